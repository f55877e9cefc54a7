//! A tiny random Llama written with `gguf::Writer` (F32, Q8_0, Q4_1, Q5_0 and Q5_1 weights) against an
//! independent naive f64 forward pass; the same model split over 2 and 4 tensor-parallel ranks
//! (threads with an in-memory all-reduce) against one rank; pipeline stages (PP=2 and TP=2 x
//! PP=2 over the TCP rank group, ranks as threads) against one rank; malformed files; batched
//! forward passes over several sequences against each sequence alone, on one rank and over
//! TP=2, PP=2 and TP=2 x PP=2.

mod common;

use std::sync::Arc;

use common::{Counting, encode, greedy_alone, randn, rel_err};

use tessera_worker::engine::sampling::Rng;
use tessera_worker::kernels::Pool;
use tessera_worker::model::gguf::{GgmlType, Value, Writer};
use tessera_worker::model::llama::{Llama, Logits};
use tessera_worker::model::parallel::{Collective, Identity, Shard};

const LAYERS: usize = 2;
const HIDDEN: usize = 128;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const FFN: usize = 256;
const VOCAB: usize = 96;
const EPS: f32 = 1e-5;
const BASE: f32 = 10_000.0;

/// Weights as f32 after a round trip through their encoding (what the model sees).
struct Weights {
    embed: Vec<f32>,
    layers: Vec<[Vec<f32>; 9]>, // attn_norm, q, k, v, o, ffn_norm, gate, up, down
    norm: Vec<f32>,
}

/// Build a tiny model; `skip` leaves a tensor out, `reshape` gives one a wrong shape.
fn build(ty: GgmlType, seed: u64, skip: Option<&str>, reshape: Option<&str>) -> (Writer, Weights) {
    let mut rng = Rng::new(seed);
    let mut w = Writer::default();
    w.metadata("general.architecture", Value::String("llama".into()))
        .metadata("llama.block_count", Value::U32(LAYERS as u32))
        .metadata("llama.embedding_length", Value::U32(HIDDEN as u32))
        .metadata("llama.attention.head_count", Value::U32(HEADS as u32))
        .metadata("llama.attention.head_count_kv", Value::U32(KV_HEADS as u32))
        .metadata("llama.feed_forward_length", Value::U32(FFN as u32))
        .metadata("llama.context_length", Value::U32(64))
        .metadata("llama.vocab_size", Value::U32(VOCAB as u32))
        .metadata("llama.rope.freq_base", Value::F32(BASE))
        .metadata("llama.attention.layer_norm_rms_epsilon", Value::F32(EPS));
    let mut add = |w: &mut Writer, name: &str, dims: &[u64], t: GgmlType, scale: f32| {
        let n = dims.iter().product::<u64>() as usize;
        let vals = if name.contains("norm") {
            (0..n).map(|_| 1.0 + (rng.next_f32() - 0.5) * 0.4).collect()
        } else {
            randn(&mut rng, n, scale)
        };
        let (bytes, back) = encode(t, &vals);
        if skip != Some(name) {
            let dims: Vec<u64> = if reshape == Some(name) {
                vec![dims[0] / 2, dims.get(1).copied().unwrap_or(1) * 2]
            } else {
                dims.to_vec()
            };
            w.tensor(name, &dims, t, bytes);
        }
        back
    };
    let h = HIDDEN as u64;
    let (qd, kvd, f) = (
        (HEADS * HEAD_DIM) as u64,
        (KV_HEADS * HEAD_DIM) as u64,
        FFN as u64,
    );
    // Like the real model, quantised files keep a Q8_0 embedding (also the tied LM head).
    let embed_ty = if ty == GgmlType::F32 {
        ty
    } else {
        GgmlType::Q8_0
    };
    let embed = add(
        &mut w,
        "token_embd.weight",
        &[h, VOCAB as u64],
        embed_ty,
        1.0,
    );
    let mut layers = Vec::new();
    for i in 0..LAYERS {
        let n = |s: &str| format!("blk.{i}.{s}.weight");
        let s = 0.6 / (HIDDEN as f32).sqrt() * 2.0;
        layers.push([
            add(&mut w, &n("attn_norm"), &[h], GgmlType::F32, 0.0),
            add(&mut w, &n("attn_q"), &[h, qd], ty, s),
            add(&mut w, &n("attn_k"), &[h, kvd], ty, s),
            add(&mut w, &n("attn_v"), &[h, kvd], ty, s),
            add(&mut w, &n("attn_output"), &[qd, h], ty, s),
            add(&mut w, &n("ffn_norm"), &[h], GgmlType::F32, 0.0),
            add(&mut w, &n("ffn_gate"), &[h, f], ty, s),
            add(&mut w, &n("ffn_up"), &[h, f], ty, s),
            add(&mut w, &n("ffn_down"), &[f, h], ty, s),
        ]);
    }
    let norm = add(&mut w, "output_norm.weight", &[h], GgmlType::F32, 0.0);
    (
        w,
        Weights {
            embed,
            layers,
            norm,
        },
    )
}

/// Writes the model to a temporary file that is deleted when the returned path is dropped.
fn write(w: &Writer, name: &str) -> tempfile::TempPath {
    let mut file = tempfile::Builder::new()
        .prefix(&format!("tessera-llama-tiny-{name}-"))
        .tempfile()
        .unwrap();
    std::io::Write::write_all(&mut file, &w.to_bytes()).unwrap();
    file.into_temp_path()
}

