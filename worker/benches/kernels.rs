//! CPU matrix-product kernels per weight type (docs/benchmarks.md, section "Kernels"): a 576 x 1536
//! matrix (the test model's FFN down-projection) times 1, 8 and 64 tokens on one thread, so the
//! types and batch sizes compare side by side in one run. The K-quants also run their previous
//! method (each row dequantised to f32 for every token, then an f32 dot product) next to their
//! integer kernels.
//!
//! Run: `cargo bench -p tessera-worker --bench kernels`

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use tessera_worker::engine::sampling::Rng;
use tessera_worker::kernels::{Bytes, Pool, QMatrix, dot, matmul};
use tessera_worker::model::gguf::GgmlType;

const ROWS: usize = 576;
const COLS: usize = 1536;

fn values(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.next_f32() * 2.0 - 1.0).collect()
}

/// Random K-quant blocks with small finite f16 scales (any bit pattern is a valid block).
fn kquant(rng: &mut Rng, ty: GgmlType) -> QMatrix {
    let (per, bytes) = ty.block();
    let blocks = ROWS * COLS / per as usize;
    let mut data = Vec::with_capacity(blocks * bytes as usize);
    for _ in 0..blocks {
        let mut b: Vec<u8> = (0..bytes).map(|_| (rng.next_u64() & 0xFF) as u8).collect();
        let scales: &[usize] = if ty == GgmlType::Q6_K {
            &[208]
        } else {
            &[0, 2]
        };
        for &at in scales {
            let s = half::f16::from_f32(rng.next_f32() * 0.01)
                .to_bits()
                .to_le_bytes();
            b[at..at + 2].copy_from_slice(&s);
        }
        data.extend(b);
    }
    QMatrix::new(ty, ROWS, COLS, Bytes::Owned(data.into())).expect("valid matrix")
}

/// The K-quants' method before their integer kernels: dequantise the row for each token.
fn dequantise_then_dot(w: &QMatrix, x: &[f32], b: usize, out: &mut [f32]) {
    let mut row = vec![0f32; COLS];
    for t in 0..b {
        for r in 0..ROWS {
            w.dequantize_row(r, &mut row);
            out[t * ROWS + r] = dot::dot_f32(&row, &x[t * COLS..(t + 1) * COLS]);
        }
    }
}

fn bench(c: &mut Criterion) {
    let mut rng = Rng::new(1);
    let pool = Pool::new(1).expect("pool");
    eprintln!("kernels: {}", dot::detect());
    let weights = values(&mut rng, ROWS * COLS);
    let mut matrices: Vec<QMatrix> = [
        GgmlType::F16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
    ]
    .into_iter()
    .map(|ty| QMatrix::from_f32(ty, ROWS, COLS, &weights))
    .collect();
    matrices
        .extend([GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K].map(|ty| kquant(&mut rng, ty)));

    let mut group = c.benchmark_group("matmul 576x1536");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    for b in [1usize, 8, 64] {
        let x = values(&mut rng, b * COLS);
        let mut out = vec![0f32; b * ROWS];
        for w in &matrices {
            group.bench_with_input(BenchmarkId::new(w.ty.to_string(), b), &b, |bench, &b| {
                bench.iter(|| matmul(&pool, black_box(w), black_box(&x), b, &mut out))
            });
            if matches!(w.ty, GgmlType::Q4_K | GgmlType::Q6_K) && b <= 8 {
                let name = format!("{} dequantise+f32", w.ty);
                group.bench_with_input(BenchmarkId::new(name, b), &b, |bench, &b| {
                    bench.iter(|| dequantise_then_dot(black_box(w), black_box(&x), b, &mut out))
                });
            }
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
