//! The small kernels of the forward pass, as CUDA C compiled at run time by NVRTC.
//!
//! No `#include`: NVRTC finds no CUDA headers on a machine with only the runtime libraries, so
//! f16 values are `unsigned short` and converted with the `cvt` PTX instruction, and the math
//! functions used (`expf`, `sqrtf`, `sincosf`, `fmaxf`) are NVRTC built-ins. Activations are
//! f32; kernels that feed a cuBLAS product write f16 (the products take f16 inputs).
//! Every block-reducing kernel is launched with [`BLOCK`] threads (a multiple of 32).

/// Threads per block of the reducing kernels (RMSNorm, attention).
pub const BLOCK: u32 = 256;

/// The kernels' entry points, in the order [`super::device::Kernels`] loads them.
pub const NAMES: [&str; 5] = [
    "rms_norm_f16",
    "rope",
    "silu_mul_f16",
    "add_inplace",
    "attention",
];

/// The CUDA C source of every kernel.
pub const SOURCE: &str = r#"
__device__ __forceinline__ unsigned short f2h(float x) {
    unsigned short r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return r;
}

/* Sum (or max) over the block; every thread gets the result. `sh` holds 32 floats. */
__device__ float block_sum(float v, float* sh) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    if (lane == 0) sh[w] = v;
    __syncthreads();
    int nw = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < nw) ? sh[threadIdx.x] : 0.0f;
    if (w == 0) {
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) sh[0] = v;
    }
    __syncthreads();
    v = sh[0];
    __syncthreads();
    return v;
}

__device__ float block_max(float v, float* sh) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    if (lane == 0) sh[w] = v;
    __syncthreads();
    int nw = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < nw) ? sh[threadIdx.x] : -3.402823466e+38f;
    if (w == 0) {
        for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
        if (lane == 0) sh[0] = v;
    }
    __syncthreads();
    v = sh[0];
    __syncthreads();
    return v;
}

extern "C" {

/* One block per row of `n`: out = x / sqrt(mean(x^2) + eps) * w, as f16. */
__global__ void rms_norm_f16(const float* x, const float* w, unsigned short* out, int n, float eps) {
    __shared__ float sh[32];
    const float* xr = x + (size_t)blockIdx.x * n;
    unsigned short* orow = out + (size_t)blockIdx.x * n;
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += xr[i] * xr[i];
    s = block_sum(s, sh);
    float scale = 1.0f / sqrtf(s / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) orow[i] = f2h(xr[i] * scale * w[i]);
}

/* ggml's normal-mode RoPE on [tokens, heads * hd], positions from `start`: one thread per
   rotated pair (t, head, i), i < pairs = rope_dim / 2. */
__global__ void rope(float* x, const float* inv_freq, int tokens, int heads, int hd, int pairs, int start) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= tokens * heads * pairs) return;
    int i = idx % pairs;
    int th = idx / pairs;
    int t = th / heads;
    float* p = x + (size_t)th * hd + 2 * i;
    float s, c;
    sincosf((float)(start + t) * inv_freq[i], &s, &c);
    float a = p[0], b = p[1];
    p[0] = a * c - b * s;
    p[1] = a * s + b * c;
}

/* out = silu(g) * u, as f16. */
__global__ void silu_mul_f16(const float* g, const float* u, unsigned short* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = g[i];
    out[i] = f2h(v / (1.0f + expf(-v)) * u[i]);
}

/* x += o (the residual). */
__global__ void add_inplace(float* x, const float* o, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += o[i];
}

/* Causal grouped-query attention of one sequence: one block per (new token t, local query
   head). q: [tokens, qh * hd]; kc, vc: [capacity, kvd] with the new tokens already appended;
   scores: scratch of `stride` floats per block; out: [tokens, qh * hd] as f16. */
__global__ void attention(const float* q, const float* kc, const float* vc, unsigned short* out,
                          float* scores, int qh, int hd, int kvd, int group, int q_head0,
                          int kv_head0, int start, int stride, float scale) {
    __shared__ float sh[32];
    int task = blockIdx.x;
    int t = task / qh, head = task % qh;
    int kv = (q_head0 + head) / group - kv_head0;
    const float* qv = q + (size_t)t * qh * hd + (size_t)head * hd;
    int n = start + t + 1;
    float* sc = scores + (size_t)task * stride;
    float mx = -3.402823466e+38f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const float* kr = kc + (size_t)j * kvd + (size_t)kv * hd;
        float d = 0.0f;
        for (int e = 0; e < hd; e++) d += qv[e] * kr[e];
        d *= scale;
        sc[j] = d;
        mx = fmaxf(mx, d);
    }
    mx = block_max(mx, sh);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float e = expf(sc[j] - mx);
        sc[j] = e;
        sum += e;
    }
    sum = block_sum(sum, sh);
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < n; j++) acc += sc[j] * vc[(size_t)j * kvd + (size_t)kv * hd + d];
        out[(size_t)t * qh * hd + (size_t)head * hd + d] = f2h(acc / sum);
    }
}

}
"#;

/// Blocks of [`BLOCK`] threads covering `n` elements (element-wise kernels).
pub fn grid_for(n: usize) -> u32 {
    (n as u32).div_ceil(BLOCK).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_defines_every_entry_point_once() {
        for name in NAMES {
            let def = format!("__global__ void {name}(");
            assert_eq!(SOURCE.matches(&def).count(), 1, "{name}");
        }
        assert_eq!(SOURCE.matches("__global__").count(), NAMES.len());
    }

    #[test]
    fn source_is_self_contained_and_balanced() {
        assert!(
            !SOURCE.contains("#include"),
            "NVRTC has no CUDA headers on a runtime-only node"
        );
        let opens = SOURCE.matches('{').count();
        let closes = SOURCE.matches('}').count();
        assert_eq!(opens, closes);
        assert_eq!(SOURCE.matches('(').count(), SOURCE.matches(')').count());
        // The entry points are in the extern "C" block, so their names are not mangled.
        let ext = SOURCE.find("extern \"C\" {").expect("extern C block");
        for name in NAMES {
            assert!(
                SOURCE.find(&format!("void {name}(")).unwrap() > ext,
                "{name}"
            );
        }
    }

    #[test]
    fn block_is_a_whole_number_of_warps_and_grids_cover() {
        const { assert!(BLOCK.is_multiple_of(32) && BLOCK <= 1024) };
        assert_eq!(grid_for(0), 1);
        assert_eq!(grid_for(1), 1);
        assert_eq!(grid_for(BLOCK as usize), 1);
        assert_eq!(grid_for(BLOCK as usize + 1), 2);
    }
}
