//! CPU kernels of the inference core: weight matrices kept in their GGUF encoding (zero-copy
//! from the memory map where possible), dot products with run-time selected SIMD, and
//! multithreaded matrix-vector / small-batch matrix-matrix products.
//!
//! Layout convention: a weight matrix has `rows` output features, each row `cols` input features
//! long and stored contiguously (GGUF's `dims = [cols, rows]`). Activations are row-major
//! `[tokens, cols]`; outputs `[tokens, rows]`.

pub mod dot;
mod pool;
pub mod quant;

use std::sync::Arc;

pub use dot::{Simd, detect};
pub use quant::{BlockQ8, QK};

use crate::model::MappedGguf;
use crate::model::gguf::GgmlType;

/// Bytes of a weight: borrowed from the model's memory map, or owned (a slice that had to be
/// gathered, such as the column shard of a row-parallel matrix, or a test matrix).
#[derive(Clone)]
pub enum Bytes {
    /// Shared, so a tied LM head and the embedding it is tied to are one copy.
    Owned(Arc<[u8]>),
    Mapped {
        file: Arc<MappedGguf>,
        start: usize,
        len: usize,
    },
}

impl Bytes {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Owned(v) => v,
            Bytes::Mapped { file, start, len } => &file.bytes()[*start..*start + *len],
        }
    }
}

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bytes::Owned(v) => write!(f, "Owned({} bytes)", v.len()),
            Bytes::Mapped { start, len, .. } => write!(f, "Mapped({len} bytes at {start})"),
        }
    }
}

/// A weight matrix in its GGUF encoding.
#[derive(Clone, Debug)]
pub struct QMatrix {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    row_bytes: usize,
    data: Bytes,
}

impl QMatrix {
    /// Wrap encoded bytes; checks the type is supported and the size matches.
    pub fn new(ty: GgmlType, rows: usize, cols: usize, data: Bytes) -> Result<Self, String> {
        if !quant::supported(ty) {
            return Err(format!(
                "type {ty} is not supported by the CPU kernels (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)"
            ));
        }
        let row_bytes = ty
            .row_bytes(cols as u64)
            .ok_or_else(|| format!("row length {cols} is not a whole number of {ty} blocks"))?
            as usize;
        let len = data.as_slice().len();
        if len != row_bytes * rows {
            return Err(format!(
                "{len} bytes for {rows} rows x {cols} columns of {ty} (expected {})",
                row_bytes * rows
            ));
        }
        Ok(Self {
            ty,
            rows,
            cols,
            row_bytes,
            data,
        })
    }

    /// Encode an f32 row-major matrix as `ty` (tests and tiny models).
    pub fn from_f32(ty: GgmlType, rows: usize, cols: usize, values: &[f32]) -> Self {
        assert_eq!(values.len(), rows * cols);
        let mut bytes = Vec::new();
        for r in values.chunks_exact(cols) {
            bytes.extend(quant::quantize_row(ty, r));
        }
        Self::new(ty, rows, cols, Bytes::Owned(bytes.into())).expect("encodable type")
    }

