//! Integration tests of kgpatch-stackcheck: real threads parked in known call chains and
//! walked from a signal handler running on them, fake stacks, and a property test.

#[path = "../benches/framehop_baseline.rs"]
#[allow(dead_code)]
mod framehop_baseline;
mod fuzz;
mod live;
mod support;
mod synthetic;
