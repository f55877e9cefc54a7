//! Hugging Face safetensors models against GGUF files of the same weights.
//!
//! A tiny random Llama is written twice: as GGUF with `gguf::Writer` (Q and K rows permuted the
//! way llama.cpp's converter permutes them) and as a Hugging Face directory (`config.json`,
//! `tokenizer.json`, `tokenizer_config.json`, safetensors in F32, F16 or BF16, Q and K in
//! Hugging Face's own order). Logits agree, greedy tokens are identical, for one rank, two
//! tensor-parallel ranks (threads with an in-memory all-reduce) and two pipeline stages. The
//! tokenizer translated from a `tokenizer.json` of the real test model's vocabulary gives the
//! GGUF tokenizer's ids. Every broken input is an error naming the file and what is wrong.

mod common;

use std::path::{Path, PathBuf};

use half::{bf16, f16};
use serde_json::json;
use tempfile::TempDir;
use tessera_worker::engine::sampling::Rng;
use tessera_worker::engine::{Engine, GenerateParams};
use tessera_worker::kernels::Pool;
use tessera_worker::model::MappedGguf;
use tessera_worker::model::gguf::{GgmlType, Value, Writer};
use tessera_worker::model::llama::{Ffn, Llama, Logits};
use tessera_worker::model::parallel::{Identity, Shard, Stage};
use tessera_worker::model::safetensors::hf_metadata;
use tessera_worker::model::source;
use tessera_worker::tokenizer::{Message, Tokenizer};

const LAYERS: usize = 2;
const HIDDEN: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const FFN: usize = 128;
/// 'Ġ' (space), the 94 printable ASCII characters and three special tokens.
const VOCAB: usize = 98;
const EPS: f32 = 1e-5;
const BASE: f32 = 10_000.0;
const TOKENS: [u32; 10] = [3, 17, 42, 5, 88, 61, 9, 30, 77, 2];

/// Weights in Hugging Face layout (`[out, in]` row-major; Q/K rows in rotate-half order).
#[derive(Clone)]
struct Weights {
    embed: Vec<f32>,
    /// input_layernorm, q, k, v, o, post_attention_layernorm, gate, up, down.
    layers: Vec<[Vec<f32>; 9]>,
    norm: Vec<f32>,
    /// `None`: tied to the embedding.
    lm_head: Option<Vec<f32>>,
}

const LAYER_PARTS: [&str; 9] = [
    "input_layernorm",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "post_attention_layernorm",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];
const GGUF_PARTS: [&str; 9] = [
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
];

/// `[rows, cols]` of each layer tensor (a vector when cols is 0).
fn layer_shapes() -> [(usize, usize); 9] {
    let (q, kv) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    [
        (HIDDEN, 0),
        (q, HIDDEN),
        (kv, HIDDEN),
        (kv, HIDDEN),
        (HIDDEN, q),
        (HIDDEN, 0),
        (FFN, HIDDEN),
        (FFN, HIDDEN),
        (HIDDEN, FFN),
    ]
}

fn random_weights(seed: u64, tied: bool) -> Weights {
    let mut rng = Rng::new(seed);
    let mut randn = |n: usize, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|_| ((0..4).map(|_| rng.next_f32()).sum::<f32>() - 2.0) * scale)
            .collect()
    };
    let s = 1.2 / (HIDDEN as f32).sqrt();
    let embed = randn(VOCAB * HIDDEN, 1.0);
    let layers = (0..LAYERS)
        .map(|_| {
            layer_shapes().map(|(r, c)| {
                if c == 0 {
                    randn(r, 0.1).into_iter().map(|x| 1.0 + x).collect()
                } else {
                    randn(r * c, s)
                }
            })
        })
        .collect();
    let norm = randn(HIDDEN, 0.1).into_iter().map(|x| 1.0 + x).collect();
    let lm_head = (!tied).then(|| randn(VOCAB * HIDDEN, s));
    Weights {
        embed,
        layers,
        norm,
        lm_head,
    }
}

impl Weights {
    /// Every value rounded to bf16 (what a BF16 checkpoint holds).
    fn rounded_bf16(&self) -> Self {
        let r = |v: &Vec<f32>| v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
        Weights {
            embed: r(&self.embed),
            layers: self.layers.iter().map(|l| l.each_ref().map(r)).collect(),
            norm: r(&self.norm),
            lm_head: self.lm_head.as_ref().map(r),
        }
    }
}

/// llama.cpp's converter permutation of Q/K rows: GGUF row `2i + j` of a head is Hugging Face
/// row `j * head_dim / 2 + i`.
fn permute_for_gguf(w: &[f32], cols: usize) -> Vec<f32> {
    let half = HEAD_DIM / 2;
    let mut out = Vec::with_capacity(w.len());
    for head in 0..w.len() / cols / HEAD_DIM {
        for i in 0..half {
            for j in 0..2 {
                let r = head * HEAD_DIM + j * half + i;
                out.extend_from_slice(&w[r * cols..(r + 1) * cols]);
            }
        }
    }
    out
}

