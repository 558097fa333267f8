//! `kgpatch`: the command-line client of the in-process agent.
//!
//! **Owns:** argument parsing, the exit-code policy, human and JSON output. It talks to an
//! agent only through `kgpatch-protocol`'s client and links no agent runtime; `attach` (and
//! `apply --attach`) load the agent through `kgpatch-attach`.
//! **Must not touch:** the target process other than through the agent's socket and
//! `kgpatch-attach`.
//!
//! # Exit codes
//! | code | meaning |
//! |-----:|---------|
//! | 0  | success (with `--no-wait`: the transition began) |
//! | 1  | the operation failed (the agent's `internal` class, a local failure), or a transition completed but a site's bytes could not be written back (each problem is printed) |
//! | 2  | bad usage |
//! | 3  | the process or its agent cannot be reached |
//! | 4  | the transition did not complete (reversed, `--keep-pending` left it pending at its deadline, or `force` could not move every thread) |
//! | 5  | `busy`: another transition is in progress |
//! | 6  | `bad_module`: the patch module is unusable (format, target, symbols, checksums) |
//! | 7  | `unpatchable`: a function cannot be patched |
//! | 8  | `vetoed`: the module's pre-apply or pre-revert callback said no |
//! | 9  | `no_such_patch`: no such patch, or not on top of the stack |
//! | 10 | `no_transition`: no transition is in progress |
//! | 11 | `bad_request`: the agent refused the request itself (protocol version, or a user that may not control it) |
//!
//! Codes 5-11 are the agent's refusals, one per error class; the target is as it was. With
//! `--json`, a failed command prints `{"error": {"kind", "message", "exit_code"}}` on stdout
//! (`kgpatch_protocol::CommandError`), `kind` being the class name, `unreachable` or
//! `failed`.

#![deny(unsafe_code)]

mod attach;
mod client;
mod render;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kgpatch_protocol::{
    AgentProcess, Client, CommandError, OnTimeout, OutcomeKind, Request, Response, Status, Timeouts,
};

use client::{exit, refused, request, status_of, Exit};

