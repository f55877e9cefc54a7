//! The CPU kernels against straightforward scalar references on seeded random data:
//! block layouts (by hand and by round trip), SIMD dot products against the scalar ones, and
//! the threaded matrix products against a naive f32 product.

use tessera_worker::engine::sampling::Rng;
use tessera_worker::kernels::dot::{self, Kernel, PairKernel, Simd};
use tessera_worker::kernels::quant::{self, BlockQ8};
use tessera_worker::kernels::{Bytes, Pool, QMatrix, matmul, matmul_multi, quantize_activations};
use tessera_worker::model::gguf::GgmlType;

const ENCODABLE: [GgmlType; 8] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
];

fn randn(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| ((0..4).map(|_| rng.next_f32()).sum::<f32>() - 2.0) * scale)
        .collect()
}

fn f16(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_bits().to_le_bytes()
}

#[test]
fn q4_1_layout_by_hand() {
    // d = 0.5, m = -1; byte j holds element j (low nibble = j) and element j + 16 (high = 15 - j).
    let mut blk = Vec::new();
    blk.extend(f16(0.5));
    blk.extend(f16(-1.0));
    blk.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let mut out = [0f32; 32];
    quant::dequantize_row(GgmlType::Q4_1, &blk, &mut out);
    for j in 0..16 {
        assert_eq!(out[j], 0.5 * j as f32 - 1.0);
        assert_eq!(out[j + 16], 0.5 * (15 - j) as f32 - 1.0);
    }
}

#[test]
fn q4_0_and_q8_0_layouts_by_hand() {
    let mut blk = Vec::new();
    blk.extend(f16(2.0));
    blk.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let mut out = [0f32; 32];
    quant::dequantize_row(GgmlType::Q4_0, &blk, &mut out);
    for j in 0..16 {
        assert_eq!(out[j], 2.0 * (j as f32 - 8.0));
        assert_eq!(out[j + 16], 2.0 * ((15 - j) as f32 - 8.0));
    }
    let mut blk = Vec::new();
    blk.extend(f16(0.25));
    blk.extend((0..32i8).map(|j| (j * 4 - 64) as u8));
    quant::dequantize_row(GgmlType::Q8_0, &blk, &mut out);
    for (j, v) in out.iter().enumerate() {
        assert_eq!(*v, 0.25 * (j as f32 * 4.0 - 64.0));
    }
}

#[test]
fn quantise_dequantise_round_trip_within_half_a_step() {
    let mut rng = Rng::new(1);
    for ty in ENCODABLE {
        let x = randn(&mut rng, 256, 1.0);
        let mut y = vec![0f32; 256];
        quant::dequantize_row(ty, &quant::quantize_row(ty, &x), &mut y);
        for (b, (xb, yb)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
            let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
            let range = xb.iter().copied().fold(f32::MIN, f32::max)
                - xb.iter().copied().fold(f32::MAX, f32::min);
            // Half a quantisation step plus f16 rounding of the scales.
            let tol = match ty {
                GgmlType::F32 => 0.0,
                GgmlType::F16 => amax * 1e-3,
                GgmlType::BF16 => amax * 8e-3,
                GgmlType::Q8_0 => amax / 127.0 * 0.5 + amax * 2e-3,
                GgmlType::Q4_0 => amax / 8.0 * 0.5 + amax * 2e-3,
                GgmlType::Q5_0 => amax / 16.0 * 0.5 + amax * 2e-3,
                GgmlType::Q5_1 => range / 31.0 * 0.5 + amax * 2e-3,
                GgmlType::Q4_1 => range / 15.0 * 0.5 + amax * 2e-3,
                other => panic!("no tolerance for {other}"),
            };
            for (a, b2) in xb.iter().zip(yb) {
                assert!(
                    (a - b2).abs() <= tol,
                    "{ty} block {b}: {a} vs {b2} (tol {tol})"
                );
            }
        }
    }
}

fn row_dot(k: Kernel, w: &[u8], x: &[f32], q8: &[BlockQ8]) -> f32 {
    match k {
        Kernel::Q8(f) => f(w, q8),
        Kernel::F32(f) => f(w, x),
    }
}

/// Random bytes that are valid K-quant blocks (finite f16 scales).
fn random_kquant(rng: &mut Rng, ty: GgmlType, blocks: usize) -> Vec<u8> {
    let bytes = ty.block().1 as usize;
    let mut out = Vec::new();
    for _ in 0..blocks {
        let mut b: Vec<u8> = (0..bytes).map(|_| (rng.next_u64() & 0xFF) as u8).collect();
        let at = if ty == GgmlType::Q6_K {
            &[208][..]
        } else {
            &[0, 2][..]
        };
        for &i in at {
            b[i..i + 2].copy_from_slice(&f16(rng.next_f32() * 0.01));
        }
        out.extend(b);
    }
    out
}

