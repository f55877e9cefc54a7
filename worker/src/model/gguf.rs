//! GGUF container parsing (versions 2 and 3): header, metadata and tensor directory.
//!
//! The parser works on a byte slice (a memory map of the file) and never trusts a length it
//! reads: every count and size is checked against the bytes that remain before anything is
//! allocated, so a truncated or hostile file gives an error naming the file, the tensor or key,
//! and the problem, never a panic or a huge allocation. Tensor data is not copied; callers get
//! offsets into the slice.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// The ggml tensor types Tessera knows, with their block layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    BF16,
}

impl GgmlType {
    /// From the numeric id in the file.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            9 => Self::Q8_1,
            10 => Self::Q2_K,
            11 => Self::Q3_K,
            12 => Self::Q4_K,
            13 => Self::Q5_K,
            14 => Self::Q6_K,
            15 => Self::Q8_K,
            30 => Self::BF16,
            _ => return None,
        })
    }

    /// Numeric id in the file.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q8_1 => 9,
            Self::Q2_K => 10,
            Self::Q3_K => 11,
            Self::Q4_K => 12,
            Self::Q5_K => 13,
            Self::Q6_K => 14,
            Self::Q8_K => 15,
            Self::BF16 => 30,
        }
    }

    /// (elements per block, bytes per block).
    pub fn block(self) -> (u64, u64) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q8_1 => (32, 36),
            Self::Q2_K => (256, 84),
            Self::Q3_K => (256, 110),
            Self::Q4_K => (256, 144),
            Self::Q5_K => (256, 176),
            Self::Q6_K => (256, 210),
            Self::Q8_K => (256, 292),
        }
    }

    /// Bytes of a row of `n` elements, if `n` is a whole number of blocks.
    pub fn row_bytes(self, n: u64) -> Option<u64> {
        let (per, bytes) = self.block();
        n.is_multiple_of(per).then(|| n / per * bytes)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// As an unsigned integer, when it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// As a float, for any numeric value.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor's directory entry.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions as GGUF stores them: innermost (row length) first.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF file (without its tensor data).
#[derive(Clone, Debug, PartialEq)]
pub struct Gguf {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    /// Absolute offset where tensor data starts.
    pub data_offset: u64,
}

/// Why a GGUF file could not be read. Every variant names the file.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GgufError {
    #[error("{path}: not a GGUF file (magic {magic:?}, expected \"GGUF\")")]
    BadMagic { path: PathBuf, magic: [u8; 4] },
    #[error("{path}: GGUF version {version} is not supported (2 and 3 are)")]
    Version { path: PathBuf, version: u32 },
    #[error("{path}: truncated at byte {at} while reading {what}")]
    Truncated {
        path: PathBuf,
        at: u64,
        what: String,
    },
    #[error("{path}: invalid {what}: {why}")]
    Invalid {
        path: PathBuf,
        what: String,
        why: String,
    },
    #[error(
        "{path}: tensor {tensor} has type id {type_id}, which is not supported (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K..Q8_K)"
    )]
    UnsupportedType {
        path: PathBuf,
        tensor: String,
        type_id: u32,
    },
    #[error(
        "{path}: tensor {tensor} ({ggml_type}, {size} bytes at offset {offset}) runs past the end of the file ({file_len} bytes): the file is truncated"
    )]
    TensorOutOfBounds {
        path: PathBuf,
        tensor: String,
        ggml_type: GgmlType,
        offset: u64,
        size: u64,
        file_len: u64,
    },
}

