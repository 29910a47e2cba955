//! OCI documents from registries and archives (index, manifest, config; Docker's schema 2
//! equivalents): parsing never panics, and choosing a platform from any index either finds a
//! manifest or names what the index has.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_runtime::registry::{Platform, choose_platform, classify_manifest};

fuzz_target!(|data: &[u8]| {
    let _ = classify_manifest(data, None);
    let _ = oci_spec::image::ImageManifest::from_reader(data);
    let _ = oci_spec::image::ImageConfiguration::from_reader(data);
    if let Ok(index) = oci_spec::image::ImageIndex::from_reader(data) {
        let _ = choose_platform(&index, &Platform::host(), "fuzz");
    }
});
