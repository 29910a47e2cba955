//! Kernel overlay mounts and feature probing.

use strata_overlay::mount::{Options, Overlay, unmount};
use strata_overlay::probe;

use crate::support::{Prereq, require, scratch};

#[test]
fn three_hundred_lowers_with_long_names_mount() {
    require(Prereq::Root);
    let t = scratch();
    let mut lowers = Vec::new();
    for i in 0..300 {
        let l = t.path().join(format!("layer-{i:04}-{}", "x".repeat(60)));
        std::fs::create_dir(&l).unwrap();
        std::fs::write(l.join(format!("f{i}")), i.to_string()).unwrap();
        std::fs::write(l.join("top"), i.to_string()).unwrap();
        lowers.push(l);
    }
    let total: usize = lowers.iter().map(|l| l.as_os_str().len() + 1).sum();
    assert!(
        total > 4096,
        "the option string must exceed a page ({total} bytes)"
    );
    let (u, w, m) = (t.path().join("u"), t.path().join("w"), t.path().join("m"));
    for d in [&u, &w, &m] {
        std::fs::create_dir(d).unwrap();
    }
    let o = Overlay {
        lowers,
        upper: Some(u),
        work: Some(w),
        options: Options {
            index_off: true,
            ..Default::default()
        },
    };
    o.mount(&m).unwrap();
    let top = std::fs::read_to_string(m.join("top"));
    let last = std::fs::read_to_string(m.join("f299"));
    unmount(&m, false).unwrap();
    assert_eq!(top.unwrap(), "0", "the first lower is the top");
    assert_eq!(last.unwrap(), "299");
}

#[test]
fn mount_errors_name_the_option_and_carry_the_kernel_message() {
    require(Prereq::Root);
    let t = scratch();
    let m = t.path().join("m");
    std::fs::create_dir(&m).unwrap();
    let o = Overlay {
        lowers: vec![t.path().join("missing")],
        upper: None,
        work: None,
        options: Options::default(),
    };
    let err = o.mount(&m).unwrap_err().to_string();
    assert!(err.contains("missing"), "{err}");
    // A work dir inside the upper: the kernel refuses at create and says why.
    let (l, u) = (t.path().join("l"), t.path().join("u"));
    std::fs::create_dir_all(u.join("w")).unwrap();
    std::fs::create_dir(&l).unwrap();
    let o = Overlay {
        lowers: vec![l],
        upper: Some(u.clone()),
        work: Some(u.join("w")),
        options: Options::default(),
    };
    let err = o.mount(&m).unwrap_err().to_string();
    assert!(err.contains("workdir") && err.contains("upperdir"), "{err}");
}

#[test]
fn probe_finds_the_features_of_this_kernel() {
    require(Prereq::Root);
    let t = scratch();
    let f = probe::probe(t.path());
    assert!(f.overlay, "overlay must mount here: {:?}", f.error);
    assert!(f.d_type);
    assert!(f.lowerdir_append, "kernel 6.8+ has lowerdir+");
    assert!(
        f.metacopy && f.redirect_dir && f.volatile && f.userxattr,
        "{f:?}"
    );
    let text = f.to_string();
    assert!(
        text.contains("metacopy: true") && text.contains("Backing Filesystem"),
        "{text}"
    );
    assert!(
        std::fs::read_dir(t.path()).unwrap().next().is_none(),
        "probe left files behind"
    );
}