const MAX_STRING: u64 = 1 << 24;
const MAX_DIMS: u32 = 4;

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn truncated(&self, what: &str) -> GgufError {
        GgufError::Truncated {
            path: self.path.to_owned(),
            at: self.pos as u64,
            what: what.to_owned(),
        }
    }

    fn invalid(&self, what: &str, why: impl Into<String>) -> GgufError {
        GgufError::Invalid {
            path: self.path.to_owned(),
            what: what.to_owned(),
            why: why.into(),
        }
    }

    fn bytes(&mut self, n: u64, what: &str) -> Result<&'a [u8], GgufError> {
        let n = usize::try_from(n).map_err(|_| self.truncated(what))?;
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| self.truncated(what))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let b = self.bytes(N as u64, what)?;
        Ok(b.try_into().expect("length checked"))
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        if len > MAX_STRING {
            return Err(self.invalid(what, format!("string length {len} exceeds {MAX_STRING}")));
        }
        let b = self.bytes(len, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.invalid(what, "string is not UTF-8"))
    }

    fn value(&mut self, type_id: u32, what: &str, depth: u32) -> Result<Value, GgufError> {
        Ok(match type_id {
            0 => Value::U8(self.array::<1>(what)?[0]),
            1 => Value::I8(self.array::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.invalid(what, format!("bool byte {b}"))),
            },
            8 => Value::String(self.string(what)?),
            9 => {
                if depth > 2 {
                    return Err(self.invalid(what, "arrays nested too deeply"));
                }
                let elem = self.u32(what)?;
                let n = self.u64(what)?;
                // Every element takes at least one byte: a count beyond the remaining bytes is
                // a corrupt header, refused before allocating.
                if n > self.remaining() {
                    return Err(self.truncated(what));
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(elem, what, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            t => return Err(self.invalid(what, format!("unknown value type {t}"))),
        })
    }
}

impl Gguf {
    /// Parse the header, metadata and tensor directory of `buf` (the whole file), checking that
    /// every tensor's data lies inside it. `path` is used in error messages.
    pub fn parse(path: &Path, buf: &[u8]) -> Result<Self, GgufError> {
        let mut r = Reader { buf, pos: 0, path };
        let magic = r.array::<4>("the magic number")?;
        if &magic != b"GGUF" {
            return Err(GgufError::BadMagic {
                path: path.to_owned(),
                magic,
            });
        }
        let version = r.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version {
                path: path.to_owned(),
                version,
            });
        }
        let n_tensors = r.u64("the tensor count")?;
        let n_kv = r.u64("the metadata count")?;
        // Each entry needs well over 8 bytes: refuse counts the file cannot hold.
        if n_tensors > r.remaining() / 8 || n_kv > r.remaining() / 8 {
            return Err(r.invalid(
                "header",
                format!("{n_tensors} tensors and {n_kv} metadata entries cannot fit in the file"),
            ));
        }
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = r.string(&format!("metadata key #{i}"))?;
            let t = r.u32(&format!("the type of metadata {key}"))?;
            let v = r.value(t, &format!("metadata {key}"), 0)?;
            metadata.insert(key, v);
        }
        let mut raw = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = r.string(&format!("the name of tensor #{i}"))?;
            let what = format!("tensor {name}");
            let n_dims = r.u32(&what)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(r.invalid(
                    &what,
                    format!("{n_dims} dimensions (1 to {MAX_DIMS} allowed)"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64(&what)?);
            }
            let type_id = r.u32(&what)?;
            let offset = r.u64(&what)?;
            raw.push((name, dims, type_id, offset));
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(32);
        if alignment == 0 || !alignment.is_power_of_two() || alignment > 1 << 16 {
            return Err(r.invalid(
                "general.alignment",
                format!("{alignment} is not a power of two up to 65536"),
            ));
        }
        let data_offset = (r.pos as u64).div_ceil(alignment) * alignment;
        let file_len = buf.len() as u64;
        let mut tensors = Vec::with_capacity(raw.len());
        for (name, dims, type_id, rel) in raw {
            let ggml_type =
                GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnsupportedType {
                    path: path.to_owned(),
                    tensor: name.clone(),
                    type_id,
                })?;
            let elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| {
                    r.invalid(
                        &format!("tensor {name}"),
                        format!("dimensions {dims:?} overflow"),
                    )
                })?;
            let (per, bytes) = ggml_type.block();
            if !dims[0].is_multiple_of(per) {
                return Err(r.invalid(
                    &format!("tensor {name}"),
                    format!(
                        "row length {} is not a multiple of the {ggml_type} block size {per}",
                        dims[0]
                    ),
                ));
            }
            let size = (elements / per).checked_mul(bytes).ok_or_else(|| {
                r.invalid(
                    &format!("tensor {name}"),
                    format!("dimensions {dims:?} overflow"),
                )
            })?;
            let offset = data_offset.saturating_add(rel);
            if !rel.is_multiple_of(alignment)
                || offset.checked_add(size).is_none_or(|end| end > file_len)
            {
                return Err(GgufError::TensorOutOfBounds {
                    path: path.to_owned(),
                    tensor: name,
                    ggml_type,
                    offset,
                    size,
                    file_len,
                });
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
                size,
            });
        }
        Ok(Gguf {
            path: path.to_owned(),
            version,
            metadata,
            tensors,
            data_offset,
        })
    }

    /// A tensor by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// The model architecture (`general.architecture`), for example `llama`.
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(Value::as_str)
    }
}

/// Writes GGUF v3 files (used by tests to build tiny models and by fuzzing to seed inputs).
#[derive(Debug, Default)]
pub struct Writer {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
}

impl Writer {
    pub fn metadata(&mut self, key: &str, value: Value) -> &mut Self {
        self.metadata.push((key.to_owned(), value));
        self
    }

    /// Add a tensor whose data is already encoded in `ggml_type`.
    pub fn tensor(
        &mut self,
        name: &str,
        dims: &[u64],
        ggml_type: GgmlType,
        data: Vec<u8>,
    ) -> &mut Self {
        self.tensors
            .push((name.to_owned(), dims.to_vec(), ggml_type, data));
        self
    }

