//! The tar reader never panics or loops on any input, and reads every entry's data in bounds.
#![no_main]

use std::io::Read;

use libfuzzer_sys::fuzz_target;
use strata_overlay::archive::Reader;

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let mut buf = Vec::new();
    while let Ok(Some(_entry)) = r.next_entry() {
        buf.clear();
        if r.data().read_to_end(&mut buf).is_err() {
            break;
        }
        assert!(r.offset() <= data.len() as u64);
    }
});
