//! Dot products of one weight row (in its GGUF encoding) with one activation row.
//!
//! Two families, as in ggml:
//! - 8-bit quantised activations ([`BlockQ8`]) against `Q8_0`, `Q4_0` and `Q4_1` weights: integer
//!   products per 32-element block, scaled once per block (`vec_dot_q4_1_q8_1` and friends);
//! - f32 activations against `F32`, `F16`, `BF16` weights (converted in registers), and against
//!   K-quants (dequantised one super-block at a time on the stack).
//!
//! Every kernel has a scalar version; the AVX2+FMA+F16C versions are chosen at run time by
//! [`kernel`] and tested against the scalar ones.

use half::{bf16, f16};

use super::quant::{self, BlockQ8, QK, QK_K, f16_at};
use crate::model::gguf::GgmlType;

/// A row dot product.
#[derive(Clone, Copy)]
pub enum Kernel {
    /// Against 8-bit quantised activations.
    Q8(fn(&[u8], &[BlockQ8]) -> f32),
    /// Against f32 activations.
    F32(fn(&[u8], &[f32]) -> f32),
}

/// The instruction set the kernels use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Simd {
    Scalar,
    Avx2,
}

impl std::fmt::Display for Simd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Simd::Scalar => "scalar",
            Simd::Avx2 => "avx2+fma+f16c",
        })
    }
}

/// The best instruction set this CPU offers (detected once).
pub fn detect() -> Simd {
    static LEVEL: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::env::var_os("TESSERA_FORCE_SCALAR").is_none()
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                return Simd::Avx2;
            }
        }
        Simd::Scalar
    })
}

/// The dot-product kernel for weights of type `ty` on instruction set `simd` (`Avx2` falls back
/// to scalar when the CPU lacks it). Panics on an unsupported type (checked at load time).
pub fn kernel(ty: GgmlType, simd: Simd) -> Kernel {
    #[cfg(target_arch = "x86_64")]
    let simd = if simd == Simd::Avx2 && detect() != Simd::Avx2 {
        Simd::Scalar
    } else {
        simd
    };
    #[cfg(target_arch = "x86_64")]
    if simd == Simd::Avx2 {
        return match ty {
            GgmlType::Q4_1 => Kernel::Q8(avx2::q4_1),
            GgmlType::Q4_0 => Kernel::Q8(avx2::q4_0),
            GgmlType::Q8_0 => Kernel::Q8(avx2::q8_0),
            GgmlType::F32 => Kernel::F32(avx2::f32),
            GgmlType::F16 => Kernel::F32(avx2::f16),
            GgmlType::BF16 => Kernel::F32(avx2::bf16),
            GgmlType::Q4_K => {
                Kernel::F32(|w, x| kquant_dot::<144>(GgmlType::Q4_K, w, x, avx2::f32_slices))
            }
            GgmlType::Q6_K => {
                Kernel::F32(|w, x| kquant_dot::<210>(GgmlType::Q6_K, w, x, avx2::f32_slices))
            }
            other => panic!("no kernel for {other}"),
        };
    }
    let _ = simd;
    match ty {
        GgmlType::Q4_1 => Kernel::Q8(scalar::q4_1),
        GgmlType::Q4_0 => Kernel::Q8(scalar::q4_0),
        GgmlType::Q8_0 => Kernel::Q8(scalar::q8_0),
        GgmlType::F32 => Kernel::F32(scalar::f32),
        GgmlType::F16 => Kernel::F32(scalar::f16),
        GgmlType::BF16 => Kernel::F32(scalar::bf16),
        GgmlType::Q4_K => {
            Kernel::F32(|w, x| kquant_dot::<144>(GgmlType::Q4_K, w, x, dot_f32_scalar))
        }
        GgmlType::Q6_K => {
            Kernel::F32(|w, x| kquant_dot::<210>(GgmlType::Q6_K, w, x, dot_f32_scalar))
        }
        other => panic!("no kernel for {other}"),
    }
}

/// A dot product of one weight row with two rows of 8-bit activations at once.
pub type PairKernel = fn(&[u8], &[BlockQ8], &[BlockQ8]) -> (f32, f32);

