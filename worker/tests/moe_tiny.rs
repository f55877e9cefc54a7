//! A tiny random mixture-of-experts Llama in llama.cpp's Mixtral layout, written with
//! `gguf::Writer` in F32 and Q8_0: 3 layers, the first dense (`llama.leading_dense_block_count`
//! 1), the others with 8 routed experts (top-2, softmax then renormalised) and one shared
//! expert. One rank against an independent naive f64 forward pass; expert parallelism over 2
//! and 4 ranks (threads with an in-memory all-reduce) against one rank; the router's spread
//! against the reference's; each rank's experts; pipeline stages; batched passes; what is
//! refused (an expert count the ranks do not divide, other MoE architectures, broken expert
//! tensors and keys, MoE safetensors); greedy text over the real TCP rank group
//! (`tessera-worker local --tp 2`) against one rank.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Counting, Proc, encode, free_port, greedy_alone, http, randn, rel_err};
use tessera_worker::engine::sampling::{Rng, argmax};
use tessera_worker::kernels::Pool;
use tessera_worker::model::gguf::{GgmlType, Value, Writer};
use tessera_worker::model::llama::{Ffn, Input, Llama, Logits, Moe, Output};
use tessera_worker::model::parallel::{Identity, Shard, Stage};

const LAYERS: usize = 3;
/// Leading dense layers.
const DENSE: usize = 1;
const HIDDEN: usize = 128;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
/// The dense layers' FFN width.
const FFN: usize = 256;
const EXPERTS: usize = 8;
const TOP_K: usize = 2;
const EXPERT_FFN: usize = 64;
/// One shared expert this wide (a multiple of 4 x 32, so that 4 ranks split it in Q8_0 blocks).
const SHARED_FFN: usize = 128;
const VOCAB: usize = 96;
const EPS: f32 = 1e-5;
const BASE: f32 = 10_000.0;

const TOKENS: [u32; 9] = [3, 17, 42, 5, 93, 0, 61, 17, 8];

/// A SwiGLU FFN as f32: gate `[f, h]`, up `[f, h]`, down `[h, f]`.
type RefMlp = [Vec<f32>; 3];

enum RefFfn {
    Dense(RefMlp),
    Moe {
        /// `[EXPERTS, HIDDEN]`.
        router: Vec<f32>,
        experts: Vec<RefMlp>,
        shared: RefMlp,
    },
}

/// Weights as f32 after a round trip through their encoding (what the model sees).
struct Weights {
    embed: Vec<f32>,
    /// attn_norm, q, k, v, o, ffn_norm.
    attn: Vec<[Vec<f32>; 6]>,
    ffn: Vec<RefFfn>,
    norm: Vec<f32>,
}

/// The byte-level BPE vocabulary of the model: the 94 printable ASCII characters, `Ġ` (a space)
/// and one control token, so that `local` can serve text.
fn vocabulary() -> Vec<String> {
    let mut v: Vec<String> = (33u8..=126).map(|b| char::from(b).to_string()).collect();
    v.push("\u{120}".into());
    v.push("<|end|>".into());
    assert_eq!(v.len(), VOCAB);
    v
}

