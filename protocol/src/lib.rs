//! The control protocol between the `kgpatch` command and the agent in a target process:
//! request and response types, versioning, stable error kinds, socket paths, and the one
//! client every caller uses.
//!
//! **Owns:** the wire format ([`Request`], [`Response`], one JSON object per line, each
//! carrying [`PROTOCOL_VERSION`]), the stable error classification ([`ErrorKind`]), where an
//! agent's socket lives ([`runtime_dir`], [`socket_path`], [`prune_stale_sockets`]) and the
//! synchronous [`Client`] with connect, write and read timeouts.
//!
//! **Must not touch:** the target process. This crate links into the CLI, the bench and
//! tests; it holds no agent runtime (no interposers, no signal handlers), so linking it never
//! changes how the linking program creates threads or handles signals.
//!
//! **Invariants:** the shapes here are the stable `--json` output of `kgpatch status`: fields
//! may be added in a later version (with `#[serde(default)]`, so older peers' messages still
//! decode), never renamed or removed within one.

#![deny(missing_docs)]
#![deny(unsafe_code)]

mod client;
mod messages;
mod paths;
mod socket;

pub use client::{Client, ClientError, Timeouts};
pub use messages::*;
pub use paths::{prune_stale_sockets, runtime_dir, socket_path, uid_of};
