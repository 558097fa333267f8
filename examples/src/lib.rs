//! The kgpatch demo target and its load generator.
//!
//! **Owns:** the demo key-value server in C (`server/`, built by `build.rs` in two variants,
//! with and without frame pointers), [`DemoServer`] (spawn one, talk to it, kill it on drop),
//! [`Client`] and [`Stats`] for its line protocol, the closed-loop load generator
//! ([`load::run`], also the `kvload` binary), the sample patch modules for this server
//! (`patches/*.c`, built by `build.rs`; [`patch_path`]) and [`tools`], which finds (or
//! builds) the `kgpatch` CLI and the agent library and runs them against a server.
//!
//! **Must not touch:** kgpatch's crates. The server is an ordinary program that knows
//! nothing about patching; tests load the agent into it through [`ServerOptions::env`]
//! (`LD_PRELOAD`) and drive it with the `kgpatch` binary, as an operator would. The
//! functions a patch replaces are listed in the crate README and in `server/kvserver.h`.
//!
//! # The server in one paragraph
//! `kvserver [--port P] [--workers N] [--transcode-pause-us US]
//! [--install-noop-handler SIGNO[:norestart]]... [--block-signals-in-workers] [--churn N]`
//! listens on 127.0.0.1, prints `LISTENING <port>`, and answers `PING`, `SET k v`, `GET k`,
//! `DEL k`, `INCR k n`, `STATS`, `SLOW ms`, `CANCEL ms`, `QUIT`, `SHUTDOWN`, one line each. It has a planted bug (`INCR k -5` adds 5,
//! fixed by replacing the static `kv_parse_amount`) and a checked two-function invariant
//! (every request line goes through `kv_transcode`, which calls `kv_encode` then `kv_decode`
//! and counts a violation when the round trip differs).

#![deny(unsafe_code)]
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

mod client;
mod error;
pub mod load;
mod server;
pub mod sys;
pub mod tools;

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

/// A sample patch module for the demo server (`patches/*.c`, built by `build.rs` once per
/// [`Variant`]; see the crate README).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Patch {
    /// `fix-incr`: replaces the static `kv_parse_amount` of `proto.c`, so `INCR k -5`
    /// subtracts 5 (`STATS bug_probe=-7`).
    FixIncr,
    /// `codec-v2`: a new wire format; replaces `kv_encode`, `kv_decode` **and** their common
    /// caller `kv_transcode` (`STATS codec=2`). Never trips the invariant.
    CodecV2,
    /// `codec-pair-only`: the same format change without `kv_transcode`: a thread may switch
    /// between the two calls and fail the round trip (`ERR invariant`). A negative example.
    CodecPairOnly,
    /// `slow-path`: replaces `kv_slow_path` (where `SLOW ms` parks a worker), same behaviour.
    SlowPath,
    /// `wrong-target`: `fix-incr` built for the *other* variant's binary (its build-id and
    /// checksums); `patch_path(WrongTarget, v)` is the module a server of `v` must refuse.
    WrongTarget,
    /// `missing-library`: targets `libkvmissing.so.1`, which the server never loads.
    MissingLibrary,
}

impl Patch {
    /// Every sample patch.
    pub const ALL: [Patch; 6] = [
        Patch::FixIncr,
        Patch::CodecV2,
        Patch::CodecPairOnly,
        Patch::SlowPath,
        Patch::WrongTarget,
        Patch::MissingLibrary,
    ];

    /// The patch's name, as in its manifest and for `kgpatch revert <pid> <name>`.
    pub fn name(self) -> &'static str {
        match self {
            Patch::FixIncr => "fix-incr",
            Patch::CodecV2 => "codec-v2",
            Patch::CodecPairOnly => "codec-pair-only",
            Patch::SlowPath => "slow-path",
            Patch::WrongTarget => "wrong-target",
            Patch::MissingLibrary => "missing-library",
        }
    }

    /// The patch named `name`.
    pub fn from_name(name: &str) -> Option<Patch> {
        Patch::ALL.into_iter().find(|p| p.name() == name)
    }
}

impl Variant {
    /// The variant named `name` (`fp` or `nofp`).
    pub fn from_name(name: &str) -> Option<Variant> {
        Variant::ALL.into_iter().find(|v| v.name() == name)
    }
}

/// The built module of `patch` for a server of `variant` (`<name>-<fp|nofp>.so`): compiled
/// against that binary's `kvserver_syms.h` values, except [`Patch::WrongTarget`], which
/// carries the other binary's.
pub fn patch_path(patch: Patch, variant: Variant) -> std::path::PathBuf {
    Path::new(env!("KGPATCH_DEMO_PATCH_DIR")).join(format!(
        "{}-{}.so",
        patch.name(),
        variant.name()
    ))
}

/// The source folder of the sample patches (`examples/patches`).
pub fn patch_source_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("patches")
}

/// The generated `kvserver_syms.h`: for each patch target the size and FNV-1a-64 checksum
/// of its body (`KVSYM_SIZE(kv_encode)`, `KVSYM_FNV(kv_parse_amount__proto_c)`) and
/// `KVSYM_BUILD_ID`, for `kvserver-fp`, or for `kvserver-nofp` when the patch is compiled
/// with `-DKV_TARGET_NOFP`.
pub fn server_symbols_header() -> &'static Path {
    Path::new(env!("KGPATCH_DEMO_SYMS_H"))
}