    /// Encoded bytes of row `r`.
    #[inline]
    pub fn row(&self, r: usize) -> &[u8] {
        &self.data.as_slice()[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    /// All encoded bytes.
    pub fn bytes(&self) -> &[u8] {
        self.data.as_slice()
    }

    /// Whether the data is borrowed from the memory map (zero-copy).
    pub fn is_mapped(&self) -> bool {
        matches!(self.data, Bytes::Mapped { .. })
    }

    /// The same matrix in memory of its own (a copy when it is mapped).
    pub fn into_owned(self) -> Self {
        match self.data {
            Bytes::Owned(_) => self,
            Bytes::Mapped { .. } => Self {
                data: Bytes::Owned(self.data.as_slice().into()),
                ..self
            },
        }
    }

    /// Drop the pages of the mapped range this matrix reads from this process's resident memory
    /// (see [`MappedGguf::release_range`]); nothing for an owned matrix.
    pub fn release_pages(&self) {
        if let Bytes::Mapped { file, start, len } = &self.data {
            file.release_range(*start, *len);
        }
    }

    /// Dequantise row `r` into `out` (`cols` long).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        quant::dequantize_row(self.ty, self.row(r), &mut out[..self.cols]);
    }

    /// The whole matrix as f32, row-major (tests and references).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, o) in out.chunks_exact_mut(self.cols).enumerate() {
            self.dequantize_row(r, o);
        }
        out
    }

    /// Rows `range` (zero-copy when mapped).
    pub fn slice_rows(&self, range: std::ops::Range<usize>) -> Self {
        assert!(range.end <= self.rows && range.start <= range.end);
        let (a, b) = (range.start * self.row_bytes, range.end * self.row_bytes);
        let data = match &self.data {
            Bytes::Owned(v) => Bytes::Owned(v[a..b].into()),
            Bytes::Mapped { file, start, .. } => Bytes::Mapped {
                file: Arc::clone(file),
                start: start + a,
                len: b - a,
            },
        };
        Self {
            rows: range.len(),
            data,
            ..*self
        }
    }

    /// Columns `range` of every row, copied (the input shard of a row-parallel matrix). The
    /// bounds must fall on block boundaries.
    pub fn slice_cols(&self, range: std::ops::Range<usize>) -> Result<Self, String> {
        let (per, bytes) = self.ty.block();
        let (per, bytes) = (per as usize, bytes as usize);
        if !range.start.is_multiple_of(per) || !range.end.is_multiple_of(per) {
            return Err(format!(
                "columns {range:?} do not fall on {} block boundaries ({per} elements)",
                self.ty
            ));
        }
        if range.start == 0 && range.end == self.cols {
            return Ok(self.clone());
        }
        let (a, b) = (range.start / per * bytes, range.end / per * bytes);
        let mut out = Vec::with_capacity((b - a) * self.rows);
        for r in 0..self.rows {
            out.extend_from_slice(&self.row(r)[a..b]);
        }
        Self::new(self.ty, self.rows, range.len(), Bytes::Owned(out.into()))
    }
}

/// The CPU worker threads (a spinning pool, see `pool.rs`) and the instruction set the kernels
/// use.
pub struct Pool {
    inner: pool::SpinPool,
    threads: usize,
    simd: Simd,
}

impl Pool {
    /// `threads` worker threads (0: the available parallelism), best instruction set.
    pub fn new(threads: usize) -> anyhow::Result<Self> {
        Self::with_simd(threads, detect())
    }