/// Build the tiny model in `ty` (norms F32; the router F32, as llama.cpp's quantiser keeps it);
/// `skip` leaves a tensor out, `reshape` gives one a wrong shape (the same number of elements).
fn build(ty: GgmlType, seed: u64, skip: Option<&str>, reshape: Option<&str>) -> (Writer, Weights) {
    let mut rng = Rng::new(seed);
    let mut w = Writer::default();
    let u = |v: usize| Value::U32(v as u32);
    let mut types = vec![Value::I32(1); VOCAB];
    types[VOCAB - 1] = Value::I32(3);
    w.metadata("general.architecture", Value::String("llama".into()))
        .metadata("llama.block_count", u(LAYERS))
        .metadata("llama.embedding_length", u(HIDDEN))
        .metadata("llama.attention.head_count", u(HEADS))
        .metadata("llama.attention.head_count_kv", u(KV_HEADS))
        .metadata("llama.feed_forward_length", u(FFN))
        .metadata("llama.context_length", u(64))
        .metadata("llama.vocab_size", u(VOCAB))
        .metadata("llama.rope.freq_base", Value::F32(BASE))
        .metadata("llama.attention.layer_norm_rms_epsilon", Value::F32(EPS))
        .metadata("llama.expert_count", u(EXPERTS))
        .metadata("llama.expert_used_count", u(TOP_K))
        .metadata("llama.expert_feed_forward_length", u(EXPERT_FFN))
        .metadata("llama.expert_shared_count", u(1))
        .metadata("llama.expert_shared_feed_forward_length", u(SHARED_FFN))
        .metadata("llama.leading_dense_block_count", u(DENSE))
        .metadata("tokenizer.ggml.model", Value::String("gpt2".into()))
        .metadata(
            "tokenizer.ggml.tokens",
            Value::Array(vocabulary().into_iter().map(Value::String).collect()),
        )
        .metadata("tokenizer.ggml.token_type", Value::Array(types))
        .metadata("tokenizer.ggml.merges", Value::Array(Vec::new()));
    let mut add = |w: &mut Writer, name: &str, dims: &[u64], t: GgmlType, scale: f32| {
        let n = dims.iter().product::<u64>() as usize;
        let vals = if name.contains("norm") {
            (0..n).map(|_| 1.0 + (rng.next_f32() - 0.5) * 0.4).collect()
        } else {
            randn(&mut rng, n, scale)
        };
        let (bytes, back) = encode(t, &vals);
        if skip != Some(name) {
            let mut dims = dims.to_vec();
            if reshape == Some(name) {
                let last = dims.len() - 1;
                dims[last] /= 2;
                dims[last - 1] *= 2;
            }
            w.tensor(name, &dims, t, bytes);
        }
        back
    };
    let (h, f, fe, fs) = (
        HIDDEN as u64,
        FFN as u64,
        EXPERT_FFN as u64,
        SHARED_FFN as u64,
    );
    let (qd, kvd) = ((HEADS * HEAD_DIM) as u64, (KV_HEADS * HEAD_DIM) as u64);
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
    let s = 1.2 / (HIDDEN as f32).sqrt();
    let (mut attn, mut ffn) = (Vec::new(), Vec::new());
    for i in 0..LAYERS {
        let n = |s: &str| format!("blk.{i}.{s}.weight");
        attn.push([
            add(&mut w, &n("attn_norm"), &[h], GgmlType::F32, 0.0),
            add(&mut w, &n("attn_q"), &[h, qd], ty, s),
            add(&mut w, &n("attn_k"), &[h, kvd], ty, s),
            add(&mut w, &n("attn_v"), &[h, kvd], ty, s),
            add(&mut w, &n("attn_output"), &[qd, h], ty, s),
            add(&mut w, &n("ffn_norm"), &[h], GgmlType::F32, 0.0),
        ]);
        if i < DENSE {
            ffn.push(RefFfn::Dense([
                add(&mut w, &n("ffn_gate"), &[h, f], ty, s),
                add(&mut w, &n("ffn_up"), &[h, f], ty, s),
                add(&mut w, &n("ffn_down"), &[f, h], ty, s),
            ]));
            continue;
        }
        let e = EXPERTS as u64;
        // A strong router: its logits spread over several units, so tokens go to many experts.
        let router = add(&mut w, &n("ffn_gate_inp"), &[h, e], GgmlType::F32, 3.0 * s);
        let gate = add(&mut w, &n("ffn_gate_exps"), &[h, fe, e], ty, s);
        let up = add(&mut w, &n("ffn_up_exps"), &[h, fe, e], ty, s);
        let down = add(&mut w, &n("ffn_down_exps"), &[fe, h, e], ty, s);
        let per = EXPERT_FFN * HIDDEN;
        let experts = (0..EXPERTS)
            .map(|x| {
                let part = |m: &[f32]| m[x * per..(x + 1) * per].to_vec();
                [part(&gate), part(&up), part(&down)]
            })
            .collect();
        let shared = [
            add(&mut w, &n("ffn_gate_shexp"), &[h, fs], ty, s),
            add(&mut w, &n("ffn_up_shexp"), &[h, fs], ty, s),
            add(&mut w, &n("ffn_down_shexp"), &[fs, h], ty, s),
        ];
        ffn.push(RefFfn::Moe {
            router,
            experts,
            shared,
        });
    }
    let norm = add(&mut w, "output_norm.weight", &[h], GgmlType::F32, 0.0);
    (
        w,
        Weights {
            embed,
            attn,
            ffn,
            norm,
        },
    )
}