fn tiny_vocab() -> Vec<String> {
    let mut v = vec!["Ġ".to_owned()];
    v.extend((b'!'..=b'~').map(|b| char::from(b).to_string()));
    v.extend(["<|im_start|>", "<|im_end|>", "<|endoftext|>"].map(str::to_owned));
    assert_eq!(v.len(), VOCAB);
    v
}

/// A fresh directory `name` under the test's own temporary directory (deleted with it).
fn dir(tmp: &TempDir, name: &str) -> PathBuf {
    let d = tmp.path().join(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn encode(ty: GgmlType, v: &[f32]) -> Vec<u8> {
    match ty {
        GgmlType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        GgmlType::F16 => v
            .iter()
            .flat_map(|x| f16::from_f32(*x).to_le_bytes())
            .collect(),
        GgmlType::BF16 => v
            .iter()
            .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
            .collect(),
        other => panic!("no test encoding for {other}"),
    }
}

/// A GGUF file of the weights (every tensor as `ty`), with the tiny tokenizer.
fn write_gguf(w: &Weights, ty: GgmlType, path: &Path) {
    write_gguf_with(w, ty, path, |_| {});
}

/// [`write_gguf`] with `extra` adding keys or tensors.
fn write_gguf_with(w: &Weights, ty: GgmlType, path: &Path, extra: impl FnOnce(&mut Writer)) {
    let mut g = Writer::default();
    g.metadata("general.architecture", Value::String("llama".into()))
        .metadata("llama.block_count", Value::U32(LAYERS as u32))
        .metadata("llama.embedding_length", Value::U32(HIDDEN as u32))
        .metadata("llama.attention.head_count", Value::U32(HEADS as u32))
        .metadata("llama.attention.head_count_kv", Value::U32(KV_HEADS as u32))
        .metadata("llama.feed_forward_length", Value::U32(FFN as u32))
        .metadata("llama.context_length", Value::U32(64))
        .metadata("llama.vocab_size", Value::U32(VOCAB as u32))
        .metadata("llama.rope.freq_base", Value::F32(BASE))
        .metadata("llama.attention.layer_norm_rms_epsilon", Value::F32(EPS))
        .metadata("tokenizer.ggml.model", Value::String("gpt2".into()))
        .metadata(
            "tokenizer.ggml.tokens",
            Value::Array(tiny_vocab().into_iter().map(Value::String).collect()),
        )
        .metadata(
            "tokenizer.ggml.token_type",
            Value::Array(
                (0..VOCAB)
                    .map(|i| Value::I32(if i >= VOCAB - 3 { 3 } else { 1 }))
                    .collect(),
            ),
        )
        .metadata("tokenizer.ggml.merges", Value::Array(Vec::new()))
        .metadata("tokenizer.ggml.bos_token_id", Value::U32(95))
        .metadata("tokenizer.ggml.eos_token_id", Value::U32(96));
    let (h, v) = (HIDDEN as u64, VOCAB as u64);
    g.tensor("token_embd.weight", &[h, v], ty, encode(ty, &w.embed));
    for (i, l) in w.layers.iter().enumerate() {
        for (k, (&(r, c), vals)) in layer_shapes().iter().zip(l).enumerate() {
            let name = format!("blk.{i}.{}.weight", GGUF_PARTS[k]);
            if c == 0 {
                g.tensor(&name, &[r as u64], ty, encode(ty, vals));
            } else {
                let vals = if k == 1 || k == 2 {
                    permute_for_gguf(vals, c)
                } else {
                    vals.clone()
                };
                g.tensor(&name, &[c as u64, r as u64], ty, encode(ty, &vals));
            }
        }
    }
    g.tensor("output_norm.weight", &[h], ty, encode(ty, &w.norm));
    if let Some(head) = &w.lm_head {
        g.tensor("output.weight", &[h, v], ty, encode(ty, head));
    }
    extra(&mut g);
    std::fs::write(path, g.to_bytes()).unwrap();
}

fn config_json(w: &Weights) -> serde_json::Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": EPS,
        "rope_theta": BASE,
        "rope_scaling": null,
        "vocab_size": VOCAB,
        "max_position_embeddings": 64,
        "tie_word_embeddings": w.lm_head.is_none(),
        "bos_token_id": 95,
        "eos_token_id": 96,
        "torch_dtype": "float32",
    })
}

fn tokenizer_json() -> serde_json::Value {
    let vocab: serde_json::Map<String, serde_json::Value> = tiny_vocab()
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, json!(i)))
        .collect();
    let added: Vec<_> = (VOCAB - 3..VOCAB)
        .map(|i| json!({"id": i, "content": tiny_vocab()[i], "special": true, "normalized": false}))
        .collect();
    json!({
        "version": "1.0",
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "decoder": {"type": "ByteLevel"},
        "model": {"type": "BPE", "vocab": vocab, "merges": []},
    })
}

fn write_json(path: &Path, v: &serde_json::Value) {
    std::fs::write(path, serde_json::to_vec_pretty(v).unwrap()).unwrap();
}