    /// As [`Pool::new`] with an explicit instruction set (tests compare them).
    pub fn with_simd(threads: usize, simd: Simd) -> anyhow::Result<Self> {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        let inner = pool::SpinPool::new(threads)
            .map_err(|e| anyhow::anyhow!("starting {threads} CPU threads: {e}"))?;
        Ok(Self {
            inner,
            threads,
            simd,
        })
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    pub fn simd(&self) -> Simd {
        self.simd
    }

    /// Run `f(i)` for `i in 0..n` on the pool (the calling thread takes part).
    pub fn for_each(&self, n: usize, f: impl Fn(usize) + Sync) {
        self.inner.run(n, &f);
    }
}

/// A raw output pointer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: used only for writes to disjoint indices, within a scope that outlives the tasks.
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}
impl SendPtr {
    #[inline]
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Quantise `b` rows of `cols` activations into 8-bit blocks.
pub fn quantize_activations(x: &[f32], cols: usize) -> Vec<BlockQ8> {
    let nb = cols / QK;
    let mut q = vec![BlockQ8::default(); x.len() / cols * nb];
    for (xr, qr) in x.chunks_exact(cols).zip(q.chunks_exact_mut(nb)) {
        quant::quantize_q8(xr, qr);
    }
    q
}

/// `out = x · wᵀ` for `b` tokens: `x` is `[b, w.cols]`, `out` is `[b, w.rows]`.
pub fn matmul(pool: &Pool, w: &QMatrix, x: &[f32], b: usize, out: &mut [f32]) {
    matmul_multi(pool, &[w], x, b, &mut [out]);
}

/// Several products with the same input in one parallel pass (for example Q, K and V, or gate
/// and up): `outs[i] = x · ws[i]ᵀ`.
pub fn matmul_multi(pool: &Pool, ws: &[&QMatrix], x: &[f32], b: usize, outs: &mut [&mut [f32]]) {
    assert_eq!(ws.len(), outs.len());
    let Some(first) = ws.first() else { return };
    let cols = first.cols;
    assert_eq!(x.len(), b * cols, "input is not [tokens, cols]");
    for (w, o) in ws.iter().zip(outs.iter()) {
        assert_eq!(w.cols, cols, "all matrices share the input");
        assert_eq!(o.len(), b * w.rows, "output is not [tokens, rows]");
    }
    let q8 = if ws.iter().any(|w| quant::uses_q8_activations(w.ty)) {
        quantize_activations(x, cols)
    } else {
        Vec::new()
    };
    let nb = cols / QK;
    // Per matrix: the one-row kernel and, where they exist, the four- and two-row kernels
    // (bit-identical to one row at a time: each weight block is decoded once per group).
    let kernels: Vec<_> = ws
        .iter()
        .map(|w| {
            (
                dot::kernel(w.ty, pool.simd),
                dot::pair_kernel(w.ty, pool.simd),
                dot::quad_kernel(w.ty, pool.simd),
            )
        })
        .collect();
    let ptrs: Vec<SendPtr> = outs.iter_mut().map(|o| SendPtr(o.as_mut_ptr())).collect();

    // Split the rows of all matrices into tasks of similar size.
    let total: usize = ws.iter().map(|w| w.rows).sum();
    let per_task = if pool.threads == 1 {
        usize::MAX
    } else {
        total.div_ceil(pool.threads * 8).max(16)
    };
    let mut tasks = Vec::new();
    for (m, w) in ws.iter().enumerate() {
        let mut r = 0;
        while r < w.rows {
            let end = (r + per_task).min(w.rows);
            tasks.push((m, r, end));
            r = end;
        }
    }
    let run = |&(m, r0, r1): &(usize, usize, usize)| {
        let w = ws[m];
        let (one, pair, quad) = kernels[m];
        let out = ptrs[m].get();
        for r in r0..r1 {
            let row = w.row(r);
            let mut t0 = 0;
            if let Some(f) = quad {
                while t0 + 3 < b {
                    let q = |k: usize| &q8[(t0 + k) * nb..(t0 + k + 1) * nb];
                    let v = f(row, [q(0), q(1), q(2), q(3)]);
                    for (k, v) in v.into_iter().enumerate() {
                        // SAFETY: as below.
                        unsafe { *out.add((t0 + k) * w.rows + r) = v };
                    }
                    t0 += 4;
                }
            }
            if let Some(f) = pair {
                while t0 + 1 < b {
                    let (v0, v1) = match f {
                        dot::PairKernel::Q8(f) => {
                            let q = &q8[t0 * nb..(t0 + 2) * nb];
                            f(row, &q[..nb], &q[nb..])
                        }
                        dot::PairKernel::F32(f) => {
                            let x = &x[t0 * cols..(t0 + 2) * cols];
                            f(row, &x[..cols], &x[cols..])
                        }
                    };
                    // SAFETY: as below.
                    unsafe {
                        *out.add(t0 * w.rows + r) = v0;
                        *out.add((t0 + 1) * w.rows + r) = v1;
                    }
                    t0 += 2;
                }
            }
            for t in t0..b {
                let v = match one {
                    dot::Kernel::Q8(f) => f(row, &q8[t * nb..(t + 1) * nb]),
                    dot::Kernel::F32(f) => f(row, &x[t * cols..(t + 1) * cols]),
                };
                // SAFETY: each (t, r) is written by exactly one task; `out` has b * rows
                // elements and outlives this call.
                unsafe { *out.add(t * w.rows + r) = v };
            }
        }
    };
    pool.for_each(tasks.len(), |i| run(&tasks[i]));
}
