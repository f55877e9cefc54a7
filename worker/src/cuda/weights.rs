//! Weights on the GPU: every matrix of the rank's shard is dequantised on the host (from its GGUF
//! encoding: Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, F16, BF16, F32) to f16, row-major `[rows, cols]`, and
//! uploaded once at load.
//!
//! Memory cost: 2 bytes per weight on the device, whatever the file's encoding (a Q4_1 file is
//! 5 bits per weight, so the GPU holds about 3.2x the file's bytes for those tensors; Q8_0 about
//! 1.9x); norms and the RoPE frequencies stay f32. The host needs one matrix's f16 copy at a
//! time during the upload. The token embedding stays on the host (in the memory map) and only
//! the prompt's rows are dequantised each step; a tied LM head is uploaded as its own f16 copy.
//! Simplest correct path; uploading the quantised blocks and dequantising inside the product
//! would cut this to the file's size and is not done.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use half::f16;

use super::cu;
use crate::kernels::QMatrix;

/// A weight matrix on the device: f16, row-major `[rows, cols]`.
pub struct DeviceMatrix {
    pub rows: usize,
    pub cols: usize,
    pub data: CudaSlice<f16>,
}

impl DeviceMatrix {
    /// Dequantise `m` on the host and upload it.
    pub fn upload(stream: &Arc<CudaStream>, m: &QMatrix, name: &str) -> anyhow::Result<Self> {
        let host = to_f16(m);
        let data = cu(
            &format!("uploading {name} ({} x {} f16)", m.rows, m.cols),
            stream.clone_htod(&host),
        )?;
        Ok(Self {
            rows: m.rows,
            cols: m.cols,
            data,
        })
    }

    /// Device bytes.
    pub fn bytes(&self) -> usize {
        self.rows * self.cols * 2
    }
}

/// `m` dequantised to f16, row-major `[rows, cols]`.
pub fn to_f16(m: &QMatrix) -> Vec<f16> {
    let mut out = Vec::with_capacity(m.rows * m.cols);
    let mut row = vec![0f32; m.cols];
    for r in 0..m.rows {
        m.dequantize_row(r, &mut row);
        out.extend(row.iter().map(|&v| f16::from_f32(v)));
    }
    out
}

/// Device bytes of `n` f16 weights (the planner-style estimate the loader logs).
pub fn f16_bytes(n: usize) -> usize {
    n * 2
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gguf::GgmlType;

    fn values(rows: usize, cols: usize) -> Vec<f32> {
        // Deterministic values in about [-2, 2].
        (0..rows * cols)
            .map(|i| ((i * 7919 % 1009) as f32 / 1009.0 - 0.5) * 4.0)
            .collect()
    }

    #[test]
    fn f16_copy_equals_the_dequantised_matrix_for_every_file_type() {
        let (rows, cols) = (6, 256);
        let v = values(rows, cols);
        for ty in [
            GgmlType::F32,
            GgmlType::F16,
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
        ] {
            let m = QMatrix::from_f32(ty, rows, cols, &v);
            let reference = m.to_f32();
            let h = to_f16(&m);
            assert_eq!(h.len(), rows * cols, "{ty}");
            for (i, (a, b)) in h.iter().zip(&reference).enumerate() {
                // f16 keeps 11 significant bits: relative error at most 2^-11.
                let tol = b.abs() * (1.0 / 2048.0) + 1e-6;
                assert!(
                    (a.to_f32() - b).abs() <= tol,
                    "{ty} element {i}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn column_shards_convert_like_the_full_matrix() {
        // Row-parallel layers hold an input-column slice (an owned copy); its f16 rows must
        // equal the matching columns of the whole matrix.
        let (rows, cols) = (4, 128);
        let m = QMatrix::from_f32(GgmlType::Q8_0, rows, cols, &values(rows, cols));
        let full = to_f16(&m);
        let part = to_f16(&m.slice_cols(32..96).unwrap());
        for r in 0..rows {
            assert_eq!(
                &part[r * 64..(r + 1) * 64],
                &full[r * cols + 32..r * cols + 96]
            );
        }
        let top = to_f16(&m.slice_rows(1..3));
        assert_eq!(&top[..], &full[cols..3 * cols]);
    }

    #[test]
    fn memory_cost_is_two_bytes_a_weight() {
        assert_eq!(f16_bytes(576 * 1536), 576 * 1536 * 2);
    }
}
