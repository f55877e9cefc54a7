//! `tessera-operator predict` end to end: the table, the JSON, the max-throughput concurrency,
//! and clear errors for an unknown GPU or an impossible layout.

use std::process::{Command, Output};

fn predict(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera-operator"))
        .arg("predict")
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("runs")
}

fn json(args: &[&str]) -> serde_json::Value {
    let out = predict(&[args, &["-o", "json"]].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

const MD: &[&str] = &["-f", "examples/deployments/llama-70b.yaml"];

#[test]
fn predicts_a_workload_as_a_table_and_as_json() {
    let args = [
        MD,
        &[
            "--gpu",
            "H100",
            "--tp",
            "4",
            "--input-tokens",
            "1000",
            "--output-tokens",
            "1000",
            "--concurrency",
            "32",
        ],
    ]
    .concat();
    let out = predict(&args);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "llama-70b on H100 TP=4 PP=1 (4 GPUs)",
        "time to first token",
        "inter-token latency",
        "output tokens/s per replica",
        "output tokens/s per GPU",
    ] {
        assert!(table.contains(want), "{want}: {table}");
    }
    let v = json(&args);
    let p = &v["prediction"];
    assert_eq!(p["batch"], 32);
    assert_eq!(p["fits"], true);
    let tps = p["outputTokensPerSecond"].as_f64().unwrap();
    let per_gpu = p["outputTokensPerSecondPerGpu"].as_f64().unwrap();
    assert!((tps / 4.0 - per_gpu).abs() < 1e-6);
    // 32 sequences, each one token per step: throughput is at most 32 / ITL.
    let itl = p["interTokenLatencySeconds"].as_f64().unwrap();
    assert!(tps <= 32.0 / itl + 1e-6);
    // The largest concurrency that fits serves more than 32.
    let max = json(&[&args[..args.len() - 2], &["--max-throughput"]].concat());
    assert!(max["prediction"]["batch"].as_u64().unwrap() > 32);
    assert!(max["prediction"]["outputTokensPerSecond"].as_f64().unwrap() > tps);
    // An FP8 KV cache holds twice the sequences.
    let fp8 = json(
        &[
            &args[..args.len() - 2],
            &["--max-throughput", "--kv-cache-dtype", "fp8"],
        ]
        .concat(),
    );
    let (b16, b8) = (
        max["prediction"]["maxBatch"].as_u64().unwrap(),
        fp8["prediction"]["maxBatch"].as_u64().unwrap(),
    );
    assert!(b8 >= 2 * b16 - 1 && b8 <= 2 * b16 + 1, "{b16} -> {b8}");
}

#[test]
fn unknown_gpus_and_impossible_layouts_are_explained() {
    let out = predict(
        &[
            MD,
            &[
                "--gpu",
                "X9000",
                "--input-tokens",
                "1",
                "--output-tokens",
                "1",
            ],
        ]
        .concat(),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--gpu X9000: not in the GPU catalog; known: A100"),
        "{err}"
    );
    let out = predict(
        &[
            MD,
            &[
                "--gpu",
                "H100",
                "--tp",
                "3",
                "--input-tokens",
                "1",
                "--output-tokens",
                "1",
            ],
        ]
        .concat(),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--tp 3: must divide the model's 64 attention heads"),
        "{err}"
    );
    // 70B BF16 does not fit one H100: said plainly.
    let out = predict(
        &[
            MD,
            &[
                "--gpu",
                "H100",
                "--input-tokens",
                "100",
                "--output-tokens",
                "100",
            ],
        ]
        .concat(),
    );
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("the weights alone do not fit"));
}

const DEEPSEEK: &[&str] = &["-f", "examples/deployments/deepseek-v3.yaml"];

#[test]
fn predicts_mixture_of_experts_layouts_with_the_all_to_all() {
    let shape = ["--input-tokens", "2000", "--output-tokens", "500"];
    let out = predict(
        &[
            DEEPSEEK,
            &[
                "--gpu",
                "H800",
                "--tp",
                "16",
                "--ep",
                "16",
                "--attention",
                "data",
            ],
            &shape,
            &["--concurrency", "256"],
        ]
        .concat(),
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "deepseek-v3 on H800 EP=16 DP-attention (16 GPUs)",
        "expert all-to-all",
        "us per MoE layer per decode step at 94 GB/s per GPU",
        "37.6 B of 671.0 B",
    ] {
        assert!(table.contains(want), "{want}: {table}");
    }
    // Expert parallelism with data-parallel attention holds more sequences than TP=8 x PP=2
    // (each GPU keeps only its own sequences' latent KV cache) and serves more per GPU.
    let ep = json(
        &[
            DEEPSEEK,
            &[
                "--gpu",
                "H800",
                "--tp",
                "16",
                "--ep",
                "16",
                "--attention",
                "data",
            ],
            &shape,
            &["--max-throughput"],
        ]
        .concat(),
    );
    let tp = json(
        &[
            DEEPSEEK,
            &["--gpu", "H800", "--tp", "8", "--pp", "2"],
            &shape,
            &["--max-throughput"],
        ]
        .concat(),
    );
    assert_eq!(ep["expertParallel"], 16);
    assert_eq!(ep["dataParallelAttention"], true);
    let max = |v: &serde_json::Value| v["prediction"]["maxBatch"].as_u64().unwrap();
    let per_gpu = |v: &serde_json::Value| {
        v["prediction"]["outputTokensPerSecondPerGpu"]
            .as_f64()
            .unwrap()
    };
    assert!(max(&ep) > 2 * max(&tp), "{ep} {tp}");
    assert!(per_gpu(&ep) > per_gpu(&tp), "{ep} {tp}");
    // Inside one node, the same layout on H800 is slower than on H100 (the cut NVLink).
    let node = |gpu: &str| {
        json(
            &[
                DEEPSEEK,
                &["--gpu", gpu, "--tp", "8", "--pp", "2", "--ep", "8"],
                &shape,
                &["--concurrency", "256"],
            ]
            .concat(),
        )
    };
    let (h800, h100) = (node("H800"), node("H100"));
    assert!(per_gpu(&h800) < per_gpu(&h100), "{h800} {h100}");
    assert!(
        h800["prediction"]["allToAllGbps"].as_f64().unwrap()
            < h100["prediction"]["allToAllGbps"].as_f64().unwrap()
    );
}

#[test]
fn impossible_expert_layouts_are_explained() {
    let shape = ["--input-tokens", "100", "--output-tokens", "100"];
    let err = |args: &[&str]| {
        let out = predict(&[args, &shape].concat());
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = err(&[DEEPSEEK, &["--gpu", "H800", "--tp", "8", "--ep", "16"]].concat());
    assert!(
        e.contains("--ep 16: the expert-parallel group is the stage's GPUs; use --ep 8"),
        "{e}"
    );
    let e = err(&[DEEPSEEK, &["--gpu", "H800", "--tp", "6", "--ep", "6"]].concat());
    assert!(
        e.contains("--ep 6: must divide the model's 256 experts"),
        "{e}"
    );
    let e = err(&[MD, &["--gpu", "H100", "--tp", "4", "--ep", "4"]].concat());
    assert!(
        e.contains("expert parallelism needs a mixture-of-experts model"),
        "{e}"
    );
    let e = err(&[
        DEEPSEEK,
        &["--gpu", "H800", "--tp", "8", "--attention", "data"],
    ]
    .concat());
    assert!(
        e.contains("--ep 1: the expert-parallel group is the stage's GPUs; use --ep 8"),
        "{e}"
    );
}