/// Every tensor of the weights under its Hugging Face name, encoded as `ty`.
fn hf_tensors(w: &Weights, ty: GgmlType) -> Vec<(String, Vec<usize>, Vec<u8>)> {
    let mut out = vec![(
        "model.embed_tokens.weight".to_owned(),
        vec![VOCAB, HIDDEN],
        encode(ty, &w.embed),
    )];
    for (i, l) in w.layers.iter().enumerate() {
        for (k, (&(r, c), vals)) in layer_shapes().iter().zip(l).enumerate() {
            let shape = if c == 0 { vec![r] } else { vec![r, c] };
            out.push((
                format!("model.layers.{i}.{}.weight", LAYER_PARTS[k]),
                shape,
                encode(ty, vals),
            ));
        }
    }
    out.push((
        "model.norm.weight".into(),
        vec![HIDDEN],
        encode(ty, &w.norm),
    ));
    if let Some(head) = &w.lm_head {
        out.push((
            "lm_head.weight".into(),
            vec![VOCAB, HIDDEN],
            encode(ty, head),
        ));
    }
    out
}

fn dtype(ty: GgmlType) -> safetensors::Dtype {
    match ty {
        GgmlType::F32 => safetensors::Dtype::F32,
        GgmlType::F16 => safetensors::Dtype::F16,
        GgmlType::BF16 => safetensors::Dtype::BF16,
        other => panic!("no safetensors dtype for {other}"),
    }
}

fn serialize(tensors: &[(String, Vec<usize>, Vec<u8>)], ty: GgmlType) -> Vec<u8> {
    serialize_as(tensors, |_| dtype(ty))
}

fn serialize_as(
    tensors: &[(String, Vec<usize>, Vec<u8>)],
    dt: impl Fn(&str) -> safetensors::Dtype,
) -> Vec<u8> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, s, b)| {
            let view = safetensors::tensor::TensorView::new(dt(n), s.clone(), b).unwrap();
            (n.clone(), view)
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}

/// A Hugging Face model directory; `shards` > 1 splits the tensors over that many files with
/// an index.
fn write_hf(tmp: &TempDir, w: &Weights, ty: GgmlType, shards: usize, name: &str) -> PathBuf {
    let d = dir(tmp, name);
    write_json(&d.join("config.json"), &config_json(w));
    write_json(&d.join("tokenizer.json"), &tokenizer_json());
    write_json(
        &d.join("tokenizer_config.json"),
        &json!({
            "bos_token": "<|im_start|>",
            "eos_token": {"content": "<|im_end|>", "special": true},
            "add_bos_token": false,
            "chat_template": "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}",
        }),
    );
    let tensors = hf_tensors(w, ty);
    if shards == 1 {
        std::fs::write(d.join("model.safetensors"), serialize(&tensors, ty)).unwrap();
        return d;
    }
    let per = tensors.len().div_ceil(shards);
    let mut map = serde_json::Map::new();
    for (s, chunk) in tensors.chunks(per).enumerate() {
        let file = format!("model-{:05}-of-{shards:05}.safetensors", s + 1);
        std::fs::write(d.join(&file), serialize(chunk, ty)).unwrap();
        for (n, _, _) in chunk {
            map.insert(n.clone(), json!(file));
        }
    }
    write_json(
        &d.join("model.safetensors.index.json"),
        &json!({"metadata": {"total_size": 0}, "weight_map": map}),
    );
    d
}

/// Two pipeline stages chained in one thread: every token's logits.
fn run_pp2(path: &Path) -> Vec<f32> {
    let src = source::open(path).unwrap();
    let pool = Pool::new(1).unwrap();
    let s0 = Llama::load_from(src.as_ref(), Shard::SINGLE, Stage::new(0, 2).unwrap()).unwrap();
    let s1 = Llama::load_from(src.as_ref(), Shard::SINGLE, Stage::new(1, 2).unwrap()).unwrap();
    let (mut c0, mut c1) = (
        s0.new_cache(1 << 20).unwrap(),
        s1.new_cache(1 << 20).unwrap(),
    );
    common::chain_stages(&pool, (&s0, &mut c0), (&s1, &mut c1), &TOKENS).1
}

/// Greedy tokens after `TOKENS[..4]`, one rank.
fn greedy(path: &Path) -> Vec<u32> {
    let model = Llama::open(path, Shard::SINGLE).unwrap();
    let pool = Pool::new(1).unwrap();
    let mut cache = model.new_cache(1 << 20).unwrap();
    let mut step = TOKENS[..4].to_vec();
    let mut out = Vec::new();
    for _ in 0..12 {
        let logits = model
            .forward(&pool, &Identity, &mut cache, &step, Logits::Last)
            .unwrap();
        let best = (0..logits.len())
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
            .unwrap() as u32;
        out.push(best);
        step = vec![best];
    }
    out
}

/// Largest difference relative to the largest logit.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, x| m.max(f64::from(x.abs())));
    let diff = a
        .iter()
        .zip(b)
        .fold(0f64, |m, (x, y)| m.max(f64::from((x - y).abs())));
    diff / scale
}

