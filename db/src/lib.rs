//! Real database servers, run by kgpatch's tests and bench: Debian's `mariadbd` under
//! `sysbench`, each on a throw-away data directory with its own socket, stopped (and waited
//! for) when dropped.
//!
//! **Owns:** starting and stopping the servers and their benchmark clients, parsing what
//! they print, building the patch modules for them (`patches/`).
//! **Must not touch:** kgpatch's internals: it drives the `kgpatch` binary like an operator.
//!
//! The servers come from Debian's packages (`apt-get install mariadb-server sysbench`;
//! `.ci/run` installs them). [`require`] says what to install when one is missing.

#![deny(missing_docs)]
#![deny(unsafe_code)]

mod mariadb;
mod patch;
mod sysbench;

pub use mariadb::{MariaDb, MariaDbOptions, ThreadHandling, MARIADBD};
pub use patch::{build_patch, describe, Described};
pub use sysbench::{Sysbench, SysbenchReport};

use std::path::PathBuf;

/// What can go wrong running a database harness.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A program the harness needs is not installed.
    #[error("{program} is not installed: run `apt-get install {package}` (.ci/run does)")]
    Missing {
        /// The program looked for.
        program: &'static str,
        /// The Debian package that has it.
        package: &'static str,
    },
    /// A program could not be started or waited for.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A program ran and failed.
    #[error("{what} failed ({status}):\n{output}")]
    Failed {
        /// What was run.
        what: String,
        /// How it ended.
        status: String,
        /// What it printed (stderr, then stdout).
        output: String,
    },
    /// The server did not come up or go down in time.
    #[error("{what} (log {log})")]
    Timeout {
        /// What did not happen.
        what: String,
        /// The server's error log.
        log: PathBuf,
    },
    /// Output the harness could not read.
    #[error("cannot read {what} from: {output}")]
    Parse {
        /// What was looked for.
        what: &'static str,
        /// The text.
        output: String,
    },
}

/// Fails with [`Error::Missing`] unless every program of the MariaDB harness is installed.
pub fn require() -> Result<(), Error> {
    for (program, package) in [
        ("/usr/sbin/mariadbd", "mariadb-server"),
        ("/usr/bin/mariadb-install-db", "mariadb-server"),
        ("/usr/bin/mariadb", "mariadb-client"),
        ("/usr/bin/sysbench", "sysbench"),
    ] {
        if !std::path::Path::new(program).exists() {
            return Err(Error::Missing { program, package });
        }
    }
    Ok(())
}

/// Runs `cmd` to completion; its stdout, or [`Error::Failed`] with what it printed.
pub(crate) fn run(what: &str, cmd: &mut std::process::Command) -> Result<String, Error> {
    let out = cmd.output().map_err(|source| Error::Io {
        what: format!("starting {what}"),
        source,
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(Error::Failed {
            what: what.to_owned(),
            status: out.status.to_string(),
            output: format!("{}{stdout}", String::from_utf8_lossy(&out.stderr)),
        });
    }
    Ok(stdout)
}
