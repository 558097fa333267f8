//! Integration tests of kgpatch-redirect: real machine code, real threads.

mod common;

mod chain;
mod cxx;
mod differential;
mod generated;
mod gone;
mod hammer;
mod install;
mod padding;
mod probe;
mod signals;
mod sweep;