#[test]
fn simd_dot_products_match_scalar_and_the_f32_reference() {
    if dot::detect() != Simd::Avx2 {
        eprintln!("no AVX2 on this CPU: only the scalar kernels run");
    }
    let mut rng = Rng::new(7);
    for cols in [32, 64, 96, 512, 576, 1536] {
        let x = randn(&mut rng, cols, 1.0);
        let q8 = quantize_activations(&x, cols);
        let xq: Vec<f32> = q8
            .iter()
            .flat_map(|b| b.qs.iter().map(move |&q| b.d * f32::from(q)))
            .collect();
        let mut types: Vec<(GgmlType, Vec<u8>)> = ENCODABLE
            .iter()
            .map(|&ty| (ty, quant::quantize_row(ty, &randn(&mut rng, cols, 0.5))))
            .collect();
        if cols.is_multiple_of(256) {
            for ty in [GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K] {
                types.push((ty, random_kquant(&mut rng, ty, cols / 256)));
            }
        }
        for (ty, w) in types {
            let mut wf = vec![0f32; cols];
            quant::dequantize_row(ty, &w, &mut wf);
            let scalar = row_dot(dot::kernel(ty, Simd::Scalar), &w, &x, &q8);
            let simd = row_dot(dot::kernel(ty, Simd::Avx2), &w, &x, &q8);
            let mag: f32 = wf.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum::<f32>() + 1e-6;
            // SIMD vs scalar: same integer products, different float summation order.
            assert!(
                (scalar - simd).abs() <= 1e-4 * mag,
                "{ty} cols {cols}: scalar {scalar} simd {simd}"
            );
            // Scalar vs the f32 reference on the same (quantised) activations: exact up to
            // float rounding.
            let acts = if quant::uses_q8_activations(ty) {
                &xq
            } else {
                &x
            };
            let reference: f32 = wf.iter().zip(acts).map(|(a, b)| a * b).sum();
            assert!(
                (scalar - reference).abs() <= 1e-4 * mag,
                "{ty} cols {cols}: scalar {scalar} reference {reference}"
            );
            // And against unquantised activations: within the 8-bit activation error.
            let exact: f32 = wf.iter().zip(&x).map(|(a, b)| a * b).sum();
            assert!(
                (scalar - exact).abs() <= 2e-2 * mag,
                "{ty} cols {cols}: {scalar} vs unquantised {exact}"
            );
        }
    }
}

#[test]
fn threaded_matmul_matches_a_naive_product() {
    let mut rng = Rng::new(11);
    let (rows, cols) = (77, 256);
    let pools = [
        Pool::with_simd(1, Simd::Scalar).unwrap(),
        Pool::with_simd(3, Simd::Avx2).unwrap(),
    ];
    let mut matrices: Vec<QMatrix> = ENCODABLE
        .iter()
        .map(|&ty| QMatrix::from_f32(ty, rows, cols, &randn(&mut rng, rows * cols, 0.3)))
        .collect();
    for ty in [GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K] {
        let bytes = random_kquant(&mut rng, ty, rows * cols / 256);
        matrices.push(QMatrix::new(ty, rows, cols, Bytes::Owned(bytes.into())).unwrap());
    }
    for w in &matrices {
        let ty = w.ty;
        let wf = w.to_f32();
        for b in [1, 5] {
            let x = randn(&mut rng, b * cols, 1.0);
            let mut expect = vec![0f32; b * rows];
            for t in 0..b {
                for r in 0..rows {
                    expect[t * rows + r] =
                        (0..cols).map(|c| wf[r * cols + c] * x[t * cols + c]).sum();
                }
            }
            let scale = expect.iter().fold(0f32, |a, v| a.max(v.abs()));
            let tol = if quant::uses_q8_activations(ty) {
                2e-2
            } else {
                1e-4
            } * scale;
            for pool in &pools {
                let mut out = vec![0f32; b * rows];
                matmul(pool, w, &x, b, &mut out);
                for (i, (o, e)) in out.iter().zip(&expect).enumerate() {
                    assert!((o - e).abs() <= tol, "{ty} b={b} [{i}]: {o} vs {e}");
                }
            }
        }
    }
}

