//! Content checksums of pool objects: the SHA-256 of every byte of an object,
//! holes included (as zeros), so the result equals `sha256sum` of the file.
//!
//! The object is walked with [`copy::data_segments`]: data segments are read
//! in [`copy::CHUNK`] reads, and holes are hashed from a zero buffer without
//! any I/O, so a thin 100 GiB volume costs the reads of its data only (the
//! hashing of its zeros remains).

use std::fs::File;
use std::io;

use sha2::{Digest, Sha256};

use super::copy::{self, CHUNK};

/// The SHA-256 (lowercase hex) of the first `len` bytes of `f`, which must be
/// at least `len` bytes long. `progress(done)` is called with the offset
/// reached, up to `len`.
pub fn sha256_sparse(f: &File, len: u64, mut progress: impl FnMut(u64)) -> io::Result<String> {
    // A short regular file would read as zero-padded (past its end is a hole).
    let meta = f.metadata()?;
    if meta.is_file() && meta.len() < len {
        return Err(short(meta.len(), len));
    }
    let mut hasher = Sha256::new();
    let zeros = vec![0u8; CHUNK];
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0u64;
    for (start, end) in copy::data_segments(f, len)? {
        hash_zeros(&mut hasher, &zeros, pos, start, &mut progress);
        let mut off = start;
        while off < end {
            let n = ((end - off) as usize).min(CHUNK);
            let got = copy::read_full_at(f, &mut buf[..n], off)?;
            if got < n {
                return Err(short(off + got as u64, len));
            }
            hasher.update(&buf[..n]);
            off += n as u64;
            progress(off);
        }
        pos = end;
    }
    hash_zeros(&mut hasher, &zeros, pos, len, &mut progress);
    progress(len);
    Ok(format!("{:x}", hasher.finalize()))
}

fn short(end: u64, len: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("the file ends at {end} bytes, short of {len}"),
    )
}

/// Hashes the hole `[from, to)` as zeros, `zeros.len()` bytes at a time.
fn hash_zeros(
    hasher: &mut Sha256,
    zeros: &[u8],
    from: u64,
    to: u64,
    progress: &mut impl FnMut(u64),
) {
    let mut at = from;
    while at < to {
        let n = ((to - at) as usize).min(zeros.len());
        hasher.update(&zeros[..n]);
        at += n as u64;
        progress(at);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    fn sha256_of(bytes: &[u8]) -> String {
        format!("{:x}", Sha256::digest(bytes))
    }

    #[test]
    fn holes_hash_as_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let f = File::create(&p).unwrap();
        // Not a multiple of CHUNK; a hole first, data in the middle (across a
        // chunk boundary), a hole, and data at the very end.
        let len = (5 << 20) + 12345;
        f.set_len(len).unwrap();
        f.write_all_at(&vec![0x5a; 3 << 19], (1 << 20) + 100)
            .unwrap();
        f.write_all_at(b"the end", len - 7).unwrap();
        f.sync_all().unwrap();
        let f = File::open(&p).unwrap();
        let mut last = 0;
        let got = sha256_sparse(&f, len, |d| {
            assert!(d >= last && d <= len);
            last = d;
        })
        .unwrap();
        assert_eq!(last, len);
        assert_eq!(got, sha256_of(&std::fs::read(&p).unwrap()));
    }

    #[test]
    fn empty_and_all_hole_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let f = File::create(&p).unwrap();
        assert_eq!(
            sha256_sparse(&f, 0, |_| {}).unwrap(),
            // sha256 of nothing.
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        f.set_len(3 << 20).unwrap();
        assert_eq!(
            sha256_sparse(&f, 3 << 20, |_| {}).unwrap(),
            sha256_of(&vec![0u8; 3 << 20])
        );
    }

    #[test]
    fn a_file_shorter_than_asked_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![1u8; 4096]).unwrap();
        let f = File::open(&p).unwrap();
        let e = sha256_sparse(&f, 8192, |_| {}).unwrap_err();
        assert!(e.to_string().contains("short of 8192"), "{e}");
    }
}
