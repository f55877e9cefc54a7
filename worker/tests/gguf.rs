//! The GGUF parser on the real test model, and fuzzing of its header parsing with proptest over
//! mutated and truncated bytes: every input gives Ok or an error, never a panic.

mod common;

use std::path::Path;

use proptest::prelude::*;
use tessera_worker::model::MappedGguf;
use tessera_worker::model::gguf::{GgmlType, Gguf, Value, Writer};

use common::model_path;

fn real_model() -> MappedGguf {
    MappedGguf::open(&model_path()).expect("the test model parses")
}

#[test]
fn the_test_model_has_the_documented_shape() {
    let m = real_model();
    let g = &m.gguf;
    assert_eq!(g.architecture(), Some("llama"));
    let u = |k: &str| {
        g.get(k)
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("{k}"))
    };
    assert_eq!(u("llama.block_count"), 30);
    assert_eq!(u("llama.embedding_length"), 576);
    assert_eq!(u("llama.attention.head_count"), 9);
    assert_eq!(u("llama.attention.head_count_kv"), 3);
    assert_eq!(u("llama.feed_forward_length"), 1536);
    let tokens = g
        .get("tokenizer.ggml.tokens")
        .and_then(Value::as_array)
        .expect("vocabulary");
    assert_eq!(tokens.len(), 49152);
    let count = |t: GgmlType| g.tensors.iter().filter(|x| x.ggml_type == t).count();
    assert_eq!(count(GgmlType::Q4_1), 210);
    assert_eq!(
        g.tensor("token_embd.weight").map(|t| t.ggml_type),
        Some(GgmlType::Q8_0)
    );
    assert!(
        g.tensor("output.weight").is_none(),
        "the LM head is tied to the embedding"
    );
    let norm = g.tensor("output_norm.weight").expect("final norm");
    assert_eq!(norm.ggml_type, GgmlType::F32);
    assert_eq!(m.tensor_bytes(norm).len(), 576 * 4);
}

#[test]
fn a_truncated_real_model_names_the_tensor() {
    let bytes = std::fs::read(model_path()).expect("model present (scripts/fetch-model.sh)");
    let cut = &bytes[..bytes.len() / 2];
    let e = Gguf::parse(Path::new("half.gguf"), cut).expect_err("truncated");
    let msg = e.to_string();
    assert!(
        msg.starts_with("half.gguf: tensor ") && msg.contains("the file is truncated"),
        "{msg}"
    );
}

fn seed_file() -> Vec<u8> {
    let mut w = Writer::default();
    w.metadata("general.architecture", Value::String("llama".into()))
        .metadata("general.alignment", Value::U32(32))
        .metadata(
            "tokenizer.ggml.scores",
            Value::Array(vec![Value::F32(0.5), Value::F32(-1.0)]),
        )
        .metadata("llama.rope.freq_base", Value::F32(10000.0))
        .tensor("a", &[32, 2], GgmlType::Q8_0, vec![7u8; 68])
        .tensor("b", &[4], GgmlType::F32, vec![0u8; 16]);
    w.to_bytes()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn mutated_headers_never_panic(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        do_cut in any::<bool>(),
    ) {
        let mut bytes = seed_file();
        for (i, b) in flips {
            let at = i.index(bytes.len());
            bytes[at] = b;
        }
        if do_cut {
            let n = cut.index(bytes.len());
            bytes.truncate(n);
        }
        // Ok or Err, never a panic; and an Ok directory only points inside the bytes.
        if let Ok(g) = Gguf::parse(Path::new("fuzz.gguf"), &bytes) {
            for t in &g.tensors {
                prop_assert!(t.offset + t.size <= bytes.len() as u64);
            }
        }
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut with_magic = b"GGUF\x03\x00\x00\x00".to_vec();
        with_magic.extend(&bytes);
        let _ = Gguf::parse(Path::new("fuzz.gguf"), &with_magic);
        let _ = Gguf::parse(Path::new("fuzz.gguf"), &bytes);
    }
}
