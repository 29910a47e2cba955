//! Integration tests of the FUSE crate.

mod model;
mod posix;
mod scale;
