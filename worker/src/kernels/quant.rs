//! ggml block layouts: dequantisation of weight rows, quantisation of rows (to build test models
//! and to encode activations), all in plain scalar code that the SIMD paths are tested against.
//!
//! Layouts (little-endian, as in ggml's `ggml-common.h`):
//! - `Q4_0`: f16 `d`, 16 bytes of nibbles; element `j` (0..16) is the low nibble of byte `j`,
//!   element `j + 16` its high nibble; value `d * (q - 8)`.
//! - `Q4_1`: f16 `d`, f16 `m`, 16 bytes of nibbles as `Q4_0`; value `d * q + m`.
//! - `Q5_0`: f16 `d`, a little-endian `u32` `qh` of fifth bits, 16 bytes of nibbles as `Q4_0`;
//!   element `j`'s fifth bit is bit `j` of `qh`; value `d * (q - 16)`.
//! - `Q5_1`: f16 `d`, f16 `m`, `qh`, 16 bytes of nibbles as `Q5_0`; value `d * q + m`.
//! - `Q8_0`: f16 `d`, 32 `i8`; value `d * q`.
//! - `Q4_K`: f16 `d`, f16 `dmin`, 12 bytes of packed 6-bit scales and mins, 128 bytes of nibbles
//!   (256 elements).
//! - `Q5_K`: as `Q4_K` with 32 bytes of fifth bits (`qh`) before the nibbles: element `l` of
//!   64-element chunk `j` takes bit `2j` of `qh[l]`, element `l + 32` bit `2j + 1` (176 bytes).
//! - `Q6_K`: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 `i8` scales, f16 `d`.

use half::{bf16, f16};

use crate::model::gguf::GgmlType;

/// Elements per block of the 32-element quantisations.
pub const QK: usize = 32;
/// Elements per K-quant super-block.
pub const QK_K: usize = 256;

/// An activation block quantised to 8 bits, ggml's `block_q8_1` with f32 scales: `d` is the
/// scale, `s = d * sum(qs)` (used by the `Q4_1` dot product for the weights' offset term).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[repr(C)]
pub struct BlockQ8 {
    pub d: f32,
    pub s: f32,
    pub qs: [i8; QK],
}

/// Whether the kernels can multiply with weights of this type.
pub fn supported(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::F32
            | GgmlType::F16
            | GgmlType::BF16
            | GgmlType::Q8_0
            | GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q4_K
            | GgmlType::Q5_K
            | GgmlType::Q6_K
    )
}

/// Types whose dot products use 8-bit quantised activations (every quantised type; the float
/// types multiply f32 activations).
pub fn uses_q8_activations(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q8_0
            | GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q4_K
            | GgmlType::Q5_K
            | GgmlType::Q6_K
    )
}

/// The 5-bit values of a `Q5_0`/`Q5_1` block: nibbles at `qs` (16 bytes), fifth bits in `qh`.
#[inline]
pub(crate) fn q5_values(qh: u32, qs: &[u8]) -> [u8; QK] {
    let mut q = [0u8; QK];
    for j in 0..16 {
        q[j] = (qs[j] & 0x0F) | ((((qh >> j) & 1) as u8) << 4);
        q[j + 16] = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
    }
    q
}

#[inline]
pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[inline]
pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Quantise `x` (a multiple of 32 long) into `out` (`x.len() / 32` blocks), round to nearest,
/// symmetric, clamped to ±127 (so that the SIMD sign trick never saturates).
pub fn quantize_q8(x: &[f32], out: &mut [BlockQ8]) {
    debug_assert_eq!(x.len(), out.len() * QK);
    for (xb, ob) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in ob.qs.iter_mut().zip(xb) {
            let r = (v * id).round().clamp(-127.0, 127.0) as i8;
            *q = r;
            sum += i32::from(r);
        }
        ob.d = d;
        ob.s = d * sum as f32;
    }
}

