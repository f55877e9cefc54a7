//! Measurement behind `scripts/bench-tokenizer.sh` (run it rather than this directly).
//!
//! `bench_tokenizer MODEL.gguf RUNS FILE...`: builds the model's tokenizer from its GGUF metadata
//! and tokenises each file's text `RUNS` times (special tokens parsed, as the OpenAI endpoints
//! do) on the calling thread, printing one JSON line per file: its bytes, the token count and
//! the best and median seconds.

use std::path::PathBuf;
use std::time::Instant;

use tessera_worker::model::MappedGguf;
use tessera_worker::tokenizer::Tokenizer;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(
        args.len() >= 3,
        "usage: bench_tokenizer MODEL.gguf RUNS FILE..."
    );
    let model = PathBuf::from(&args[0]);
    let runs: usize = args[1].parse()?;
    let file = MappedGguf::open(&model)?;
    let tokenizer = Tokenizer::from_gguf(&file.gguf)?;
    for path in &args[2..] {
        let text = std::fs::read_to_string(path)?;
        let mut secs = Vec::with_capacity(runs);
        let mut tokens = 0;
        for _ in 0..runs.max(1) {
            let t = Instant::now();
            let ids = tokenizer.encode(&text, true);
            secs.push(t.elapsed().as_secs_f64());
            tokens = ids.len();
        }
        secs.sort_by(f64::total_cmp);
        println!(
            "{{\"file\":{:?},\"bytes\":{},\"tokens\":{},\"best_s\":{:.4},\"median_s\":{:.4}}}",
            path,
            text.len(),
            tokens,
            secs[0],
            secs[secs.len() / 2]
        );
    }
    Ok(())
}
