//! The tokenizer against llama.cpp's own tokenizer test suite: the vocabulary-only GGUF files of
//! Llama 2 (SentencePiece), Llama 3 (byte-level BPE, `llama-bpe` pre-tokenizer) and GPT-2, each
//! with 46 test strings and the token ids the original (Hugging Face) tokenizer gives for them
//! without special tokens. `scripts/fetch-vocab.sh` places them in models/vocab/ (the README's
//! test command runs it).

use std::path::PathBuf;

use tessera_worker::model::MappedGguf;
use tessera_worker::tokenizer::Tokenizer;

fn vocab(name: &str) -> (Tokenizer, Vec<(String, Vec<u32>)>) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/vocab");
    let path = dir.join(format!("ggml-vocab-{name}.gguf"));
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-vocab.sh",
        path.display()
    );
    let file = MappedGguf::open(&path).expect("vocabulary parses");
    let t = Tokenizer::from_gguf(&file.gguf).expect("tokenizer builds");
    let read =
        |ext: &str| std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.{ext}")));
    let inp = read("inp").expect("test strings");
    let out = read("out").expect("expected ids");
    let texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    let ids: Vec<&str> = out.split('\n').collect();
    assert_eq!(
        texts.len(),
        ids.len(),
        "{name}: as many strings as id lists"
    );
    let cases: Vec<(String, Vec<u32>)> = texts
        .iter()
        .zip(&ids)
        .filter(|(t, i)| !(t.is_empty() && i.is_empty()))
        .map(|(t, i)| {
            let ids = i.split_whitespace().map(|v| v.parse().unwrap()).collect();
            (t.to_string(), ids)
        })
        .collect();
    (t, cases)
}

/// Encode without special tokens (the suite's ids have no BOS).
fn encode(t: &Tokenizer, text: &str) -> Vec<u32> {
    let mut ids = t.encode(text, false);
    if t.add_bos && !ids.is_empty() && Some(ids[0]) == t.bos {
        ids.remove(0);
    }
    ids
}

fn check(name: &str) {
    let (t, cases) = vocab(name);
    assert!(cases.len() >= 40, "{name}: {} cases", cases.len());
    let mut failed = Vec::new();
    for (text, want) in &cases {
        let got = encode(&t, text);
        if &got != want {
            failed.push(format!("{text:?}\n  want {want:?}\n  got  {got:?}"));
        }
    }
    assert!(
        failed.is_empty(),
        "{name}: {} of {} strings differ:\n{}",
        failed.len(),
        cases.len(),
        failed.join("\n")
    );
    eprintln!("{name}: {} strings, all ids equal", cases.len());
}

#[test]
fn llama2_sentencepiece_ids_match_the_reference() {
    check("llama-spm");
}

#[test]
fn llama3_bpe_ids_match_the_reference() {
    check("llama-bpe");
}

#[test]
fn gpt2_bpe_ids_match_the_reference() {
    check("gpt-2");
}

/// Decoding gives the text back: exactly for byte-level BPE; for SentencePiece after the space
/// prefix the encoder added (llama.cpp's detokeniser drops it the same way).
#[test]
fn decoding_the_reference_ids_gives_the_text_back() {
    for name in ["llama-spm", "llama-bpe", "gpt-2"] {
        let (t, cases) = vocab(name);
        for (text, ids) in &cases {
            let got = t.decode(ids, true);
            let got = if name == "llama-spm" {
                got.strip_prefix(' ').unwrap_or(&got).to_owned()
            } else {
                got
            };
            assert_eq!(&got, text, "{name}: {ids:?}");
        }
    }
}

/// SentencePiece specifics: BOS by default, a space prefix at the start and after a special
/// token only, byte fallback for characters outside the vocabulary, `</s>` stops.
#[test]
fn sentencepiece_prefix_bos_and_byte_fallback() {
    let (t, _) = vocab("llama-spm");
    assert_eq!((t.bos, t.eos, t.add_bos), (Some(1), Some(2), true));
    assert!(t.is_stop(2));
    let hello = t.encode("Hello", false);
    assert_eq!(hello[0], 1, "BOS first");
    let word = t.token(hello[1]).unwrap();
    assert_eq!(word, "\u{2581}Hello", "the space prefix");
    // After a special token the prefix comes again; plain-text "<s>" is not the BOS token.
    let with = t.encode("<s>Hello", true);
    assert_eq!(with, vec![1, 1, hello[1]]);
    assert!(t.encode("<s>", false)[1..].iter().all(|&id| id != 1));
    // A character with no token: its UTF-8 bytes as <0xXX> tokens, decoded back.
    let ids = t.encode("\u{1F999}", false);
    let bytes: Vec<&str> = ids[2..].iter().map(|&i| t.token(i).unwrap()).collect();
    assert_eq!(bytes, ["<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]);
    assert_eq!(t.decode(&ids, true), " \u{1F999}");
}

/// Unsupported or inconsistent tokenizer metadata is an error naming the file, the key, the
/// value and what is supported.
#[test]
fn bad_tokenizer_metadata_is_named() {
    use tessera_worker::model::gguf::{Gguf, Value, Writer};
    let build = |model: &str, scores: usize| {
        let mut w = Writer::default();
        w.metadata("tokenizer.ggml.model", Value::String(model.into()))
            .metadata(
                "tokenizer.ggml.tokens",
                Value::Array(
                    ["<unk>", "a", "b"]
                        .map(|t| Value::String(t.into()))
                        .to_vec(),
                ),
            )
            .metadata(
                "tokenizer.ggml.scores",
                Value::Array(vec![Value::F32(0.0); scores]),
            );
        let path = PathBuf::from("bad-vocab.gguf");
        let g = Gguf::parse(&path, &w.to_bytes()).unwrap();
        Tokenizer::from_gguf(&g).err().map(|e| format!("{e:#}"))
    };
    let e = build("bert", 3).expect("unsupported model");
    assert!(
        e.contains("bad-vocab.gguf")
            && e.contains("tokenizer.ggml.model \"bert\"")
            && e.contains("llama, SentencePiece-style"),
        "{e}"
    );
    let e = build("llama", 2).expect("scores do not match the tokens");
    assert!(
        e.contains("tokenizer.ggml.scores has 2 entries for 3 tokens"),
        "{e}"
    );
    assert!(
        build("llama", 3).is_none(),
        "a consistent SentencePiece vocabulary builds"
    );
}

/// Llama 3's vocabulary: BOS by default (as llama.cpp for the `llama-bpe` pre-tokenizer) and its
/// chat format, with the ids Llama 3's own template gives.
#[test]
fn llama3_bos_and_chat_format() {
    use tessera_worker::tokenizer::Message;
    let (t, _) = vocab("llama-bpe");
    assert_eq!((t.bos, t.add_bos), (Some(128_000), true));
    assert!(t.is_stop(128_009), "<|eot_id|> ends a turn");
    let text = t
        .apply_chat_template(&[Message::new("user", " Hello ")], true)
        .unwrap();
    assert_eq!(
        text,
        "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    assert_eq!(
        t.encode(&text, true),
        [
            128_000, 128_006, 882, 128_007, 271, 9906, 128_009, 128_006, 78_191, 128_007, 271
        ]
    );
    // Vocabularies without a supported chat format say so instead of guessing.
    for name in ["llama-spm", "gpt-2"] {
        let (t, _) = vocab(name);
        let e = t
            .apply_chat_template(&[Message::new("user", "Hi")], true)
            .expect_err("no chat format");
        assert!(
            format!("{e:#}").contains("chat template is not supported"),
            "{name}: {e:#}"
        );
    }
}