#[test]
fn matmul_multi_equals_separate_products() {
    let mut rng = Rng::new(5);
    let pool = Pool::new(2).unwrap();
    let cols = 128;
    let a = QMatrix::from_f32(GgmlType::Q4_1, 40, cols, &randn(&mut rng, 40 * cols, 1.0));
    let b = QMatrix::from_f32(GgmlType::Q8_0, 24, cols, &randn(&mut rng, 24 * cols, 1.0));
    let c = QMatrix::from_f32(GgmlType::F16, 8, cols, &randn(&mut rng, 8 * cols, 1.0));
    let x = randn(&mut rng, 3 * cols, 1.0);
    let (mut oa, mut ob, mut oc) = (vec![0f32; 3 * 40], vec![0f32; 3 * 24], vec![0f32; 3 * 8]);
    matmul_multi(
        &pool,
        &[&a, &b, &c],
        &x,
        3,
        &mut [&mut oa, &mut ob, &mut oc],
    );
    for (w, o) in [(&a, &oa), (&b, &ob), (&c, &oc)] {
        let mut single = vec![0f32; 3 * w.rows];
        matmul(&pool, w, &x, 3, &mut single);
        assert_eq!(&single, o);
    }
}

#[test]
fn slices_select_rows_and_block_aligned_columns() {
    let mut rng = Rng::new(3);
    let (rows, cols) = (6, 128);
    let w = QMatrix::from_f32(
        GgmlType::Q4_1,
        rows,
        cols,
        &randn(&mut rng, rows * cols, 1.0),
    );
    let full = w.to_f32();
    let r = w.slice_rows(2..5).to_f32();
    assert_eq!(r, full[2 * cols..5 * cols]);
    let c = w.slice_cols(32..96).unwrap().to_f32();
    for row in 0..rows {
        assert_eq!(
            c[row * 64..(row + 1) * 64],
            full[row * cols + 32..row * cols + 96]
        );
    }
    let e = w.slice_cols(16..96).unwrap_err();
    assert!(e.contains("block boundaries"), "{e}");

    // K-quants split on 256-element super-blocks (a row-parallel shard at TP=3 of a 768-wide
    // row), and name the boundary when a split would cut one.
    for ty in [GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K] {
        let (rows, cols) = (4, 768);
        let bytes = random_kquant(&mut rng, ty, rows * cols / 256);
        let w = QMatrix::new(ty, rows, cols, Bytes::Owned(bytes.into())).unwrap();
        let full = w.to_f32();
        let c = w.slice_cols(256..512).unwrap().to_f32();
        for row in 0..rows {
            assert_eq!(
                c[row * 256..(row + 1) * 256],
                full[row * cols + 256..row * cols + 512],
                "{ty}"
            );
        }
        let e = w.slice_cols(0..384).unwrap_err();
        assert!(e.contains("block boundaries"), "{ty}: {e}");
    }
}

