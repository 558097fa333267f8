//! Demo server, load generator and sample patch modules.
//!
//! Status: planned (see the end-to-end issue).
