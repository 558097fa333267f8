//! Integration tests of the kgpatch CLI live with the end-to-end tests.