/// K-quant blocks of random bytes (finite f16 scales), dequantised by the `gguf` Python package
/// (gguf-py, the reference numpy implementation maintained with llama.cpp): samples and sums.
#[rustfmt::skip]
#[allow(clippy::excessive_precision)]
mod kquant_reference {
    pub const Q4_K_BYTES: [u8; 288] = [69, 34, 133, 159, 238, 171, 20, 206, 245, 153, 204, 5, 37, 53, 213, 206, 192, 173, 6, 120, 63, 96, 236, 131, 118, 4, 87, 161, 124, 71, 42, 73, 237, 16, 194, 250, 10, 103, 206, 13, 143, 2, 38, 71, 133, 118, 36, 98, 196, 35, 57, 146, 50, 179, 145, 104, 206, 53, 141, 33, 181, 39, 151, 11, 180, 138, 66, 0, 165, 98, 123, 12, 144, 184, 24, 38, 129, 1, 202, 255, 85, 54, 228, 48, 127, 169, 1, 167, 109, 247, 16, 192, 78, 220, 8, 60, 189, 181, 64, 72, 8, 185, 88, 111, 191, 138, 99, 67, 48, 68, 100, 249, 67, 40, 127, 45, 33, 51, 206, 229, 217, 85, 53, 204, 120, 134, 31, 216, 14, 127, 160, 29, 208, 161, 116, 100, 83, 151, 198, 160, 173, 193, 54, 126, 48, 163, 17, 32, 107, 131, 59, 173, 52, 139, 181, 169, 63, 196, 144, 15, 138, 137, 135, 245, 15, 140, 59, 142, 252, 140, 76, 231, 51, 218, 125, 69, 151, 117, 140, 92, 189, 209, 48, 225, 71, 217, 216, 47, 124, 91, 112, 16, 45, 88, 184, 95, 72, 215, 222, 173, 36, 146, 75, 31, 190, 30, 190, 222, 190, 75, 79, 87, 255, 139, 49, 58, 133, 9, 97, 139, 135, 24, 60, 229, 52, 107, 73, 226, 194, 51, 72, 223, 74, 189, 116, 78, 92, 139, 189, 4, 184, 93, 52, 199, 243, 109, 30, 181, 205, 194, 94, 197, 89, 159, 78, 0, 109, 47, 177, 9, 250, 117, 220, 128, 15, 173, 204, 85, 116, 105, 201, 111, 148, 235, 105, 238, 187, 96, 8, 52, 18, 181, 41, 135, 239, 112, 47, 83];
    pub const Q4_K_SAMPLES: [(usize, f32); 14] = [(0, 0.3891944885253906), (1, 7.711811065673828), (31, 1.5157508850097656), (32, 6.502094268798828), (63, 3.3428382873535156), (64, 1.0677337646484375), (100, 0.5510139465332031), (127, 2.608203887939453), (128, 3.6121368408203125), (200, 0.9989738464355469), (255, 5.40252685546875), (256, -6.449371337890625), (300, -0.21370697021484375), (511, -3.5531005859375)];
    pub const Q4_K_SUM: f64 = -225.2364273071289;
    pub const Q4_K_ABS_SUM: f64 = 1839.201805114746;
    pub const Q4_K_WEIGHTED_SUM: f64 = -280690.69861602783;
    pub const Q6_K_BYTES: [u8; 420] = [188, 14, 93, 148, 67, 201, 211, 114, 169, 128, 103, 43, 105, 76, 135, 204, 214, 211, 190, 204, 121, 206, 74, 60, 8, 210, 72, 15, 56, 104, 221, 81, 242, 149, 96, 37, 149, 231, 196, 204, 13, 64, 1, 133, 177, 55, 207, 129, 35, 54, 98, 74, 140, 114, 162, 129, 212, 103, 171, 247, 232, 55, 119, 60, 190, 233, 159, 196, 80, 166, 184, 3, 11, 129, 85, 80, 243, 194, 231, 238, 108, 26, 11, 223, 213, 173, 248, 21, 131, 115, 209, 215, 115, 31, 77, 216, 28, 30, 10, 116, 158, 110, 45, 94, 166, 73, 250, 250, 249, 61, 118, 243, 151, 59, 94, 173, 227, 187, 64, 102, 153, 131, 208, 53, 190, 170, 186, 239, 252, 88, 207, 68, 175, 124, 96, 142, 15, 148, 181, 172, 69, 130, 121, 61, 236, 78, 174, 80, 129, 207, 205, 189, 141, 132, 137, 50, 234, 205, 164, 172, 163, 68, 208, 241, 162, 18, 40, 175, 76, 184, 108, 165, 121, 49, 189, 118, 28, 239, 199, 247, 72, 176, 205, 56, 11, 145, 24, 91, 50, 167, 20, 164, 134, 154, 158, 167, 155, 55, 106, 27, 24, 213, 138, 41, 159, 122, 53, 177, 18, 159, 56, 215, 149, 181, 168, 162, 159, 245, 249, 238, 247, 31, 99, 96, 133, 174, 104, 84, 167, 6, 108, 204, 18, 209, 132, 10, 82, 167, 171, 49, 83, 189, 97, 49, 137, 29, 245, 99, 16, 62, 42, 40, 41, 101, 69, 204, 221, 184, 183, 216, 121, 213, 102, 97, 82, 111, 130, 7, 64, 17, 152, 182, 51, 82, 149, 27, 129, 247, 205, 156, 228, 241, 203, 43, 158, 112, 229, 240, 91, 85, 115, 173, 123, 134, 222, 253, 141, 175, 239, 157, 214, 216, 66, 185, 195, 4, 64, 96, 75, 99, 16, 207, 140, 41, 234, 28, 131, 41, 34, 39, 105, 77, 58, 92, 235, 249, 127, 182, 116, 47, 73, 124, 80, 233, 253, 216, 190, 124, 5, 241, 9, 187, 182, 102, 229, 115, 136, 108, 107, 203, 161, 141, 126, 123, 61, 165, 148, 181, 191, 122, 42, 60, 36, 154, 104, 195, 97, 245, 211, 207, 231, 187, 219, 30, 57, 81, 121, 205, 226, 108, 245, 2, 239, 102, 42, 169, 127, 38, 128, 71, 60, 0, 83, 189, 190, 202, 178, 54, 145, 107, 58, 169, 13, 90, 241, 203, 165, 161, 243, 222, 100, 144, 58, 156, 89, 239, 97, 161, 2, 37];
    pub const Q6_K_SAMPLES: [(usize, f32); 14] = [(0, -16.84722900390625), (1, -15.162506103515625), (31, -21.832351684570312), (32, 12.179718017578125), (63, 17.206268310546875), (64, 18.82884979248047), (100, -6.5869903564453125), (127, -0.5592727661132812), (128, -4.9713134765625), (200, -21.431884765625), (255, 7.6364898681640625), (256, -2.034423828125), (300, 7.922515869140625), (511, -13.008575439453125)];
    pub const Q6_K_SUM: f64 = -69.47221374511719;
    pub const Q6_K_ABS_SUM: f64 = 7663.571228027344;
    pub const Q6_K_WEIGHTED_SUM: f64 = 7285.108009338379;
    pub const Q5_K_BYTES: [u8; 352] = [173, 39, 202, 17, 238, 171, 20, 206, 245, 153, 204, 5, 37, 53, 213, 206, 192, 173, 6, 120, 63, 96, 236, 131, 118, 4, 87, 161, 124, 71, 42, 73, 237, 16, 194, 250, 10, 103, 206, 13, 143, 2, 38, 71, 133, 118, 36, 98, 196, 35, 57, 146, 50, 179, 145, 104, 206, 53, 141, 33, 181, 39, 151, 11, 180, 138, 66, 0, 165, 98, 123, 12, 144, 184, 24, 38, 129, 1, 202, 255, 85, 54, 228, 48, 127, 169, 1, 167, 109, 247, 16, 192, 78, 220, 8, 60, 189, 181, 64, 72, 8, 185, 88, 111, 191, 138, 99, 67, 48, 68, 100, 249, 67, 40, 127, 45, 33, 51, 206, 229, 217, 85, 53, 204, 120, 134, 31, 216, 14, 127, 160, 29, 208, 161, 116, 100, 83, 151, 198, 160, 173, 193, 54, 126, 126, 57, 118, 170, 107, 131, 59, 173, 52, 139, 181, 169, 63, 196, 144, 15, 138, 137, 135, 245, 15, 140, 59, 142, 252, 140, 76, 231, 51, 218, 125, 69, 59, 17, 193, 166, 189, 209, 48, 225, 71, 217, 216, 47, 124, 91, 112, 16, 45, 88, 184, 95, 72, 215, 222, 173, 36, 146, 75, 31, 190, 30, 190, 222, 190, 75, 79, 87, 255, 139, 49, 58, 133, 9, 97, 139, 135, 24, 60, 229, 52, 107, 73, 226, 194, 51, 72, 223, 74, 189, 116, 78, 92, 139, 189, 4, 184, 93, 52, 199, 243, 109, 30, 181, 205, 194, 94, 197, 89, 159, 78, 0, 109, 47, 177, 9, 250, 117, 220, 128, 15, 173, 204, 85, 116, 105, 201, 111, 148, 235, 105, 238, 187, 96, 8, 52, 18, 181, 41, 135, 239, 112, 47, 83, 226, 235, 130, 75, 192, 32, 100, 206, 233, 91, 57, 39, 6, 1, 3, 81, 74, 206, 104, 30, 130, 100, 39, 38, 176, 131, 240, 71, 138, 174, 209, 178, 188, 14, 93, 148, 67, 201, 211, 114, 169, 128, 103, 43, 105, 76, 135, 204, 214, 211, 190, 204, 121, 206, 74, 60, 8, 210, 72, 15, 56, 104, 221, 81];
    pub const Q5_K_SAMPLES: [(usize, f32); 14] = [(0, 5.479514122009277), (1, 26.16814422607422), (31, 20.65117645263672), (32, 15.453829765319824), (63, 39.95036697387695), (64, 2.9898719787597656), (100, 9.65116024017334), (127, 6.29300594329834), (128, 4.732046127319336), (200, 2.955245018005371), (255, 7.427433013916016), (256, 0.9636287689208984), (300, 0.8875002861022949), (511, 0.6699752807617188)];
    pub const Q5_K_SUM: f64 = 3937.4492135047913;
    pub const Q5_K_ABS_SUM: f64 = 3937.977804660797;
    pub const Q5_K_WEIGHTED_SUM: f64 = 576955.7455296516;
}

