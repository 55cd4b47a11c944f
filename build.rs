//! Build script: only tells cargo that the release link depends on the hot-function list.
//!
//! `scripts/build-release.sh` links through `build/hot-first-link`, which packs the functions
//! named in `build/hot-functions.txt` first in .text (PID 1's resident memory). Cargo does not
//! know about either file, so without this a regenerated list would not relink the binary.

fn main() {
    println!("cargo:rerun-if-changed=build/hot-functions.txt");
    println!("cargo:rerun-if-changed=build/hot-first-link");
}