/// The two-row kernel for weights of type `ty` on `simd`, where there is one: it decodes each
/// weight block once for both activation rows (batched matrix products), and gives each result
/// bit for bit as [`kernel`] does for that row alone. `None`: use [`kernel`] per row.
pub fn pair_kernel(ty: GgmlType, simd: Simd) -> Option<PairKernel> {
    #[cfg(target_arch = "x86_64")]
    if simd == Simd::Avx2 && detect() == Simd::Avx2 {
        return match ty {
            GgmlType::Q4_1 => Some(avx2::q4_1_pair),
            GgmlType::Q8_0 => Some(avx2::q8_0_pair),
            _ => None,
        };
    }
    let _ = (ty, simd);
    None
}

fn kquant_dot<const BYTES: usize>(
    ty: GgmlType,
    w: &[u8],
    x: &[f32],
    dot: fn(&[f32], &[f32]) -> f32,
) -> f32 {
    let mut buf = [0f32; QK_K];
    let mut acc = 0f32;
    for (blk, xs) in w.chunks_exact(BYTES).zip(x.chunks_exact(QK_K)) {
        quant::dequantize_row(ty, blk, &mut buf);
        acc += dot(&buf, xs);
    }
    acc
}

/// Plain f32 dot product (scalar).
pub fn dot_f32_scalar(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// f32 dot product with the best instruction set available.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if detect() == Simd::Avx2 {
        return avx2::f32_slices(a, b);
    }
    dot_f32_scalar(a, b)
}

/// `y += a * x` with the best instruction set available.
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if detect() == Simd::Avx2 {
        // SAFETY: AVX2 and FMA were detected.
        unsafe { avx2::axpy(a, x, y) };
        return;
    }
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// Scalar reference kernels.
pub mod scalar {
    use super::*;

    pub fn q4_1(w: &[u8], x: &[BlockQ8]) -> f32 {
        let mut acc = 0f32;
        for (blk, y) in w.chunks_exact(20).zip(x) {
            let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
            let mut s = 0i32;
            for j in 0..16 {
                let q = blk[4 + j];
                s += i32::from(q & 0x0F) * i32::from(y.qs[j]);
                s += i32::from(q >> 4) * i32::from(y.qs[j + 16]);
            }
            acc += d * y.d * s as f32 + m * y.s;
        }
        acc
    }

    pub fn q4_0(w: &[u8], x: &[BlockQ8]) -> f32 {
        let mut acc = 0f32;
        for (blk, y) in w.chunks_exact(18).zip(x) {
            let d = f16_at(blk, 0);
            let mut s = 0i32;
            for j in 0..16 {
                let q = blk[2 + j];
                s += (i32::from(q & 0x0F) - 8) * i32::from(y.qs[j]);
                s += (i32::from(q >> 4) - 8) * i32::from(y.qs[j + 16]);
            }
            acc += d * y.d * s as f32;
        }
        acc
    }

    pub fn q8_0(w: &[u8], x: &[BlockQ8]) -> f32 {
        let mut acc = 0f32;
        for (blk, y) in w.chunks_exact(34).zip(x) {
            let d = f16_at(blk, 0);
            let s: i32 = blk[2..34]
                .iter()
                .zip(&y.qs)
                .map(|(&a, &b)| i32::from(a as i8) * i32::from(b))
                .sum();
            acc += d * y.d * s as f32;
        }
        acc
    }

    pub fn f32(w: &[u8], x: &[f32]) -> f32 {
        w.chunks_exact(4)
            .zip(x)
            .map(|(c, v)| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * v)
            .sum()
    }

    pub fn f16(w: &[u8], x: &[f32]) -> f32 {
        w.chunks_exact(2)
            .zip(x)
            .map(|(c, v)| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32() * v)
            .sum()
    }

