//! Applying any blob never writes outside the target, and a failed apply leaves nothing behind.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_overlay::{ApplyOptions, apply};

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("layer");
    let opts = ApplyOptions { max_size: 16 << 20, sync: false, ..ApplyOptions::rootless() };
    let ok = apply(data, &target, &opts).is_ok();
    let names: Vec<_> = std::fs::read_dir(dir.path()).expect("read dir").map(|e| e.expect("entry").file_name()).collect();
    if ok {
        assert_eq!(names, vec![std::ffi::OsString::from("layer")], "only the target may appear");
    } else {
        assert!(names.is_empty(), "a failed apply left {names:?}");
    }
});