/// An independent, naive forward pass in f64: returns every token's logits.
fn reference(wt: &Weights, tokens: &[u32]) -> Vec<Vec<f64>> {
    reference_rope(wt, tokens, &[1.0; HEAD_DIM / 2])
}

/// [`reference`] with RoPE pair i's angle multiplied by `rope[i]` (ggml: the linear scale over
/// the pair's frequency factor).
fn reference_rope(wt: &Weights, tokens: &[u32], rope: &[f64]) -> Vec<Vec<f64>> {
    let dims = common::NaiveDims {
        hidden: HIDDEN,
        heads: HEADS,
        kv_heads: KV_HEADS,
        vocab: VOCAB,
        eps: EPS,
        base: BASE,
    };
    let attn: Vec<[&[f32]; 6]> = (wt.layers.iter())
        .map(|l| [&l[0][..], &l[1], &l[2], &l[3], &l[4], &l[5]])
        .collect();
    let mut ffn = |i: usize, xn: &[f64]| {
        let [.., wg, wu, wd] = &wt.layers[i];
        common::naive_swiglu(wg, wu, wd, xn, FFN)
    };
    common::naive_forward(&dims, &wt.embed, &attn, &wt.norm, tokens, rope, &mut ffn)
}

const TOKENS: [u32; 9] = [3, 17, 42, 5, 95, 0, 61, 17, 8];

#[test]
fn tiny_model_matches_the_naive_reference() {
    // F32 weights use f32 activations (tight); quantised weights use 8-bit activations.
    for (ty, tol) in [
        (GgmlType::F32, 1e-4),
        (GgmlType::Q8_0, 1.5e-2),
        (GgmlType::Q4_1, 1.5e-2),
        (GgmlType::Q5_0, 1.5e-2),
        (GgmlType::Q5_1, 1.5e-2),
    ] {
        let (w, wt) = build(ty, 42, None, None);
        let path = write(&w, &format!("ref-{ty}.gguf"));
        let model = Llama::open(&path, Shard::SINGLE).expect("loads");
        let pool = Pool::new(2).unwrap();
        let mut cache = model.new_cache(1 << 20).unwrap();
        let ours = model
            .forward(&pool, &Identity, &mut cache, &TOKENS, Logits::All)
            .unwrap();
        let expect = reference(&wt, &TOKENS);
        let err = rel_err(&ours, &expect);
        eprintln!("{ty}: max error {err:.2e} of the largest logit");
        assert!(err < tol, "{ty}: relative error {err} >= {tol}");

        // Prefill then one-token decode steps give the same logits as one batch.
        let mut cache = model.new_cache(1 << 20).unwrap();
        let mut step = model
            .forward(&pool, &Identity, &mut cache, &TOKENS[..4], Logits::All)
            .unwrap();
        for t in &TOKENS[4..] {
            step.extend(
                model
                    .forward(&pool, &Identity, &mut cache, &[*t], Logits::Last)
                    .unwrap(),
            );
        }
        let err = rel_err(&step, &expect);
        assert!(err < tol, "{ty} incremental: relative error {err}");
        assert_eq!(cache.len(), TOKENS.len());
    }
}

#[test]
fn tensor_parallel_splits_match_one_rank() {
    for (ty, tol) in [(GgmlType::F32, 1e-5), (GgmlType::Q4_1, 1e-3)] {
        let (w, _) = build(ty, 9, None, None);
        let path = write(&w, &format!("tp-{ty}.gguf"));
        let one = common::tp_logits(&path, 1, &TOKENS[..6], &TOKENS[6..]);
        let scale = one.iter().fold(0f32, |m, v| m.max(v.abs()));
        // 2 ranks split the KV heads; 4 ranks replicate them (4 query heads, 2 KV heads).
        for world in [2, 4] {
            let split = common::tp_logits(&path, world, &TOKENS[..6], &TOKENS[6..]);
            let err = one
                .iter()
                .zip(&split)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
                / scale;
            eprintln!("{ty} TP={world}: max error {err:.2e}");
            assert!(err < tol, "{ty} TP={world}: relative error {err}");
        }
    }
}

