//! Streaming SHA-256 (sha2), as image verification and ChecksumVolume use
//! it: 64 MiB fed in 1 MiB chunks from memory. Throughput in bytes hashed.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sha2::{Digest, Sha256};

const SIZE: usize = 64 << 20;
const CHUNK: usize = 1 << 20;

fn bench(c: &mut Criterion) {
    let data: Vec<u8> = (0..SIZE).map(|i| (i * 31 + i / 4096) as u8).collect();
    let mut g = c.benchmark_group("sha256");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Bytes(SIZE as u64));
    g.bench_function("64 MiB in 1 MiB chunks", |b| {
        b.iter(|| {
            let mut h = Sha256::new();
            for chunk in data.chunks(CHUNK) {
                h.update(black_box(chunk));
            }
            black_box(h.finalize())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