#[test]
fn f32_safetensors_match_the_gguf_at_every_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let w = random_weights(11, true);
    let gguf = dir(&tmp, "f32-gguf").join("tiny.gguf");
    write_gguf(&w, GgmlType::F32, &gguf);
    let hf = write_hf(&tmp, &w, GgmlType::F32, 1, "f32-hf");
    let mut worst = 0f64;
    for tp in [1, 2] {
        let (a, b) = (run_tp(&hf, tp), run_tp(&gguf, tp));
        let e = rel_err(&a, &b);
        eprintln!("F32 safetensors vs GGUF, TP={tp}: {e:.2e} of the largest logit");
        assert!(e <= 1e-4, "TP={tp}: {e}");
        worst = worst.max(e);
    }
    let (a, b) = (run_pp2(&hf), run_pp2(&gguf));
    let e = rel_err(&a, &b);
    eprintln!("F32 safetensors vs GGUF, PP=2: {e:.2e}");
    assert!(e <= 1e-4, "PP=2: {e}");
    assert!(
        rel_err(&a, &run_tp(&hf, 1)) <= 1e-4,
        "PP=2 against one rank"
    );
    assert_eq!(greedy(&hf), greedy(&gguf), "greedy tokens are identical");
    assert!(worst <= 1e-4);
}

#[test]
fn bf16_and_f16_safetensors_match_the_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let w = random_weights(12, true);
    // BF16 checkpoint against an F32 GGUF of the same (rounded) values: only the layout
    // differs, so the F32 tolerance holds.
    let rounded = w.rounded_bf16();
    let gguf = dir(&tmp, "bf16-gguf").join("rounded.gguf");
    write_gguf(&rounded, GgmlType::F32, &gguf);
    let hf = write_hf(&tmp, &w, GgmlType::BF16, 1, "bf16-hf");
    for tp in [1, 2] {
        let e = rel_err(&run_tp(&hf, tp), &run_tp(&gguf, tp));
        eprintln!("BF16 safetensors vs F32 GGUF of the rounded weights, TP={tp}: {e:.2e}");
        assert!(e <= 1e-4, "TP={tp}: {e}");
    }
    assert_eq!(greedy(&hf), greedy(&gguf), "greedy tokens are identical");
    // Against the unrounded F32 weights: bf16 keeps 8 bits of mantissa (relative rounding
    // 2^-9 per weight); measured 2.7e-3 of the largest logit, allowed 1e-2.
    let exact = dir(&tmp, "bf16-exact").join("exact.gguf");
    write_gguf(&w, GgmlType::F32, &exact);
    let e = rel_err(&run_tp(&hf, 1), &run_tp(&exact, 1));
    eprintln!("BF16 safetensors vs F32 GGUF of the unrounded weights: {e:.2e}");
    assert!(e <= 1e-2, "{e}");

    // F16 in both formats: the same bits, so the same logits.
    let gguf16 = dir(&tmp, "f16-gguf").join("tiny-f16.gguf");
    write_gguf(&w, GgmlType::F16, &gguf16);
    let hf16 = write_hf(&tmp, &w, GgmlType::F16, 1, "f16-hf");
    let e = rel_err(&run_tp(&hf16, 2), &run_tp(&gguf16, 2));
    eprintln!("F16 safetensors vs F16 GGUF, TP=2: {e:.2e}");
    assert!(e <= 1e-4, "{e}");
}

#[test]
fn sharded_models_open_from_the_directory_a_shard_or_the_index() {
    let tmp = tempfile::tempdir().unwrap();
    // Untied LM head this time (lm_head.weight stored, output.weight in the GGUF).
    let w = random_weights(13, false);
    let gguf = dir(&tmp, "sharded-gguf").join("untied.gguf");
    write_gguf(&w, GgmlType::F32, &gguf);
    let want = run_tp(&gguf, 1);
    let hf = write_hf(&tmp, &w, GgmlType::F32, 3, "sharded-hf");
    for path in [
        hf.clone(),
        hf.join("model-00002-of-00003.safetensors"),
        hf.join("model.safetensors.index.json"),
    ] {
        let e = rel_err(&run_tp(&path, 1), &want);
        assert!(e <= 1e-4, "{}: {e}", path.display());
    }
    let e = rel_err(&run_tp(&hf, 2), &run_tp(&gguf, 2));
    assert!(e <= 1e-4, "TP=2: {e}");
    let single = write_hf(&tmp, &w, GgmlType::F32, 1, "single-file");
    let e = rel_err(&run_tp(&single.join("model.safetensors"), 1), &want);
    assert!(e <= 1e-4, "a path to model.safetensors: {e}");

    // One rank borrows every weight from the files' maps; a rank of two copies its half out
    // (and lets the mapped pages go): all of its weights are its own, half of the model's.
    let src = source::open(&hf).unwrap();
    let whole = Llama::load_from(src.as_ref(), Shard::SINGLE, Stage::WHOLE).unwrap();
    let (total, copied) = whole.weight_bytes();
    let qk: usize = (whole.layers.iter())
        .map(|l| l.wq.bytes().len() + l.wk.bytes().len())
        .sum();
    assert_eq!(copied, qk, "only Q and K, reordered for RoPE, are copies");
    assert!(
        whole.layers[0].wv.is_mapped()
            && matches!(&whole.layers[0].ffn, Ffn::Dense(m) if m.gate.is_mapped())
    );
    let m = Llama::load_from(src.as_ref(), Shard::new(1, 2).unwrap(), Stage::WHOLE).unwrap();
    assert_eq!(m.layers[0].wq.rows, HEADS / 2 * HEAD_DIM);
    assert_eq!(m.weight_bytes(), (total / 2, total / 2));
}

