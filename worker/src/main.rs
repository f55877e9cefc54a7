use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use tessera_worker::cli::{Cli, Command};
use tessera_worker::telemetry::{Telemetry, fake::FakeTelemetry, nvml};
use tessera_worker::{agent, logging};

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init();
    match cli.command {
        Command::Telemetry { fake, labels } => telemetry(fake.as_deref(), labels),
        Command::Generate(args) => match generate(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Agent(args) => {
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: starting the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(agent::run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Serve => report(tessera_worker::serve::run()),
        Command::Fetch { uri, dest, sha256 } => {
            report(tessera_worker::fetch::run(&uri, &dest, sha256.as_deref()))
        }
        Command::Local {
            model,
            tp,
            pp,
            port,
            threads,
            device,
            prefill,
            decode,
        } => report(tessera_worker::local::run(
            &tessera_worker::local::LocalArgs {
                model,
                tp: tp as usize,
                pp: pp as usize,
                port,
                threads,
                device,
                disaggregated: (prefill.is_some() || decode.is_some())
                    .then(|| (prefill.unwrap_or(1) as usize, decode.unwrap_or(1) as usize)),
            },
        )),
    }
}

/// Log a failure (the message names what went wrong) and map it to the exit status.
fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            logging::write_termination_message(&format!("{e:#}"));
            if tessera_worker::dist::is_group_error(&e) {
                ExitCode::from(tessera_worker::dist::EXIT_GROUP_LOST as u8)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn telemetry(fake: Option<&std::path::Path>, labels: bool) -> ExitCode {
    let backend: Box<dyn Telemetry> = match fake {
        Some(path) => match FakeTelemetry::from_file(path) {
            Ok(t) => Box::new(t),
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::FAILURE;
            }
        },
        None => nvml::detect(),
    };
    let snapshot = backend.snapshot();
    let json = if labels {
        serde_json::to_string_pretty(&agent::node_labels(&snapshot))
    } else {
        serde_json::to_string_pretty(&snapshot)
    }
    .expect("snapshots serialise");
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{json}") {
        eprintln!("error: writing to stdout: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn generate(args: &tessera_worker::cli::GenerateArgs) -> anyhow::Result<()> {
    use tessera_worker::engine::{Engine, GenerateParams, SamplingParams};
    use tessera_worker::tokenizer::Message;

    #[cfg(feature = "cuda")]
    if args.device == tessera_worker::cuda::Device::Cuda {
        return tessera_worker::cuda::llama::generate_cli(args);
    }
    let t0 = std::time::Instant::now();
    let engine = Engine::open(&args.model, args.threads)?;
    let load = t0.elapsed();
    let prompt = if args.chat {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(Message::new("system", system));
        }
        messages.push(Message::new("user", &args.prompt));
        engine.chat_prompt(&messages)?
    } else {
        engine.tokenizer.encode(&args.prompt, false)
    };
    let params = GenerateParams {
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
            ..Default::default()
        },
        stop: args.stop.clone(),
        kv_budget_bytes: args.kv_cache_mib << 20,
        ignore_eos: args.ignore_eos,
    };
    let mut out = std::io::stdout().lock();
    let mut write_err = None;
    let g = engine.generate(&prompt, &params, |piece| {
        if write_err.is_none() {
            write_err = out
                .write_all(piece.as_bytes())
                .and_then(|()| out.flush())
                .err();
        }
    })?;
    writeln!(out)?;
    if let Some(e) = write_err {
        anyhow::bail!("writing to stdout: {e}");
    }
    eprintln!(
        "load {:.2} s; prompt {} tokens in {:.3} s ({:.1} tokens/s); generated {} tokens, {} decode steps in {:.3} s ({:.1} tokens/s); finish {}; {} threads, {}",
        load.as_secs_f64(),
        g.usage.prompt_tokens,
        g.prefill.as_secs_f64(),
        g.prefill_tokens_per_s(),
        g.usage.completion_tokens,
        g.decode_steps,
        g.decode.as_secs_f64(),
        g.decode_tokens_per_s(),
        g.finish_reason.as_str(),
        engine.pool.threads(),
        engine.pool.simd(),
    );
    Ok(())
}
