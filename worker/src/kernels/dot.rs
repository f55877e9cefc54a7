//! Dot products of one weight row (in its GGUF encoding) with one activation row.
//!
//! Two families, as in ggml:
//! - 8-bit quantised activations ([`BlockQ8`], 32 elements) against every quantised type: integer
//!   products per 32-element block, scaled once per block (`vec_dot_q4_1_q8_1` and friends). The
//!   K-quants are taken 32 elements at a time too: a `Q4_K` sub-block is 32 elements with one
//!   scale and min, a `Q6_K` 32-element chunk is two 16-element sub-blocks whose scales multiply
//!   the two halves' integer sums. (ggml quantises activations per 256 for K-quants; one scale
//!   per 32 is at least as accurate.)
//! - f32 activations against `F32`, `F16`, `BF16` weights (converted in registers).
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
            GgmlType::Q5_0 => Kernel::Q8(avx2::q5_0),
            GgmlType::Q5_1 => Kernel::Q8(avx2::q5_1),
            GgmlType::Q4_K => Kernel::Q8(avx2::q4_k),
            GgmlType::Q5_K => Kernel::Q8(avx2::q5_k),
            GgmlType::Q6_K => Kernel::Q8(avx2::q6_k),
            GgmlType::F32 => Kernel::F32(avx2::f32),
            GgmlType::F16 => Kernel::F32(avx2::f16),
            GgmlType::BF16 => Kernel::F32(avx2::bf16),
            other => panic!("no kernel for {other}"),
        };
    }
    let _ = simd;
    match ty {
        GgmlType::Q4_1 => Kernel::Q8(scalar::q4_1),
        GgmlType::Q4_0 => Kernel::Q8(scalar::q4_0),
        GgmlType::Q8_0 => Kernel::Q8(scalar::q8_0),
        GgmlType::Q5_0 => Kernel::Q8(scalar::q5_0),
        GgmlType::Q5_1 => Kernel::Q8(scalar::q5_1),
        GgmlType::Q4_K => Kernel::Q8(scalar::q4_k),
        GgmlType::Q5_K => Kernel::Q8(scalar::q5_k),
        GgmlType::Q6_K => Kernel::Q8(scalar::q6_k),
        GgmlType::F32 => Kernel::F32(scalar::f32),
        GgmlType::F16 => Kernel::F32(scalar::f16),
        GgmlType::BF16 => Kernel::F32(scalar::bf16),
        other => panic!("no kernel for {other}"),
    }
}

/// A dot product of one weight row with two rows of 8-bit activations.
pub type PairQ8 = fn(&[u8], &[BlockQ8], &[BlockQ8]) -> (f32, f32);
/// A dot product of one weight row with two rows of f32 activations.
pub type PairF32 = fn(&[u8], &[f32], &[f32]) -> (f32, f32);

/// A dot product of one weight row with two activation rows at once.
#[derive(Clone, Copy)]
pub enum PairKernel {
    /// Against 8-bit quantised activations.
    Q8(PairQ8),
    /// Against f32 activations (F32, F16, BF16 weights).
    F32(PairF32),
}

/// The two-row kernel for weights of type `ty` on `simd`, where there is one: it decodes each
/// weight block once for both activation rows (batched matrix products), and gives each result
/// bit for bit as [`kernel`] does for that row alone. `None`: use [`kernel`] per row.
pub fn pair_kernel(ty: GgmlType, simd: Simd) -> Option<PairKernel> {
    #[cfg(target_arch = "x86_64")]
    if simd == Simd::Avx2 && detect() == Simd::Avx2 {
        return Some(match ty {
            GgmlType::Q4_0 => PairKernel::Q8(avx2::q4_0_pair),
            GgmlType::Q4_1 => PairKernel::Q8(avx2::q4_1_pair),
            GgmlType::Q8_0 => PairKernel::Q8(avx2::q8_0_pair),
            GgmlType::Q5_0 => PairKernel::Q8(avx2::q5_0_pair),
            GgmlType::Q5_1 => PairKernel::Q8(avx2::q5_1_pair),
            GgmlType::Q4_K => PairKernel::Q8(avx2::q4_k_pair),
            GgmlType::Q5_K => PairKernel::Q8(avx2::q5_k_pair),
            GgmlType::Q6_K => PairKernel::Q8(avx2::q6_k_pair),
            GgmlType::F32 => PairKernel::F32(avx2::f32_pair),
            GgmlType::F16 => PairKernel::F32(avx2::f16_pair),
            GgmlType::BF16 => PairKernel::F32(avx2::bf16_pair),
            _ => return None,
        });
    }
    let _ = (ty, simd);
    None
}

