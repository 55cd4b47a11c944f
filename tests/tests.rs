//! The integration tests, one binary (one link, one template cluster), one module per
//! part of the product, all driving the real binary through the one harness (`common`).
//! Run one part with a filter: `cargo test --test tests -- sync::`; one test:
//! `cargo test --test tests -- overlap::NAME --exact`.

mod common;

mod clusters;
mod fleet;
mod generate;
mod hardening;
mod metrics;
mod overlap;
mod rotate;
mod run;
mod sync;
mod verify;
mod watch;