/// Llama 3.1's `rope_freqs.weight` (each pair's angle divided by its factor) and linear RoPE
/// scaling (`llama.rope.scaling.factor`: positions divided by it) against the naive reference
/// applying ggml's formula; and the model without them is measurably different, so the test
/// would notice them ignored.
#[test]
fn rope_frequency_factors_and_linear_scaling_follow_ggml() {
    let pairs = HEAD_DIM / 2;
    let ramp: Vec<f32> = (0..pairs)
        .map(|i| 1.0 + 7.0 * i as f32 / (pairs - 1) as f32)
        .collect();
    let pool = Pool::new(1).unwrap();
    let logits = |w: &Writer, name: &str| -> anyhow::Result<Vec<f32>> {
        let model = Llama::open(&write(w, name), Shard::SINGLE)?;
        let mut cache = model.new_cache(1 << 20)?;
        model.forward(&pool, &Identity, &mut cache, &TOKENS, Logits::All)
    };
    for (case, factors, linear) in [
        ("rope_freqs", Some(&ramp), None),
        ("linear x4", None, Some(4.0f32)),
        ("both", Some(&ramp), Some(2.0)),
    ] {
        let (mut w, wt) = build(GgmlType::F32, 42, None, None);
        if let Some(f) = factors {
            let bytes = f.iter().flat_map(|v| v.to_le_bytes()).collect();
            w.tensor("rope_freqs.weight", &[pairs as u64], GgmlType::F32, bytes);
        }
        if let Some(x) = linear {
            w.metadata("llama.rope.scaling.type", Value::String("linear".into()))
                .metadata("llama.rope.scaling.factor", Value::F32(x));
        }
        let mult: Vec<f64> = (0..pairs)
            .map(|i| {
                let ff = factors.map_or(1.0, |f| f64::from(f[i]));
                1.0 / f64::from(linear.unwrap_or(1.0)) / ff
            })
            .collect();
        let ours = logits(&w, &format!("rope-{}.gguf", case.replace(' ', "-"))).unwrap();
        let err = rel_err(&ours, &reference_rope(&wt, &TOKENS, &mult));
        let plain = rel_err(&ours, &reference(&wt, &TOKENS));
        eprintln!(
            "{case}: error {err:.2e} against the scaled reference, {plain:.2e} against plain RoPE"
        );
        assert!(err < 1e-4, "{case}: relative error {err}");
        assert!(plain > 1e-2, "{case}: scaling changed nothing ({plain})");
    }

    // Type none: no scaling, whatever factor the file also carries (as llama.cpp).
    let (mut w, wt) = build(GgmlType::F32, 42, None, None);
    w.metadata("llama.rope.scaling.type", Value::String("none".into()))
        .metadata("llama.rope.scaling.factor", Value::F32(4.0));
    let err = rel_err(
        &logits(&w, "rope-none.gguf").unwrap(),
        &reference(&wt, &TOKENS),
    );
    assert!(err < 1e-4, "type none: relative error {err}");

    let (mut w, _) = build(GgmlType::F32, 42, None, None);
    w.metadata("llama.rope.scaling.type", Value::String("yarn".into()));
    let e = logits(&w, "rope-yarn.gguf").expect_err("YaRN is refused");
    assert!(
        format!("{e:#}").contains("llama.rope.scaling.type \"yarn\" is not supported"),
        "{e:#}"
    );
    let (mut w, _) = build(GgmlType::F32, 42, None, None);
    let mut bad = ramp;
    bad[3] = 0.0;
    let bytes = bad.iter().flat_map(|v| v.to_le_bytes()).collect();
    w.tensor("rope_freqs.weight", &[pairs as u64], GgmlType::F32, bytes);
    let e = logits(&w, "rope-zero.gguf").expect_err("a zero factor is refused");
    assert!(
        format!("{e:#}").contains("rope_freqs.weight: factor 3 is 0"),
        "{e:#}"
    );
}

#[test]
fn a_shard_holds_its_part_of_the_weights() {
    let (w, _) = build(GgmlType::Q4_1, 1, None, None);
    let path = write(&w, "shard-size.gguf");
    let one = Llama::open(&path, Shard::SINGLE).unwrap();
    let (total, owned) = one.weight_bytes();
    assert_eq!(owned, 0, "one rank borrows every weight from the map");
    let half = Llama::open(&path, Shard::new(1, 2).unwrap()).unwrap();
    // Every matrix splits in half, the embedding too (vocabulary-parallel, rows 48..96, one
    // matrix with the tied head), and a tensor-parallel rank copies its part out of
    // the map: all of its weights are its own.
    assert_eq!(half.weight_bytes(), (total / 2, total / 2));
    let (embed, head) = (half.embed.as_ref().unwrap(), half.lm_head.as_ref().unwrap());
    assert_eq!((embed.rows, head.rows), (VOCAB / 2, VOCAB / 2));
    assert!(!embed.is_mapped() && !head.is_mapped());
    assert_eq!(
        embed.bytes().as_ptr(),
        head.bytes().as_ptr(),
        "the tied head is the embedding's rows, not a second copy"
    );
    assert_eq!(
        embed.row(0),
        one.embed.as_ref().unwrap().row(VOCAB / 2),
        "rank 1 holds the second half of the vocabulary"
    );
    assert_eq!((half.local.q_heads, half.local.kv_heads), (2, 1));
    let quarter = Llama::open(&path, Shard::new(3, 4).unwrap()).unwrap();
    assert_eq!(
        (
            quarter.local.q_head0,
            quarter.local.kv_head0,
            quarter.local.kv_heads
        ),
        (3, 1, 1)
    );
    let e = Llama::open(&path, Shard::new(0, 3).unwrap())
        .err()
        .expect("3 does not divide 4 heads");
    assert!(format!("{e:#}").contains("must divide"), "{e:#}");
}

