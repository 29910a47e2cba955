//! Benchmarks for Strata; see `benches/`. Nothing here is run by `cargo test`.
