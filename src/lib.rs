//! phasegate drives staged rollouts of device-compliance and access policies as a persisted state
//! machine. See `docs/ARCHITECTURE.md` for the map.

pub mod adapters;
pub mod announce;
pub mod api;
pub mod cli;
pub mod crash;
pub mod daemon;
pub mod domain;
pub mod emulator;
pub mod engine;
pub mod graph;
pub mod identity;
pub mod metrics;
pub mod notifier;
pub mod preflight;
pub mod provider;
pub mod retry;
pub mod runner;
pub mod store;
#[cfg(test)]
#[path = "../tests/common/postgres.rs"]
mod test_postgres;
#[cfg(test)]
mod testing;
pub mod web;