#[test]
fn malformed_models_name_the_tensor_or_key() {
    let (w, _) = build(GgmlType::Q4_1, 2, Some("blk.1.ffn_up.weight"), None);
    let e = Llama::open(&write(&w, "missing.gguf"), Shard::SINGLE)
        .err()
        .expect("missing tensor");
    let msg = format!("{e:#}");
    assert!(
        msg.contains("missing.gguf")
            && msg.contains("blk.1.ffn_up.weight")
            && msg.contains("missing"),
        "{msg}"
    );

    let (w, _) = build(GgmlType::Q4_1, 2, None, Some("blk.0.attn_k.weight"));
    let e = Llama::open(&write(&w, "shape.gguf"), Shard::SINGLE)
        .err()
        .expect("wrong shape");
    let msg = format!("{e:#}");
    assert!(
        msg.contains("blk.0.attn_k.weight") && msg.contains("shape"),
        "{msg}"
    );

    let (mut w, _) = build(GgmlType::Q4_1, 2, Some("blk.0.attn_q.weight"), None);
    let (h, q) = (HIDDEN as u64, (HEADS * HEAD_DIM) as u64);
    w.tensor(
        "blk.0.attn_q.weight",
        &[h, q],
        GgmlType::Q8_1,
        vec![0u8; (h * q / 32 * 36) as usize],
    );
    let e = Llama::open(&write(&w, "q8_1.gguf"), Shard::SINGLE)
        .err()
        .expect("unsupported type");
    let msg = format!("{e:#}");
    assert!(
        msg.contains("blk.0.attn_q.weight") && msg.contains("Q8_1"),
        "{msg}"
    );

    let mut w = Writer::default();
    w.metadata("general.architecture", Value::String("llama".into()));
    let e = Llama::open(&write(&w, "nokeys.gguf"), Shard::SINGLE)
        .err()
        .expect("no metadata");
    let msg = format!("{e:#}");
    assert!(
        msg.contains("llama.block_count") && msg.contains("missing"),
        "{msg}"
    );

    let e = Llama::open(
        std::path::Path::new("/nonexistent/model.gguf"),
        Shard::SINGLE,
    )
    .err()
    .expect("no file");
    assert!(format!("{e:#}").contains("/nonexistent/model.gguf"));
}

#[test]
fn odd_hyper_parameters_and_tokens_are_errors_not_panics() {
    let keys = [
        "llama.block_count",
        "llama.embedding_length",
        "llama.attention.head_count",
        "llama.attention.head_count_kv",
        "llama.feed_forward_length",
        "llama.context_length",
        "llama.vocab_size",
        "llama.attention.key_length",
        "llama.rope.dimension_count",
    ];
    for key in keys {
        for v in [0u64, 1, 3, 1 << 40] {
            let (mut w, _) = build(GgmlType::Q4_1, 4, None, None);
            // A later entry with the same key replaces the earlier one when parsed.
            w.metadata(key, Value::U64(v));
            let path = write(&w, "odd.gguf");
            match Llama::open(&path, Shard::SINGLE) {
                Err(e) => assert!(!format!("{e:#}").is_empty()),
                Ok(model) => {
                    // Whatever loads must also run or fail cleanly.
                    let pool = Pool::new(1).unwrap();
                    if let Ok(mut cache) = model.new_cache(1 << 20) {
                        let _ = model.forward(&pool, &Identity, &mut cache, &[1, 2], Logits::Last);
                    }
                }
            }
        }
    }
    let (w, _) = build(GgmlType::Q4_1, 4, None, None);
    let model = Llama::open(&write(&w, "tokens.gguf"), Shard::SINGLE).unwrap();
    let pool = Pool::new(1).unwrap();
    let mut cache = model.new_cache(1 << 20).unwrap();
    let e = model
        .forward(
            &pool,
            &Identity,
            &mut cache,
            &[1, VOCAB as u32],
            Logits::Last,
        )
        .unwrap_err();
    assert!(
        format!("{e:#}").contains(&format!("token id {VOCAB}")),
        "{e:#}"
    );
    assert_eq!(cache.len(), 0, "a failed pass leaves the cache as it was");
}

#[test]
fn the_engine_can_be_shared_between_threads() {
    fn check<T: Send + Sync>() {}
    check::<tessera_worker::engine::Engine>();
}

// ---------------------------------------------------------------------------------------------
// Pipeline parallelism.

use std::time::Duration;

use tessera_worker::dist::{self, GroupConfig, Role};
use tessera_worker::engine::Engine;
use tessera_worker::engine::runner::{Runner, Step};
use tessera_worker::model::MappedGguf;
use tessera_worker::model::llama::{Input, Output};
use tessera_worker::model::parallel::Stage;
use tessera_worker::tokenizer::Tokenizer;

#[test]
fn stages_split_layers_evenly_earlier_stages_take_the_extra_one() {
    let split = |n: usize, p: usize| -> Vec<std::ops::Range<usize>> {
        (0..p)
            .map(|s| Stage::new(s, p).unwrap().layers(n))
            .collect()
    };
    assert_eq!(split(30, 1), vec![0..30]);
    assert_eq!(split(30, 2), vec![0..15, 15..30]);
    assert_eq!(split(30, 4), vec![0..8, 8..16, 16..23, 23..30]);
    assert_eq!(split(2, 2), vec![0..1, 1..2]);
    assert_eq!(split(7, 3), vec![0..3, 3..5, 5..7]);
    assert!(Stage::new(2, 2).is_err());
}

