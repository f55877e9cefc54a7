//! The Llama decoder on the real test model (SmolLM2-135M-Instruct, Q4_1): the France question,
//! logits against llama.cpp's, determinism, the KV-cache budget.

mod common;

use tessera_worker::engine::{Engine, FinishReason, GenerateParams, SamplingParams};
use tessera_worker::model::llama::Logits;
use tessera_worker::tokenizer::Message;

fn engine() -> &'static Engine {
    static E: std::sync::OnceLock<Engine> = std::sync::OnceLock::new();
    E.get_or_init(|| Engine::open(&common::model_path(), 2).expect("the test model loads"))
}

fn france() -> Vec<u32> {
    engine()
        .chat_prompt(&[Message::new("user", "What is the capital of France?")])
        .unwrap()
}

fn greedy(max_tokens: usize) -> GenerateParams {
    GenerateParams {
        max_tokens,
        ..Default::default()
    }
}

#[test]
fn the_capital_of_france_is_paris() {
    let g = engine().generate(&france(), &greedy(24), |_| {}).unwrap();
    assert!(g.text.contains("Paris"), "{:?}", g.text);
    // llama.cpp's greedy answer to the same prompt, word for word.
    assert_eq!(g.text, "The capital of France is Paris.");
    assert_eq!(g.finish_reason, FinishReason::Stop);
    assert_eq!(g.usage.prompt_tokens, 16);
    assert_eq!(g.usage.completion_tokens, g.tokens.len());

    // With ignore_eos the same prompt runs on to max_tokens, past the end-of-turn token.
    let p = GenerateParams {
        ignore_eos: true,
        ..greedy(24)
    };
    let g2 = engine().generate(&france(), &p, |_| {}).unwrap();
    assert_eq!(g2.finish_reason, FinishReason::Length);
    assert_eq!(g2.tokens.len(), 24);
    assert_eq!(g2.tokens[..g.tokens.len()], g.tokens[..]);
    assert!(g2.text.starts_with(&g.text), "{:?}", g2.text);
}

#[test]
fn logits_match_llama_cpp() {
    // llama.cpp's ten largest last-token logits for the France prompt: (id, logit).
    const TOP: [(usize, f32); 10] = [
        (504, 27.815655),
        (60, 26.177788),
        (38634, 26.051735),
        (15319, 25.965073),
        (7026, 25.115282),
        (33488, 24.305248),
        (51, 24.06556),
        (50, 24.023098),
        (54, 23.761192),
        (57, 23.462246),
    ];
    let e = engine();
    let prompt = france();
    let mut cache = e.model.new_cache(64 << 20).unwrap();
    let logits = e
        .model
        .forward(
            &e.pool,
            e.collective.as_ref(),
            &mut cache,
            &prompt,
            Logits::Last,
        )
        .unwrap();
    assert_eq!(logits.len(), 49152);
    let argmax = tessera_worker::engine::sampling::argmax(&logits);
    assert_eq!(argmax, 504);
    let worst = TOP
        .iter()
        .map(|&(id, v)| (logits[id] - v).abs())
        .fold(0f32, f32::max);
    eprintln!("largest difference from llama.cpp over its top 10: {worst}");
    // Both quantise activations to 8 bits per 32-element block, with different rounding of
    // the scales (ggml keeps them in f16): logits near 25 agree to a few tenths.
    assert!(worst < 0.5, "largest difference {worst}");
}

#[test]
fn greedy_generation_is_deterministic_and_seeded_sampling_too() {
    let e = engine();
    let prompt = e.tokenizer.encode("Once upon a time", false);
    let a = e.generate(&prompt, &greedy(8), |_| {}).unwrap();
    let b = e.generate(&prompt, &greedy(8), |_| {}).unwrap();
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(a.finish_reason, FinishReason::Length);
    assert_eq!(a.usage.completion_tokens, 8);
    let sampled = |seed| {
        let p = GenerateParams {
            max_tokens: 8,
            sampling: SamplingParams {
                temperature: 0.8,
                top_k: 40,
                top_p: 0.95,
                seed: Some(seed),
                ..Default::default()
            },
            ..Default::default()
        };
        e.generate(&prompt, &p, |_| {}).unwrap().tokens
    };
    assert_eq!(sampled(3), sampled(3));
}