/// A dot product of one weight row with four rows of 8-bit activations at once.
pub type QuadKernel = fn(&[u8], [&[BlockQ8]; 4]) -> [f32; 4];

/// The four-row kernel for `ty` on `simd`, where there is one (every quantised type on AVX2):
/// each weight block is decoded once for four activation rows, and each result is bit for
/// bit what [`kernel`] gives for that row alone (one generic body serves 1, 2 and 4 rows).
pub fn quad_kernel(ty: GgmlType, simd: Simd) -> Option<QuadKernel> {
    #[cfg(target_arch = "x86_64")]
    if simd == Simd::Avx2 && detect() == Simd::Avx2 {
        return match ty {
            GgmlType::Q4_0 => Some(avx2::q4_0_quad),
            GgmlType::Q4_1 => Some(avx2::q4_1_quad),
            GgmlType::Q8_0 => Some(avx2::q8_0_quad),
            GgmlType::Q5_0 => Some(avx2::q5_0_quad),
            GgmlType::Q5_1 => Some(avx2::q5_1_quad),
            GgmlType::Q4_K => Some(avx2::q4_k_quad),
            GgmlType::Q5_K => Some(avx2::q5_k_quad),
            GgmlType::Q6_K => Some(avx2::q6_k_quad),
            _ => None,
        };
    }
    let _ = (ty, simd);
    None
}

