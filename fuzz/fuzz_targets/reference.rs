//! Image references (`name[:tag][@digest]`, from the command line and from archives' tags):
//! parsing never panics, and what parses prints as a reference that parses back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_runtime::image::Reference;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(r) = s.parse::<Reference>() {
        let again: Reference = r.to_string().parse().expect("a printed reference parses");
        assert_eq!(again, r, "{s:?} does not round-trip");
        let _ = r.familiar();
    }
});
