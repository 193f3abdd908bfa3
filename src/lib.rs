//! fraudgate: a real-time fraud-decision engine.
//!
//! The decision core ([`engine`], [`rules`], [`window`]) is pure: the clock is passed in
//! and nothing here does IO except [`rules::load_dir`], the one load path used by
//! `fraudgate check`, startup and hot reload. See `docs/ARCHITECTURE.md` for the code map.

pub mod keyhash;
pub mod txn;
pub mod window;