#[test]
fn the_engine_opens_either_format_and_generates_the_same_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let w = random_weights(14, true);
    let gguf = dir(&tmp, "engine-gguf").join("engine.gguf");
    write_gguf(&w, GgmlType::F32, &gguf);
    let hf = write_hf(&tmp, &w, GgmlType::F32, 1, "engine-hf");
    let (a, b) = (
        Engine::open(&gguf, 1).unwrap(),
        Engine::open(&hf, 1).unwrap(),
    );
    assert_eq!(b.model.config, a.model.config);
    for text in ["Hi there!", "a b  c", "<|im_start|>x<|im_end|>"] {
        assert_eq!(
            b.tokenizer.encode(text, true),
            a.tokenizer.encode(text, true),
            "{text:?}"
        );
    }
    assert_eq!((b.tokenizer.bos, b.tokenizer.eos), (Some(95), Some(96)));
    // The scheduler reads the tokenizer from the model's metadata: it is there for safetensors.
    let meta = b.model.file().expect("metadata");
    assert!(Tokenizer::from_gguf(&meta.gguf).is_ok());
    let prompt = a.tokenizer.encode("Hello, world", true);
    let params = GenerateParams {
        max_tokens: 10,
        ..GenerateParams::default()
    };
    let ga = a.generate(&prompt, &params, |_| {}).unwrap();
    let gb = b.generate(&prompt, &params, |_| {}).unwrap();
    assert_eq!(gb.tokens, ga.tokens);
    assert_eq!(gb.text, ga.text);
}

fn real_model() -> MappedGguf {
    MappedGguf::open(&common::model_path()).unwrap()
}

#[test]
fn a_tokenizer_json_of_the_test_models_vocabulary_gives_the_gguf_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let m = real_model();
    let g = &m.gguf;
    let strings = |k: &str| -> Vec<String> {
        g.get(k)
            .and_then(Value::as_array)
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens");
    let merges = strings("tokenizer.ggml.merges");
    let types: Vec<i64> = g
        .get("tokenizer.ggml.token_type")
        .and_then(Value::as_array)
        .unwrap()
        .iter()
        .map(|v| match v {
            Value::I32(x) => i64::from(*x),
            other => other.as_u64().unwrap() as i64,
        })
        .collect();
    let id = |k: &str| g.get(k).and_then(Value::as_u64).unwrap() as usize;
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| types[*i] == 1)
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let added: Vec<_> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| types[*i] == 3 || types[*i] == 4)
        .map(|(i, t)| json!({"id": i, "content": t, "special": types[i] == 3}))
        .collect();
    assert!(!added.is_empty());
    // Hugging Face's newer merges format (pairs) for half of them.
    let merges: Vec<serde_json::Value> = merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if i % 2 == 0 {
                json!(m)
            } else {
                let (a, b) = m.split_once(' ').unwrap();
                json!([a, b])
            }
        })
        .collect();
    let d = dir(&tmp, "real-tokenizer");
    write_json(
        &d.join("tokenizer.json"),
        &json!({
            "version": "1.0",
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            ]},
            "model": {"type": "BPE", "vocab": vocab, "merges": merges},
        }),
    );
    write_json(
        &d.join("tokenizer_config.json"),
        &json!({
            "bos_token": tokens[id("tokenizer.ggml.bos_token_id")],
            "eos_token": tokens[id("tokenizer.ggml.eos_token_id")],
            "chat_template": g.get("tokenizer.chat_template").and_then(Value::as_str).unwrap(),
        }),
    );
    write_json(
        &d.join("config.json"),
        &json!({
            "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
            "vocab_size": tokens.len(), "tie_word_embeddings": true,
        }),
    );
    let (meta, tied) = hf_metadata(&d).unwrap();
    assert!(tied);
    let hf = Tokenizer::from_gguf(&meta.gguf).unwrap();
    let want = Tokenizer::from_gguf(g).unwrap();
    assert_eq!(hf.vocab_size(), want.vocab_size());
    assert_eq!((hf.bos, hf.eos), (want.bos, want.eos));
    assert_eq!(hf.stop_ids, want.stop_ids);
    for text in [
        "Hello world",
        "What is the capital of France?",
        "  leading spaces and trailing   ",
        "I'm sure they'll say it's fine, we've done it'd seem",
        "Numbers: 1234567 and 3.14159, year 2024!",
        "line one\nline two\n\n\tindented\r\n",
        "Ünïcödé café naïve résumé, Straße, Ελληνικά, русский",
        "中文字符和日本語のテキスト",
        "emoji 🎉🚀 and symbols ©®™ ±×÷",
        "fn main() { println!(\"{}\", x + 1); } // code",
        "<|im_start|>user\nhi<|im_end|>\n",
    ] {
        assert_eq!(hf.encode(text, true), want.encode(text, true), "{text:?}");
        assert_eq!(hf.encode(text, false), want.encode(text, false), "{text:?}");
    }
    let chat = [Message::new("user", "What is the capital of France?")];
    assert_eq!(
        hf.apply_chat_template(&chat, true).unwrap(),
        want.apply_chat_template(&chat, true).unwrap()
    );
}

