//! Refusals leave the target exactly as it was.
