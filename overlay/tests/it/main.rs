//! Integration tests of the layer format: apply, diff round trips through kernel overlay,
//! hostile archives, mounts, and interop with other tools.

mod apply;
mod hostile;
mod interop;
mod mount;
mod roundtrip;
mod support;