/// Writes the model to a temporary file that is deleted when the returned path is dropped.
fn write(w: &Writer, name: &str) -> tempfile::TempPath {
    let mut file = tempfile::Builder::new()
        .prefix(&format!("tessera-moe-tiny-{name}-"))
        .suffix(".gguf")
        .tempfile()
        .unwrap();
    std::io::Write::write_all(&mut file, &w.to_bytes()).unwrap();
    file.into_temp_path()
}

/// The routing weights the reference applies.
#[derive(Clone, Copy, PartialEq)]
enum Routing {
    /// Softmax over all experts, the top-k, renormalised to sum 1 (what the model must do).
    Renormalised,
    /// The top-k's softmax weights as they are (what it must not do).
    Raw,
}

/// What the naive forward pass computes.
struct Reference {
    /// Every token's logits.
    logits: Vec<Vec<f64>>,
    /// Per layer, the experts chosen for each token in turn (empty for a dense layer).
    chosen: Vec<Vec<usize>>,
    /// The smallest gap between the k-th and the (k+1)-th router logit of any token: how far
    /// the routing is from a tie that rounding could tip.
    margin: f64,
}

/// An independent, naive forward pass in f64.
fn reference(wt: &Weights, tokens: &[u32], routing: Routing) -> Reference {
    let dims = common::NaiveDims {
        hidden: HIDDEN,
        heads: HEADS,
        kv_heads: KV_HEADS,
        vocab: VOCAB,
        eps: EPS,
        base: BASE,
    };
    let attn: Vec<[&[f32]; 6]> = (wt.attn.iter())
        .map(|l| [&l[0][..], &l[1], &l[2], &l[3], &l[4], &l[5]])
        .collect();
    let mut chosen = vec![Vec::new(); LAYERS];
    let mut margin = f64::MAX;
    let mut ffn = |i: usize, xn: &[f64]| match &wt.ffn[i] {
        RefFfn::Dense([g, u, d]) => common::naive_swiglu(g, u, d, xn, FFN),
        RefFfn::Moe {
            router,
            experts,
            shared,
        } => {
            let logits = common::naive_mv(router, xn, EXPERTS);
            let max = logits.iter().copied().fold(f64::MIN, f64::max);
            let e: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
            let z: f64 = e.iter().sum();
            let p: Vec<f64> = e.iter().map(|e| e / z).collect();
            let mut order: Vec<usize> = (0..EXPERTS).collect();
            order.sort_by(|a, b| p[*b].total_cmp(&p[*a]));
            let top = &order[..TOP_K];
            margin = margin.min(logits[order[TOP_K - 1]] - logits[order[TOP_K]]);
            let norm = match routing {
                Routing::Renormalised => top.iter().map(|&x| p[x]).sum(),
                Routing::Raw => 1.0,
            };
            let [g, u, d] = shared;
            let mut y = common::naive_swiglu(g, u, d, xn, SHARED_FFN);
            for &x in top {
                let [g, u, d] = &experts[x];
                let ye = common::naive_swiglu(g, u, d, xn, EXPERT_FFN);
                y.iter_mut()
                    .zip(&ye)
                    .for_each(|(y, v)| *y += p[x] / norm * v);
                chosen[i].push(x);
            }
            y
        }
    };
    let logits = common::naive_forward(
        &dims,
        &wt.embed,
        &attn,
        &wt.norm,
        tokens,
        &[1.0; HEAD_DIM / 2],
        &mut ffn,
    );
    Reference {
        logits,
        chosen,
        margin,
    }
}

