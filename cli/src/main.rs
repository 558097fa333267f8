//! `kgpatch`: the command-line client of the in-process agent.
//!
//! **Owns:** argument parsing, talking to an agent's control socket, human and JSON output.
//! **Must not touch:** the target process other than through the agent's socket.
//!
//! Exit codes: 0 success (with `--no-wait`: the transition began); 1 the agent refused or the
//! operation failed (the target is as it was), or a transition completed but a site's bytes
//! could not be written back (each problem is printed); 2 bad usage; 3 the process or its agent cannot
//! be reached; 4 the transition did not complete (it was reversed, or `--keep-pending` left
//! it pending at its deadline, or `force` could not move every thread).

#![deny(unsafe_code)]

mod client;
mod render;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kgpatch_agent::protocol::{OnTimeout, OutcomeKind, Request, Response, Status};

use client::{request, Exit};

const EXIT_FAILED: u8 = 1;
const EXIT_INCOMPLETE: u8 = 4;

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
        #[command(flatten)]
        how: TransitionArgs,
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
    /// List processes that run a kgpatch agent (and remove stale sockets of processes that
    /// are gone).
    Ps,
    /// Print what a patch module needs to name a function of a target: its size and
    /// checksum, as the KGPATCH_REPLACE macros (C) and `replace!` (Rust) take them.
    Describe {
        /// The target executable or library file.
        target: PathBuf,
        /// The function's symbol.
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

fn main() -> ExitCode {
    default_sigpipe();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let code = e.downcast_ref::<Exit>().map_or(EXIT_FAILED, |x| x.code);
            eprintln!("kgpatch: {e:#}");
            ExitCode::from(code)
        }
    }
}

fn refused(kind: impl std::fmt::Debug, message: String) -> anyhow::Error {
    let _ = kind;
    Exit {
        code: EXIT_FAILED,
        message,
    }
    .into()
}

fn status_of(pid: u32) -> Result<Status> {
    match request(pid, &Request::Status)? {
        Response::Status(s) => Ok(*s),
        Response::Error { kind, message } => Err(refused(kind, message)),
        other => anyhow::bail!("unexpected answer from the agent: {other:?}"),
    }
}

fn print_json(s: &Status) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(s)?);
    Ok(())
}

fn run(cli: Cli) -> Result<u8> {
    match cli.command {
        Command::Apply { pid, module, how } => {
            let module = std::fs::canonicalize(&module)
                .with_context(|| format!("cannot read the patch module {}", module.display()))?;
            let req = Request::Apply {
                module,
                timeout_ms: Some(how.timeout.as_millis() as u64),
                on_timeout: on_timeout(how.keep_pending),
                stop_the_world: how.stop_the_world,
            };
            transition(pid, req, how.no_wait, how.json)
        }
        Command::Revert { pid, patch, how } => {
            let req = Request::Revert {
                patch,
                timeout_ms: Some(how.timeout.as_millis() as u64),
                on_timeout: on_timeout(how.keep_pending),
                stop_the_world: how.stop_the_world,
            };
            transition(pid, req, how.no_wait, how.json)
        }
        Command::Status { pid, watch, json } => {
            if watch {
                return watch_until_done(pid, None, json);
            }
            let s = status_of(pid)?;
            if json {
                print_json(&s)?;
            } else {
                print!("{}", render::status(&s));
            }
            Ok(0)
        }
        Command::List { pid, json } => {
            let s = status_of(pid)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s.patches)?);
            } else {
                print!("{}", render::patches(&s));
            }
            Ok(0)
        }
        Command::Force { pid } => match request(pid, &Request::Force)? {
            Response::Forced {
                t,
                completed,
                moved,
                unmoved,
            } => {
                eprint!("{}", render::forced(t, completed, moved, &unmoved));
                Ok(if completed || unmoved.is_empty() {
                    0
                } else {
                    EXIT_INCOMPLETE
                })
            }
            Response::Error { kind, message } => Err(refused(kind, message)),
            other => anyhow::bail!("unexpected answer from the agent: {other:?}"),
        },
        Command::Unload { pid, patch } => match request(pid, &Request::Unload { patch })? {
            Response::Unloaded {
                patch,
                module,
                mapped_bytes,
            } => {
                eprintln!("kgpatch: WARNING: module of patch {patch} ({}, {mapped_bytes} bytes) unmapped: any pointer the program still holds into it now crashes the process", module.display());
                Ok(0)
            }
            Response::Error { kind, message } => Err(refused(kind, message)),
            other => anyhow::bail!("unexpected answer from the agent: {other:?}"),
        },
        Command::Ps => {
            ps();
            Ok(0)
        }
        Command::Describe {
            target,
            symbol,
            file,
            json,
        } => {
            let found = kgpatch_kmod::describe_symbol(&target, &symbol, file.as_deref())
                .with_context(|| format!("cannot describe `{symbol}` in {}", target.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&found)?);
                return Ok(0);
            }
            if found.is_empty() {
                return Err(refused(
                    (),
                    format!("no symbol `{symbol}` in {}", target.display()),
                ));
            }
            for d in &found {
                let checksum = d
                    .checksum
                    .map_or("0 /* no file bytes */".into(), |c| format!("{c:#018x}ULL"));
                let file = d.file.as_deref().unwrap_or("");
                println!(
                    "{} {}#{} at {:#x}: size {} checksum {}",
                    d.name, file, d.index, d.address, d.size, checksum
                );
                if file.is_empty() {
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
            Ok(0)
        }
        Command::Inspect { module, json } => {
            let m = kgpatch_kmod::inspect(&module)
                .with_context(|| format!("{} is not a usable patch module", module.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&m)?);
            } else {
                print!("{m}");
            }
            Ok(0)
        }
    }
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
                    kgpatch_agent::protocol::Kind::Apply => "apply",
                    kgpatch_agent::protocol::Kind::Revert => "revert",
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
        other => anyhow::bail!("unexpected answer from the agent: {other:?}"),
    };
    if no_wait {
        return Ok(0);
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
                    return Ok(EXIT_INCOMPLETE);
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
                    return Ok(0);
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
                            _ if !o.problems.is_empty() => EXIT_FAILED,
                            OutcomeKind::Completed => 0,
                            OutcomeKind::Reversed => EXIT_INCOMPLETE,
                        })
                    }
                    None => Ok(EXIT_INCOMPLETE),
                };
            }
        }
        std::thread::sleep(Duration::from_millis(if tty { 100 } else { 50 }));
    }
}

/// Processes with an agent socket in the runtime directories this user can see. Stale
/// sockets in this user's own runtime directory (left by processes that are gone) are
/// removed first, and said so on stderr.
#[allow(unsafe_code)]
fn ps() {
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    for stale in kgpatch_agent::prune_stale_sockets(&kgpatch_agent::runtime_dir(me), None) {
        eprintln!(
            "kgpatch: removed {}: no agent serves it any more",
            stale.display()
        );
    }
    let mut dirs = vec![kgpatch_agent::runtime_dir(me)];
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
    println!("{:>8}  {:<20} socket", "pid", "command");
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_suffix(".sock")
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) else {
                continue; // a socket left by a process that is gone
            };
            println!("{:>8}  {:<20} {}", pid, comm.trim(), e.path().display());
        }
    }
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