/// Dequantise a row of `out.len()` elements encoded as `ty` in `b`.
///
/// Panics if `ty` is not [`supported`] or `b` is too short: callers check both when loading.
pub fn dequantize_row(ty: GgmlType, b: &[u8], out: &mut [f32]) {
    let n = out.len();
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(b[..n * 4].chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(b[..n * 2].chunks_exact(2)) {
                *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, c) in out.iter_mut().zip(b[..n * 2].chunks_exact(2)) {
                *o = bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        GgmlType::Q8_0 => {
            for (o, blk) in out.chunks_exact_mut(QK).zip(b.chunks_exact(34)) {
                let d = f16_at(blk, 0);
                for (v, &q) in o.iter_mut().zip(&blk[2..34]) {
                    *v = d * f32::from(q as i8);
                }
            }
        }
        GgmlType::Q4_0 => {
            for (o, blk) in out.chunks_exact_mut(QK).zip(b.chunks_exact(18)) {
                let d = f16_at(blk, 0);
                for j in 0..16 {
                    let q = blk[2 + j];
                    o[j] = d * (f32::from(q & 0x0F) - 8.0);
                    o[j + 16] = d * (f32::from(q >> 4) - 8.0);
                }
            }
        }
        GgmlType::Q4_1 => {
            for (o, blk) in out.chunks_exact_mut(QK).zip(b.chunks_exact(20)) {
                let d = f16_at(blk, 0);
                let m = f16_at(blk, 2);
                for j in 0..16 {
                    let q = blk[4 + j];
                    o[j] = d * f32::from(q & 0x0F) + m;
                    o[j + 16] = d * f32::from(q >> 4) + m;
                }
            }
        }
        GgmlType::Q5_0 => {
            for (o, blk) in out.chunks_exact_mut(QK).zip(b.chunks_exact(22)) {
                let d = f16_at(blk, 0);
                let q = q5_values(u32_at(blk, 2), &blk[6..22]);
                for (v, &q) in o.iter_mut().zip(&q) {
                    *v = d * (f32::from(q) - 16.0);
                }
            }
        }
        GgmlType::Q5_1 => {
            for (o, blk) in out.chunks_exact_mut(QK).zip(b.chunks_exact(24)) {
                let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
                let q = q5_values(u32_at(blk, 4), &blk[8..24]);
                for (v, &q) in o.iter_mut().zip(&q) {
                    *v = d * f32::from(q) + m;
                }
            }
        }
        GgmlType::Q4_K => {
            for (o, blk) in out.chunks_exact_mut(QK_K).zip(b.chunks_exact(144)) {
                dequantize_q4_k(blk, o);
            }
        }
        GgmlType::Q5_K => {
            for (o, blk) in out.chunks_exact_mut(QK_K).zip(b.chunks_exact(176)) {
                dequantize_q5_k(blk, o);
            }
        }
        GgmlType::Q6_K => {
            for (o, blk) in out.chunks_exact_mut(QK_K).zip(b.chunks_exact(210)) {
                dequantize_q6_k(blk, o);
            }
        }
        other => panic!("dequantize_row: {other} is not supported"),
    }
}

/// Sub-block `j`'s (scale, min) of a `Q4_K` block's 12 packed bytes.
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

fn dequantize_q4_k(blk: &[u8], out: &mut [f32]) {
    let d = f16_at(blk, 0);
    let dmin = f16_at(blk, 2);
    let scales = &blk[4..16];
    let qs = &blk[16..144];
    for (k, chunk) in out.chunks_exact_mut(64).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * k, scales);
        let (sc2, m2) = scale_min_k4(2 * k + 1, scales);
        let (d1, m1) = (d * f32::from(sc1), dmin * f32::from(m1));
        let (d2, m2) = (d * f32::from(sc2), dmin * f32::from(m2));
        let q = &qs[32 * k..32 * k + 32];
        for l in 0..32 {
            chunk[l] = d1 * f32::from(q[l] & 0x0F) - m1;
            chunk[l + 32] = d2 * f32::from(q[l] >> 4) - m2;
        }
    }
}

fn dequantize_q5_k(blk: &[u8], out: &mut [f32]) {
    let d = f16_at(blk, 0);
    let dmin = f16_at(blk, 2);
    let scales = &blk[4..16];
    let qh = &blk[16..48];
    let qs = &blk[48..176];
    for (k, chunk) in out.chunks_exact_mut(64).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * k, scales);
        let (sc2, m2) = scale_min_k4(2 * k + 1, scales);
        let (d1, m1) = (d * f32::from(sc1), dmin * f32::from(m1));
        let (d2, m2) = (d * f32::from(sc2), dmin * f32::from(m2));
        let q = &qs[32 * k..32 * k + 32];
        for l in 0..32 {
            let h1 = ((qh[l] >> (2 * k)) & 1) << 4;
            let h2 = ((qh[l] >> (2 * k + 1)) & 1) << 4;
            chunk[l] = d1 * f32::from((q[l] & 0x0F) | h1) - m1;
            chunk[l + 32] = d2 * f32::from((q[l] >> 4) | h2) - m2;
        }
    }
}