/// Live patching for running Linux x86-64 processes, one thread at a time.
#[derive(Parser, Debug)]
#[command(name = "kgpatch", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How `apply` and `revert` run their transition.
#[derive(clap::Args, Debug)]
struct TransitionArgs {
    /// Deadline for every thread to move, e.g. 30s, 500ms, 2m.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,
    /// At the deadline, leave the transition pending instead of reversing it.
    #[arg(long)]
    keep_pending: bool,
    /// BASELINE FOR BENCHMARKS ONLY: halt every thread at once (stop-the-world) instead of
    /// moving them one by one.
    #[arg(long)]
    stop_the_world: bool,
    /// Return as soon as the transition began.
    #[arg(long)]
    no_wait: bool,
    /// Print the final status as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Apply a patch module to a running process and watch every thread move to it.
    Apply {
        /// The process.
        pid: u32,
        /// The patch module (.so).
        module: PathBuf,
        /// If the process runs no agent, attach one first (as `kgpatch attach` does).
        #[arg(long)]
        attach: bool,
        #[command(flatten)]
        how: TransitionArgs,
    },
    /// Load the agent into a running process that was started without it. One thread is
    /// paused for about a millisecond; every other thread runs on. A no-op (that says so)
    /// when the process already runs the agent.
    Attach {
        /// The process.
        pid: u32,
        /// Bound on every wait of the injection.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        timeout: Duration,
        /// JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revert a patch (the most recent one first), the same way it went in.
    Revert {
        /// The process.
        pid: u32,
        /// The patch's name (see `kgpatch list`).
        patch: String,
        #[command(flatten)]
        how: TransitionArgs,
    },
    /// Show the patch stack and the transition in progress.
    Status {
        /// The process.
        pid: u32,
        /// Keep showing it until the transition ends (Ctrl-C to stop).
        #[arg(long)]
        watch: bool,
        /// JSON, stable for scripts.
        #[arg(long)]
        json: bool,
    },
    /// List the applied patches.
    List {
        /// The process.
        pid: u32,
        /// JSON.
        #[arg(long)]
        json: bool,
    },
    /// Move the remaining threads without a stack check (loudly unsafe). Names the threads it
    /// cannot move (those blocking the migration signal); exit 4 if any remain.
    Force {
        /// The process.
        pid: u32,
    },
    /// DANGEROUS: unmap a reverted patch module. The program may still hold pointers into
    /// it (string constants, function pointers, callbacks the module's code registered);
    /// using one afterwards crashes the process.
    ///
    /// A reverted module stays mapped by default (`kgpatch status` lists it with its size),
    /// as Linux livepatch modules stay loaded until unloaded on purpose. Unload it only when
    /// you know the program keeps nothing of it. Refused while the patch is applied or any
    /// transition is in progress.
    Unload {
        /// The process.
        pid: u32,
        /// The patch's name (see `kgpatch status`, "reverted modules still mapped").
        patch: String,
    },
    /// List processes that run a kgpatch agent, and how it came in (and remove stale
    /// sockets of processes that are gone).
    Ps {
        /// JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print what a patch module needs to name a function of a target: its size and
    /// checksum, as the KGPATCH_REPLACE macros (C) and `replace!` (Rust) take them.
    Describe {
        /// The target executable or library file.
        target: PathBuf,
        /// The function's symbol: its ELF name (mangled for C++), or a demangled C++ name
        /// with parameters (`ns::C::f(int)`, one overload) or without (`ns::C::f`, all).
        /// Symbols come from `.symtab`, else a separate debug file (by build-id or
        /// `.gnu_debuglink` under `KGPATCH_DEBUG_DIRS`, default `/usr/lib/debug`), else
        /// `.dynsym`; each line says which.
        symbol: String,
        /// For a static function: its source file (the STT_FILE symbol, e.g. `server.c`).
        #[arg(long)]
        file: Option<String>,
        /// JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a patch module's manifest without loading it.
    Inspect {
        /// The module.
        module: PathBuf,
        /// JSON.
        #[arg(long)]
        json: bool,
    },
}

impl Command {
    /// `--json` was given: errors are printed as JSON on stdout too.
    fn json(&self) -> bool {
        match self {
            Command::Apply { how, .. } | Command::Revert { how, .. } => how.json,
            Command::Status { json, .. }
            | Command::List { json, .. }
            | Command::Ps { json }
            | Command::Attach { json, .. }
            | Command::Describe { json, .. }
            | Command::Inspect { json, .. } => *json,
            Command::Force { .. } | Command::Unload { .. } => false,
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 30s, 500ms or 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("`{s}`: the unit must be ms, s or m")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("`{s}` is out of range"))
}

/// Dies quietly on a closed pipe (`kgpatch status | head`), as command-line tools do,
/// instead of panicking on the failed write.
#[allow(unsafe_code)]
fn default_sigpipe() {
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

/// This process's effective uid.
#[allow(unsafe_code)]
fn euid() -> u32 {
    // SAFETY: geteuid takes nothing and cannot fail.
    unsafe { libc::geteuid() }
}

fn main() -> ExitCode {
    default_sigpipe();
    let cli = Cli::parse();
    let json = cli.command.json();
    match run(cli.command) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let (code, kind) = e
                .downcast_ref::<Exit>()
                .map_or((exit::FAILED, "failed"), |x| (x.code, x.kind));
            eprintln!("kgpatch: {e:#}");
            if json {
                let error = CommandError {
                    kind: kind.into(),
                    message: format!("{e:#}"),
                    exit_code: code,
                };
                if let Ok(text) =
                    serde_json::to_string_pretty(&serde_json::json!({ "error": error }))
                {
                    println!("{text}");
                }
            }
            ExitCode::from(code)
        }
    }
}

fn print_json(s: &Status) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(s)?);
    Ok(())
}

fn unexpected(other: &Response) -> anyhow::Error {
    anyhow::anyhow!("unexpected answer from the agent: {other:?}")
}

fn run(command: Command) -> Result<u8> {
    match command {
        Command::Apply {
            pid,
            module,
            attach: attach_first,
            how,
        } => {
            if attach_first {
                attach::ensure_agent(pid, Duration::from_secs(10))?;
            }
            apply(pid, &module, &how)
        }
        Command::Attach { pid, timeout, json } => attach::attach(pid, timeout, json),
        Command::Revert { pid, patch, how } => revert(pid, patch, &how),
        Command::Status { pid, watch, json } => status(pid, watch, json),
        Command::List { pid, json } => list(pid, json),
        Command::Force { pid } => force(pid),
        Command::Unload { pid, patch } => unload(pid, patch),
        Command::Ps { json } => ps(json),
        Command::Describe {
            target,
            symbol,
            file,
            json,
        } => describe(&target, &symbol, file.as_deref(), json),
        Command::Inspect { module, json } => inspect(&module, json),
    }
}

fn apply(pid: u32, module: &std::path::Path, how: &TransitionArgs) -> Result<u8> {
    let module = std::fs::canonicalize(module)
        .with_context(|| format!("cannot read the patch module {}", module.display()))?;
    let req = Request::Apply {
        module,
        timeout_ms: Some(how.timeout.as_millis() as u64),
        on_timeout: on_timeout(how.keep_pending),
        stop_the_world: how.stop_the_world,
    };
    transition(pid, req, how.no_wait, how.json)
}

fn revert(pid: u32, patch: String, how: &TransitionArgs) -> Result<u8> {
    let req = Request::Revert {
        patch,
        timeout_ms: Some(how.timeout.as_millis() as u64),
        on_timeout: on_timeout(how.keep_pending),
        stop_the_world: how.stop_the_world,
    };
    transition(pid, req, how.no_wait, how.json)
}

fn status(pid: u32, watch: bool, json: bool) -> Result<u8> {
    if watch {
        return watch_until_done(pid, None, json);
    }
    let s = status_of(pid)?;
    if json {
        print_json(&s)?;
    } else {
        print!("{}", render::status(&s));
    }
    Ok(exit::OK)
}

fn list(pid: u32, json: bool) -> Result<u8> {
    let s = status_of(pid)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s.patches)?);
    } else {
        print!("{}", render::patches(&s));
    }
    Ok(exit::OK)
}

