//! Whiteout/opaque conversion (`strata layer check --to`) on any layer a tar can make: every
//! conversion either refuses before changing anything or leaves a tree that checks clean for
//! the form it was converted to, in turn wh, userxattr, kernel.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_overlay::form::{self, Form};
use strata_overlay::{ApplyOptions, apply};

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("tempdir");
    let layer = dir.path().join("layer");
    let opts = ApplyOptions { max_size: 4 << 20, sync: false, ..ApplyOptions::default() };
    if apply(data, &layer, &opts).is_err() {
        return;
    }
    let Ok(mut before) = form::check(&layer) else { return };
    for to in [Form::Wh, Form::UserXattr, Form::Kernel] {
        match form::convert(&layer, to) {
            Ok(_) => {
                let after = form::check(&layer).expect("a converted tree checks");
                assert!(after.problems(to).is_empty(), "converted to {to} but: {:?}", after.problems(to));
                before = after;
            }
            Err(_) => {
                let now = form::check(&layer).expect("checks");
                assert_eq!(now, before, "a refused conversion to {to} changed the tree");
                return;
            }
        }
    }
});
