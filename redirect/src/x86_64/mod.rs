//! The x86-64 implementation: analysis, code generation, stub memory, live text writes,
//! the SIGTRAP handler, unwind information, and the patcher that ties them together.

pub mod analysis;
pub mod encode;
pub mod memory;
pub mod patcher;
pub mod sigframe;
pub mod text;
pub mod trap;
pub mod unwind;
