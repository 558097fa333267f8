//! The kgpatch demo target and its load generator.
//!
//! **Owns:** the demo key-value server in C (`server/`, built by `build.rs` in two variants,
//! with and without frame pointers), [`DemoServer`] (spawn one, talk to it, kill it on drop),
//! [`Client`] and [`Stats`] for its line protocol, and the closed-loop load generator
//! ([`load::run`], also the `kvload` binary). The sample patch modules for this server will
//! live here too (`patches/`).
//!
//! **Must not touch:** kgpatch itself. Nothing here knows about patching: the server is an
//! ordinary program, and tests that patch it load the agent into it through
//! [`ServerOptions::env`] (`LD_PRELOAD`). The functions a patch replaces are listed in the
//! crate README and in `server/kvserver.h`.
//!
//! # The server in one paragraph
//! `kvserver [--port P] [--workers N] [--transcode-pause-us US]
//! [--install-noop-handler SIGNO[:norestart]]... [--block-signals-in-workers] [--churn N]`
//! listens on 127.0.0.1, prints `LISTENING <port>`, and answers `PING`, `SET k v`, `GET k`,
//! `DEL k`, `INCR k n`, `STATS`, `SLOW ms`, `CANCEL ms`, `QUIT`, `SHUTDOWN`, one line each. It has a planted bug (`INCR k -5` adds 5,
//! fixed by replacing the static `kv_parse_amount`) and a checked two-function invariant
//! (every request line goes through `kv_transcode`, which calls `kv_encode` then `kv_decode`
//! and counts a violation when the round trip differs).

#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

mod client;
mod error;
pub mod load;
mod server;
pub mod sys;

use std::path::Path;

pub use client::{Client, Stats};
pub use error::Error;
pub use server::{DemoServer, ServerOptions};

/// How the demo server was compiled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Variant {
    /// `-O2 -g -fno-omit-frame-pointer -mno-omit-leaf-frame-pointer`: every function keeps
    /// `rbp` as a frame pointer.
    FramePointers,
    /// `-O2 -g -fomit-frame-pointer` (gcc's default, what Debian packages use): stacks can
    /// only be walked with the DWARF CFI in `.eh_frame`.
    NoFramePointers,
}

impl Variant {
    /// Both variants, frame pointers first.
    pub const ALL: [Variant; 2] = [Variant::FramePointers, Variant::NoFramePointers];

    /// A short name for messages and test labels: `fp` or `nofp`.
    pub fn name(self) -> &'static str {
        match self {
            Variant::FramePointers => "fp",
            Variant::NoFramePointers => "nofp",
        }
    }
}

/// The path of the built server executable of `variant` (PIE, not stripped).
pub fn server_path(variant: Variant) -> &'static Path {
    match variant {
        Variant::FramePointers => Path::new(env!("KGPATCH_DEMO_SERVER")),
        Variant::NoFramePointers => Path::new(env!("KGPATCH_DEMO_SERVER_NOFP")),
    }
}

/// The server's source folder; patch modules include `kvserver.h` from it.
pub fn server_source_dir() -> &'static Path {
    Path::new(env!("KGPATCH_DEMO_SERVER_SRC"))
}

/// The generated `kvserver_syms.h`: for each patch target the size and FNV-1a-64 checksum
/// of its body (`KVSYM_SIZE(kv_encode)`, `KVSYM_FNV(kv_parse_amount__proto_c)`) and
/// `KVSYM_BUILD_ID`, for `kvserver-fp`, or for `kvserver-nofp` when the patch is compiled
/// with `-DKV_TARGET_NOFP`.
pub fn server_symbols_header() -> &'static Path {
    Path::new(env!("KGPATCH_DEMO_SYMS_H"))
}
