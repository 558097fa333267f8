//! Integration tests of the demo server, its helpers and the load generator. Every test
//! runs real server processes on 127.0.0.1 ephemeral ports.

mod commands;
mod load;
mod patching;
mod sanitize;
mod signals;
mod stress;
mod symbols;

use kgpatch_examples::{DemoServer, Variant};

/// Starts a server of `variant` with default options, panicking with the reason.
fn start(variant: Variant) -> DemoServer {
    DemoServer::start(variant).unwrap_or_else(|e| panic!("{}: {e}", variant.name()))
}
