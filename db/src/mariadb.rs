//! `mariadbd` on a throw-away data directory: `mariadb-install-db`, then the server with
//! `--no-defaults` (nothing from /etc/mysql), a Unix socket in that directory and no TCP
//! port (`--skip-networking`: parallel tests never collide), stopped with SIGTERM — the
//! server's own clean shutdown — and waited for.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::{require, run, Error};

/// How the server runs its connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadHandling {
    /// One thread per connection (the default).
    OnePerConnection,
    /// `thread_handling=pool-of-threads`: a pool of workers serves every connection.
    Pool,
}

/// How to start a [`MariaDb`].
#[derive(Clone, Debug)]
pub struct MariaDbOptions {
    /// Connection handling.
    pub threads: ThreadHandling,
    /// Extra environment (e.g. `LD_PRELOAD` of the agent, `KGPATCH_RUNTIME_DIR`).
    pub env: Vec<(OsString, OsString)>,
    /// How long the server may take to come up.
    pub startup: Duration,
}

impl Default for MariaDbOptions {
    fn default() -> MariaDbOptions {
        MariaDbOptions {
            threads: ThreadHandling::OnePerConnection,
            env: Vec::new(),
            startup: Duration::from_secs(60),
        }
    }
}

impl MariaDbOptions {
    /// Adds an environment variable of the server.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
}

/// A running `mariadbd` on its own data directory, stopped and removed when dropped.
#[derive(Debug)]
pub struct MariaDb {
    dir: PathBuf,
    child: Option<Child>,
}

/// The server's program.
pub const MARIADBD: &str = "/usr/sbin/mariadbd";

impl MariaDb {
    /// Creates a data directory and starts the server on it; returns once it accepts
    /// connections.
    pub fn start(opts: &MariaDbOptions) -> Result<MariaDb, Error> {
        require()?;
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kgpatch-mariadb-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
        let mut db = MariaDb { dir, child: None };
        let datadir = db.dir.join("data");
        let mut install = Command::new("/usr/bin/mariadb-install-db");
        install
            .arg("--no-defaults")
            .arg(format!("--datadir={}", datadir.display()))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"]);
        if as_root() {
            install.arg("--user=root");
        }
        run("mariadb-install-db", &mut install)?;

        let mut cmd = Command::new(MARIADBD);
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", datadir.display()))
            .arg(format!("--socket={}", db.socket().display()))
            .arg(format!(
                "--pid-file={}",
                db.dir.join("mariadbd.pid").display()
            ))
            .arg(format!("--log-error={}", db.log().display()))
            .args([
                "--skip-networking",
                "--skip-log-bin",
                "--innodb-buffer-pool-size=128M",
                "--innodb-log-file-size=64M",
                "--max-connections=256",
            ]);
        if opts.threads == ThreadHandling::Pool {
            cmd.arg("--thread-handling=pool-of-threads");
        }
        if as_root() {
            cmd.arg("--user=root");
        }
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        db.child = Some(cmd.spawn().map_err(|source| Error::Io {
            what: "starting mariadbd".into(),
            source,
        })?);
        db.wait_ready(opts.startup)?;
        Ok(db)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Err(Error::Timeout {
                    what: format!("mariadbd exited during startup ({status})"),
                    log: self.log(),
                });
            }
            if self.socket().exists() && self.sql("SELECT 1").is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: format!("mariadbd did not accept connections within {timeout:?}"),
                    log: self.log(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The server's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Its Unix socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("mysqld.sock")
    }

    /// Its error log.
    pub fn log(&self) -> PathBuf {
        self.dir.join("error.log")
    }

    /// Its throw-away directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs SQL as root with the `mariadb` client (`-N -B`: tab-separated rows, no
    /// header); its output.
    pub fn sql(&self, query: &str) -> Result<String, Error> {
        run(
            &format!("mariadb -e {query:?}"),
            Command::new("/usr/bin/mariadb")
                .arg("--no-defaults")
                .arg(format!("--socket={}", self.socket().display()))
                .args(["-uroot", "-N", "-B", "-e", query])
                .stdin(Stdio::null()),
        )
    }

    /// `Some(status)` once the server has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, Error> {
        match self.child.as_mut() {
            None => Ok(None),
            Some(c) => c.try_wait().map_err(|source| Error::Io {
                what: "waiting for mariadbd".into(),
                source,
            }),
        }
    }

    /// `true` while the server runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }

    /// Shuts the server down with SIGTERM (its clean shutdown) and waits up to `timeout`;
    /// its exit status. A server that does not stop in time is killed and reported.
    pub fn stop(&mut self, timeout: Duration) -> Result<ExitStatus, Error> {
        let Some(mut child) = self.child.take() else {
            return Err(Error::Timeout {
                what: "mariadbd was already stopped".into(),
                log: self.log(),
            });
        };
        terminate(child.id());
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Error::Timeout {
                        what: format!("mariadbd did not shut down within {timeout:?} of SIGTERM"),
                        log: self.log(),
                    });
                }
            }
        }
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop(Duration::from_secs(60));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `true` when this process runs as root (`/proc/self` belongs to the effective uid), as CI
/// does: the server then needs `--user=root`.
fn as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Sends SIGTERM to `pid` (with kill(1): no unsafe for one signal).
fn terminate(pid: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}