#[test]
fn a_stage_holds_its_layers_and_chains_to_the_whole_model() {
    let (w, _) = build(GgmlType::F32, 5, None, None);
    let path = write(&w, "stages.gguf");
    let file = Arc::new(MappedGguf::open(&path).unwrap());
    let whole = Llama::open(&path, Shard::SINGLE).unwrap();
    let s0 =
        Llama::load_stage(Arc::clone(&file), Shard::SINGLE, Stage::new(0, 2).unwrap()).unwrap();
    let s1 =
        Llama::load_stage(Arc::clone(&file), Shard::SINGLE, Stage::new(1, 2).unwrap()).unwrap();
    assert_eq!((s0.layers.len(), s0.first_layer), (1, 0));
    assert_eq!((s1.layers.len(), s1.first_layer), (1, 1));
    assert!(s0.embed.is_some() && s0.lm_head.is_none() && s0.norm.is_empty());
    // Tied embeddings: the last stage reads the embedding matrix as its LM head.
    assert!(s1.embed.is_none() && s1.lm_head.is_some() && s1.norm.len() == HIDDEN);
    assert_eq!(s0.kv_bytes_per_token() * 2, whole.kv_bytes_per_token());

    let pool = Pool::new(1).unwrap();
    let mut c = whole.new_cache(1 << 20).unwrap();
    let want = whole
        .forward(&pool, &Identity, &mut c, &TOKENS, Logits::All)
        .unwrap();
    let (mut c0, mut c1) = (
        s0.new_cache(1 << 20).unwrap(),
        s1.new_cache(1 << 20).unwrap(),
    );
    let (x, got) = common::chain_stages(&pool, (&s0, &mut c0), (&s1, &mut c1), &TOKENS);
    assert_eq!(x.len(), TOKENS.len() * HIDDEN);
    assert_eq!(
        got, want,
        "the same arithmetic in two stages: bit-identical"
    );

    // A later stage cannot start from tokens, an earlier one cannot make logits.
    let e = s1
        .forward_from(
            &pool,
            &Identity,
            &mut c1,
            Input::Tokens(&[1]),
            Output::Hidden,
        )
        .unwrap_err();
    assert!(format!("{e:#}").contains("no token embedding"), "{e:#}");
    let e = s0
        .forward_from(
            &pool,
            &Identity,
            &mut c0,
            Input::Tokens(&[1]),
            Output::Logits(Logits::Last),
        )
        .unwrap_err();
    assert!(format!("{e:#}").contains("no LM head"), "{e:#}");
    assert_eq!(
        (c0.len(), c1.len()),
        (TOKENS.len(), TOKENS.len()),
        "failed passes leave no trace"
    );

    let e = Llama::load_stage(file, Shard::SINGLE, Stage::new(0, 3).unwrap())
        .err()
        .expect("3 stages of 2 layers");
    assert!(
        format!("{e:#}").contains("pipeline-parallel degree 3 exceeds the model's 2 layers"),
        "{e:#}"
    );
}

fn tiny_engine(path: &std::path::Path, collective: Box<dyn Collective>, stage: Stage) -> Engine {
    let file = Arc::new(MappedGguf::open(path).unwrap());
    let shard = Shard::new(collective.rank(), collective.world()).unwrap();
    let tokens = (0..VOCAB).map(|i| format!("t{i}")).collect();
    Engine {
        model: Llama::load_stage(file, shard, stage).unwrap(),
        tokenizer: Arc::new(
            Tokenizer::new(
                tokens,
                vec![1; VOCAB],
                &[],
                false,
                None,
                None,
                None,
                false,
                None,
            )
            .unwrap(),
        ),
        pool: Pool::new(1).unwrap(),
        collective,
    }
}

/// Prefill `TOKENS[..4]`, then greedy-decode 8 tokens: the leader's logits and tokens.
fn greedy(runner: &mut Runner) -> (Vec<Vec<f32>>, Vec<u32>) {
    let (mut all, mut out) = (Vec::new(), Vec::new());
    let mut step = TOKENS[..4].to_vec();
    for _ in 0..8 {
        let logits = runner
            .run(&Step::Forward {
                seq: 7,
                tokens: step,
            })
            .unwrap()
            .expect("the leader gets logits");
        let next = (0..logits.len())
            .max_by(|a, b| logits[*a].total_cmp(&logits[*b]))
            .unwrap() as u32;
        all.push(logits);
        out.push(next);
        step = vec![next];
    }
    runner.run(&Step::Release { seq: 7 }).unwrap();
    (all, out)
}

/// TP x PP ranks as threads joined over TCP on 127.0.0.1; rank 0 drives.
fn run_layout(path: &std::path::Path, tp: usize, pp: usize) -> (Vec<Vec<f32>>, Vec<u32>) {
    run_layout_with(path, tp, pp, greedy)
}

/// The leader's logits per step and the tokens it chose.
type Logged = (Vec<Vec<f32>>, Vec<u32>);

