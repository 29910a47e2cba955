//! What a registry sends back about auth (untrusted network input): `WWW-Authenticate`
//! challenges and token-server answers parse without panicking, and a Bearer realm is always
//! an http(s) URL.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_runtime::registry::{Challenge, parse_challenge, token_from};

fuzz_target!(|data: &[u8]| {
    let _ = token_from(data);
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Some(Challenge::Bearer { realm, .. }) = parse_challenge(s) {
        assert!(realm.starts_with("http"), "realm {realm:?} accepted");
    }
});
