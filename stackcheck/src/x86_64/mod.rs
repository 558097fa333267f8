//! x86-64: registers, unwind rules and one unwind step.

mod regs;
mod unwind;

pub(crate) use regs::capture_caller;
pub use regs::{Reg, Regs};
pub(crate) use unwind::{step, FastRule, Step};