/// As [`run_layout`], with rank 0 driving `drive` (which must release its sequences).
fn run_layout_with(
    path: &std::path::Path,
    tp: usize,
    pp: usize,
    drive: fn(&mut Runner) -> Logged,
) -> Logged {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let world = tp * pp;
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let path = path.to_owned();
            std::thread::spawn(move || {
                let cfg = GroupConfig {
                    rank,
                    world,
                    pp,
                    leader_host: "127.0.0.1".into(),
                    port,
                    group_id: format!("tiny-{tp}x{pp}"),
                    connect_deadline: Duration::from_secs(60),
                    stall_timeout: Duration::from_secs(30),
                    secret: Vec::new(),
                };
                let g = dist::join_with_exit(&cfg, Box::new(|why: &str| panic!("lost: {why}")))
                    .unwrap();
                assert_eq!(g.stage, Stage::new(rank / tp, pp).unwrap());
                assert_eq!((g.collective.rank(), g.collective.world()), (rank % tp, tp));
                let engine = tiny_engine(&path, g.collective, g.stage);
                match g.role {
                    Role::Leader(b) => {
                        let mut r = Runner::new(engine, 1 << 20, Some(b)).with_pipe(g.pipe);
                        Some(drive(&mut r))
                    }
                    Role::Follower(mut s) => {
                        let mut r = Runner::new(engine, 1 << 20, None).with_pipe(g.pipe);
                        dist::follow(&mut r, s.as_mut()).unwrap();
                        assert_eq!(r.live(), 0, "the leader released the sequence");
                        None
                    }
                }
            })
        })
        .collect();
    let mut results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    results.remove(0).unwrap()
}

/// Tolerance of TP=2 x PP=2 against one rank, relative to the largest logit: the tensor-parallel
/// split's (its all-reduce adds partial sums in another order); the pipeline split itself moves
/// f32 hidden states unchanged and adds nothing (PP=2 alone is compared bit for bit).
const PP_TOL: [(GgmlType, f32); 2] = [(GgmlType::F32, 1e-5), (GgmlType::Q4_1, 1e-3)];

#[test]
fn pipeline_layouts_over_tcp_match_one_rank() {
    for (ty, tol) in PP_TOL {
        let (w, _) = build(ty, 11, None, None);
        let path = write(&w, &format!("pp-{ty}.gguf"));
        let mut single = Runner::new(
            tiny_engine(&path, Box::new(Identity), Stage::WHOLE),
            1 << 20,
            None,
        );
        let (want, want_tokens) = greedy(&mut single);
        let (pp2, pp2_tokens) = run_layout(&path, 1, 2);
        assert_eq!(pp2, want, "{ty} PP=2: bit-identical logits");
        assert_eq!(pp2_tokens, want_tokens);
        let (tp2pp2, tokens) = run_layout(&path, 2, 2);
        assert_eq!(
            tokens, want_tokens,
            "{ty} TP=2 x PP=2: identical greedy tokens"
        );
        let scale = want.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
        let err = want
            .iter()
            .flatten()
            .zip(tp2pp2.iter().flatten())
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
            / scale;
        eprintln!("{ty} TP=2 x PP=2: max error {err:.2e} of the largest logit");
        assert!(err < tol, "{ty} TP=2 x PP=2: relative error {err}");
    }
}

/// Prompts of different lengths for the batched tests.
const PROMPTS: [&[u32]; 3] = [&[3, 17], &[42, 5, 95, 0, 61], &[17, 8, 9, 64]];

fn argmax(v: &[f32]) -> u32 {
    (0..v.len()).max_by(|a, b| v[*a].total_cmp(&v[*b])).unwrap() as u32
}

