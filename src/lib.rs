//! fraudgate: a real-time fraud-decision engine.
//!
//! The decision core ([`engine`], [`rules`], [`window`], [`decision`]) is pure: the clock
//! is passed in and nothing here does IO except [`rules::load_dir`], the one load path
//! used by `fraudgate check`, startup and hot reload. See `docs/ARCHITECTURE.md`.

pub mod backtest;
pub mod config;
pub mod decision;
pub mod demo;
pub mod engine;
pub mod feedback;
pub mod keyhash;
pub mod loadgen;
pub mod loadrun;
pub(crate) mod prefetch;
pub mod rules;
pub mod service;
pub mod snapshot;
pub mod telemetry;
pub mod transport;
pub mod txn;
pub mod watchdog;
pub mod window;

pub use config::EngineConfig;
pub use decision::{Action, Decision};
pub use engine::{Engine, Outcome};
pub use rules::{load_dir, RuleSet};
pub use txn::Transaction;
