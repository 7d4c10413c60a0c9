//! Unit tests of the krbd client: a fake kernel plays the rbd bus (a map
//! request makes `/sys/bus/rbd/devices/N` and `/dev/rbdN` in a temp
//! directory, a remove deletes them) and records what it was written and
//! which key the process keyring held meanwhile.

use std::sync::atomic::{AtomicBool, Ordering};

use stratus_core::runner::{FakeRunner, Output};
use uuid::Uuid;

use super::*;
use crate::rbd::Monitor;

const KEY: &str = "AQB37hFrNEJkMhAAqUs+QZS9zmTGOfQGD4T7xg==";
const FSID: &str = "69d8ee26-508c-4088-b3a4-b2c4a29d107d";

/// A write: the file's name, the request, the key name and key given with it.
type Write = (String, String, Option<(String, String)>);

#[derive(Default)]
pub(crate) struct FakeKernel {
    root: PathBuf,
    writes: Mutex<Vec<Write>>,
    refuse: AtomicBool,
    /// Removes answered EBUSY before one succeeds (udev probing).
    busy: std::sync::atomic::AtomicU32,
}

impl RbdKernel for FakeKernel {
    fn write(
        &self,
        file: &Path,
        request: &str,
        key: Option<(&str, &CephKey)>,
    ) -> std::io::Result<()> {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        self.writes.lock().unwrap().push((
            name.clone(),
            request.to_owned(),
            key.map(|(n, k)| (n.to_owned(), k.base64().to_owned())),
        ));
        if self.refuse.load(Ordering::SeqCst) {
            return Err(std::io::Error::from_raw_os_error(libc::ENOENT));
        }
        if name == "remove_single_major" && self.busy.load(Ordering::SeqCst) > 0 {
            self.busy.fetch_sub(1, Ordering::SeqCst);
            return Err(std::io::Error::from_raw_os_error(libc::EBUSY));
        }
        let devices = self.root.join("sys/bus/rbd/devices");
        if name == "add_single_major" {
            let f: Vec<&str> = request.split(' ').collect();
            let id = std::fs::read_dir(&devices).unwrap().count();
            let d = devices.join(id.to_string());
            std::fs::create_dir_all(&d).unwrap();
            for (file, v) in [
                ("pool", f[2]),
                ("name", f[3]),
                ("current_snap", "-"),
                ("cluster_fsid", FSID),
            ] {
                std::fs::write(d.join(file), format!("{v}\n")).unwrap();
            }
            std::fs::write(self.root.join(format!("dev/rbd{id}")), "").unwrap();
        } else {
            let id = request.trim();
            std::fs::remove_dir_all(devices.join(id)).unwrap();
            std::fs::remove_file(self.root.join(format!("dev/rbd{id}"))).unwrap();
        }
        Ok(())
    }
}

impl FakeKernel {
    /// A kernel whose bus is under ROOT/sys once made (no krbd until then).
    pub(crate) fn at(root: &Path) -> FakeKernel {
        FakeKernel {
            root: root.to_path_buf(),
            ..Default::default()
        }
    }

    /// The bus under ROOT/sys (made here: the host has krbd), the
    /// devices under ROOT/dev.
    pub(crate) fn with_bus(root: &Path) -> FakeKernel {
        std::fs::create_dir_all(root.join("dev")).unwrap();
        std::fs::create_dir_all(root.join("sys/bus/rbd/devices")).unwrap();
        for f in ["add_single_major", "remove_single_major"] {
            std::fs::write(root.join("sys/bus/rbd").join(f), "").unwrap();
        }
        FakeKernel::at(root)
    }
}

struct Host {
    _dir: tempfile::TempDir,
    kernel: Arc<FakeKernel>,
    runner: FakeRunner,
    attacher: KrbdAttacher,
}