/// A batched pass computes every row exactly as a pass of its sequence alone (the linear layers
/// multiply each row by the same weights with the same kernel, attention is per sequence), so
/// the tolerance is zero: bit-identical logits.
#[test]
fn a_batched_forward_gives_each_sequences_logits_bit_for_bit() {
    for ty in [GgmlType::F32, GgmlType::Q4_1] {
        let (w, _) = build(ty, 13, None, None);
        let path = write(&w, &format!("batch-{ty}.gguf"));
        let model = Llama::open(&path, Shard::SINGLE).unwrap();
        let pool = Pool::new(2).unwrap();

        // Each sequence alone: prefill its prompt, then 4 greedy decode steps.
        let want: Vec<_> = PROMPTS
            .iter()
            .map(|p| greedy_alone(&model, &pool, p, 4, argmax))
            .collect();

        // Batched, with sequences at different positions in every step: sequence 0 prefills
        // in step 0, sequence 1 in two chunks (steps 0 and 1), sequence 2 joins in step 2.
        let mut caches: Vec<_> = (0..3).map(|_| model.new_cache(1 << 20).unwrap()).collect();
        let mut got: Vec<Vec<Vec<f32>>> = vec![Vec::new(); 3];
        let mut fed = [0usize; 3]; // prompt tokens fed
        let coll = Counting::default();
        for step in 0..7 {
            let mut rows: Vec<(usize, Vec<u32>)> = Vec::new();
            for s in 0..3 {
                let p = PROMPTS[s];
                if s == 2 && step < 2 || got[s].len() == 5 {
                    continue;
                }
                if fed[s] < p.len() {
                    let n = if s == 1 && fed[s] == 0 {
                        3
                    } else {
                        p.len() - fed[s]
                    };
                    rows.push((s, p[fed[s]..fed[s] + n].to_vec()));
                    fed[s] += n;
                } else {
                    rows.push((s, vec![argmax(got[s].last().unwrap())]));
                }
            }
            if rows.is_empty() {
                break;
            }
            let lens: Vec<usize> = rows.iter().map(|(_, t)| t.len()).collect();
            let tokens: Vec<u32> = rows.iter().flat_map(|(_, t)| t.clone()).collect();
            let mut refs: Vec<&mut _> = caches
                .iter_mut()
                .enumerate()
                .filter(|(s, _)| rows.iter().any(|(r, _)| r == s))
                .map(|(_, c)| c)
                .collect();
            let before = coll.calls();
            let out = model
                .forward_batch(
                    &pool,
                    &coll,
                    &mut refs,
                    &lens,
                    Input::Tokens(&tokens),
                    Output::Logits(Logits::Last),
                )
                .unwrap();
            assert_eq!(
                coll.calls() - before,
                2 * LAYERS,
                "one all-reduce per layer half for the whole batch"
            );
            assert_eq!(out.len(), rows.len() * VOCAB);
            for ((s, _), l) in rows.iter().zip(out.chunks_exact(VOCAB)) {
                // A chunk that does not finish the prompt gives logits nobody samples.
                if fed[*s] == PROMPTS[*s].len() {
                    got[*s].push(l.to_vec());
                }
            }
        }
        assert_eq!(
            got, want,
            "{ty}: batched logits equal each sequence's alone"
        );

        // Every token's logits and hidden states come back in row order too.
        let mut alone = model.new_cache(1 << 20).unwrap();
        let all0 = model
            .forward(&pool, &Identity, &mut alone, PROMPTS[1], Logits::All)
            .unwrap();
        let (mut c0, mut c1) = (
            model.new_cache(1 << 20).unwrap(),
            model.new_cache(1 << 20).unwrap(),
        );
        let tokens: Vec<u32> = PROMPTS[1].iter().chain(PROMPTS[0]).copied().collect();
        let all = model
            .forward_batch(
                &pool,
                &Identity,
                &mut [&mut c0, &mut c1],
                &[PROMPTS[1].len(), PROMPTS[0].len()],
                Input::Tokens(&tokens),
                Output::Logits(Logits::All),
            )
            .unwrap();
        assert_eq!(all.len(), tokens.len() * VOCAB);
        assert_eq!(&all[..all0.len()], &all0[..]);
    }
}

#[test]
fn a_failed_batched_forward_changes_no_cache() {
    let (w, _) = build(GgmlType::F32, 13, None, None);
    let path = write(&w, "batch-fail.gguf");
    let model = Llama::open(&path, Shard::SINGLE).unwrap();
    let pool = Pool::new(1).unwrap();
    let per_token = model.kv_bytes_per_token();
    let mut roomy = model.new_cache(1 << 20).unwrap();
    let mut small = model.new_cache(3 * per_token).unwrap();
    model
        .forward(&pool, &Identity, &mut small, &[1, 2], Logits::Last)
        .unwrap();
    let run = |caches: &mut [&mut tessera_worker::model::kv_cache::KvCache],
               lens: &[usize],
               tokens: &[u32]| {
        model
            .forward_batch(
                &pool,
                &Identity,
                caches,
                lens,
                Input::Tokens(tokens),
                Output::Logits(Logits::Last),
            )
            .unwrap_err()
    };
    // The second sequence's cache has room for one more token, not two.
    let e = run(&mut [&mut roomy, &mut small], &[1, 2], &[4, 5, 6]);
    assert!(format!("{e:#}").contains("KV cache full"), "{e:#}");
    // A token outside the vocabulary fails in the middle of the pass: everything rolls back.
    let e = run(
        &mut [&mut roomy, &mut small],
        &[2, 1],
        &[4, 5, VOCAB as u32],
    );
    assert!(format!("{e:#}").contains("outside the vocabulary"), "{e:#}");
    let e = run(&mut [&mut roomy, &mut small], &[2, 2], &[4, 5, 6]);
    assert!(format!("{e:#}").contains("does not split"), "{e:#}");
    let e = run(&mut [&mut roomy, &mut small], &[3, 0], &[4, 5, 6]);
    assert!(format!("{e:#}").contains("no tokens"), "{e:#}");
    assert_eq!((roomy.len(), small.len()), (0, 2));
    // The runner refuses a sequence twice in one step.
    let mut runner = Runner::new(
        tiny_engine(&path, Box::new(Identity), Stage::WHOLE),
        1 << 20,
        None,
    );
    let e = runner
        .run(&Step::ForwardBatch {
            seqs: vec![(1, vec![1]), (1, vec![2])],
        })
        .unwrap_err();
    assert!(format!("{e:#}").contains("appears twice"), "{e:#}");
}

/// Three sequences through `Step::ForwardBatch` (prompts of different lengths in one step, then
/// 5 batched greedy decode steps); the leader's logits per step and the tokens.
fn batched_greedy(runner: &mut Runner) -> (Vec<Vec<f32>>, Vec<u32>) {
    let (mut all, mut out) = (Vec::new(), Vec::new());
    let mut seqs: Vec<(u64, Vec<u32>)> = PROMPTS
        .iter()
        .enumerate()
        .map(|(i, p)| (10 + i as u64, p.to_vec()))
        .collect();
    for _ in 0..6 {
        let logits = runner
            .run(&Step::ForwardBatch { seqs: seqs.clone() })
            .unwrap()
            .expect("the leader gets logits");
        assert_eq!(logits.len(), 3 * VOCAB);
        for ((_, tokens), l) in seqs.iter_mut().zip(logits.chunks_exact(VOCAB)) {
            let next = argmax(l);
            out.push(next);
            *tokens = vec![next];
        }
        all.push(logits);
    }
    for (seq, _) in seqs {
        runner.run(&Step::Release { seq }).unwrap();
    }
    (all, out)
}