/// The 32 six-bit values (0..64) of chunk `c` (0..8) of a `Q6_K` block, and the chunk's two
/// sub-block scales (elements 0..16 and 16..32).
#[inline]
fn q6_k_chunk(blk: &[u8], c: usize) -> ([u8; QK], [i8; 2]) {
    let (n, which) = (c / 4, c % 4);
    let ql = &blk[64 * n..64 * n + 64];
    let qh = &blk[128 + 32 * n..128 + 32 * n + 32];
    let sc = &blk[192 + 8 * n..192 + 8 * n + 8];
    let mut q = [0u8; QK];
    for (l, v) in q.iter_mut().enumerate() {
        let low = match which {
            0 => ql[l] & 0x0F,
            1 => ql[l + 32] & 0x0F,
            2 => ql[l] >> 4,
            _ => ql[l + 32] >> 4,
        };
        *v = low | (((qh[l] >> (2 * which)) & 3) << 4);
    }
    (q, [sc[2 * which] as i8, sc[2 * which + 1] as i8])
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

    pub fn q5_0(w: &[u8], x: &[BlockQ8]) -> f32 {
        let mut acc = 0f32;
        for (blk, y) in w.chunks_exact(22).zip(x) {
            let d = f16_at(blk, 0);
            let q = quant::q5_values(quant::u32_at(blk, 2), &blk[6..22]);
            let s: i32 = q
                .iter()
                .zip(&y.qs)
                .map(|(&a, &b)| (i32::from(a) - 16) * i32::from(b))
                .sum();
            acc += d * y.d * s as f32;
        }
        acc
    }

    pub fn q5_1(w: &[u8], x: &[BlockQ8]) -> f32 {
        let mut acc = 0f32;
        for (blk, y) in w.chunks_exact(24).zip(x) {
            let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
            let q = quant::q5_values(quant::u32_at(blk, 4), &blk[8..24]);
            let s: i32 = q
                .iter()
                .zip(&y.qs)
                .map(|(&a, &b)| i32::from(a) * i32::from(b))
                .sum();
            acc += d * y.d * s as f32 + m * y.s;
        }
        acc
    }

    /// `Q4_K`: 8 sub-blocks of 32 per super-block, each against one activation block.
    pub fn q4_k(w: &[u8], x: &[BlockQ8]) -> f32 {
        k4_or_k5::<false>(w, x)
    }

    /// `Q5_K`: as `Q4_K` with a fifth bit per element.
    pub fn q5_k(w: &[u8], x: &[BlockQ8]) -> f32 {
        k4_or_k5::<true>(w, x)
    }

    fn k4_or_k5<const FIFTH: bool>(w: &[u8], x: &[BlockQ8]) -> f32 {
        let (bytes, qs_at) = if FIFTH { (176, 48) } else { (144, 16) };
        let mut acc = 0f32;
        for (blk, ys) in w.chunks_exact(bytes).zip(x.chunks_exact(QK_K / QK)) {
            let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
            for (c, y) in ys.iter().enumerate() {
                let (sc, mn) = quant::scale_min_k4(c, &blk[4..16]);
                let qs = &blk[qs_at + 32 * (c / 2)..qs_at + 32 * (c / 2) + 32];
                let shift = 4 * (c % 2);
                let s: i32 = qs
                    .iter()
                    .enumerate()
                    .zip(&y.qs)
                    .map(|((l, &a), &b)| {
                        let high = if FIFTH {
                            ((blk[16 + l] >> c) & 1) << 4
                        } else {
                            0
                        };
                        i32::from(((a >> shift) & 0x0F) | high) * i32::from(b)
                    })
                    .sum();
                acc += d * f32::from(sc) * y.d * s as f32 - dmin * f32::from(mn) * y.s;
            }
        }
        acc
    }

    /// `Q6_K`: 8 chunks of 32 per super-block, each two 16-element sub-blocks with their own
    /// scale, against one activation block.
    pub fn q6_k(w: &[u8], x: &[BlockQ8]) -> f32 {
        let mut acc = 0f32;
        for (blk, ys) in w.chunks_exact(210).zip(x.chunks_exact(QK_K / QK)) {
            let d = f16_at(blk, 208);
            for (c, y) in ys.iter().enumerate() {
                let (q, sc) = q6_k_chunk(blk, c);
                let half = |r: std::ops::Range<usize>| -> i32 {
                    r.map(|l| (i32::from(q[l]) - 32) * i32::from(y.qs[l])).sum()
                };
                let s = i32::from(sc[0]) * half(0..16) + i32::from(sc[1]) * half(16..32);
                acc += d * y.d * s as f32;
            }
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

    use super::{BlockQ8, QK, QK_K, quant};

    // Safe wrappers: `kernel` hands these out only after detecting AVX2, FMA and F16C.

    /// One, two and four activation rows against a row of quantised weights of kind `$kind`
    /// (`rows` below): the lengths are checked here, once.
    macro_rules! quantised {
        ($one:ident, $pair:ident, $quad:ident, $kind:expr) => {
            pub fn $one(w: &[u8], x: &[BlockQ8]) -> f32 {
                assert!(fits($kind, w, x));
                // SAFETY: features detected by the caller; lengths checked above.
                unsafe { rows::<{ $kind }, 1>(w, [x])[0] }
            }
            pub fn $pair(w: &[u8], x: &[BlockQ8], z: &[BlockQ8]) -> (f32, f32) {
                assert!(fits($kind, w, x) && z.len() == x.len());
                // SAFETY: as above.
                let [a, b] = unsafe { rows::<{ $kind }, 2>(w, [x, z]) };
                (a, b)
            }
            pub fn $quad(w: &[u8], xs: [&[BlockQ8]; 4]) -> [f32; 4] {
                assert!(fits($kind, w, xs[0]) && xs.iter().all(|x| x.len() == xs[0].len()));
                // SAFETY: as above.
                unsafe { rows::<{ $kind }, 4>(w, xs) }
            }
        };
    }
    quantised!(q4_0, q4_0_pair, q4_0_quad, Q4_0);
    quantised!(q4_1, q4_1_pair, q4_1_quad, Q4_1);
    quantised!(q5_0, q5_0_pair, q5_0_quad, Q5_0);
    quantised!(q5_1, q5_1_pair, q5_1_quad, Q5_1);
    quantised!(q8_0, q8_0_pair, q8_0_quad, Q8_0);
    quantised!(q4_k, q4_k_pair, q4_k_quad, Q4_K);
    quantised!(q5_k, q5_k_pair, q5_k_quad, Q5_K);
    quantised!(q6_k, q6_k_pair, q6_k_quad, Q6_K);

    /// `w` holds the blocks `x` needs: one weight block per activation block for the
    /// 32-element kinds, one super-block per 8 activation blocks (whole) for the K-quants.
    fn fits(kind: u8, w: &[u8], x: &[BlockQ8]) -> bool {
        const PER: usize = QK_K / QK;
        match kind {
            Q4_K | Q5_K | Q6_K => {
                x.len().is_multiple_of(PER) && w.len() >= x.len() / PER * block_bytes(kind)
            }
            _ => w.len() >= x.len() * block_bytes(kind),
        }
    }

    /// The kernel body of each quantised kind.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows<const KIND: u8, const R: usize>(w: &[u8], xs: [&[BlockQ8]; R]) -> [f32; R] {
        // SAFETY: the callers' checks (`fits`) and features are those of the bodies.
        unsafe {
            match KIND {
                Q4_K => q4_k_rows::<false, R>(w, xs),
                Q5_K => q4_k_rows::<true, R>(w, xs),
                Q6_K => q6_k_rows::<R>(w, xs),
                _ => block32_rows::<KIND, R>(w, xs),
            }
        }
    }

    pub fn f32_slices(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        // SAFETY: as above; `n` elements are readable from both.
        unsafe { f32_impl(a.as_ptr(), &b[..n]) }
    }

    /// One and two f32 activation rows against a row of float weights of kind `$kind`.
    macro_rules! float {
        ($one:ident, $pair:ident, $kind:expr) => {
            pub fn $one(w: &[u8], x: &[f32]) -> f32 {
                assert!(w.len() >= x.len() * float_bytes($kind));
                // SAFETY: features detected by the caller; lengths checked above.
                unsafe { float_rows::<{ $kind }, 1>(w, [x])[0] }
            }
            pub fn $pair(w: &[u8], x: &[f32], z: &[f32]) -> (f32, f32) {
                assert!(w.len() >= x.len() * float_bytes($kind) && z.len() == x.len());
                // SAFETY: as above.
                let [a, b] = unsafe { float_rows::<{ $kind }, 2>(w, [x, z]) };
                (a, b)
            }
        };
    }
    float!(f32, f32_pair, F32);
    float!(f16, f16_pair, F16);
    float!(bf16, bf16_pair, BF16);

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

    /// 32 bytes, byte `k` all ones where bit `k` of `bits` is set and zero elsewhere.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn bytes_from_bits(bits: u32) -> __m256i {
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(bits as i32),
            _mm256_set_epi64x(
                0x0303_0303_0303_0303,
                0x0202_0202_0202_0202,
                0x0101_0101_0101_0101,
                0,
            ),
        );
        // Every bit but bit k of byte k (mod 8) set: the OR is all ones iff bit k was set.
        let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
        _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi64x(-1))
    }

    // The quantised kinds: 32-element blocks (`block32_rows`), then the K-quants.
    const Q4_0: u8 = 0;
    const Q4_1: u8 = 1;
    const Q5_0: u8 = 2;
    const Q5_1: u8 = 3;
    const Q8_0: u8 = 4;
    const Q4_K: u8 = 5;
    const Q5_K: u8 = 6;
    const Q6_K: u8 = 7;

    /// Bytes per block (per 256-element super-block for the K-quants).
    const fn block_bytes(kind: u8) -> usize {
        match kind {
            Q4_0 => 18,
            Q4_1 => 20,
            Q5_0 => 22,
            Q5_1 => 24,
            Q8_0 => 34,
            Q4_K => 144,
            Q5_K => 176,
            _ => 210,
        }
    }

    /// A row of 32-element blocks of kind `KIND` against `R` activation rows at once: each
    /// weight block is decoded once, and each row's result is the same whatever `R` (the
    /// operations on a row's accumulators, and their order, do not depend on `R`). Signed kinds
    /// (`Q4_0`: `q - 8`, `Q5_0`: `q - 16`, `Q8_0`) use the sign trick; the others (`Q4_1`,
    /// `Q5_1`: `d * q + m`) multiply unsigned values and add `m` times the activations' sum.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block32_rows<const KIND: u8, const R: usize>(
        w: &[u8],
        xs: [&[BlockQ8]; R],
    ) -> [f32; R] {
        let signed = matches!(KIND, Q4_0 | Q5_0 | Q8_0);
        let bytes = block_bytes(KIND);
        let ones = _mm256_set1_epi16(1);
        let p = w.as_ptr();
        // Block `i` into `acc` (even blocks and odd blocks have their own accumulators, so two
        // chains of additions run in parallel; the arrays are indexed by constants only, which
        // keeps them in registers).
        let step = |i: usize, acc: &mut [__m256; R], summ: &mut [__m128; R]| {
            // SAFETY: block `i` lies within `w` and every row (checked by the wrappers).
            unsafe {
                let b = p.add(i * bytes);
                let dm = two_f16(b);
                let q = match KIND {
                    Q4_0 => _mm256_sub_epi8(nibbles(b.add(2)), _mm256_set1_epi8(8)),
                    Q4_1 => nibbles(b.add(4)),
                    Q5_0 | Q5_1 => {
                        let at = if KIND == Q5_0 { 2 } else { 4 };
                        let qh = u32::from_le(b.add(at).cast::<u32>().read_unaligned());
                        let high = bytes_from_bits(qh);
                        let lo = nibbles(b.add(at + 4));
                        if KIND == Q5_1 {
                            _mm256_or_si256(lo, _mm256_and_si256(high, _mm256_set1_epi8(0x10)))
                        } else {
                            // q - 16: the nibble where the fifth bit is set, nibble | 0xF0 where
                            // it is not.
                            _mm256_or_si256(
                                lo,
                                _mm256_andnot_si256(high, _mm256_set1_epi8(0xF0_u8 as i8)),
                            )
                        }
                    }
                    _ => _mm256_loadu_si256(b.add(2).cast()),
                };
                for r in 0..R {
                    let y = xs[r].get_unchecked(i);
                    let by = _mm256_loadu_si256(y.qs.as_ptr().cast());
                    // Lanes [d * y.d, m * y.s]: the block's scale and its offset term.
                    let f = _mm_mul_ps(dm, _mm_setr_ps(y.d, y.s, 0.0, 0.0));
                    let prod = if signed {
                        dot_i8(q, by)
                    } else {
                        summ[r] = _mm_add_ps(summ[r], f);
                        _mm256_madd_epi16(_mm256_maddubs_epi16(q, by), ones)
                    };
                    acc[r] = _mm256_fmadd_ps(
                        _mm256_set1_ps(_mm_cvtss_f32(f)),
                        _mm256_cvtepi32_ps(prod),
                        acc[r],
                    );
                }
            }
        };
        let (mut even, mut odd) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
        // Lane 1: the sum of the offset terms (lane 0, the sum of scales, is not used).
        let mut summ = [_mm_setzero_ps(); R];
        let n = xs[0].len();
        let mut i = 0;
        while i + 1 < n {
            step(i, &mut even, &mut summ);
            step(i + 1, &mut odd, &mut summ);
            i += 2;
        }
        if i < n {
            step(i, &mut even, &mut summ);
        }
        // SAFETY: features enabled on this function.
        std::array::from_fn(|r| unsafe {
            hsum(_mm256_add_ps(even[r], odd[r]))
                + _mm_cvtss_f32(_mm_shuffle_ps(summ[r], summ[r], 1))
        })
    }

    /// `Q4_K` (`FIFTH = false`) and `Q5_K` (`true`: a fifth bit per element from `qh`) against
    /// `R` activation rows (as [`block32_rows`]): 8 sub-blocks of 32 per super-block, each with
    /// its scale and min, against one activation block each.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_k_rows<const FIFTH: bool, const R: usize>(
        w: &[u8],
        xs: [&[BlockQ8]; R],
    ) -> [f32; R] {
        let (bytes, qs_at) = if FIFTH { (176, 48) } else { (144, 16) };
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let mut summ = [0f32; R];
        let ones = _mm256_set1_epi16(1);
        let m4 = _mm256_set1_epi8(0x0F);
        let sixteen = _mm256_set1_epi8(0x10);
        const PER: usize = QK_K / QK;
        for (s, blk) in w.chunks_exact(bytes).take(xs[0].len() / PER).enumerate() {
            // SAFETY: `blk` has `bytes` bytes; every row has 8 blocks per super-block (wrappers).
            unsafe {
                let dm = two_f16(blk.as_ptr());
                let (d, dmin) = (_mm_cvtss_f32(dm), _mm_cvtss_f32(_mm_shuffle_ps(dm, dm, 1)));
                let qh = if FIFTH {
                    _mm256_loadu_si256(blk.as_ptr().add(16).cast())
                } else {
                    _mm256_setzero_si256()
                };
                for k in 0..4 {
                    let q = _mm256_loadu_si256(blk.as_ptr().add(qs_at + 32 * k).cast());
                    let halves = [
                        _mm256_and_si256(q, m4),
                        _mm256_and_si256(_mm256_srli_epi16(q, 4), m4),
                    ];
                    for (h, q) in halves.into_iter().enumerate() {
                        let c = 2 * k + h;
                        let q = if FIFTH {
                            // Bit c of each byte of qh, as 16.
                            let bit = _mm256_set1_epi8(1 << c);
                            let set = _mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit);
                            _mm256_or_si256(q, _mm256_and_si256(set, sixteen))
                        } else {
                            q
                        };
                        let (sc, mn) = quant::scale_min_k4(c, &blk[4..16]);
                        let (dsc, mmn) = (d * f32::from(sc), dmin * f32::from(mn));
                        for r in 0..R {
                            let y = xs[r].get_unchecked(s * PER + c);
                            let by = _mm256_loadu_si256(y.qs.as_ptr().cast());
                            let prod = _mm256_madd_epi16(_mm256_maddubs_epi16(q, by), ones);
                            acc[r][h] = _mm256_fmadd_ps(
                                _mm256_set1_ps(dsc * y.d),
                                _mm256_cvtepi32_ps(prod),
                                acc[r][h],
                            );
                            summ[r] += mmn * y.s;
                        }
                    }
                }
            }
        }
        // SAFETY: features enabled on this function.
        std::array::from_fn(|r| unsafe { hsum(_mm256_add_ps(acc[r][0], acc[r][1])) - summ[r] })
    }

    /// `Q6_K` against `R` activation rows (as [`block32_rows`]): 8 chunks of 32 per super-block, each
    /// two 16-element sub-blocks whose scales multiply the halves' integer sums.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q6_k_rows<const R: usize>(w: &[u8], xs: [&[BlockQ8]; R]) -> [f32; R] {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let m4 = _mm256_set1_epi8(0x0F);
        let m2 = _mm256_set1_epi8(3);
        let off = _mm256_set1_epi8(32);
        const PER: usize = QK_K / QK;
        for (s, blk) in w.chunks_exact(210).take(xs[0].len() / PER).enumerate() {
            // SAFETY: `blk` has 210 bytes; every row has 8 blocks per super-block (wrappers).
            unsafe {
                let p = blk.as_ptr();
                let d = _mm_cvtss_f32(two_f16(p.add(208)));
                for n in 0..2 {
                    let ql0 = _mm256_loadu_si256(p.add(64 * n).cast());
                    let ql1 = _mm256_loadu_si256(p.add(64 * n + 32).cast());
                    let qh = _mm256_loadu_si256(p.add(128 + 32 * n).cast());
                    let high = |h: __m256i| _mm256_slli_epi16(_mm256_and_si256(h, m2), 4);
                    let chunks = [
                        _mm256_or_si256(_mm256_and_si256(ql0, m4), high(qh)),
                        _mm256_or_si256(_mm256_and_si256(ql1, m4), high(_mm256_srli_epi16(qh, 2))),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                            high(_mm256_srli_epi16(qh, 4)),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                            high(_mm256_srli_epi16(qh, 6)),
                        ),
                    ];
                    let sc = &blk[192 + 8 * n..200 + 8 * n];
                    for (which, q) in chunks.into_iter().enumerate() {
                        let q = _mm256_sub_epi8(q, off);
                        let aq = _mm256_sign_epi8(q, q);
                        // i16 lanes 0..8 hold elements 0..16, lanes 8..16 elements 16..32.
                        let scales = _mm256_set_m128i(
                            _mm_set1_epi16(i16::from(sc[2 * which + 1] as i8)),
                            _mm_set1_epi16(i16::from(sc[2 * which] as i8)),
                        );
                        for r in 0..R {
                            let y = xs[r].get_unchecked(s * PER + 4 * n + which);
                            let by = _mm256_loadu_si256(y.qs.as_ptr().cast());
                            let pairs = _mm256_maddubs_epi16(aq, _mm256_sign_epi8(by, q));
                            let prod = _mm256_madd_epi16(pairs, scales);
                            acc[r][which & 1] = _mm256_fmadd_ps(
                                _mm256_set1_ps(d * y.d),
                                _mm256_cvtepi32_ps(prod),
                                acc[r][which & 1],
                            );
                        }
                    }
                }
            }
        }
        // SAFETY: features enabled on this function.
        std::array::from_fn(|r| unsafe { hsum(_mm256_add_ps(acc[r][0], acc[r][1])) })
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

    // The float weight kinds of `float_rows`.
    const F32: u8 = 0;
    const F16: u8 = 1;
    const BF16: u8 = 2;

    const fn float_bytes(kind: u8) -> usize {
        if kind == F32 { 4 } else { 2 }
    }

    /// Eight weights of kind `KIND` from element `i` on, as f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8<const KIND: u8>(w: *const u8, i: usize) -> __m256 {
        // SAFETY: the caller guarantees 8 readable elements from `i`.
        unsafe {
            match KIND {
                F32 => _mm256_loadu_ps(w.add(4 * i).cast()),
                F16 => _mm256_cvtph_ps(_mm_loadu_si128(w.add(2 * i).cast())),
                _ => {
                    let h = _mm_loadu_si128(w.add(2 * i).cast());
                    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                }
            }
        }
    }

    /// A row of float weights against `R` f32 activation rows at once: each 8 weights are
    /// converted once for all rows. Every row has four accumulators (32 elements per
    /// iteration), then one for the last 8-element chunks, then a scalar tail; the same for any
    /// `R`, so each row's result does not depend on `R`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn float_rows<const KIND: u8, const R: usize>(w: &[u8], xs: [&[f32]; R]) -> [f32; R] {
        let n = xs[0].len();
        let p = w.as_ptr();
        let mut acc = [[_mm256_setzero_ps(); 4]; R];
        let mut i = 0;
        // SAFETY: every load reads elements < n of `w` and of each row (checked by the
        // wrappers).
        unsafe {
            while i + 32 <= n {
                let wv: [__m256; 4] = std::array::from_fn(|k| load8::<KIND>(p, i + 8 * k));
                for (a, x) in acc.iter_mut().zip(xs) {
                    for (k, (ak, wk)) in a.iter_mut().zip(wv).enumerate() {
                        let xv = _mm256_loadu_ps(x.as_ptr().add(i + 8 * k));
                        *ak = _mm256_fmadd_ps(wk, xv, *ak);
                    }
                }
                i += 32;
            }
            while i + 8 <= n {
                let wv = load8::<KIND>(p, i);
                for (a, x) in acc.iter_mut().zip(xs) {
                    a[0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.as_ptr().add(i)), a[0]);
                }
                i += 8;
            }
        }
        let tail = i;
        std::array::from_fn(|r| {
            let [a0, a1, a2, a3] = acc[r];
            // SAFETY: features enabled on this function.
            let mut v =
                unsafe { hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))) };
            for (j, &xj) in xs[r].iter().enumerate().skip(tail) {
                let b = float_bytes(KIND) * j;
                let wj = match KIND {
                    F32 => f32::from_le_bytes([w[b], w[b + 1], w[b + 2], w[b + 3]]),
                    F16 => half::f16::from_bits(u16::from_le_bytes([w[b], w[b + 1]])).to_f32(),
                    _ => half::bf16::from_bits(u16::from_le_bytes([w[b], w[b + 1]])).to_f32(),
                };
                v += wj * xj;
            }
            v
        })
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