/// The error of opening `path` as one rank's model.
fn open_err(path: &Path) -> String {
    match Llama::open(path, Shard::SINGLE) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => format!("{e:#}"),
    }
}

fn assert_has(e: &str, parts: &[&str]) {
    for p in parts {
        assert!(e.contains(p), "{p:?} not in: {e}");
    }
}

#[test]
fn broken_tensors_name_the_file_the_tensor_and_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let w = random_weights(15, true);
    let base = hf_tensors(&w, GgmlType::F32);
    let write = |name: &str,
                 tensors: &[(String, Vec<usize>, Vec<u8>)],
                 dt: &dyn Fn(&str) -> safetensors::Dtype| {
        let d = write_hf(&tmp, &w, GgmlType::F32, 1, name);
        std::fs::write(d.join("model.safetensors"), serialize_as(tensors, dt)).unwrap();
        d
    };
    let f32s = |_: &str| safetensors::Dtype::F32;

    // Missing tensor.
    let up = "model.layers.1.mlp.up_proj.weight";
    let missing: Vec<_> = base.iter().filter(|t| t.0 != up).cloned().collect();
    let d = write("missing", &missing, &f32s);
    assert_has(&open_err(&d), &["model.safetensors", up, "missing"]);

    // Wrong shape (in the file's own order).
    let mut reshaped = base.clone();
    let q = reshaped
        .iter_mut()
        .find(|t| t.0 == "model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    q.1 = vec![HIDDEN / 2, HIDDEN * 2];
    let d = write("shape", &reshaped, &f32s);
    assert_has(
        &open_err(&d),
        &[
            "model.safetensors",
            "model.layers.0.self_attn.q_proj.weight",
            "shape [32, 128], expected [64, 64]",
        ],
    );

    // Unsupported dtypes: I8 and F8_E4M3 (one byte per element).
    for (dt, text) in [
        (safetensors::Dtype::I8, "I8"),
        (safetensors::Dtype::F8_E4M3, "F8_E4M3"),
    ] {
        let mut bytes = base.clone();
        let t = bytes.iter_mut().find(|t| t.0 == up).unwrap();
        t.2.truncate(t.2.len() / 4);
        let d = write(&format!("dtype-{text}"), &bytes, &|n: &str| {
            if n == up { dt } else { safetensors::Dtype::F32 }
        });
        assert_has(
            &open_err(&d),
            &[
                "model.safetensors",
                up,
                text,
                "not supported",
                "F32, F16 and BF16",
            ],
        );
    }

    // Truncated file.
    let d = write_hf(&tmp, &w, GgmlType::F32, 1, "truncated");
    let f = d.join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    assert_has(&open_err(&d), &["model.safetensors", "truncated"]);
    // Only its header's length left.
    std::fs::write(&f, 1000u64.to_le_bytes()).unwrap();
    assert_has(&open_err(&f), &["model.safetensors", "truncated"]);

    // A shard the index names is not there; an index pointing outside the directory.
    let d = write_hf(&tmp, &w, GgmlType::F32, 2, "lost-shard");
    std::fs::remove_file(d.join("model-00002-of-00002.safetensors")).unwrap();
    assert_has(
        &open_err(&d),
        &["model-00002-of-00002.safetensors", "cannot open"],
    );
    write_json(
        &d.join("model.safetensors.index.json"),
        &json!({"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}}),
    );
    assert_has(
        &open_err(&d),
        &[
            "model.safetensors.index.json",
            "weight_map.model.norm.weight",
            "not a file in the model directory",
        ],
    );
    // The index lists a tensor in a shard that does not hold it.
    let d = write_hf(&tmp, &w, GgmlType::F32, 2, "misplaced");
    let idx = d.join("model.safetensors.index.json");
    let shard2 = d.join("model-00002-of-00002.safetensors");
    let held: Vec<_> = base
        .iter()
        .skip(base.len().div_ceil(2))
        .filter(|t| t.0 != "model.norm.weight")
        .cloned()
        .collect();
    std::fs::write(&shard2, serialize(&held, GgmlType::F32)).unwrap();
    assert_has(
        &open_err(&d),
        &[
            "model-00002-of-00002.safetensors",
            "model.norm.weight",
            "missing",
            "model.safetensors.index.json places it",
        ],
    );
    // ... and one that no shard holds and the index does not list.
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&idx).unwrap()).unwrap();
    v["weight_map"]
        .as_object_mut()
        .unwrap()
        .remove("model.norm.weight");
    write_json(&idx, &v);
    assert_has(
        &open_err(&d),
        &[
            "model.safetensors.index.json",
            "model.norm.weight",
            "missing from weight_map",
        ],
    );

    // An untied model without lm_head.weight.
    let d = write_hf(&tmp, &w, GgmlType::F32, 1, "untied-no-head");
    let mut c = config_json(&w);
    c["tie_word_embeddings"] = json!(false);
    write_json(&d.join("config.json"), &c);
    assert_has(
        &open_err(&d),
        &[
            "model.safetensors",
            "lm_head.weight",
            "missing",
            "tie_word_embeddings",
        ],
    );

    // A directory without weights; a path that does not exist.
    let d = dir(&tmp, "no-weights");
    assert_has(&open_err(&d), &["no-weights", "model.safetensors"]);
    assert_has(
        &open_err(&d.join("nothing-here")),
        &["nothing-here", "no such model"],
    );
}

