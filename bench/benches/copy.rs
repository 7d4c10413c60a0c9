//! The copy engine against a plain copy: `pdisk::backend::copy::sparse_copy`
//! (SEEK_DATA/SEEK_HOLE, zero blocks skipped, holes kept) against a
//! read/write loop over the whole file, on a 64 MiB file that is half data
//! (1 MiB pieces of non-zero bytes) and half holes. Throughput is in bytes
//! of the source's size. The page cache is warm: this measures the engine
//! (syscalls, zero detection, bytes moved), not the disk.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use pdisk::backend::copy::sparse_copy;

const SIZE: u64 = 64 << 20;
const PIECE: usize = 1 << 20;

/// A SIZE-byte file whose even MiBs hold data and odd MiBs are holes.
fn make_source(path: &Path) {
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
    for i in (0..SIZE / PIECE as u64).step_by(2) {
        f.write_all_at(&piece, i * PIECE as u64).unwrap();
    }
    f.sync_all().unwrap();
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

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let dst = dir.path().join("dst.raw");
    make_source(&src);

    let mut g = c.benchmark_group("copy 64 MiB, 50% data");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Bytes(SIZE));
    g.bench_function("sparse_copy", |b| {
        b.iter_batched(
            // sparse_copy wants an empty destination: a fresh one per run.
            || {
                let _ = std::fs::remove_file(&dst);
                (File::open(&src).unwrap(), File::create(&dst).unwrap())
            },
            |(s, d)| {
                let st = sparse_copy(&s, &d, SIZE, |_| {}).unwrap();
                assert_eq!(st.written, SIZE / 2);
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("read/write loop", |b| {
        b.iter_batched(
            || {
                let _ = std::fs::remove_file(&dst);
            },
            |()| assert_eq!(plain_copy(&src, &dst), SIZE),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
