//! `kgpatch`: the command-line client of the in-process agent.
//!
//! **Owns:** argument parsing, talking to an agent's control socket, and human/JSON output.
//! **Must not touch:** the target process other than through the agent's socket.
//!
//! Status: planned (see the end-to-end issue).

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("kgpatch: not built yet; see README.md for the status of each part");
    ExitCode::from(2)
}