/// Layer `i`'s mixture of experts.
fn moe(model: &Llama, i: usize) -> &Moe {
    match &model.layers[i].ffn {
        Ffn::Moe(m) => m,
        Ffn::Dense(_) => panic!("layer {i} is dense"),
    }
}

/// Tolerance against the naive f64 reference, relative to the largest logit: F32 weights use
/// f32 activations; quantised weights use 8-bit activations (llama_tiny.rs's bounds).
const REF_TOL: [(GgmlType, f64); 2] = [(GgmlType::F32, 1e-4), (GgmlType::Q8_0, 1.5e-2)];

#[test]
fn one_rank_matches_the_naive_reference() {
    for (ty, tol) in REF_TOL {
        let (w, wt) = build(ty, 42, None, None);
        let path = write(&w, &format!("ref-{ty}"));
        let model = Llama::open(&path, Shard::SINGLE).expect("loads");
        assert!(matches!(model.layers[0].ffn, Ffn::Dense(_)));
        let pool = Pool::new(2).unwrap();
        let mut cache = model.new_cache(1 << 20).unwrap();
        let ours = model
            .forward(&pool, &Identity, &mut cache, &TOKENS, Logits::All)
            .unwrap();
        let r = reference(&wt, &TOKENS, Routing::Renormalised);
        // No token's routing is within rounding of a tie, so the comparison is well posed.
        assert!(
            r.margin > 1e-3,
            "{ty}: a near tie in the routing ({})",
            r.margin
        );
        let expect = r.logits;
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
    }
}

/// The model's router sends each token to exactly the experts the reference chooses, and those
/// are many different experts, so no degenerate router (every token to the same two experts)
/// can pass the reference test; and the routing weights matter: against the same reference
/// with the top-k weights left unnormalised the logits are far outside the F32 tolerance.
#[test]
fn the_router_spreads_tokens_over_the_experts_as_the_reference_does() {
    let (w, wt) = build(GgmlType::F32, 42, None, None);
    let model = Llama::open(&write(&w, "route"), Shard::SINGLE).unwrap();
    let pool = Pool::new(1).unwrap();
    let mut cache = model.new_cache(1 << 20).unwrap();
    let logits = model
        .forward(&pool, &Identity, &mut cache, &TOKENS, Logits::All)
        .unwrap();
    let raw = rel_err(&logits, &reference(&wt, &TOKENS, Routing::Raw).logits);
    eprintln!("against unnormalised routing weights: {raw:.2e} of the largest logit");
    assert!(
        raw > 100.0 * REF_TOL[0].1,
        "renormalisation changed nothing ({raw})"
    );
    let r = reference(&wt, &TOKENS, Routing::Renormalised);
    for (i, want) in r.chosen.iter().enumerate().skip(DENSE) {
        let mut counts = vec![0u64; EXPERTS];
        want.iter().for_each(|&x| counts[x] += 1);
        let got = moe(&model, i).routed_tokens();
        eprintln!("layer {i}: tokens per expert {got:?}");
        assert_eq!(got, counts, "layer {i}: the reference's routing");
        assert_eq!(got.iter().sum::<u64>(), (TOKENS.len() * TOP_K) as u64);
        let used = got.iter().filter(|&&n| n > 0).count();
        assert!(used >= 4, "layer {i}: only {used} experts used: {got:?}");
        assert!(
            got.iter().all(|&n| n < TOKENS.len() as u64),
            "layer {i}: one expert took every token: {got:?}"
        );
    }
}