fn force(pid: u32) -> Result<u8> {
    match request(pid, &Request::Force)? {
        Response::Forced {
            t,
            completed,
            moved,
            unmoved,
        } => {
            eprint!("{}", render::forced(t, completed, moved, &unmoved));
            Ok(if completed || unmoved.is_empty() {
                exit::OK
            } else {
                exit::INCOMPLETE
            })
        }
        Response::Error { kind, message } => Err(refused(kind, message)),
        other => Err(unexpected(&other)),
    }
}

fn unload(pid: u32, patch: String) -> Result<u8> {
    match request(pid, &Request::Unload { patch })? {
        Response::Unloaded {
            patch,
            module,
            mapped_bytes,
        } => {
            eprintln!("kgpatch: WARNING: module of patch {patch} ({}, {mapped_bytes} bytes) unmapped: any pointer the program still holds into it now crashes the process", module.display());
            Ok(exit::OK)
        }
        Response::Error { kind, message } => Err(refused(kind, message)),
        other => Err(unexpected(&other)),
    }
}

fn describe(target: &std::path::Path, symbol: &str, file: Option<&str>, json: bool) -> Result<u8> {
    let found = kgpatch_kmod::describe_symbol(target, symbol, file)
        .with_context(|| format!("cannot describe `{symbol}` in {}", target.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&found)?);
        return Ok(exit::OK);
    }
    if found.is_empty() {
        anyhow::bail!("no symbol `{symbol}` in {}", target.display());
    }
    for d in &found {
        let checksum = d
            .checksum
            .map_or("0 /* no file bytes */".into(), |c| format!("{c:#018x}ULL"));
        let file = d.file.as_deref().unwrap_or("");
        let source = match &d.debug_file {
            Some(p) => format!("debug file {}", p.display()),
            None => d.table.section_name().to_owned(),
        };
        println!(
            "{} {}#{} at {:#x}: size {} checksum {} (from {source})",
            d.name, file, d.index, d.address, d.size, checksum
        );
        if let Some(demangled) = &d.demangled {
            println!("  demangled: {demangled}");
        }
        if let Some(base) = &d.clone_of {
            println!(
                "  compiler clone of {base}: its callers call it directly; patch it by this name"
            );
        }
        for p in &d.parts {
            println!(
                "  split piece {} at {:#x}: size {} (part of this function: patched and checked with it)",
                p.name, p.address, p.size
            );
        }
        let nth = found.iter().filter(|o| o.name == d.name).count() > 1;
        if nth {
            println!(
                "  KGPATCH_REPLACE_NTH(\"{}\", {}, {}, new_fn, {}, {});",
                d.name,
                d.file
                    .as_ref()
                    .map_or("\"\"".into(), |f| format!("\"{f}\"")),
                d.index,
                d.size,
                checksum
            );
        } else if file.is_empty() {
            println!(
                "  KGPATCH_REPLACE(\"{}\", new_fn, {}, {});",
                d.name, d.size, checksum
            );
        } else {
            println!(
                "  KGPATCH_REPLACE_LOCAL(\"{}\", \"{}\", new_fn, {}, {});",
                d.name, file, d.size, checksum
            );
        }
    }
    Ok(exit::OK)
}