    pub fn bf16(w: &[u8], x: &[f32]) -> f32 {
        w.chunks_exact(2)
            .zip(x)
            .map(|(c, v)| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32() * v)
            .sum()
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{BlockQ8, QK};

    // Safe wrappers: `kernel` hands these out only after detecting AVX2, FMA and F16C.
    pub fn q4_1(w: &[u8], x: &[BlockQ8]) -> f32 {
        assert!(w.len() >= x.len() * 20);
        // SAFETY: features detected by the caller (`kernel`); lengths checked above.
        unsafe { q4_1_impl(w, x) }
    }
    pub fn q4_1_pair(w: &[u8], x: &[BlockQ8], z: &[BlockQ8]) -> (f32, f32) {
        assert!(w.len() >= x.len() * 20 && z.len() == x.len());
        // SAFETY: as above.
        unsafe { q4_1_pair_impl(w, x, z) }
    }
    pub fn q8_0_pair(w: &[u8], x: &[BlockQ8], z: &[BlockQ8]) -> (f32, f32) {
        assert!(w.len() >= x.len() * 34 && z.len() == x.len());
        // SAFETY: as above.
        unsafe { q8_0_pair_impl(w, x, z) }
    }
    pub fn q4_0(w: &[u8], x: &[BlockQ8]) -> f32 {
        assert!(w.len() >= x.len() * 18);
        // SAFETY: as above.
        unsafe { q4_0_impl(w, x) }
    }
    pub fn q8_0(w: &[u8], x: &[BlockQ8]) -> f32 {
        assert!(w.len() >= x.len() * 34);
        // SAFETY: as above.
        unsafe { q8_0_impl(w, x) }
    }
    pub fn f32(w: &[u8], x: &[f32]) -> f32 {
        assert!(w.len() >= x.len() * 4);
        // SAFETY: as above.
        unsafe { f32_impl(w.as_ptr().cast(), x) }
    }
    pub fn f32_slices(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        // SAFETY: as above; `n` elements are readable from both.
        unsafe { f32_impl(a.as_ptr(), &b[..n]) }
    }
    pub fn f16(w: &[u8], x: &[f32]) -> f32 {
        assert!(w.len() >= x.len() * 2);
        // SAFETY: as above.
        unsafe { f16_impl(w, x) }
    }
    pub fn bf16(w: &[u8], x: &[f32]) -> f32 {
        assert!(w.len() >= x.len() * 2);
        // SAFETY: as above.
        unsafe { bf16_impl(w, x) }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Two f16 values at `p` (`d` and, for Q4_1, `m`) as f32 lanes 0 and 1.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn two_f16(p: *const u8) -> __m128 {
        // SAFETY: the caller guarantees 4 readable bytes at `p`.
        let bits = unsafe { p.cast::<i32>().read_unaligned() };
        _mm_cvtph_ps(_mm_cvtsi32_si128(bits))
    }

    /// 32 nibbles of a Q4 block (16 bytes at `p`) as 32 bytes in element order.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        // SAFETY: the caller guarantees 16 readable bytes at `p`.
        let qs = unsafe { _mm_loadu_si128(p.cast()) };
        let m4 = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(qs, m4);
        let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), m4);
        _mm256_set_m128i(hi, lo)
    }

    /// Sum of products of signed bytes `x` and `y`, as 8 i32 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_i8(x: __m256i, y: __m256i) -> __m256i {
        let ax = _mm256_sign_epi8(x, x);
        let sy = _mm256_sign_epi8(y, x);
        _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), _mm256_set1_epi16(1))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_1_impl(w: &[u8], x: &[BlockQ8]) -> f32 {
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut summs = _mm_setzero_ps();
        let ones = _mm256_set1_epi16(1);
        let p = w.as_ptr();
        let n = x.len();
        let one = |i: usize, acc: __m256, summs: __m128| -> (__m256, __m128) {
            // SAFETY: block `i < n` lies within `w` (checked by the wrapper).
            unsafe {
                let b = p.add(i * 20);
                let y = x.get_unchecked(i);
                let dm = two_f16(b);
                let bx = nibbles(b.add(4));
                let by = _mm256_loadu_si256(y.qs.as_ptr().cast());
                let prod = _mm256_madd_epi16(_mm256_maddubs_epi16(bx, by), ones);
                // lanes: [d * yd, m * ys]
                let ys = _mm_setr_ps(y.d, y.s, 0.0, 0.0);
                let f = _mm_mul_ps(dm, ys);
                let acc = _mm256_fmadd_ps(
                    _mm256_set1_ps(_mm_cvtss_f32(f)),
                    _mm256_cvtepi32_ps(prod),
                    acc,
                );
                (acc, _mm_add_ps(summs, f))
            }
        };
        let mut i = 0;
        while i + 1 < n {
            (acc0, summs) = one(i, acc0, summs);
            (acc1, summs) = one(i + 1, acc1, summs);
            i += 2;
        }
        if i < n {
            (acc0, summs) = one(i, acc0, summs);
        }
        // summs lane 1 holds the sum of m * ys; lane 0 the (unused) sum of scales.
        let m_term = _mm_cvtss_f32(_mm_shuffle_ps(summs, summs, 1));
        // SAFETY: features enabled on this function.
        unsafe { hsum(_mm256_add_ps(acc0, acc1)) + m_term }
    }

    /// [`q4_1_impl`] for two activation rows, each block's weights decoded once; every
    /// operation on a row's accumulators is the single-row kernel's, in the same order.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_1_pair_impl(w: &[u8], x: &[BlockQ8], z: &[BlockQ8]) -> (f32, f32) {
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let (mut b0, mut b1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let (mut sa, mut sb) = (_mm_setzero_ps(), _mm_setzero_ps());
        let ones = _mm256_set1_epi16(1);
        let p = w.as_ptr();
        let n = x.len();
        type Acc = (__m256, __m128, __m256, __m128);
        let one = |i: usize, (acc_a, sa, acc_b, sb): Acc| -> Acc {
            // SAFETY: block `i < n` lies within `w`, `x` and `z` (checked by the wrapper).
            unsafe {
                let b = p.add(i * 20);
                let dm = two_f16(b);
                let bx = nibbles(b.add(4));
                let row = |y: &BlockQ8, acc: __m256, summs: __m128| -> (__m256, __m128) {
                    let by = _mm256_loadu_si256(y.qs.as_ptr().cast());
                    let prod = _mm256_madd_epi16(_mm256_maddubs_epi16(bx, by), ones);
                    let ys = _mm_setr_ps(y.d, y.s, 0.0, 0.0);
                    let f = _mm_mul_ps(dm, ys);
                    let acc = _mm256_fmadd_ps(
                        _mm256_set1_ps(_mm_cvtss_f32(f)),
                        _mm256_cvtepi32_ps(prod),
                        acc,
                    );
                    (acc, _mm_add_ps(summs, f))
                };
                let (acc_a, sa) = row(x.get_unchecked(i), acc_a, sa);
                let (acc_b, sb) = row(z.get_unchecked(i), acc_b, sb);
                (acc_a, sa, acc_b, sb)
            }
        };
        let mut i = 0;
        while i + 1 < n {
            (a0, sa, b0, sb) = one(i, (a0, sa, b0, sb));
            (a1, sa, b1, sb) = one(i + 1, (a1, sa, b1, sb));
            i += 2;
        }
        if i < n {
            (a0, sa, b0, sb) = one(i, (a0, sa, b0, sb));
        }
        let ma = _mm_cvtss_f32(_mm_shuffle_ps(sa, sa, 1));
        let mb = _mm_cvtss_f32(_mm_shuffle_ps(sb, sb, 1));
        // SAFETY: features enabled on this function.
        unsafe {
            (
                hsum(_mm256_add_ps(a0, a1)) + ma,
                hsum(_mm256_add_ps(b0, b1)) + mb,
            )
        }
    }

    /// [`q8_0_impl`] for two activation rows (as [`q4_1_pair_impl`]).
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_0_pair_impl(w: &[u8], x: &[BlockQ8], z: &[BlockQ8]) -> (f32, f32) {
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let (mut b0, mut b1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let p = w.as_ptr();
        let one = |i: usize, acc_a: __m256, acc_b: __m256| -> (__m256, __m256) {
            // SAFETY: block `i` lies within `w`, `x` and `z` (checked by the wrapper).
            unsafe {
                let b = p.add(i * 34);
                let d = _mm_cvtss_f32(two_f16(b));
                let bx = _mm256_loadu_si256(b.add(2).cast());
                let row = |y: &BlockQ8, acc: __m256| -> __m256 {
                    let by = _mm256_loadu_si256(y.qs.as_ptr().cast());
                    _mm256_fmadd_ps(
                        _mm256_set1_ps(d * y.d),
                        _mm256_cvtepi32_ps(dot_i8(bx, by)),
                        acc,
                    )
                };
                (
                    row(x.get_unchecked(i), acc_a),
                    row(z.get_unchecked(i), acc_b),
                )
            }
        };
        let n = x.len();
        let mut i = 0;
        while i + 1 < n {
            (a0, b0) = one(i, a0, b0);
            (a1, b1) = one(i + 1, a1, b1);
            i += 2;
        }
        if i < n {
            (a0, b0) = one(i, a0, b0);
        }
        // SAFETY: features enabled on this function.
        unsafe { (hsum(_mm256_add_ps(a0, a1)), hsum(_mm256_add_ps(b0, b1))) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_0_impl(w: &[u8], x: &[BlockQ8]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let p = w.as_ptr();
        let eight = _mm256_set1_epi8(8);
        for (i, y) in x.iter().enumerate() {
            // SAFETY: block `i` lies within `w` (checked by the wrapper).
            unsafe {
                let b = p.add(i * 18);
                let d = _mm_cvtss_f32(two_f16(b));
                let bx = _mm256_sub_epi8(nibbles(b.add(2)), eight);
                let by = _mm256_loadu_si256(y.qs.as_ptr().cast());
                let prod = dot_i8(bx, by);
                acc = _mm256_fmadd_ps(_mm256_set1_ps(d * y.d), _mm256_cvtepi32_ps(prod), acc);
            }
        }
        // SAFETY: features enabled on this function.
        unsafe { hsum(acc) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_0_impl(w: &[u8], x: &[BlockQ8]) -> f32 {
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let p = w.as_ptr();
        let one = |i: usize, acc: __m256| -> __m256 {
            // SAFETY: block `i` lies within `w` (checked by the wrapper).
            unsafe {
                let b = p.add(i * 34);
                let y = x.get_unchecked(i);
                let d = _mm_cvtss_f32(two_f16(b));
                let bx = _mm256_loadu_si256(b.add(2).cast());
                let by = _mm256_loadu_si256(y.qs.as_ptr().cast());
                _mm256_fmadd_ps(
                    _mm256_set1_ps(d * y.d),
                    _mm256_cvtepi32_ps(dot_i8(bx, by)),
                    acc,
                )
            }
        };
        let n = x.len();
        let mut i = 0;
        while i + 1 < n {
            acc0 = one(i, acc0);
            acc1 = one(i + 1, acc1);
            i += 2;
        }
        if i < n {
            acc0 = one(i, acc0);
        }
        // SAFETY: features enabled on this function.
        unsafe { hsum(_mm256_add_ps(acc0, acc1)) }
    }

    /// `w` points at `x.len()` readable f32 values (any alignment).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn f32_impl(w: *const f32, x: &[f32]) -> f32 {
        let n = x.len();
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY: every load below reads indices < n of `w` and `x`.
        unsafe {
            while i + 32 <= n {
                for (k, a) in acc.iter_mut().enumerate() {
                    let j = i + 8 * k;
                    *a = _mm256_fmadd_ps(
                        _mm256_loadu_ps(w.add(j)),
                        _mm256_loadu_ps(x.as_ptr().add(j)),
                        *a,
                    );
                }
                i += 32;
            }
            while i + 8 <= n {
                acc[0] = _mm256_fmadd_ps(
                    _mm256_loadu_ps(w.add(i)),
                    _mm256_loadu_ps(x.as_ptr().add(i)),
                    acc[0],
                );
                i += 8;
            }
            let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let mut r = hsum(s);
            while i < n {
                r += w.add(i).read_unaligned() * x[i];
                i += 1;
            }
            r
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16_impl(w: &[u8], x: &[f32]) -> f32 {
        let n = x.len();
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        // SAFETY: loads read elements < n of both (checked by the wrapper).
        unsafe {
            while i + 8 <= n {
                let h = _mm_loadu_si128(w.as_ptr().add(2 * i).cast());
                acc = _mm256_fmadd_ps(_mm256_cvtph_ps(h), _mm256_loadu_ps(x.as_ptr().add(i)), acc);
                i += 8;
            }
            let mut r = hsum(acc);
            while i < n {
                let bits = u16::from_le_bytes([w[2 * i], w[2 * i + 1]]);
                r += half::f16::from_bits(bits).to_f32() * x[i];
                i += 1;
            }
            r
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn bf16_impl(w: &[u8], x: &[f32]) -> f32 {
        let n = x.len();
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        // SAFETY: loads read elements < n of both (checked by the wrapper).
        unsafe {
            while i + 8 <= n {
                let h = _mm_loadu_si128(w.as_ptr().add(2 * i).cast());
                let f = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
                acc = _mm256_fmadd_ps(f, _mm256_loadu_ps(x.as_ptr().add(i)), acc);
                i += 8;
            }
            let mut r = hsum(acc);
            while i < n {
                let bits = u16::from_le_bytes([w[2 * i], w[2 * i + 1]]);
                r += half::bf16::from_bits(bits).to_f32() * x[i];
                i += 1;
            }
            r
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len().min(y.len());
        let va = _mm256_set1_ps(a);
        let mut i = 0;
        // SAFETY: indices < n of both.
        unsafe {
            while i + 8 <= n {
                let yp = y.as_mut_ptr().add(i);
                let v =
                    _mm256_fmadd_ps(va, _mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(yp));
                _mm256_storeu_ps(yp, v);
                i += 8;
            }
        }
        while i < n {
            y[i] += a * x[i];
            i += 1;
        }
    }

    const _: () = assert!(QK == 32);
}