#[test]
fn k_quants_dequantise_like_gguf_py() {
    use kquant_reference::*;
    type Case<'a> = (GgmlType, &'a [u8], &'a [(usize, f32)], f64, f64, f64);
    let cases: [Case<'_>; 3] = [
        (
            GgmlType::Q4_K,
            &Q4_K_BYTES,
            &Q4_K_SAMPLES,
            Q4_K_SUM,
            Q4_K_ABS_SUM,
            Q4_K_WEIGHTED_SUM,
        ),
        (
            GgmlType::Q5_K,
            &Q5_K_BYTES,
            &Q5_K_SAMPLES,
            Q5_K_SUM,
            Q5_K_ABS_SUM,
            Q5_K_WEIGHTED_SUM,
        ),
        (
            GgmlType::Q6_K,
            &Q6_K_BYTES,
            &Q6_K_SAMPLES,
            Q6_K_SUM,
            Q6_K_ABS_SUM,
            Q6_K_WEIGHTED_SUM,
        ),
    ];
    for (ty, bytes, samples, sum, abs_sum, weighted) in cases {
        let mut out = vec![0f32; 512];
        quant::dequantize_row(ty, bytes, &mut out);
        for &(i, v) in samples {
            assert!(
                (out[i] - v).abs() <= 1e-5 * v.abs().max(1.0),
                "{ty}[{i}]: {} vs {v}",
                out[i]
            );
        }
        let s: f64 = out.iter().map(|&v| f64::from(v)).sum();
        let a: f64 = out.iter().map(|&v| f64::from(v).abs()).sum();
        let w: f64 = out
            .iter()
            .enumerate()
            .map(|(i, &v)| i as f64 * f64::from(v))
            .sum();
        for (name, ours, theirs) in [
            ("sum", s, sum),
            ("abs sum", a, abs_sum),
            ("weighted", w, weighted),
        ] {
            assert!(
                (ours - theirs).abs() <= 1e-6 * theirs.abs().max(1.0),
                "{ty} {name}: {ours} vs {theirs}"
            );
        }
    }
}

