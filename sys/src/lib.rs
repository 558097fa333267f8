//! kgpatch's one OS layer: every system call, `/proc` parser and loader query the other
//! crates need, written once.
//!
//! **Owns:** thin, typed wrappers over Linux: threads of a process (list, tid, tgkill),
//! `/proc` (one maps parser, one task lister, one status parser), futex waits, signal sets,
//! the loaded-object walk (`dl_iterate_phdr`), and ptrace for attach.
//!
//! **Must not touch:** anything kgpatch-specific: universe words, machine code, patch
//! modules, the protocol. It decides nothing; it reports what the kernel says.
//!
//! Modules:
//! - [`thread`]: `gettid`, `tgkill`, errno save and restore, membarrier.
//! - [`futex`]: wait and wake on an `AtomicU32`.
//! - [`signal`]: signal-set bits and the signals glibc keeps for itself.
//! - [`proc`]: `/proc/<pid>`: tasks, maps, status, a blocked thread's syscall, comm.
//! - [`objects`]: the loaded objects of this process (`dl_iterate_phdr`).
//! - [`ptrace`]: seize, interrupt, registers and memory of another process (attach).
//!
//! # Signal safety
//! Functions marked *async-signal-safe* in their docs make raw system calls into
//! caller-provided buffers: no allocation, no locks, bounded time. Everything else may
//! allocate and must not be called from a signal handler or while another thread is stopped.

#![deny(missing_docs)]
#![deny(unsafe_code)]

pub mod futex;
pub mod objects;
pub mod proc;
pub mod ptrace;
pub mod signal;
pub mod thread;
