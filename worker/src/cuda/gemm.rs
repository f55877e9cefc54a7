//! The linear layers as cuBLAS products. The worker's layout is row-major: weights `W[rows, cols]`,
//! activations `x[tokens, cols]`, outputs `y[tokens, rows] = x Wᵀ`. cuBLAS is column-major, where
//! the same bytes read as `Wc = Wᵀ [cols, rows]`, `Xc = xᵀ [cols, tokens]` and
//! `Yc = yᵀ [rows, tokens]`, so the call is `Yc = Wcᵀ Xc`: `op(A) = T`, `op(B) = N`,
//! `m = rows`, `n = tokens`, `k = cols`, `lda = ldb = cols`, `ldc = rows` ([`GemmDims`]).
//! One `cublasGemmEx` covers decode (`n = 1`, a GEMV) and prefill: f16 A and B, f32 C, f32
//! compute.

use cudarc::cublas::{CudaBlas, result as blas, sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use half::f16;

use super::cu;
use super::weights::DeviceMatrix;

/// The column-major GEMM arguments of `y[tokens, rows] = x[tokens, cols] · W[rows, cols]ᵀ`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmDims {
    /// A (the weight) is transposed; B (the activations) is not.
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
}

impl GemmDims {
    pub fn linear(rows: usize, cols: usize, tokens: usize) -> Self {
        Self {
            trans_a: true,
            trans_b: false,
            m: rows,
            n: tokens,
            k: cols,
            lda: cols,
            ldb: cols,
            ldc: rows,
        }
    }

    /// What cuBLAS computes with these arguments, on the host (column-major BLAS semantics):
    /// `C = op(A) op(B)`. The tests check it against the row-major product.
    pub fn reference(&self, a: &[f32], b: &[f32]) -> Vec<f32> {
        let at = |i: usize, p: usize| {
            if self.trans_a {
                a[p + i * self.lda]
            } else {
                a[i + p * self.lda]
            }
        };
        let bt = |p: usize, j: usize| {
            if self.trans_b {
                b[j + p * self.ldb]
            } else {
                b[p + j * self.ldb]
            }
        };
        let mut c = vec![0f32; self.ldc * self.n];
        for j in 0..self.n {
            for i in 0..self.m {
                c[i + j * self.ldc] = (0..self.k).map(|p| at(i, p) * bt(p, j)).sum();
            }
        }
        c
    }
}

/// `out[tokens, w.rows] = x[tokens, w.cols] · wᵀ` on `stream` (the handle's stream).
pub fn linear(
    blas: &CudaBlas,
    stream: &CudaStream,
    w: &DeviceMatrix,
    x: &CudaSlice<f16>,
    tokens: usize,
    out: &mut CudaSlice<f32>,
) -> anyhow::Result<()> {
    let d = GemmDims::linear(w.rows, w.cols, tokens);
    anyhow::ensure!(
        x.len() >= tokens * w.cols && out.len() >= tokens * w.rows,
        "linear: buffers too small for {tokens} x [{}, {}]",
        w.rows,
        w.cols
    );
    let int = |v: usize| -> anyhow::Result<i32> {
        i32::try_from(v).map_err(|_| anyhow::anyhow!("linear: dimension {v} exceeds cuBLAS's int"))
    };
    let op = |t: bool| {
        if t {
            sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            sys::cublasOperation_t::CUBLAS_OP_N
        }
    };
    let (alpha, beta) = (1f32, 0f32);
    let (a, _ra) = w.data.device_ptr(stream);
    let (b, _rb) = x.device_ptr(stream);
    let (c, _rc) = out.device_ptr_mut(stream);
    // SAFETY: the pointers are live device allocations of this context with at least
    // m*k (A), k*n (B) and m*n (C) elements, checked above; alpha and beta are host f32
    // (the handle's default pointer mode).
    let r = unsafe {
        blas::gemm_ex(
            *blas.handle(),
            op(d.trans_a),
            op(d.trans_b),
            int(d.m)?,
            int(d.n)?,
            int(d.k)?,
            (&alpha as *const f32).cast(),
            a as *const _,
            sys::cudaDataType::CUDA_R_16F,
            int(d.lda)?,
            b as *const _,
            sys::cudaDataType::CUDA_R_16F,
            int(d.ldb)?,
            (&beta as *const f32).cast(),
            c as *mut _,
            sys::cudaDataType::CUDA_R_32F,
            int(d.ldc)?,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    };
    cu("cublasGemmEx", r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_major_arguments_compute_the_row_major_linear_layer() {
        let (rows, cols, tokens) = (5, 7, 3);
        let w: Vec<f32> = (0..rows * cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let x: Vec<f32> = (0..tokens * cols)
            .map(|i| (i as f32 * 0.11).cos())
            .collect();
        let d = GemmDims::linear(rows, cols, tokens);
        // The same bytes handed to cuBLAS: A = w, B = x, C read back row-major [tokens, rows].
        let c = d.reference(&w, &x);
        for t in 0..tokens {
            for r in 0..rows {
                let want: f32 = (0..cols).map(|i| x[t * cols + i] * w[r * cols + i]).sum();
                let got = c[t * rows + r];
                assert!((got - want).abs() < 1e-5, "y[{t}][{r}]: {got} vs {want}");
            }
        }
    }

    #[test]
    fn decode_is_a_single_column_product() {
        let d = GemmDims::linear(1536, 576, 1);
        assert_eq!((d.m, d.n, d.k), (1536, 1, 576));
        assert_eq!((d.lda, d.ldb, d.ldc), (576, 576, 1536));
        assert!(d.trans_a && !d.trans_b);
    }
}