/// ggml's reference quantisers, as gguf-py implements them, on a fixed input.
#[rustfmt::skip]
mod quantiser_reference {
    pub const Q8_0_REF: [u8; 272] = [238, 37, 129, 223, 61, 154, 248, 86, 180, 18, 112, 205, 43, 137, 231, 69, 162, 0, 94, 187, 25, 119, 213, 51, 144, 238, 76, 170, 8, 102, 195, 33, 127, 220, 25, 37, 68, 135, 244, 97, 164, 18, 127, 194, 0, 255, 0, 1, 255, 0, 1, 255, 0, 1, 255, 1, 255, 0, 1, 255, 0, 1, 255, 0, 1, 0, 1, 255, 177, 37, 0, 1, 255, 0, 1, 255, 0, 255, 224, 66, 153, 251, 93, 179, 21, 119, 206, 48, 134, 232, 74, 161, 3, 101, 187, 29, 127, 214, 56, 142, 240, 82, 238, 37, 172, 10, 104, 198, 36, 129, 223, 61, 154, 248, 86, 180, 18, 112, 205, 43, 137, 231, 69, 162, 0, 94, 187, 25, 119, 213, 51, 144, 238, 76, 170, 8, 238, 37, 102, 195, 33, 127, 220, 58, 152, 246, 84, 177, 15, 109, 203, 41, 134, 228, 66, 159, 253, 91, 185, 23, 117, 210, 48, 142, 236, 74, 167, 5, 99, 192, 207, 37, 31, 127, 217, 57, 147, 243, 83, 173, 13, 109, 199, 39, 129, 225, 65, 155, 251, 91, 181, 21, 117, 207, 47, 137, 233, 73, 163, 3, 98, 189, 29, 124, 238, 37, 215, 53, 147, 241, 79, 172, 10, 104, 198, 36, 129, 223, 61, 154, 248, 86, 180, 18, 112, 205, 43, 137, 231, 69, 162, 0, 94, 187, 25, 119, 213, 51, 238, 37, 144, 238, 76, 170, 8, 102, 195, 33, 127, 220, 58, 152, 246, 84, 177, 15, 109, 203, 41, 134, 228, 66, 159, 253, 91, 185, 23, 117, 210, 48, 142, 236];
    pub const Q4_0_REF: [u8; 144] = [226, 53, 224, 70, 172, 242, 88, 189, 19, 121, 223, 53, 139, 224, 70, 172, 242, 104, 15, 181, 132, 143, 137, 130, 142, 135, 128, 140, 136, 136, 136, 136, 136, 136, 136, 136, 166, 181, 184, 88, 248, 168, 56, 232, 136, 40, 202, 100, 15, 184, 82, 253, 151, 49, 226, 53, 3, 105, 207, 36, 138, 224, 70, 172, 242, 88, 189, 19, 121, 223, 53, 139, 226, 181, 66, 236, 134, 32, 202, 116, 31, 185, 83, 253, 151, 49, 235, 133, 47, 202, 196, 181, 134, 32, 218, 116, 31, 185, 83, 253, 151, 49, 236, 134, 47, 202, 100, 14, 226, 53, 53, 155, 241, 87, 189, 3, 105, 207, 36, 138, 224, 70, 172, 242, 88, 189, 226, 181, 31, 185, 83, 253, 168, 66, 236, 134, 32, 202, 116, 31, 185, 83, 253, 151];
    pub const Q4_1_REF: [u8; 160] = [70, 54, 226, 193, 208, 54, 155, 241, 87, 189, 19, 105, 206, 36, 138, 224, 70, 156, 242, 87, 69, 53, 211, 192, 123, 112, 119, 125, 114, 120, 127, 116, 119, 119, 119, 119, 119, 119, 119, 119, 230, 53, 105, 193, 71, 167, 7, 103, 199, 39, 135, 215, 53, 155, 241, 87, 189, 3, 105, 207, 22, 54, 226, 193, 3, 104, 206, 36, 138, 208, 70, 155, 242, 87, 189, 19, 121, 207, 37, 138, 38, 54, 166, 193, 189, 36, 121, 223, 53, 155, 225, 87, 172, 3, 104, 206, 36, 138, 208, 70, 38, 54, 196, 193, 121, 223, 53, 155, 225, 87, 172, 3, 104, 206, 36, 138, 208, 70, 155, 242, 22, 54, 226, 193, 53, 155, 241, 87, 173, 3, 104, 206, 36, 138, 208, 70, 155, 242, 87, 189, 38, 54, 166, 193, 225, 70, 172, 2, 104, 189, 36, 121, 223, 53, 155, 225, 87, 172, 3, 104];
    pub const Q5_0_REF: [u8; 176] = [226, 49, 164, 165, 45, 109, 192, 124, 56, 243, 191, 107, 38, 226, 174, 90, 21, 209, 141, 73, 244, 192, 15, 177, 150, 255, 255, 255, 7, 15, 1, 4, 12, 14, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 166, 177, 255, 45, 109, 105, 96, 160, 240, 48, 112, 192, 0, 48, 148, 200, 13, 81, 148, 234, 45, 97, 226, 49, 150, 180, 180, 165, 21, 209, 157, 73, 4, 192, 124, 56, 243, 191, 107, 38, 226, 174, 90, 21, 226, 177, 210, 210, 150, 150, 131, 200, 12, 64, 148, 217, 29, 97, 165, 234, 62, 114, 183, 251, 79, 132, 196, 177, 180, 180, 165, 45, 28, 80, 149, 217, 30, 98, 166, 250, 62, 114, 199, 11, 79, 132, 200, 13, 226, 49, 210, 146, 150, 182, 107, 39, 226, 174, 90, 21, 209, 157, 73, 4, 192, 124, 56, 243, 191, 107, 226, 177, 75, 90, 218, 210, 46, 114, 182, 251, 79, 131, 200, 12, 64, 148, 217, 29, 97, 165, 234, 62];
    pub const Q5_0_DEQ_SUM: f64 = -1.3121337890625;
    pub const Q5_0_DEQ_WEIGHTED: f64 = -63.6624755859375;
    pub const Q5_1_REF: [u8; 192] = [18, 50, 226, 193, 164, 165, 45, 109, 176, 123, 55, 227, 175, 106, 38, 210, 157, 89, 5, 193, 140, 72, 244, 176, 26, 49, 211, 192, 105, 0, 0, 0, 248, 240, 254, 251, 244, 241, 255, 247, 255, 255, 255, 255, 255, 255, 255, 255, 181, 49, 105, 193, 0, 210, 210, 150, 159, 95, 15, 207, 143, 63, 15, 207, 123, 55, 242, 175, 107, 22, 210, 158, 228, 49, 226, 193, 150, 180, 180, 165, 21, 209, 157, 73, 4, 192, 124, 56, 243, 191, 107, 38, 226, 174, 90, 21, 243, 49, 166, 193, 45, 45, 105, 105, 124, 56, 243, 191, 107, 38, 226, 158, 90, 21, 209, 141, 73, 4, 192, 124, 243, 49, 196, 193, 75, 75, 90, 218, 243, 191, 107, 38, 226, 158, 90, 21, 209, 141, 73, 4, 192, 124, 55, 243, 228, 49, 226, 193, 210, 146, 150, 182, 107, 39, 226, 174, 90, 21, 209, 157, 73, 4, 192, 124, 56, 243, 191, 107, 243, 49, 166, 193, 180, 165, 37, 45, 209, 157, 73, 4, 192, 124, 56, 243, 191, 107, 38, 226, 158, 90, 21, 209];
    pub const Q5_1_DEQ_SUM: f64 = -2.5653076171875;
    pub const Q5_1_DEQ_WEIGHTED: f64 = -236.4010009765625;
}

