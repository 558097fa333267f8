//! Integration tests of the universe control plane: scripted scenarios and a property test
//! over random operation sequences.

mod model;
mod scenarios;