/// Expert parallelism against one rank. Tolerance relative to the largest logit. The all-reduce
/// adds the ranks' partial sums (their experts' outputs, their slices of attention and of the
/// shared expert) in another order than one rank does: F32 moves by rounding only (1e-7).
/// Quantised weights multiply 8-bit activations, and a difference of 1e-7 now and then tips one
/// activation's rounding by one step (1/127 of its block's largest value), which moves the
/// logits by up to a few 1e-3 from that token on; still below the quantised model's own error
/// against the exact reference (about 4e-3) and far below a routing mistake (3e-1).
#[test]
fn expert_parallel_splits_match_one_rank() {
    for (ty, tol) in [(GgmlType::F32, 1e-5), (GgmlType::Q8_0, 1e-2)] {
        let (w, _) = build(ty, 9, None, None);
        let path = write(&w, &format!("ep-{ty}"));
        let one = common::tp_logits(&path, 1, &TOKENS[..6], &TOKENS[6..]);
        let scale = one.iter().fold(0f32, |m, v| m.max(v.abs()));
        for world in [2, 4] {
            let split = common::tp_logits(&path, world, &TOKENS[..6], &TOKENS[6..]);
            assert_eq!(split.len(), one.len());
            let err = one
                .iter()
                .zip(&split)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
                / scale;
            eprintln!("{ty} EP=TP={world}: max error {err:.2e} of the largest logit");
            assert!(err < tol, "{ty} TP={world}: relative error {err}");
        }
    }
}

/// Rank r of W holds experts [r*E/W, (r+1)*E/W) whole, byte for byte the file's, copied out of
/// the map (one rank borrows them all); the router whole; 1/W of the shared expert. Over 2
/// ranks the weights add up to the model's plus one more router per MoE layer.
#[test]
fn each_rank_holds_its_own_experts_whole() {
    let (w, _) = build(GgmlType::Q8_0, 3, None, None);
    let path = write(&w, "shards");
    let whole = Llama::open(&path, Shard::SINGLE).unwrap();
    let (total, owned) = whole.weight_bytes();
    assert_eq!(owned, 0, "one rank borrows every weight from the map");
    assert!(moe(&whole, 1).experts.iter().all(|e| e.down.is_mapped()));
    for world in [2, 4] {
        let mut sum = 0;
        for rank in 0..world {
            let part = Llama::open(&path, Shard::new(rank, world).unwrap()).unwrap();
            for i in DENSE..LAYERS {
                let (mine, all) = (moe(&part, i), moe(&whole, i));
                let per = EXPERTS / world;
                assert_eq!((mine.expert0, mine.experts.len()), (rank * per, per));
                for (j, e) in mine.experts.iter().enumerate() {
                    let x = &all.experts[mine.expert0 + j];
                    assert!(!e.gate.is_mapped(), "a rank of several copies its experts");
                    assert_eq!(e.gate.bytes(), x.gate.bytes(), "rank {rank} expert {j}");
                    assert_eq!(e.up.bytes(), x.up.bytes());
                    assert_eq!(e.down.bytes(), x.down.bytes());
                }
                assert_eq!(mine.router.bytes(), all.router.bytes());
                let shared = mine.shared.as_ref().unwrap();
                assert_eq!(
                    (shared.gate.rows, shared.down.cols),
                    (SHARED_FFN / world, SHARED_FFN / world)
                );
            }
            let (t, o) = part.weight_bytes();
            assert_eq!(t, o, "a rank of several owns its weights");
            sum += t;
        }
        if world == 2 {
            let router = moe(&whole, 1).router.bytes().len();
            assert_eq!(sum, total + (LAYERS - DENSE) * router);
        }
    }
}

#[test]
fn an_expert_count_the_ranks_do_not_divide_is_refused() {
    let (w, _) = build(GgmlType::F32, 4, None, None);
    let path = write(&w, "three");
    let e = Llama::open(&path, Shard::new(0, 3).unwrap())
        .err()
        .expect("8 experts over 3 ranks");
    let msg = format!("{e:#}");
    assert!(
        msg.contains("tensor-parallel degree 3 must divide the model's 8 routed experts")
            && msg.contains("(1, 2, 4)"),
        "{msg}"
    );
}

