//! `kgpatch attach <pid>` and `apply --attach`: the agent injected into a process that was
//! started without it (`kgpatch-attach` does the injection; this module finds the agent
//! library, names the runtime directory the CLI will look in, and prints what happened).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use kgpatch_attach::{AttachError, AttachOptions, AttachReport, AGENT_FILE_NAME};
use kgpatch_protocol::{runtime_dir, uid_of, Client, ClientError};

use crate::client::{exit, Exit};

/// Where the agent library is: `$KGPATCH_AGENT_SO`, else next to this `kgpatch` binary
/// (the build tree, or the package's `/usr/lib/kgpatch` beside `/usr/lib/kgpatch/kgpatch`),
/// else `/usr/lib/kgpatch/`, `/usr/local/lib/kgpatch/`.
pub fn agent_library() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("KGPATCH_AGENT_SO").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return std::fs::canonicalize(&p).map_err(|e| {
            usage(format!(
                "KGPATCH_AGENT_SO names {}, which cannot be read ({e}); point it at libkgpatch_agent.so",
                p.display()
            ))
        });
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(AGENT_FILE_NAME)));
    let candidates = beside.into_iter().chain(
        ["/usr/lib/kgpatch", "/usr/local/lib/kgpatch"]
            .iter()
            .map(|d| Path::new(d).join(AGENT_FILE_NAME)),
    );
    for c in candidates {
        if let Ok(p) = std::fs::canonicalize(&c) {
            return Ok(p);
        }
    }
    Err(usage(format!(
        "cannot find {AGENT_FILE_NAME} next to kgpatch or in /usr/lib/kgpatch; set KGPATCH_AGENT_SO to its path"
    )))
}

fn usage(message: String) -> anyhow::Error {
    Exit {
        code: exit::FAILED,
        kind: "failed",
        message,
    }
    .into()
}

/// Injects the agent into `pid` unless it already runs one. The report, or an [`Exit`]:
/// `UNREACHABLE` for a process that does not exist, `FAILED` for every refusal (the
/// target as it was) and for a failure the injector could not undo (said loudly).
pub fn inject(pid: u32, timeout: Duration) -> Result<AttachReport> {
    let uid = uid_of(pid).ok_or_else(|| Exit {
        code: exit::UNREACHABLE,
        kind: "unreachable",
        message: format!("no process with pid {pid}"),
    })?;
    let mut opts = AttachOptions::new(agent_library()?);
    // The directory this CLI will look in: the agent is told, whatever its own
    // environment says.
    opts.runtime_dir = Some(runtime_dir(uid));
    opts.timeout = timeout;
    kgpatch_attach::attach(pid as i32, &opts).map_err(|e| {
        let code = match e {
            AttachError::NoSuchProcess { .. } | AttachError::TargetExited { .. } => {
                exit::UNREACHABLE
            }
            _ => exit::FAILED,
        };
        Exit {
            code,
            kind: if code == exit::UNREACHABLE {
                "unreachable"
            } else {
                "attach_refused"
            },
            message: e.to_string(),
        }
        .into()
    })
}

/// `kgpatch attach <pid>`.
pub fn attach(pid: u32, timeout: Duration, json: bool) -> Result<u8> {
    if agent_answers(pid) {
        return already(pid, json);
    }
    let report = inject(pid, timeout)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report_json(&report))?);
    } else {
        println!("{}", describe(&report));
    }
    Ok(exit::OK)
}

/// For `apply --attach`: attaches first when `pid` runs no agent (saying so on stderr).
pub fn ensure_agent(pid: u32, timeout: Duration) -> Result<()> {
    match Client::for_pid(pid).and_then(|c| c.status().map(|_| ())) {
        Err(ClientError::NoAgent { .. }) => {
            let report = inject(pid, timeout)?;
            eprintln!("kgpatch: {}", describe(&report));
            Ok(())
        }
        // Anything else (an agent, or an error the apply will report) goes on.
        _ => Ok(()),
    }
}

fn agent_answers(pid: u32) -> bool {
    Client::for_pid(pid).is_ok_and(|c| c.status().is_ok())
}

fn already(pid: u32, json: bool) -> Result<u8> {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "pid": pid, "already": true }))?
        );
    } else {
        println!("process {pid} already runs the kgpatch agent; nothing done");
    }
    Ok(exit::OK)
}

fn describe(r: &AttachReport) -> String {
    if r.already {
        return format!(
            "process {} already runs the kgpatch agent; nothing done",
            r.pid
        );
    }
    let within = match r.syscall {
        Some(nr) => format!("asleep in syscall {nr}"),
        None => "running".to_owned(),
    };
    let left = match r.bootstrap_left {
        Some(at) => format!(
            "; the 64 KiB bootstrap mapping at {at:#x} stays (its thread did not unmap it in time)"
        ),
        None => String::new(),
    };
    format!(
        "attached the agent to process {} in {:.1} ms: thread {} ({within}) paused {:.2} ms, \
         the other {} threads ran on{left}",
        r.pid,
        r.total.as_secs_f64() * 1e3,
        r.tid,
        r.pause.as_secs_f64() * 1e3,
        r.threads.saturating_sub(1)
    )
}

fn report_json(r: &AttachReport) -> serde_json::Value {
    serde_json::json!({
        "pid": r.pid,
        "already": r.already,
        "tid": r.tid,
        "syscall": r.syscall,
        "pause_us": r.pause.as_micros() as u64,
        "total_us": r.total.as_micros() as u64,
        "threads": r.threads,
        "bootstrap_left": r.bootstrap_left,
    })
}
