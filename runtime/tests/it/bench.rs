//! `strata bench --quick`: a complete, well-formed report (no speed is asserted: these machines
//! are shared and noisy).

use crate::support::{ok, require_command, require_root, scratch, strata};

#[test]
fn a_quick_bench_writes_a_complete_report() {
    require_root();
    require_command("fuse-overlayfs");
    let t = scratch();
    let out = t.path().join("report");
    let table = ok(strata()
        .args(["bench", "--quick", "--rounds", "1", "--out"])
        .arg(&out)
        .arg("--dir")
        .arg(t.path()));
    let backends = [
        "volume",
        "tmpfs",
        "overlay",
        "strata-fuse",
        "fuse-overlayfs",
    ];
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert_eq!(table, md, "the table printed is the report");
    let header = md.lines().find(|l| l.starts_with("| workload |")).unwrap();
    for b in backends {
        assert!(header.contains(&format!(" {b} |")), "{header}");
    }
    let rows: Vec<&str> = md
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| workload"))
        .collect();
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let workloads = json["workloads"].as_array().unwrap();
    // The five every machine has, and fuse-overlayfs 2.0 where it is installed.
    let all = json["backends"].as_array().unwrap();
    assert!(
        all.len() == backends.len() || all.len() == backends.len() + 1,
        "{all:?}"
    );
    for b in backends {
        assert!(all.iter().any(|x| x == b), "{b} missing from {all:?}");
    }
    assert_eq!(rows.len(), workloads.len());
    assert!(workloads.len() >= 17, "{} workloads", workloads.len());
    for name in [
        "seq read",
        "rand read",
        "(16 deep)",
        "seq write",
        "rand write",
        "copy-up 4 KiB",
        "create",
        "stat",
        "readdir",
        "merged dir",
        "unlink",
        "rename lower dir",
        "extract",
        "sqlite",
    ] {
        assert!(
            workloads
                .iter()
                .any(|w| w["workload"].as_str().unwrap().contains(name)),
            "no {name} row"
        );
    }
    for w in workloads {
        for b in backends {
            let r = &w["results"][b];
            let median = r["median_ms"].as_f64().unwrap();
            assert!(median.is_finite() && median >= 0.0, "{w}");
            assert_eq!(r["runs_ms"].as_array().unwrap().len(), 1, "{w}");
            assert!(r["speed_vs_volume"].as_f64().unwrap().is_finite(), "{w}");
        }
        assert_eq!(
            w["results"]["volume"]["speed_vs_volume"].as_f64(),
            Some(1.0)
        );
    }
    let svg = std::fs::read_to_string(out.join("report.svg")).unwrap();
    assert!(svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(
        svg.matches("<rect class=\"bar\"").count(),
        workloads.len() * all.len(),
        "one bar per workload and backend"
    );
    // Nothing is left in the scratch dir but the report.
    let left: Vec<_> = std::fs::read_dir(t.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("report")]);
}