#[test]
fn quantisers_match_gguf_py_byte_for_byte() {
    use quantiser_reference::*;
    let mut x: Vec<f32> = (0..256i64)
        .map(|i| ((i * 37) % 101 - 50) as f32 / 17.0)
        .collect();
    x[40..72].iter_mut().for_each(|v| *v *= 0.01);
    for (ty, expect) in [
        (GgmlType::Q8_0, &Q8_0_REF[..]),
        (GgmlType::Q4_0, &Q4_0_REF[..]),
        (GgmlType::Q4_1, &Q4_1_REF[..]),
        (GgmlType::Q5_0, &Q5_0_REF[..]),
        (GgmlType::Q5_1, &Q5_1_REF[..]),
    ] {
        assert_eq!(quant::quantize_row(ty, &x), expect, "{ty}");
    }
    // gguf-py's dequantisation of the same bytes: sums, plain and weighted by position.
    for (ty, bytes, sum, weighted) in [
        (
            GgmlType::Q5_0,
            &Q5_0_REF[..],
            Q5_0_DEQ_SUM,
            Q5_0_DEQ_WEIGHTED,
        ),
        (
            GgmlType::Q5_1,
            &Q5_1_REF[..],
            Q5_1_DEQ_SUM,
            Q5_1_DEQ_WEIGHTED,
        ),
    ] {
        let mut out = vec![0f32; 256];
        quant::dequantize_row(ty, bytes, &mut out);
        let s: f64 = out.iter().map(|&v| f64::from(v)).sum();
        let w: f64 = out
            .iter()
            .enumerate()
            .map(|(i, &v)| i as f64 * f64::from(v))
            .sum();
        assert!(
            (s - sum).abs() <= 1e-6 * sum.abs().max(1.0),
            "{ty}: {s} vs {sum}"
        );
        assert!(
            (w - weighted).abs() <= 1e-6 * weighted.abs().max(1.0),
            "{ty}: {w} vs {weighted}"
        );
    }
}