    fn put_value(out: &mut Vec<u8>, v: &Value) {
        match v {
            Value::U8(x) => out.push(*x),
            Value::I8(x) => out.push(*x as u8),
            Value::U16(x) => out.extend(x.to_le_bytes()),
            Value::I16(x) => out.extend(x.to_le_bytes()),
            Value::U32(x) => out.extend(x.to_le_bytes()),
            Value::I32(x) => out.extend(x.to_le_bytes()),
            Value::F32(x) => out.extend(x.to_le_bytes()),
            Value::Bool(x) => out.push(u8::from(*x)),
            Value::String(s) => {
                out.extend((s.len() as u64).to_le_bytes());
                out.extend(s.as_bytes());
            }
            Value::Array(items) => {
                let elem = items.first().map_or(4, Self::type_id);
                out.extend(elem.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for i in items {
                    Self::put_value(out, i);
                }
            }
            Value::U64(x) => out.extend(x.to_le_bytes()),
            Value::I64(x) => out.extend(x.to_le_bytes()),
            Value::F64(x) => out.extend(x.to_le_bytes()),
        }
    }

    fn type_id(v: &Value) -> u32 {
        match v {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    /// The file's bytes (alignment 32).
    pub fn to_bytes(&self) -> Vec<u8> {
        const ALIGN: usize = 32;
        let mut out = Vec::new();
        out.extend(b"GGUF");
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            Self::put_value(&mut out, &Value::String(k.clone()));
            out.extend(Self::type_id(v).to_le_bytes());
            Self::put_value(&mut out, v);
        }
        let mut rel = 0usize;
        let mut offsets = Vec::new();
        for (name, dims, t, data) in &self.tensors {
            Self::put_value(&mut out, &Value::String(name.clone()));
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(t.id().to_le_bytes());
            out.extend((rel as u64).to_le_bytes());
            offsets.push(rel);
            rel = (rel + data.len()).div_ceil(ALIGN) * ALIGN;
        }
        let data_start = out.len().div_ceil(ALIGN) * ALIGN;
        out.resize(data_start, 0);
        for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
            out.resize(data_start + off, 0);
            out.extend(data);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Vec<u8> {
        let mut w = Writer::default();
        w.metadata("general.architecture", Value::String("llama".into()))
            .metadata("llama.block_count", Value::U32(2))
            .metadata(
                "tokenizer.ggml.tokens",
                Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
            )
            .tensor("w", &[32, 2], GgmlType::F32, vec![0u8; 32 * 2 * 4])
            .tensor("q", &[64], GgmlType::Q4_1, vec![1u8; 2 * 20]);
        w.to_bytes()
    }

    #[test]
    fn round_trip() {
        let bytes = tiny();
        let g = Gguf::parse(Path::new("tiny.gguf"), &bytes).expect("parses");
        assert_eq!(g.version, 3);
        assert_eq!(g.architecture(), Some("llama"));
        assert_eq!(g.get("llama.block_count").and_then(Value::as_u64), Some(2));
        let q = g.tensor("q").expect("q");
        assert_eq!(q.ggml_type, GgmlType::Q4_1);
        assert_eq!(q.size, 40);
        assert_eq!(
            &bytes[q.offset as usize..(q.offset + q.size) as usize],
            &[1u8; 40][..]
        );
    }

    #[test]
    fn truncated_file_names_the_tensor() {
        let bytes = tiny();
        let cut = &bytes[..bytes.len() - 10];
        let e = Gguf::parse(Path::new("m.gguf"), cut).expect_err("truncated");
        let msg = e.to_string();
        assert!(
            msg.contains("m.gguf")
                && msg.contains("tensor q")
                && msg.contains("Q4_1")
                && msg.contains("truncated"),
            "{msg}"
        );
    }

    #[test]
    fn unsupported_type_names_tensor_and_type() {
        let mut bytes = tiny();
        // Patch the type id of tensor "q" (type u32 comes right before its u64 offset).
        let needle = b"\x01\x00\x00\x00\x00\x00\x00\x00q";
        let at = bytes
            .windows(needle.len())
            .position(|w| w == needle)
            .expect("q entry")
            + needle.len();
        // Layout after the name: n_dims u32, dims u64, type u32.
        let type_at = at + 4 + 8;
        bytes[type_at..type_at + 4].copy_from_slice(&99u32.to_le_bytes());
        let e = Gguf::parse(Path::new("m.gguf"), &bytes).expect_err("unsupported");
        assert_eq!(
            e,
            GgufError::UnsupportedType {
                path: "m.gguf".into(),
                tensor: "q".into(),
                type_id: 99
            }
        );
    }

    #[test]
    fn not_gguf() {
        let e = Gguf::parse(Path::new("x.bin"), b"PK\x03\x04rest").expect_err("zip");
        assert!(e.to_string().starts_with("x.bin: not a GGUF file"), "{e}");
        let e = Gguf::parse(Path::new("x.bin"), b"GG").expect_err("short");
        assert!(matches!(e, GgufError::Truncated { .. }));
    }
}
