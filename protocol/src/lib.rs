//! The control protocol between the `kgpatch` command and the agent in a target process:
//! request and response types, versioning, stable error kinds, socket paths, and the one
//! client every caller uses.
//!
//! **Must not touch:** the target process. This crate links into the CLI, the bench and
//! tests; it holds no agent runtime (no interposers, no signal handlers).

#![deny(missing_docs)]
#![deny(unsafe_code)]