#[test]
fn pipeline_stages_chain_to_the_whole_model() {
    let (w, _) = build(GgmlType::F32, 5, None, None);
    let path = write(&w, "stages");
    let file = std::sync::Arc::new(tessera_worker::model::MappedGguf::open(&path).unwrap());
    let whole = Llama::open(&path, Shard::SINGLE).unwrap();
    let stage = |s| {
        Llama::load_stage(
            std::sync::Arc::clone(&file),
            Shard::SINGLE,
            Stage::new(s, 2).unwrap(),
        )
        .unwrap()
    };
    let (s0, s1) = (stage(0), stage(1));
    // Layers 0..2 (dense, MoE) and 2..3 (MoE): the dense prefix counts global layers.
    assert_eq!((s0.layers.len(), s1.first_layer), (2, 2));
    assert!(matches!(s0.layers[0].ffn, Ffn::Dense(_)));
    assert!(matches!(s0.layers[1].ffn, Ffn::Moe(_)) && matches!(s1.layers[0].ffn, Ffn::Moe(_)));
    let pool = Pool::new(1).unwrap();
    let mut c = whole.new_cache(1 << 20).unwrap();
    let want = whole
        .forward(&pool, &Identity, &mut c, &TOKENS, Logits::All)
        .unwrap();
    let (mut c0, mut c1) = (
        s0.new_cache(1 << 20).unwrap(),
        s1.new_cache(1 << 20).unwrap(),
    );
    let (_, got) = common::chain_stages(&pool, (&s0, &mut c0), (&s1, &mut c1), &TOKENS);
    assert_eq!(
        got, want,
        "the same arithmetic in two stages: bit-identical"
    );
}

/// Each expert runs once over all the rows routed to it and a token's outputs are added in
/// expert order, so a row's result does not depend on its batch: tolerance zero. One
/// all-reduce per layer half for the whole batch, MoE layers included.
#[test]
fn a_batched_forward_gives_each_sequences_logits_bit_for_bit() {
    const PROMPTS: [&[u32]; 3] = [&[3, 17], &[42, 5, 93, 0, 61], &[17, 8, 9, 64]];
    for ty in [GgmlType::F32, GgmlType::Q8_0] {
        let (w, _) = build(ty, 13, None, None);
        let model = Llama::open(&write(&w, &format!("batch-{ty}")), Shard::SINGLE).unwrap();
        let pool = Pool::new(2).unwrap();
        let want: Vec<_> = PROMPTS
            .iter()
            .map(|p| greedy_alone(&model, &pool, p, 3, argmax))
            .collect();
        let mut caches: Vec<_> = (0..3).map(|_| model.new_cache(1 << 20).unwrap()).collect();
        let mut got: Vec<Vec<Vec<f32>>> = vec![Vec::new(); 3];
        let coll = Counting::default();
        let mut step: Vec<Vec<u32>> = PROMPTS.iter().map(|p| p.to_vec()).collect();
        for _ in 0..4 {
            let lens: Vec<usize> = step.iter().map(Vec::len).collect();
            let tokens: Vec<u32> = step.concat();
            let mut refs: Vec<&mut _> = caches.iter_mut().collect();
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
            assert_eq!(coll.calls() - before, 2 * LAYERS);
            for (s, l) in out.chunks_exact(VOCAB).enumerate() {
                got[s].push(l.to_vec());
                step[s] = vec![argmax(l)];
            }
        }
        assert_eq!(
            got, want,
            "{ty}: batched logits equal each sequence's alone"
        );
    }
}

fn open_err(w: &Writer, name: &str) -> String {
    let e = Llama::open(&write(w, name), Shard::SINGLE)
        .err()
        .unwrap_or_else(|| panic!("{name}: loads"));
    format!("{e:#}")
}

