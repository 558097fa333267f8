//! `kvserver`: runs the built demo server in place (exec, so the pid stays the same and
//! `kgpatch apply <pid>` can target it).
//!
//! ```text
//! kvserver [--variant fp|nofp] [--print-path] [server options...]
//! ```
//! `--variant` picks the build (default `fp`, frame pointers; `nofp` is Debian-style);
//! `--print-path` prints the executable's path and exits; every other argument goes to the
//! server (`--port P`, `--workers N`, `--transcode-pause-us US`,
//! `--install-noop-handler SIGNO[:norestart]`).

use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

use kgpatch_examples::{server_path, Variant};

fn main() -> ExitCode {
    let mut variant = Variant::FramePointers;
    let mut print = false;
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
            _ => rest.push(a),
        }
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
