//! The one way this program touches files: open below a directory handle without following
//! a link (`dirfd::Dir`), or open an operator-named path (links followed, as a Kubernetes
//! secret volume needs), in both cases without blocking and judged on the open descriptor;
//! read with a bound; replace atomically and durably (`atomic`: temp file, fsync, rename,
//! fsync of the directory).
//!
//! Everything that reads outside input goes through it: the secret files and
//! `pg_service.conf` in the container, `postmaster.pid`, the secrets directory on the host
//! (`store`, `generate`, `rotate`) and the state file. A FIFO named where a file should be
//! must never freeze the runtime's only thread (and PID 1's signal forwarding with it), and
//! a file swapped between a check and an open must be what is judged.

pub mod atomic;
pub mod dirfd;