fn host(with_module: bool) -> Host {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    std::fs::create_dir_all(root.join("dev")).unwrap();
    let kernel = Arc::new(if with_module {
        FakeKernel::with_bus(&root)
    } else {
        FakeKernel {
            root: root.clone(),
            ..Default::default()
        }
    });
    // No rbd module anywhere: modprobe fails as on this test host.
    let runner = FakeRunner::with(|argv| {
        Ok(if argv[0] == "modprobe" {
            Output::failed(1, "modprobe: FATAL: Module rbd not found")
        } else {
            Output::ok("")
        })
    });
    let attacher = KrbdAttacher::new(
        Arc::new(runner.clone()),
        kernel.clone(),
        KrbdOptions {
            sys: root.join("sys"),
            dev: root.join("dev"),
            device_timeout: Duration::from_millis(300),
        },
    );
    Host {
        _dir: dir,
        kernel,
        runner,
        attacher,
    }
}

fn disk(image: &str) -> RbdDisk {
    RbdDisk {
        monitors: vec![
            Monitor {
                host: "10.0.0.7".into(),
                port: 6789,
            },
            Monitor {
                host: "fd00::8".into(),
                port: 6789,
            },
        ],
        pool: "pdisk".into(),
        image: image.into(),
        user: "compute".into(),
        key: crate::rbd::test_key(KEY),
        conf: Vec::new(),
    }
}

fn record(image: &str) -> KrbdDisk {
    KrbdDisk {
        pool: "pdisk".into(),
        image: image.into(),
        fsid: FSID.into(),
        device: None,
    }
}

fn holder(n: u8) -> Holder {
    Holder::disk(Uuid::from_bytes([n; 16]), "vda")
}