fn dequantize_q6_k(blk: &[u8], out: &mut [f32]) {
    let d = f16_at(blk, 208);
    for (n, y) in out.chunks_exact_mut(128).enumerate() {
        let ql = &blk[64 * n..64 * n + 64];
        let qh = &blk[128 + 32 * n..128 + 32 * n + 32];
        let sc = &blk[192 + 8 * n..192 + 8 * n + 8];
        let s = |i: usize| d * f32::from(sc[i] as i8);
        for l in 0..32 {
            let is = l / 16;
            let q1 = i32::from((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) - 32;
            let q2 = i32::from((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
            let q3 = i32::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            let q4 = i32::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            y[l] = s(is) * q1 as f32;
            y[l + 32] = s(is + 2) * q2 as f32;
            y[l + 64] = s(is + 4) * q3 as f32;
            y[l + 96] = s(is + 6) * q4 as f32;
        }
    }
}

/// Encode a row as `ty` the way ggml's reference quantisers do (`quantize_row_*_ref`). Used to
/// write test models and by the kernel tests; K-quants are not encodable here.
///
/// Panics for types it cannot encode and for rows that are not whole blocks.
pub fn quantize_row(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    match ty {
        GgmlType::F32 => x.iter().for_each(|v| out.extend(v.to_le_bytes())),
        GgmlType::F16 => x
            .iter()
            .for_each(|v| out.extend(f16::from_f32(*v).to_bits().to_le_bytes())),
        GgmlType::BF16 => x
            .iter()
            .for_each(|v| out.extend(bf16::from_f32(*v).to_bits().to_le_bytes())),
        GgmlType::Q8_0 => {
            assert!(x.len().is_multiple_of(QK));
            for b in x.chunks_exact(QK) {
                let amax = b.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16::from_f32(d).to_bits().to_le_bytes());
                out.extend(b.iter().map(|v| (v * id).round() as i8 as u8));
            }
        }
        GgmlType::Q4_0 | GgmlType::Q5_0 => {
            assert!(x.len().is_multiple_of(QK));
            let levels = if ty == GgmlType::Q4_0 { 16 } else { 32 };
            for b in x.chunks_exact(QK) {
                let (d, q) = quantize_symmetric(b, levels);
                out.extend(f16::from_f32(d).to_bits().to_le_bytes());
                push_values(&mut out, &q, levels);
            }
        }
        GgmlType::Q4_1 | GgmlType::Q5_1 => {
            assert!(x.len().is_multiple_of(QK));
            let levels = if ty == GgmlType::Q4_1 { 16 } else { 32 };
            for b in x.chunks_exact(QK) {
                let (d, min, q) = quantize_affine(b, levels);
                out.extend(f16::from_f32(d).to_bits().to_le_bytes());
                out.extend(f16::from_f32(min).to_bits().to_le_bytes());
                push_values(&mut out, &q, levels);
            }
        }
        other => panic!("quantize_row: cannot encode {other}"),
    }
    out
}

/// ggml's symmetric quantiser (`Q4_0`, `Q5_0`) of one 32-element block into `levels` values:
/// the element of largest magnitude becomes `-levels / 2`; value `d * (q - levels / 2)`.
fn quantize_symmetric(b: &[f32], levels: i32) -> (f32, [u8; QK]) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in b {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -(levels / 2) as f32;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let offset = (levels / 2) as f32 + 0.5;
    let q = std::array::from_fn(|j| ((b[j] * id + offset) as i32).clamp(0, levels - 1) as u8);
    (d, q)
}

/// ggml's affine quantiser (`Q4_1`, `Q5_1`) of one 32-element block into `levels` values from
/// the block's minimum: value `d * q + min`.
fn quantize_affine(b: &[f32], levels: i32) -> (f32, f32, [u8; QK]) {
    let min = b.iter().copied().fold(f32::INFINITY, f32::min);
    let max = b.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let d = (max - min) / (levels - 1) as f32;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q = std::array::from_fn(|j| (((b[j] - min) * id + 0.5) as i32).clamp(0, levels - 1) as u8);
    (d, min, q)
}

/// 32 values of 4 bits (16 levels: nibble pairs) or 5 bits (32 levels: `qh`, then the nibbles),
/// as ggml lays them out.
fn push_values(out: &mut Vec<u8>, q: &[u8; QK], levels: i32) {
    if levels == 32 {
        let mut qh = 0u32;
        for (j, &v) in q.iter().enumerate() {
            qh |= u32::from((v >> 4) & 1) << j;
        }
        out.extend(qh.to_le_bytes());
    }
    out.extend((0..16).map(|j| (q[j] & 0x0F) | ((q[j + 16] & 0x0F) << 4)));
}
