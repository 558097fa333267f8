//! Integration tests of the agent (real processes, real signals): see the modules.
