//! `kvserver`: runs the built demo server in place (exec, so the pid stays the same and
//! `kgpatch apply <pid>` can target it).
//!
//! ```text
//! kvserver [--variant fp|nofp] [--print-path] [--print-patch NAME] [server options...]
//! ```
//! `--variant` picks the build (default `fp`, frame pointers; `nofp` is Debian-style);
//! `--print-path` prints the executable's path and exits; `--print-patch NAME` prints the
//! path of the sample patch module `NAME` built for that variant (`fix-incr`, `codec-v2`,
//! `codec-pair-only`, `slow-path`, `wrong-target`, `missing-library`) and exits; every
//! other argument goes to the
//! server (`--port P`, `--workers N`, `--transcode-pause-us US`,
//! `--install-noop-handler SIGNO[:norestart]`).

#![deny(unsafe_code)]

use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

use kgpatch_examples::{patch_path, server_path, Patch, Variant};

fn main() -> ExitCode {
    let mut variant = Variant::FramePointers;
    let mut print = false;
    let mut print_patch = None;
    let mut rest = Vec::new();
    let mut args = std::env::args_os().skip(1);
    while let Some(a) = args.next() {
        match a.to_str() {
            Some("--variant") => match args.next().as_ref().and_then(|v| v.to_str()) {
                Some("fp") => variant = Variant::FramePointers,
                Some("nofp") => variant = Variant::NoFramePointers,
                other => {
                    eprintln!("kvserver: --variant wants fp or nofp, not {other:?}");
                    return ExitCode::from(2);
                }
            },
            Some("--print-path") => print = true,
            Some("--print-patch") => match args.next().as_ref().and_then(|v| v.to_str()) {
                Some(name) if Patch::from_name(name).is_some() => {
                    print_patch = Patch::from_name(name)
                }
                other => {
                    let names: Vec<&str> = Patch::ALL.iter().map(|p| p.name()).collect();
                    eprintln!(
                        "kvserver: --print-patch wants one of {}, not {other:?}",
                        names.join(", ")
                    );
                    return ExitCode::from(2);
                }
            },
            _ => rest.push(a),
        }
    }
    if let Some(p) = print_patch {
        println!("{}", patch_path(p, variant).display());
        return ExitCode::SUCCESS;
    }
    let path = server_path(variant);
    if print {
        println!("{}", path.display());
        return ExitCode::SUCCESS;
    }
    let err = Command::new(path).args(rest).exec();
    eprintln!("kvserver: cannot run {}: {err}", path.display());
    ExitCode::from(1)
}