fn inspect(module: &std::path::Path, json: bool) -> Result<u8> {
    let m = kgpatch_kmod::inspect(module)
        .with_context(|| format!("{} is not a usable patch module", module.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&m)?);
    } else {
        print!("{m}");
    }
    Ok(exit::OK)
}

fn on_timeout(keep_pending: bool) -> OnTimeout {
    if keep_pending {
        OnTimeout::Pending
    } else {
        OnTimeout::Reverse
    }
}

fn transition(pid: u32, req: Request, no_wait: bool, json: bool) -> Result<u8> {
    let t = match request(pid, &req)? {
        Response::Started { t, kind, patch } => {
            if !json {
                let kind = match kind {
                    kgpatch_protocol::Kind::Apply => "apply",
                    kgpatch_protocol::Kind::Revert => "revert",
                };
                eprintln!("kgpatch: transition {t} began ({kind} {patch})");
            }
            t
        }
        Response::Reversed { t } => {
            if !json {
                eprintln!("kgpatch: transition {t} (still applying) is being reversed");
            }
            t
        }
        Response::Error { kind, message } => return Err(refused(kind, message)),
        other => return Err(unexpected(&other)),
    };
    if no_wait {
        return Ok(exit::OK);
    }
    watch_until_done(pid, Some(t), json)
}