/// The two- and four-row kernels (batched products) give each row's dot product bit for bit as
/// the one-row kernel does.
#[test]
fn pair_kernels_equal_the_one_row_kernel_bit_for_bit() {
    let mut rng = Rng::new(11);
    let paired = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
    ];
    for ty in paired {
        let Some(pair) = dot::pair_kernel(ty, Simd::Avx2) else {
            assert!(
                dot::detect() != Simd::Avx2,
                "{ty} has a two-row kernel on AVX2"
            );
            continue;
        };
        let (PairKernel::F32(pair), Kernel::F32(single)) = (pair, dot::kernel(ty, Simd::Avx2))
        else {
            continue;
        };
        // Float weights: whole 32-element steps, 8-element steps and a scalar tail.
        for cols in [8, 40, 100, 576] {
            let w = quant::quantize_row(ty, &randn(&mut rng, cols, 0.5));
            let (x, z) = (randn(&mut rng, cols, 1.0), randn(&mut rng, cols, 2.0));
            let (a, b) = pair(&w, &x, &z);
            assert_eq!(a.to_bits(), single(&w, &x).to_bits(), "{ty} x {cols}");
            assert_eq!(b.to_bits(), single(&w, &z).to_bits(), "{ty} z {cols}");
        }
    }
    for ty in paired {
        let Some(PairKernel::Q8(pair)) = dot::pair_kernel(ty, Simd::Avx2) else {
            continue;
        };
        let Kernel::Q8(single) = dot::kernel(ty, Simd::Avx2) else {
            panic!("{ty}: an 8-bit two-row kernel needs an 8-bit one-row kernel");
        };
        let kquant = matches!(ty, GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K);
        let widths: &[usize] = if kquant {
            &[256, 512, 1536]
        } else {
            &[32, 64, 96, 576, 1536]
        };
        for &cols in widths {
            let w = if kquant {
                random_kquant(&mut rng, ty, cols / 256)
            } else {
                quant::quantize_row(ty, &randn(&mut rng, cols, 0.5))
            };
            let x = quantize_activations(&randn(&mut rng, cols, 1.0), cols);
            let z = quantize_activations(&randn(&mut rng, cols, 2.0), cols);
            let (a, b) = pair(&w, &x, &z);
            assert_eq!(a.to_bits(), single(&w, &x).to_bits(), "{ty} x {cols}");
            assert_eq!(b.to_bits(), single(&w, &z).to_bits(), "{ty} z {cols}");
            if let Some(quad) = dot::quad_kernel(ty, Simd::Avx2) {
                let u = quantize_activations(&randn(&mut rng, cols, 0.3), cols);
                let v = quantize_activations(&randn(&mut rng, cols, 4.0), cols);
                let got = quad(&w, [&x, &z, &u, &v]);
                for (k, row) in [&x, &z, &u, &v].into_iter().enumerate() {
                    let want = single(&w, row);
                    assert_eq!(got[k].to_bits(), want.to_bits(), "{ty} quad row {k} {cols}");
                }
            }
        }
    }
    // A matrix product over 5 rows (two pairs and one alone) equals the products row by row.
    let pool = Pool::with_simd(2, Simd::Avx2).unwrap();
    for ty in [
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
    ] {
        let (rows, cols) = (40, 96);
        let m = QMatrix::from_f32(ty, rows, cols, &randn(&mut rng, rows * cols, 0.5));
        let x = randn(&mut rng, 5 * cols, 1.0);
        let mut all = vec![0f32; 5 * rows];
        matmul(&pool, &m, &x, 5, &mut all);
        for (t, want) in all.chunks_exact(rows).enumerate() {
            let mut one = vec![0f32; rows];
            matmul(&pool, &m, &x[t * cols..(t + 1) * cols], 1, &mut one);
            assert_eq!(one, want, "{ty} row {t}");
        }
    }
}
