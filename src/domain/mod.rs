//! The functional core: plans, rollouts, gates and the state machine.
//!
//! **Architecture invariant:** nothing under `domain` performs I/O, reads a clock, sleeps or
//! spawns. Every function takes the current time as an argument and returns values; the shell
//! (`engine`, `store`, `provider`, `cli`) decides what to do with them. This is what lets the state
//! machine be tested exhaustively and property-tested without a store or a network.

pub mod desired;
pub mod directory;
pub mod event;
pub mod forecast;
pub mod gate;
pub mod machine;
pub mod plan;
pub mod rollout;
pub mod signins;
pub mod time;