#[test]
fn other_mixture_of_experts_architectures_are_refused_naming_what_is_supported() {
    let moe_archs = [
        "deepseek2",
        "qwen2moe",
        "qwen3moe",
        "mixtral",
        "llama4",
        "gpt-oss",
        "gptoss",
        "dbrx",
        "olmoe",
        // Unknown to Tessera, but its metadata says it has experts.
        "futuremoe",
    ];
    for arch in moe_archs {
        let mut w = Writer::default();
        w.metadata("general.architecture", Value::String(arch.into()))
            .metadata(&format!("{arch}.expert_count"), Value::U32(8));
        let msg = open_err(&w, arch);
        assert!(
            msg.contains(&format!(
                "general.architecture \"{arch}\" is a mixture-of-experts model"
            )) && msg.contains("not supported yet")
                && msg.contains("llama-architecture GGUFs")
                && msg.contains("Mixtral layout"),
            "{msg}"
        );
    }
    // A dense model of another architecture keeps its plain refusal.
    let mut w = Writer::default();
    w.metadata("general.architecture", Value::String("qwen2".into()));
    let msg = open_err(&w, "qwen2");
    assert!(
        msg.contains("architecture \"qwen2\" is not supported (llama is)"),
        "{msg}"
    );
}

#[test]
fn broken_expert_tensors_and_keys_are_refused_naming_them() {
    let ty = GgmlType::F32;
    let (w, _) = build(ty, 2, Some("blk.2.ffn_down_exps.weight"), None);
    let msg = open_err(&w, "missing");
    assert!(
        msg.contains("layer 2 is a mixture-of-experts layer")
            && msg.contains("tensor blk.2.ffn_down_exps.weight is missing"),
        "{msg}"
    );
    let (w, _) = build(ty, 2, None, Some("blk.1.ffn_up_exps.weight"));
    let msg = open_err(&w, "shape");
    assert!(
        msg.contains(
            "tensor blk.1.ffn_up_exps.weight has shape [128, 128, 4], expected [128, 64, 8]"
        ),
        "{msg}"
    );
    let (w, _) = build(ty, 2, None, Some("blk.1.ffn_gate_inp.weight"));
    let msg = open_err(&w, "router");
    assert!(
        msg.contains("tensor blk.1.ffn_gate_inp.weight has shape [256, 4], expected [128, 8]"),
        "{msg}"
    );
    let (w, _) = build(ty, 2, Some("blk.1.ffn_gate_inp.weight"), None);
    let msg = open_err(&w, "no-router");
    assert!(
        msg.contains("blk.1.ffn_gate_inp.weight is missing"),
        "{msg}"
    );

    // An older llama.cpp's one tensor per expert.
    let (mut w, _) = build(ty, 2, Some("blk.1.ffn_gate_exps.weight"), None);
    let (h, f) = (HIDDEN as u64, EXPERT_FFN as u64);
    w.tensor(
        "blk.1.ffn_gate.0.weight",
        &[h, f],
        ty,
        vec![0; HIDDEN * EXPERT_FFN * 4],
    );
    let msg = open_err(&w, "legacy");
    assert!(
        msg.contains("stores its experts one tensor each") && msg.contains("ffn_gate_exps"),
        "{msg}"
    );

    // Shared-expert tensors the metadata does not declare, and a gate on them.
    let (mut w, _) = build(ty, 2, None, None);
    w.metadata("llama.expert_shared_count", Value::U32(0))
        .metadata("llama.expert_shared_feed_forward_length", Value::U32(0));
    let msg = open_err(&w, "undeclared-shared");
    assert!(
        msg.contains(
            "blk.1.ffn_gate_shexp.weight is present but the metadata declares no shared experts"
        ),
        "{msg}"
    );
    let (mut w, _) = build(ty, 2, None, None);
    w.tensor(
        "blk.1.ffn_gate_inp_shexp.weight",
        &[h],
        ty,
        vec![0; HIDDEN * 4],
    );
    let msg = open_err(&w, "gated-shared");
    assert!(
        msg.contains("blk.1.ffn_gate_inp_shexp.weight") && msg.contains("not supported"),
        "{msg}"
    );

    // Keys: a later entry replaces the earlier one when parsed.
    for (key, value, want) in [
        (
            "llama.expert_used_count",
            Value::U32(9),
            "llama.expert_used_count is 9; it must be between 1 and llama.expert_count 8",
        ),
        (
            "llama.expert_used_count",
            Value::U32(0),
            "llama.expert_used_count is 0",
        ),
        (
            "llama.expert_gating_func",
            Value::U32(2),
            "llama.expert_gating_func is U32(2); only 1 (softmax",
        ),
        (
            "llama.expert_weights_norm",
            Value::Bool(false),
            "llama.expert_weights_norm is Bool(false); only true",
        ),
        (
            "llama.leading_dense_block_count",
            Value::U32(4),
            "llama.leading_dense_block_count is 4, more than the 3 layers",
        ),
    ] {
        let (mut w, _) = build(ty, 2, None, None);
        w.metadata(key, value);
        let msg = open_err(&w, "key");
        assert!(msg.contains(want), "{key}: {msg}");
    }
}