#[test]
fn batched_steps_over_tp_and_pp_match_one_rank() {
    for (ty, tol) in PP_TOL {
        let (w, _) = build(ty, 17, None, None);
        let path = write(&w, &format!("batch-pp-{ty}.gguf"));
        let mut single = Runner::new(
            tiny_engine(&path, Box::new(Identity), Stage::WHOLE),
            1 << 20,
            None,
        );
        let (want, want_tokens) = batched_greedy(&mut single);
        assert_eq!(single.live(), 0);
        // One rank, batched, against each sequence's own `Step::Forward`s: bit for bit.
        for (s, p) in PROMPTS.iter().enumerate() {
            let mut step = p.to_vec();
            for (i, l) in want.iter().enumerate() {
                let logits = single
                    .run(&Step::Forward {
                        seq: 1,
                        tokens: step,
                    })
                    .unwrap()
                    .unwrap();
                assert_eq!(
                    logits,
                    l[s * VOCAB..(s + 1) * VOCAB],
                    "{ty}: seq {s} step {i}"
                );
                step = vec![want_tokens[i * 3 + s]];
            }
            single.run(&Step::Release { seq: 1 }).unwrap();
        }
        let (pp2, pp2_tokens) = run_layout_with(&path, 1, 2, batched_greedy);
        assert_eq!(pp2, want, "{ty} PP=2: bit-identical batched logits");
        assert_eq!(pp2_tokens, want_tokens);
        let scale = want.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
        for (tp, pp) in [(2, 1), (2, 2)] {
            let (got, tokens) = run_layout_with(&path, tp, pp, batched_greedy);
            assert_eq!(tokens, want_tokens, "{ty} TP={tp} x PP={pp}: greedy tokens");
            let err = want
                .iter()
                .flatten()
                .zip(got.iter().flatten())
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
                / scale;
            eprintln!("{ty} TP={tp} x PP={pp} batched: max error {err:.2e} of the largest logit");
            assert!(err < tol, "{ty} TP={tp} x PP={pp}: relative error {err}");
        }
    }
}

/// `Step::Reserve` makes a sequence's cache with memory for exactly the admitted tokens: the
/// reservation does not grow as the tokens arrive (the cache grew by doubling before, up to
/// twice what was admitted), a step past it is refused like a full cache, and the logits are
/// those of a cache made at the first step.
#[test]
fn a_reserved_cache_holds_exactly_its_admission_and_never_grows() {
    let (w, _) = build(GgmlType::F32, 23, None, None);
    let path = write(&w, "reserve.gguf");
    let mut runner = Runner::new(
        tiny_engine(&path, Box::new(Identity), Stage::WHOLE),
        1 << 20,
        None,
    );
    let mut lazy = Runner::new(
        tiny_engine(&path, Box::new(Identity), Stage::WHOLE),
        1 << 20,
        None,
    );
    let per_token_floats = runner.engine.model.kv_bytes_per_token() / 4;
    runner.run(&Step::Reserve { seq: 7, tokens: 9 }).unwrap();
    let reserved = runner.reserved_floats(7).expect("a cache");
    assert_eq!(reserved, 9 * per_token_floats);
    let prompt = vec![1u32, 2, 3, 4, 5];
    let a = runner
        .run(&Step::Forward {
            seq: 7,
            tokens: prompt.clone(),
        })
        .unwrap()
        .unwrap();
    let b = lazy
        .run(&Step::Forward {
            seq: 7,
            tokens: prompt,
        })
        .unwrap()
        .unwrap();
    assert_eq!(a, b, "the reservation changes no logit");
    for t in 0..4u32 {
        runner
            .run(&Step::Forward {
                seq: 7,
                tokens: vec![6 + t],
            })
            .unwrap();
    }
    assert_eq!(runner.seq_len(7), 9);
    assert_eq!(runner.reserved_floats(7), Some(reserved), "no growth");
    let e = runner
        .run(&Step::Forward {
            seq: 7,
            tokens: vec![1],
        })
        .unwrap_err();
    assert!(format!("{e:#}").contains("KV cache full"), "{e:#}");
    // A reservation beyond the per-sequence budget is held to the budget; a second Reserve of
    // a live sequence changes nothing.
    let budget_tokens = (1 << 20) / runner.engine.model.kv_bytes_per_token();
    runner
        .run(&Step::Reserve {
            seq: 8,
            tokens: 1 << 30,
        })
        .unwrap();
    let cap = budget_tokens.min(runner.engine.model.config.context_length);
    assert_eq!(runner.reserved_floats(8), Some(cap * per_token_floats));
    runner.run(&Step::Reserve { seq: 7, tokens: 1 }).unwrap();
    assert_eq!(runner.reserved_floats(7), Some(reserved));
    runner.run(&Step::Release { seq: 7 }).unwrap();
    assert_eq!(runner.reserved_floats(7), None);
}