#[test]
fn stop_sequences_and_streaming() {
    let e = engine();
    let mut pieces = Vec::new();
    let p = GenerateParams {
        stop: vec![" Paris".into()],
        ..greedy(24)
    };
    let g = e
        .generate(&france(), &p, |s| pieces.push(s.to_owned()))
        .unwrap();
    assert_eq!(g.text, "The capital of France is");
    assert_eq!(pieces.concat(), g.text);
    assert_eq!(g.finish_reason, FinishReason::Stop);
}

#[test]
fn the_kv_cache_budget_is_enforced() {
    let e = engine();
    // 30 layers x 3 KV heads x 64 x 2 (K and V) x 4 bytes = 46080 bytes per token.
    let per_token = 46080;
    let p = GenerateParams {
        kv_budget_bytes: per_token * 8,
        ..greedy(100)
    };
    let err = e.generate(&france(), &p, |_| {}).unwrap_err();
    assert!(format!("{err:#}").contains("KV cache"), "{err:#}");
    // A budget that holds the prompt and a few tokens ends the generation with "length".
    let p = GenerateParams {
        kv_budget_bytes: per_token * 20,
        ..greedy(100)
    };
    let prompt = e.tokenizer.encode("Once upon a time", false);
    let g = e.generate(&prompt, &p, |_| {}).unwrap();
    assert_eq!(g.finish_reason, FinishReason::Length);
    assert!(g.usage.total_tokens() <= 21, "{:?}", g.usage);
}

#[test]
fn weights_are_borrowed_from_the_map() {
    let (total, owned) = engine().model.weight_bytes();
    assert_eq!(owned, 0);
    assert!(total > 90 << 20, "{total}");
}

/// Batched decode on the real model: three prompts of different lengths prefilled in one
/// batched pass, then batched greedy decode steps, give every sequence's logits bit for bit
/// (tolerance zero: each row is computed as in a pass of its sequence alone).
#[test]
fn a_batched_forward_gives_each_sequences_logits_on_the_real_model() {
    use tessera_worker::model::llama::{Input, Output};
    let e = engine();
    let (model, pool, coll) = (&e.model, &e.pool, e.collective.as_ref());
    let argmax = |v: &[f32]| (0..v.len()).max_by(|a, b| v[*a].total_cmp(&v[*b])).unwrap() as u32;
    let prompts = [
        france(),
        e.chat_prompt(&[Message::new("user", "Name three colours.")])
            .unwrap(),
        vec![504, 3575, 282],
    ];
    const STEPS: usize = 6;
    let mut want = Vec::new();
    for p in &prompts {
        let mut cache = model.new_cache(64 << 20).unwrap();
        let mut logits = vec![
            model
                .forward(pool, coll, &mut cache, p, Logits::Last)
                .unwrap(),
        ];
        for _ in 0..STEPS {
            let next = argmax(logits.last().unwrap());
            logits.push(
                model
                    .forward(pool, coll, &mut cache, &[next], Logits::Last)
                    .unwrap(),
            );
        }
        want.push(logits);
    }
    let vocab = model.config.vocab;
    let mut caches: Vec<_> = (0..3).map(|_| model.new_cache(64 << 20).unwrap()).collect();
    let mut got: Vec<Vec<Vec<f32>>> = vec![Vec::new(); 3];
    let mut rows: Vec<Vec<u32>> = prompts.to_vec();
    for _ in 0..=STEPS {
        let lens: Vec<usize> = rows.iter().map(Vec::len).collect();
        let tokens: Vec<u32> = rows.concat();
        let mut refs: Vec<&mut _> = caches.iter_mut().collect();
        let out = model
            .forward_batch(
                pool,
                coll,
                &mut refs,
                &lens,
                Input::Tokens(&tokens),
                Output::Logits(Logits::Last),
            )
            .unwrap();
        for (s, l) in out.chunks_exact(vocab).enumerate() {
            got[s].push(l.to_vec());
            rows[s] = vec![argmax(l)];
        }
    }
    for (s, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(g == w, "sequence {s}: batched logits differ from its own");
    }
}
