//! kgpatch-attach against real processes: small C programs built with `cc` here, a
//! stand-in agent .so exporting `kgpatch_agent_attach`.

mod harness;
mod refuse;
mod success;
