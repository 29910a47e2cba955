//! containerd's filter syntax (List filters arrive from any gRPC client): parsing never panics,
//! and a parsed filter can be evaluated against any fields.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_snapshotter::filter::{Fields, Filter};

struct Any<'a>(&'a str);

impl Fields for Any<'_> {
    fn field(&self, path: &[String]) -> Option<String> {
        (path.len() % 2 == 0).then(|| self.0.to_string())
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let (filter, value) = s.split_once('\n').unwrap_or((s, ""));
    if let Ok(f) = Filter::parse(filter) {
        let _ = f.matches(&Any(value));
    }
});
