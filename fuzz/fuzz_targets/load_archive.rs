//! `strata load` of any archive (OCI layout or `docker save`: index.json, manifest.json,
//! repositories, blobs): never panics, and a failed load leaves the store as it was (no blob,
//! no ingest file, no image).
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_runtime::image::{Images, load};

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = dir.path().join("in.tar");
    std::fs::write(&archive, data).expect("write");
    let root = dir.path().join("root");
    let mut images = Images::open(&root).expect("open store");
    if load(&mut images, &archive).is_err() {
        let blobs = std::fs::read_dir(root.join("content/blobs/sha256")).expect("blobs").count();
        let ingest = std::fs::read_dir(root.join("content/ingest")).expect("ingest").count();
        assert_eq!((blobs, ingest), (0, 0), "a failed load kept data");
        assert!(images.store.images().expect("list").is_empty(), "a failed load kept an image");
    }
});