#[tokio::test]
async fn maps_once_per_image_with_the_key_by_reference_and_unmaps_with_the_last_holder() {
    let h = host(true);
    assert!(h.attacher.available().await);
    let dev = h
        .attacher
        .attach(&holder(1), &disk("pd-vol-a"), FSID)
        .await
        .unwrap();
    assert_eq!(dev.file_name().unwrap(), "rbd0");
    // A second guest of the same image shares the mapping.
    let again = h
        .attacher
        .attach(&holder(2), &disk("pd-vol-a"), FSID)
        .await
        .unwrap();
    assert_eq!(again, dev);
    let writes = h.kernel.writes.lock().unwrap().clone();
    assert_eq!(writes.len(), 1, "{writes:?}");
    let (file, request, key) = &writes[0];
    assert_eq!(file, "add_single_major");
    assert_eq!(
        request,
        "10.0.0.7:6789,[fd00::8]:6789 name=compute,key=stratus.client.compute pdisk pd-vol-a"
    );
    assert!(!request.contains(KEY));
    assert_eq!(
        key.as_ref().unwrap(),
        &("stratus.client.compute".to_string(), KEY.to_string())
    );
    // No modprobe: the bus was there.
    assert!(h.runner.calls().is_empty());

    h.attacher
        .detach(&holder(1), &record("pd-vol-a"))
        .await
        .unwrap();
    assert!(dev.exists(), "the other guest still holds it");
    h.attacher
        .detach(&holder(2), &record("pd-vol-a"))
        .await
        .unwrap();
    assert!(!dev.exists());
    let writes = h.kernel.writes.lock().unwrap().clone();
    assert_eq!(
        (writes[1].0.as_str(), writes[1].1.as_str(), &writes[1].2),
        ("remove_single_major", "0", &None)
    );
    // A repeated detach is fine and writes nothing.
    h.attacher
        .detach(&holder(2), &record("pd-vol-a"))
        .await
        .unwrap();
    assert_eq!(h.kernel.writes.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn a_refused_map_is_an_error_that_shows_no_key_and_leaves_nothing() {
    let h = host(true);
    h.kernel.refuse.store(true, Ordering::SeqCst);
    let e = h
        .attacher
        .attach(&holder(1), &disk("pd-vol-a"), FSID)
        .await
        .unwrap_err();
    assert!(e.message().contains("rbd:pdisk/pd-vol-a"), "{e}");
    assert!(e.message().contains("refused"), "{e}");
    assert!(!e.message().contains(KEY), "{e}");
    assert_eq!(h.attacher.holders(&record("pd-vol-a")).await, 0);
    assert!(h.attacher.mappings().is_empty());
}

#[tokio::test]
async fn without_the_module_modprobe_is_tried_once_and_krbd_is_not_used() {
    let h = host(false);
    assert!(!h.attacher.available().await);
    assert!(!h.attacher.available().await);
    assert_eq!(h.runner.command_lines(), ["modprobe rbd"]);
    let e = h
        .attacher
        .attach(&holder(1), &disk("pd-vol-a"), FSID)
        .await
        .unwrap_err();
    assert!(e.message().contains("modprobe rbd"), "{e}");
}

#[tokio::test]
async fn reap_unmaps_only_pdisk_images_no_holder_names() {
    let h = host(true);
    // Three mappings left by a crash: one a guest's record names, one of
    // nobody's, one not pdisk's.
    for image in ["pd-vol-kept", "pd-vol-left", "backup"] {
        h.attacher
            .attach(&holder(9), &disk(image), FSID)
            .await
            .unwrap();
    }
    // As after a restart: a new attacher over the same kernel.
    let fresh = KrbdAttacher::new(
        Arc::new(h.runner.clone()),
        h.kernel.clone(),
        h.attacher.opts.clone(),
    );
    fresh.adopt(holder(1), &record("pd-vol-kept")).await;
    let report = fresh.reap().await;
    assert_eq!(
        report,
        [Ok(
            "unmapped krbd mapping rbd1 of rbd:pdisk/pd-vol-left (no guest holds it)".to_string()
        )]
    );
    let left: Vec<String> = fresh.mappings().into_iter().map(|m| m.image).collect();
    assert_eq!(left, ["pd-vol-kept", "backup"]);
    // The kept one is re-found, not mapped again.
    let dev = fresh
        .attach(&holder(1), &disk("pd-vol-kept"), FSID)
        .await
        .unwrap();
    assert_eq!(dev.file_name().unwrap(), "rbd0");
    assert_eq!(h.kernel.writes.lock().unwrap().len(), 4);
}

#[tokio::test]
async fn a_crash_after_the_map_leaves_a_mapping_the_undo_removes() {
    for point in crate::failpoints::KRBD_POINTS[0].1 {
        let h = host(true);
        h.attacher.arm_crash_point(Some(point));
        let a = Arc::new(h.attacher);
        let a2 = a.clone();
        let r =
            tokio::spawn(async move { a2.attach(&holder(1), &disk("pd-vol-a"), FSID).await }).await;
        assert!(r.is_err(), "{point}: the attach's task panicked");
        assert_eq!(a.mappings().len(), 1, "{point}");
        // The record (made before the map) undoes it.
        a.arm_crash_point(None);
        a.detach(&holder(1), &record("pd-vol-a")).await.unwrap();
        assert!(a.mappings().is_empty(), "{point}");
    }
}

#[tokio::test]
async fn an_unmap_the_kernel_answers_busy_is_retried() {
    let h = host(true);
    let dev = h
        .attacher
        .attach(&holder(1), &disk("pd-vol-a"), FSID)
        .await
        .unwrap();
    // udev's probe of the new device holds it open for a moment.
    h.kernel.busy.store(2, Ordering::SeqCst);
    h.attacher
        .detach(&holder(1), &record("pd-vol-a"))
        .await
        .unwrap();
    assert!(!dev.exists());
    let removes = h
        .kernel
        .writes
        .lock()
        .unwrap()
        .iter()
        .filter(|w| w.0 == "remove_single_major")
        .count();
    assert_eq!(removes, 3);
}