/// Shows progress until transition `t` (or the one in progress) ends; the exit code says how.
fn watch_until_done(pid: u32, t: Option<u64>, json: bool) -> Result<u8> {
    let tty = std::io::stderr().is_terminal() && !json;
    let mut last_print = Instant::now() - Duration::from_secs(10);
    let mut watched = t;
    loop {
        let s = status_of(pid)?;
        match (&s.transition, watched) {
            (Some(tr), w) if w.is_none_or(|w| w == tr.t) => {
                watched = Some(tr.t);
                if tr.left_pending {
                    // --keep-pending: the deadline passed and the transition stays.
                    if tty {
                        eprintln!();
                    }
                    if json {
                        print_json(&s)?;
                    } else {
                        print!("{}", render::transition(tr));
                        eprintln!("kgpatch: the deadline passed; transition {} is left pending: `kgpatch force {pid}` completes it, `kgpatch revert {pid} {}` turns it around", tr.t, tr.patch);
                    }
                    return Ok(exit::INCOMPLETE);
                }
                if tty {
                    eprint!("\r\x1b[2K{}", render::progress_line(tr));
                } else if !json && last_print.elapsed() >= Duration::from_secs(1) {
                    eprint!("{}", render::transition(tr));
                    last_print = Instant::now();
                }
            }
            _ => {
                if tty {
                    eprintln!();
                }
                if json {
                    print_json(&s)?;
                }
                let Some(w) = watched else {
                    if !json {
                        print!("{}", render::status(&s));
                    }
                    return Ok(exit::OK);
                };
                return match s.last.filter(|o| o.t == w) {
                    Some(o) => {
                        if !json {
                            println!("{}", render::outcome(&o));
                        }
                        for p in &o.problems {
                            eprintln!("kgpatch: {p}");
                        }
                        Ok(match o.result {
                            // Every thread moved, but something could not be written back.
                            _ if !o.problems.is_empty() => exit::FAILED,
                            OutcomeKind::Completed => exit::OK,
                            OutcomeKind::Reversed => exit::INCOMPLETE,
                        })
                    }
                    None => Ok(exit::INCOMPLETE),
                };
            }
        }
        std::thread::sleep(Duration::from_millis(if tty { 100 } else { 50 }));
    }
}

/// The runtime directories this user can see: its own, and every `/tmp/kgpatch-*` for root.
fn runtime_dirs(me: u32) -> Vec<PathBuf> {
    let mut dirs = vec![kgpatch_protocol::runtime_dir(me)];
    if me == 0 {
        if let Ok(rd) = std::fs::read_dir("/tmp") {
            dirs.extend(
                rd.filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().starts_with("kgpatch-"))
                    .map(|e| e.path()),
            );
        }
    }
    dirs.sort();
    dirs.dedup();
    dirs
}

/// The processes with a socket in `dir`, each asked how its agent came in.
fn processes_in(dir: &std::path::Path) -> Vec<AgentProcess> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let quick = Timeouts {
        connect: Duration::from_millis(500),
        write: Duration::from_millis(500),
        read: Duration::from_secs(2),
    };
    let mut found = Vec::new();
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_suffix(".sock")
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(comm) = kgpatch_sys::proc::comm(kgpatch_sys::proc::Pid::Other(pid as i32)) else {
            continue; // a socket left by a process that is gone
        };
        let agent = Client::at(e.path())
            .with_timeouts(quick)
            .status()
            .ok()
            .and_then(|s| s.agent);
        found.push(AgentProcess {
            pid,
            command: comm.trim().to_owned(),
            socket: e.path(),
            agent,
        });
    }
    found.sort_by_key(|p| p.pid);
    found
}

/// Processes with an agent socket in the runtime directories this user can see. Stale
/// sockets in this user's own runtime directory (left by processes that are gone) are
/// removed first, and said so on stderr.
fn ps(json: bool) -> Result<u8> {
    let me = euid();
    for stale in kgpatch_protocol::prune_stale_sockets(&kgpatch_protocol::runtime_dir(me), None) {
        eprintln!(
            "kgpatch: removed {}: no agent serves it any more",
            stale.display()
        );
    }
    let found: Vec<AgentProcess> = runtime_dirs(me)
        .iter()
        .flat_map(|d| processes_in(d))
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&found)?);
        return Ok(exit::OK);
    }
    println!("{:>8}  {:<20} {:<38} socket", "pid", "command", "agent");
    for p in &found {
        println!(
            "{:>8}  {:<20} {:<38} {}",
            p.pid,
            p.command,
            render::agent(p.agent.as_ref()),
            p.socket.display()
        );
    }
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("x").is_err());
    }
}
