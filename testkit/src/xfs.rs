//! An XFS reflink filesystem on a loop device ([`XfsPool`]).

use std::path::PathBuf;

use crate::{require_root, run, run_ok};

/// An XFS filesystem with reflink on a loop device, mounted in a temp dir.
pub struct XfsPool {
    pub dir: tempfile::TempDir,
    pub mnt: PathBuf,
    loopdev: String,
}

impl XfsPool {
    pub fn new(size_mib: u64) -> XfsPool {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("stratus-it-")
            .tempdir()
            .unwrap();
        let img = dir.path().join("xfs.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(size_mib << 20)
            .unwrap();
        let loopdev = run_ok("losetup", &["-f", "--show", img.to_str().unwrap()])
            .trim()
            .to_string();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let pool = XfsPool { dir, mnt, loopdev };
        run_ok("mkfs.xfs", &["-q", "-m", "reflink=1", &pool.loopdev]);
        run_ok("mount", &[&pool.loopdev, pool.mnt.to_str().unwrap()]);
        pool
    }
}

impl Drop for XfsPool {
    fn drop(&mut self) {
        let _ = run("umount", &["-l", self.mnt.to_str().unwrap()]);
        let _ = run("losetup", &["-d", &self.loopdev]);
    }
}
