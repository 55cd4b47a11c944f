//! The async runtime every mode uses: tokio's current-thread scheduler.
//!
//! One thread is plenty (the work is a few file reads and one connection per rotation), and
//! for `run` it matters: the runtime is built only after PID 1 has blocked its signals, and
//! a current-thread runtime starts no worker threads of its own.

use anyhow::Context;

/// A current-thread runtime with I/O and timers.
pub fn new() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Runs one-shot work (`sync`, `verify`, `rotate`) to completion on a fresh runtime.
pub fn block_on<T>(
    future: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    new()?.block_on(future)
}