#[test]
fn mixture_of_experts_safetensors_models_are_refused_naming_the_field() {
    for (config, want) in [
        (
            serde_json::json!({"model_type": "mixtral", "num_local_experts": 8}),
            "field num_local_experts is 8",
        ),
        (
            serde_json::json!({"model_type": "qwen2_moe", "num_experts": 60}),
            "field num_experts is 60",
        ),
        (
            serde_json::json!({"model_type": "llama", "n_routed_experts": 4}),
            "field n_routed_experts is 4",
        ),
        (
            serde_json::json!({"model_type": "qwen3_moe"}),
            "field model_type is \"qwen3_moe\"",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        std::fs::write(dir.path().join("model.safetensors"), b"").unwrap();
        let e = Llama::open(dir.path(), Shard::SINGLE)
            .err()
            .expect("refused");
        let msg = format!("{e:#}");
        assert!(
            msg.contains("config.json")
                && msg.contains(want)
                && msg.contains("mixture-of-experts safetensors models are not supported yet")
                && msg.contains("convert_hf_to_gguf.py"),
            "{msg}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// `tessera-worker local` over the real TCP rank group.

/// Start `local --tp TP` on `model` and wait until its API is ready.
fn start_local(model: &std::path::Path, tp: usize) -> (Proc, u16) {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_tessera-worker"))
        .arg("local")
        .arg("--model")
        .arg(model)
        .args(["--tp", &tp.to_string(), "--port", &port.to_string()])
        .args(["--threads", "1"])
        .env("RUST_LOG", "warn")
        .env("TESSERA_SERVED_MODEL_NAME", "moe")
        .env("TESSERA_STALL_TIMEOUT_SECS", "3")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut p = Proc(child);
    let t = Instant::now();
    while http(port, "GET", "/readyz", None).map(|r| r.0) != Some(200) {
        assert!(
            p.0.try_wait().unwrap().is_none(),
            "local --tp {tp} exited before it was ready"
        );
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "local --tp {tp} not ready"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (p, port)
}

/// Greedy text for a fixed prompt.
fn complete(port: u16) -> String {
    let body = serde_json::json!({
        "model": "moe", "prompt": "mixture of experts", "max_tokens": 12, "temperature": 0
    })
    .to_string();
    let (status, body) = http(port, "POST", "/v1/completions", Some(&body)).unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 12, "{body}");
    v["choices"][0]["text"].as_str().unwrap().to_owned()
}

#[test]
fn local_tp2_generates_the_text_of_one_rank() {
    // F32: the two layouts' logits differ by rounding only (1e-7), far from any greedy tie.
    let (w, _) = build(GgmlType::F32, 21, None, None);
    let path = write(&w, "local");
    let (p1, port1) = start_local(&path, 1);
    let want = complete(port1);
    drop(p1);
    assert!(!want.is_empty());
    let (p2, port2) = start_local(&path, 2);
    // Rank 0 runs experts 0..4, rank 1 experts 4..8; the TCP all-reduce sums their outputs.
    assert_eq!(complete(port2), want, "TP=2 gives TP=1's greedy text");
    drop(p2);

    // The launcher checks the split before starting any rank.
    let out = Command::new(env!("CARGO_BIN_EXE_tessera-worker"))
        .arg("local")
        .arg("--model")
        .arg(&path)
        .args(["--tp", "3", "--port", "1"])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--tp 3") && err.contains("must divide the model's 8 routed experts"),
        "{err}"
    );
}
