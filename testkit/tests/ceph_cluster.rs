//! The micro-cluster of `testkit::CephCluster` works as an RBD store: a
//! cephx user limited to one pool writes and reads an image through QEMU's
//! rbd driver, is refused in another pool, and nothing is left running or
//! on disk after drop. Prints the measured bring-up time, memory and disk.

use std::path::PathBuf;
use testkit::*;

#[test]
#[ignore = "needs root and ceph (scripts/test)"]
fn micro_cluster_serves_rbd_with_cephx_and_leaves_nothing_behind() {
    let (dir, pids): (PathBuf, Vec<u32>);
    {
        let c = CephCluster::start();
        eprintln!("ceph micro-cluster up in {:?}", c.startup);
        c.create_pool("rbd-a");
        c.create_pool("rbd-b");
        let keyring = c.create_rbd_user("pdisk", "rbd-a");
        assert!(std::fs::read_to_string(&keyring)
            .unwrap()
            .contains("[client.pdisk]"));
        let conf = c.conf.to_str().unwrap();
        let as_pdisk = |args: &[&str]| {
            let mut a = vec![
                "-c",
                conf,
                "--id",
                "pdisk",
                "--keyring",
                keyring.to_str().unwrap(),
            ];
            a.extend_from_slice(args);
            run("rbd", &a)
        };
        let out = as_pdisk(&["create", "--size", "16M", "rbd-a/img"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let refused = as_pdisk(&["create", "--size", "16M", "rbd-b/img"]);
        assert!(
            !refused.status.success(),
            "a user of rbd-a created an image in rbd-b"
        );

        let url = c.qemu_url("rbd-a", "img");
        run_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x5a 1M 1M", &url]);
        let read = run_ok("qemu-io", &["-f", "raw", "-c", "read -P 0x5a 1M 1M", &url]);
        assert!(read.contains("read 1048576/1048576"), "{read}");
        let bad = run("qemu-io", &["-f", "raw", "-c", "read -P 0x5a 0 1M", &url]);
        let bad = String::from_utf8_lossy(&bad.stdout);
        assert!(bad.contains("Pattern verification failed"), "{bad}");

        let df = c.ceph_json(&["df"]);
        assert_eq!(df["stats"]["total_bytes"].as_u64(), Some(MEMSTORE_BYTES));
        eprintln!(
            "ceph micro-cluster: daemons' RSS {} MiB, directory {} MiB",
            c.rss_bytes() >> 20,
            c.disk_bytes() >> 20
        );
        dir = c.dir.path().to_path_buf();
        pids = std::fs::read_dir(dir.join("run"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".pid"))
            .filter_map(|e| std::fs::read_to_string(e.path()).ok()?.trim().parse().ok())
            .collect();
        assert_eq!(pids.len(), 3, "mon, osd and mgr pid files");
    }
    assert!(!dir.exists(), "{} left behind", dir.display());
    for p in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{p}")).exists(),
            "ceph daemon {p} still running"
        );
    }
}
