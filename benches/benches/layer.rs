//! Criterion benchmarks of layer apply and diff (filled in below).
fn main() {}