#[test]
fn broken_json_names_the_file_and_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let w = random_weights(16, true);
    let d = write_hf(&tmp, &w, GgmlType::F32, 1, "json");
    let config = d.join("config.json");
    let set = |field: &str, value: serde_json::Value| {
        let mut c = config_json(&w);
        if value.is_null() {
            c.as_object_mut().unwrap().remove(field);
        } else {
            c[field] = value;
        }
        write_json(&config, &c);
        open_err(&d)
    };
    assert_has(
        &set("hidden_size", json!("big")),
        &["config.json", "hidden_size", "\"big\""],
    );
    assert_has(
        &set("num_hidden_layers", serde_json::Value::Null),
        &["config.json", "num_hidden_layers", "missing"],
    );
    assert_has(
        &set("num_attention_heads", json!(0)),
        &["config.json", "num_attention_heads"],
    );
    assert_has(
        &set("num_key_value_heads", json!(3)),
        &["config.json", "num_key_value_heads 3"],
    );
    assert_has(
        &set("rms_norm_eps", json!(-1.0)),
        &["config.json", "rms_norm_eps"],
    );
    assert_has(
        &set("model_type", json!("gpt2")),
        &["config.json", "model_type", "\"gpt2\""],
    );
    assert_has(
        &set(
            "rope_scaling",
            json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": -1.0}),
        ),
        &[
            "config.json",
            "rope_scaling.low_freq_factor is not a positive number",
        ],
    );
    assert_has(
        &set(
            "rope_scaling",
            json!({"rope_type": "llama3", "low_freq_factor": 4.0, "high_freq_factor": 1.0}),
        ),
        &[
            "config.json",
            "high_freq_factor 1 is not above low_freq_factor 4",
        ],
    );
    assert_has(
        &set("rope_scaling", json!({"rope_type": "yarn", "factor": 4.0})),
        &["config.json", "rope_scaling", "yarn", "not supported"],
    );
    assert_has(
        &set("attention_bias", json!(true)),
        &["config.json", "attention_bias"],
    );
    assert_has(
        &set("tie_word_embeddings", json!("yes")),
        &["config.json", "tie_word_embeddings"],
    );
    std::fs::write(&config, b"{\"hidden_size\": 64,").unwrap();
    assert_has(&open_err(&d), &["config.json", "invalid JSON"]);
    std::fs::remove_file(&config).unwrap();
    assert_has(&open_err(&d), &["config.json", "cannot read"]);
    write_json(&config, &config_json(&w));
    assert!(Llama::open(&d, Shard::SINGLE).is_ok());

    let tok = d.join("tokenizer.json");
    let set_tok = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut t = tokenizer_json();
        edit(&mut t);
        write_json(&tok, &t);
        open_err(&d)
    };
    assert_has(
        &set_tok(&|t| t["model"]["merges"] = json!(7)),
        &["tokenizer.json", "model.merges"],
    );
    assert_has(
        &set_tok(&|t| t["model"]["merges"] = json!(["ab"])),
        &["tokenizer.json", "model.merges[0]"],
    );
    assert_has(
        &set_tok(&|t| t["model"]["vocab"]["!"] = json!("one")),
        &["tokenizer.json", "model.vocab", "\"!\""],
    );
    assert_has(
        &set_tok(&|t| t["model"]["vocab"]["zz"] = json!(500)),
        &["tokenizer.json", "\"zz\"", "vocab_size 98"],
    );
    assert_has(
        &set_tok(&|t| t["model"]["type"] = json!("Unigram")),
        &["tokenizer.json", "model.type", "Unigram"],
    );
    assert_has(
        &set_tok(&|t| t["pre_tokenizer"] = json!({"type": "Metaspace"})),
        &[
            "tokenizer.json",
            "pre_tokenizer",
            "Metaspace",
            "not supported",
        ],
    );
    assert_has(
        &set_tok(&|t| t["normalizer"] = json!({"type": "NFC"})),
        &["tokenizer.json", "normalizer"],
    );
    assert_has(
        &set_tok(&|t| t["added_tokens"][0]["id"] = json!(-1)),
        &["tokenizer.json", "added_tokens[0].id"],
    );
    std::fs::remove_file(&tok).unwrap();
    assert_has(&open_err(&d), &["tokenizer.json", "cannot read"]);
    write_json(&tok, &tokenizer_json());

    let tc = d.join("tokenizer_config.json");
    write_json(&tc, &json!({"eos_token": "<|not-a-token|>"}));
    assert_has(
        &open_err(&d),
        &["tokenizer_config.json", "eos_token", "<|not-a-token|>"],
    );
    write_json(&tc, &json!({"chat_template": 5}));
    assert_has(&open_err(&d), &["tokenizer_config.json", "chat_template"]);
    std::fs::remove_file(&tc).unwrap();
    // Optional: without it, bos and eos come from config.json.
    let e = Engine::open(&d, 1).unwrap();
    assert_eq!((e.tokenizer.bos, e.tokenizer.eos), (Some(95), Some(96)));

    // Sharded layouts over the tensor-parallel degree are the loader's checks, named the same.
    let err = match Llama::open(&d, Shard::new(0, 3).unwrap()) {
        Ok(_) => panic!("TP=3 of 4 heads"),
        Err(e) => format!("{e:#}"),
    };
    assert_has(&err, &["tensor-parallel degree 3"]);
}

