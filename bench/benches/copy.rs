//! The copy engine against a plain copy, and its two I/O paths against each
//! other: `pdisk::backend::copy::sparse_copy_with` (SEEK_DATA/SEEK_HOLE,
//! zero blocks skipped, holes kept) moving its bytes with pread/pwrite
//! (`CopyIo::ReadWrite`) or with io_uring, several chunks in flight
//! (`CopyIo::IoUring`), against a read/write loop over the whole file.
//!
//! Sources, 64 MiB each, in a temp dir on local disk (the target dir, or
//! `STRATUS_COPY_BENCH_DIR`, e.g. an XFS mount like pdisk's pool):
//! - "50% data": even MiBs hold data (1 MiB pieces of non-zero bytes), odd
//!   MiBs are holes;
//! - "dense": every byte is data, as in a raw image without holes; measured
//!   with the source in the page cache ("warm": the engine's own cost:
//!   syscalls, zero detection, bytes moved) and dropped from it before every
//!   run with `posix_fadvise(DONTNEED)` ("cold": reads come from the disk,
//!   as in an import).
//!
//! Throughput is in bytes of the source's size. Destinations are fresh files
//! each run and are not fsynced (the engine's callers fsync once at the end).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use pdisk::backend::copy::{sparse_copy, sparse_copy_with, CopyIo};

const SIZE: u64 = 64 << 20;
const PIECE: usize = 1 << 20;

/// A SIZE-byte file with data in every `every`-th MiB (1: dense) and holes
/// elsewhere.
fn make_source(path: &Path, every: u64) {
    let f = File::create(path).unwrap();
    f.set_len(SIZE).unwrap();
    let mut piece = vec![0u8; PIECE];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for b in piece.chunks_mut(8) {
        // xorshift64: cheap, never all-zero blocks.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
    }
    for i in (0..SIZE / PIECE as u64).step_by(every as usize) {
        f.write_all_at(&piece, i * PIECE as u64).unwrap();
    }
    f.sync_all().unwrap();
}

/// Drops the file's (clean) pages from the page cache: the next read comes
/// from the disk. No root needed.
fn evict(path: &Path) {
    let f = File::open(path).unwrap();
    // SAFETY: posix_fadvise on an open fd only gives the kernel a hint.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "posix_fadvise");
}

/// The peer: read every byte, write every byte (holes become zeros on disk).
fn plain_copy(src: &Path, dst: &Path) -> u64 {
    let mut s = File::open(src).unwrap();
    let mut d = File::create(dst).unwrap();
    let mut buf = vec![0u8; PIECE];
    let mut total = 0;
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        d.write_all(&buf[..n]).unwrap();
        total += n as u64;
    }
    total
}

/// One group: the engine (default, and each I/O path) and the plain loop on
/// `src`, dropping `src` from the page cache before each run when `cold`.
fn group(c: &mut Criterion, name: &str, src: &Path, dst: &Path, data: u64, cold: bool) {
    let mut g = c.benchmark_group(name);
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Bytes(SIZE));
    // The engine wants an empty destination: a fresh one per run.
    let setup = || {
        let _ = std::fs::remove_file(dst);
        if cold {
            evict(src);
        }
        (File::open(src).unwrap(), File::create(dst).unwrap())
    };
    g.bench_function("sparse_copy (default)", |b| {
        b.iter_batched(
            setup,
            |(s, d)| assert_eq!(sparse_copy(&s, &d, SIZE, |_| {}).unwrap().written, data),
            BatchSize::PerIteration,
        )
    });
    for (label, io) in [
        ("engine read/write", CopyIo::ReadWrite),
        ("engine io_uring", CopyIo::IoUring),
    ] {
        g.bench_function(label, |b| {
            b.iter_batched(
                setup,
                |(s, d)| {
                    let st = sparse_copy_with(io, &s, &d, SIZE, |_| {}).unwrap();
                    assert_eq!(st.written, data);
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.bench_function("read/write loop", |b| {
        b.iter_batched(
            || {
                let _ = std::fs::remove_file(dst);
                if cold {
                    evict(src);
                }
            },
            |()| assert_eq!(plain_copy(src, dst), SIZE),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn bench(c: &mut Criterion) {
    // STRATUS_COPY_BENCH_DIR picks the filesystem (e.g. an XFS pool, as
    // pdisk's); by default the target dir (local disk), not /tmp, which may
    // be tmpfs.
    let parent = std::env::var_os("STRATUS_COPY_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_TARGET_TMPDIR").into());
    let dir = tempfile::Builder::new()
        .prefix("copy-bench-")
        .tempdir_in(parent)
        .unwrap();
    let half = dir.path().join("half.raw");
    let dense = dir.path().join("dense.raw");
    let dst = dir.path().join("dst.raw");
    make_source(&half, 2);
    make_source(&dense, 1);
    group(c, "copy 64 MiB, 50% data", &half, &dst, SIZE / 2, false);
    group(c, "copy 64 MiB dense, warm", &dense, &dst, SIZE, false);
    group(c, "copy 64 MiB dense, cold", &dense, &dst, SIZE, true);
}

criterion_group!(benches, bench);
criterion_main!(benches);
