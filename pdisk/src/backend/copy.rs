//! The copy engine: reflink when the filesystem shares extents, otherwise a
//! sparse-aware copy that never writes zeros.
//!
//! `sparse_copy` walks the source's data segments with SEEK_DATA/SEEK_HOLE,
//! and inside them skips every all-zero 4 KiB block, so holes stay holes and
//! a 100 GiB volume with 10 MiB of data costs 10 MiB of I/O.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Block granularity of zero detection: holes are punched at this size.
pub const ZERO_BLOCK: usize = 4096;
/// Bytes read per I/O.
pub const CHUNK: usize = 1 << 20;

/// Makes `dst` share all of `src`'s extents (FICLONE). Both must live on the
/// same reflink-capable filesystem; `dst` takes `src`'s size.
pub fn ficlone(src: &File, dst: &File) -> io::Result<()> {
    // SAFETY: FICLONE takes the source fd as its integer argument; both fds
    // are open and owned by the borrowed Files for the duration of the call.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// True when files in `dir` can be reflinked (probed with two temp files).
pub fn reflink_supported(dir: &Path) -> io::Result<bool> {
    let a = tempfile::NamedTempFile::new_in(dir)?;
    let b = tempfile::NamedTempFile::new_in(dir)?;
    a.as_file().write_all_at(b"stratus reflink probe", 0)?;
    match ficlone(a.as_file(), b.as_file()) {
        Ok(()) => Ok(true),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP)
                    | Some(libc::EXDEV)
                    | Some(libc::EINVAL)
                    | Some(libc::ENOTTY)
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

fn seek(f: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    // SAFETY: lseek on an owned, open fd; it only moves the file offset.
    let r = unsafe { libc::lseek(f.as_raw_fd(), offset as libc::off_t, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None) // no more data past offset
    } else {
        Err(e)
    }
}

/// The data segments of `f` within `[0, len)`, as (start, end) pairs.
/// Filesystems without SEEK_DATA support report the whole file as data.
pub fn data_segments(f: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < len {
        let start = match seek(f, pos, libc::SEEK_DATA) {
            Ok(Some(s)) => s,
            Ok(None) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                return Ok(vec![(0, len)]);
            }
            Err(e) => return Err(e),
        };
        if start >= len {
            break;
        }
        let end = seek(f, start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        out.push((start, end));
        pos = end;
    }
    Ok(out)
}

/// Statistics of one copy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Bytes read from the source (its data segments).
    pub read: u64,
    /// Bytes written to the destination (non-zero blocks only).
    pub written: u64,
}

/// Copies the first `len` bytes of `src` into `dst` (which must be empty or
/// all holes), writing only non-zero blocks. `dst` is sized to `len`.
/// `progress(done)` is called with the offset reached, up to `len`.
pub fn sparse_copy(
    src: &File,
    dst: &File,
    len: u64,
    mut progress: impl FnMut(u64),
) -> io::Result<CopyStats> {
    dst.set_len(len)?;
    let mut stats = CopyStats::default();
    let mut buf = vec![0u8; CHUNK];
    for (start, end) in data_segments(src, len)? {
        let mut off = start;
        while off < end {
            let n = ((end - off) as usize).min(CHUNK);
            let got = read_full_at(src, &mut buf[..n], off)?;
            if got == 0 {
                break;
            }
            stats.read += got as u64;
            stats.written += write_nonzero_runs(dst, &buf[..got], off)?;
            off += got as u64;
            progress(off);
        }
    }
    progress(len);
    Ok(stats)
}

/// Reads up to `buf.len()` bytes at `offset`, retrying short reads; returns
/// fewer only at the end of the file.
pub fn read_full_at(f: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Writes the non-zero ZERO_BLOCK-sized runs of `buf` at `offset`; returns
/// the bytes written.
pub fn write_nonzero_runs(dst: &File, buf: &[u8], offset: u64) -> io::Result<u64> {
    let mut written = 0;
    let mut run_start: Option<usize> = None;
    let mut i = 0;
    while i < buf.len() {
        let end = (i + ZERO_BLOCK).min(buf.len());
        let zero = is_zero(&buf[i..end]);
        match (zero, run_start) {
            (false, None) => run_start = Some(i),
            (true, Some(s)) => {
                dst.write_all_at(&buf[s..i], offset + s as u64)?;
                written += (i - s) as u64;
                run_start = None;
            }
            _ => {}
        }
        i = end;
    }
    if let Some(s) = run_start {
        dst.write_all_at(&buf[s..], offset + s as u64)?;
        written += (buf.len() - s) as u64;
    }
    Ok(written)
}

/// True when every byte is zero (compares 16 bytes at a time).
pub fn is_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(16);
    chunks
        .by_ref()
        .all(|c| u128::from_ne_bytes(c.try_into().expect("16 bytes")) == 0)
        && chunks.remainder().iter().all(|&x| x == 0)
}

/// Bytes of the file actually allocated on disk.
pub fn allocated_bytes(path: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)?.blocks() * 512)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_copy_keeps_holes_and_skips_zero_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let src_p = dir.path().join("src");
        let dst_p = dir.path().join("dst");
        let src = File::create(&src_p).unwrap();
        let len = 64 << 20;
        src.set_len(len).unwrap();
        // 1 MiB of data at 8 MiB, a zero-filled (allocated) MiB at 20 MiB,
        // and 5 bytes at the very end.
        src.write_all_at(&vec![0xab; 1 << 20], 8 << 20).unwrap();
        src.write_all_at(&vec![0; 1 << 20], 20 << 20).unwrap();
        src.write_all_at(b"tail!", len - 5).unwrap();
        src.sync_all().unwrap();
        let src = File::open(&src_p).unwrap();
        let dst = File::create(&dst_p).unwrap();
        let mut last = 0;
        let stats = sparse_copy(&src, &dst, len, |d| {
            assert!(d >= last);
            last = d;
        })
        .unwrap();
        assert_eq!(last, len);
        // Only the non-zero blocks were written.
        assert_eq!(stats.written, (1 << 20) + 4096);
        let a = std::fs::read(&src_p).unwrap();
        let b = std::fs::read(&dst_p).unwrap();
        assert!(a == b, "content differs");
        assert!(allocated_bytes(&dst_p).unwrap() < 4 << 20);
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0; 4096]));
        let mut b = [0u8; 4096];
        b[4095] = 1;
        assert!(!is_zero(&b));
    }
}