/// Logits of a prefill of `TOKENS[..6]` (every token) and four single-token decode steps, with
/// `world` tensor-parallel ranks as threads.
fn run_tp(path: &Path, world: usize) -> Vec<f32> {
    common::tp_logits(path, world, &TOKENS[..6], &TOKENS[6..])
}

/// Llama 3.1's `rope_scaling` (`rope_type: llama3`) in config.json gives the logits of the same
/// weights as a GGUF file carrying the converter's `rope_freqs.weight`, at TP=1 and TP=2; and
/// the scaling matters (plain RoPE gives other logits).
#[test]
fn llama3_rope_scaling_equals_the_converted_rope_freqs() {
    let tmp = tempfile::tempdir().unwrap();
    use tessera_worker::model::safetensors::llama3_rope_factors;
    let w = random_weights(21, true);
    let hf = write_hf(&tmp, &w, GgmlType::F32, 1, "llama3-rope");
    let mut cfg = config_json(&w);
    // Original context 256: pairs with wavelengths under 64 keep their frequency, over 256 are
    // slowed 8x, the band between blends (the tiny model's wavelengths run from 6 to ~16000).
    cfg["rope_scaling"] = json!({
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 256,
    });
    write_json(&hf.join("config.json"), &cfg);
    let factors = llama3_rope_factors(f64::from(BASE), HEAD_DIM, 8.0, 1.0, 4.0, 256.0);
    assert!(factors.contains(&1.0) && factors.contains(&8.0));
    assert!(factors.iter().any(|f| *f > 1.0 && *f < 8.0), "{factors:?}");
    let gguf = dir(&tmp, "llama3-rope-gguf").join("scaled.gguf");
    write_gguf_with(&w, GgmlType::F32, &gguf, |g| {
        let bytes = factors.iter().flat_map(|v| v.to_le_bytes()).collect();
        g.tensor(
            "rope_freqs.weight",
            &[factors.len() as u64],
            GgmlType::F32,
            bytes,
        );
    });
    let plain = dir(&tmp, "llama3-rope-plain").join("plain.gguf");
    write_gguf(&w, GgmlType::F32, &plain);
    for tp in [1, 2] {
        let e = rel_err(&run_tp(&hf, tp), &run_tp(&gguf, tp));
        assert!(e <= 1e-4, "TP={tp}: {e}");
    }
    // The converter's defaults (factor 8, low 1, high 4) and the original context at the top
    // level, where the converter reads it: the same model.
    cfg["rope_scaling"] = json!({"rope_type": "llama3"});
    cfg["original_max_position_embeddings"] = json!(256);
    let hf2 = write_hf(&tmp, &w, GgmlType::F32, 1, "llama3-rope-defaults");
    write_json(&hf2.join("config.json"), &cfg);
    let e = rel_err(&run_tp(&hf2, 1), &run_tp(&gguf, 1));
    assert!(e <= 1e-4, "defaults: {e}");
    let d = rel_err(&run_tp(&hf, 1), &run_tp(&plain, 1));
    assert!(d > 1e-3, "the scaling changed nothing: {d}");
}

/// A tokenizer.json with Llama 3's pre-tokenizer (its split regex, then ByteLevel without a
/// regex) becomes `tokenizer.ggml.pre = llama-bpe`, and the tokenizer splits as Llama 3's.
#[test]
fn llama3_pre_tokenizer_is_recognised() {
    let tmp = tempfile::tempdir().unwrap();
    let w = random_weights(22, true);
    let d = write_hf(&tmp, &w, GgmlType::F32, 1, "llama3-pre");
    let mut tok = tokenizer_json();
    tok["pre_tokenizer"] = json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
         "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
    ]});
    write_json(&d.join("tokenizer.json"), &tok);
    let (meta, _) = hf_metadata(&d).unwrap();
    assert_eq!(
        meta.gguf.get("tokenizer.ggml.pre").and_then(Value::as_str),
        Some("llama-bpe")
    );
    let t = Tokenizer::from_gguf(&meta.gguf).unwrap();
    assert_eq!(
        t.pre_tokenize("year 12345!"),
        ["year", " ", "123", "45", "!"]
    );

    // Another split regex is refused, naming the field.
    tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = json!("\\s+");
    write_json(&d.join("tokenizer.json"), &tok);
    let e = format!("{:#}", hf_metadata(&d).err().expect("unknown split"));
    assert!(
        e.contains("tokenizer.json") && e.contains("pre_tokenizer"),
        "{e}"
    );
}
