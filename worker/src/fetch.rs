//! Model downloads: one file resumed across interruptions and restarts and checked against its
//! SHA-256 ([`download`]), or a Hugging Face model directory fetched file by file
//! ([`fetch_model`]). `tessera-worker serve` downloads the Tessera engine's model itself;
//! `tessera-worker fetch` is the init container that fills the model cache of vLLM and SGLang
//! pods (and of any pod whose model URI is a directory) before the engine starts.
//!
//! A directory URI ends in `/` (for example a Hugging Face repository's `resolve/REVISION/`
//! path, or any static server): HTTP cannot list a directory, so the files are the ones a
//! Hugging Face model directory holds by convention: `config.json`, the tokenizer files the
//! server has, and the weights named by `model.safetensors.index.json` (or the single
//! `model.safetensors`). A marker file written last makes a restarted init container skip the
//! whole fetch; a file cut short is resumed.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sha2::Digest;

/// The URL without its query (which may hold a signature) for the log.
fn display_url(url: &str) -> &str {
    url.split(['?', '#']).next().unwrap_or(url)
}

/// SHA-256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("reading {}", path.display()))?;
    Ok(crate::hex(&h.finalize()))
}

/// An error that retrying will not fix.
#[derive(Debug)]
struct Fatal(String);

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Fatal {}

/// The server has no such file (HTTP 404 or 410): fatal for a required file, a skip for an
/// optional one of a model directory.
#[derive(Debug)]
pub struct Missing(pub String);

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Missing {}

/// What the URI and the checksum are called where they came from, for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Names {
    pub uri: &'static str,
    pub sha256: &'static str,
}

impl Names {
    /// `tessera-worker serve`'s environment.
    pub const SERVE: Names = Names {
        uri: "TESSERA_MODEL_URI",
        sha256: "TESSERA_MODEL_SHA256",
    };
    /// `tessera-worker fetch`'s flags.
    pub const FETCH: Names = Names {
        uri: "--uri",
        sha256: "--sha256",
    };
}

/// How a model download waits and retries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DownloadOptions {
    /// A read that brings no byte for this long breaks the connection (then the download
    /// resumes). There is no deadline on the whole body: a 100 GB model takes as long as it takes.
    pub idle_timeout: Duration,
    /// Interruptions in a row without progress before giving up; any progress resets the count.
    pub max_failures: u32,
    /// First wait before resuming; doubles with each interruption in a row (up to 32x).
    pub backoff: Duration,
    /// Names of the URI and checksum settings in error messages.
    pub names: Names,
}

impl Default for DownloadOptions {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(60),
            max_failures: 8,
            backoff: Duration::from_millis(500),
            names: Names::SERVE,
        }
    }
}

/// Download `url` to `dest` once: into `DEST.partial`, resuming it with a Range request after an
/// interruption (and across restarts), logging progress, checking the SHA-256 when given, and
/// renaming it to `dest` only when complete and verified. With [`DownloadOptions::default`].
pub fn download(url: &str, dest: &Path, sha256: Option<&str>) -> anyhow::Result<()> {
    download_with(url, dest, sha256, DownloadOptions::default())
}

/// [`download`] with explicit timeouts and retry budget.
pub fn download_with(
    url: &str,
    dest: &Path,
    sha256: Option<&str>,
    opts: DownloadOptions,
) -> anyhow::Result<()> {
    let name = dest
        .file_name()
        .with_context(|| format!("{} has no file name", dest.display()))?;
    if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut partial_name = name.to_owned();
    partial_name.push(".partial");
    let partial = dest.with_file_name(partial_name);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        // An idle timeout per read, not a deadline on the whole body (ureq's recv_body budget
        // is total: with 60 s, every download longer than a minute was cut, and after eight
        // cuts it failed).
        .timeout_recv_body(None)
        .timeout_per_read(Some(opts.idle_timeout))
        .http_status_as_error(false)
        .build()
        .into();
    let started = Instant::now();
    let mut failures = 0u32;
    let size_of = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    loop {
        let before = size_of(&partial);
        let result = get_once(&agent, url, &partial);
        if size_of(&partial) > before {
            // Progress: only interruptions in a row without any count against the budget.
            failures = 0;
        }
        match result {
            Ok(()) => break,
            Err(e) if e.is::<Fatal>() || e.is::<Missing>() || failures >= opts.max_failures => {
                return Err(e.context(format!(
                    "downloading the model from {} ({})",
                    display_url(url),
                    opts.names.uri
                )));
            }
            Err(e) => {
                failures += 1;
                let wait = opts.backoff * (1u32 << failures.min(5));
                tracing::warn!(
                    "download of {} interrupted ({e:#}); resuming in {:.1} s (attempt {})",
                    display_url(url),
                    wait.as_secs_f64(),
                    failures + 1
                );
                std::thread::sleep(wait);
            }
        }
    }
    let size = std::fs::metadata(&partial)?.len();
    if let Some(want) = sha256 {
        let got = sha256_file(&partial)?;
        if !got.eq_ignore_ascii_case(want) {
            let _ = std::fs::remove_file(&partial);
            bail!(
                "the model downloaded from {} has sha256 {got}, but {} is {want}: the file is corrupt or the checksum is wrong; the download was deleted, fix the checksum (or the URI) and restart",
                display_url(url),
                opts.names.sha256
            );
        }
        tracing::info!("sha256 {got} verified");
    }
    std::fs::rename(&partial, dest)
        .with_context(|| format!("moving the download to {}", dest.display()))?;
    tracing::info!(
        "downloaded {} ({:.1} MiB) to {} in {:.1} s",
        display_url(url),
        size as f64 / 1048576.0,
        dest.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// One GET, appending to `partial` from where it ends.
fn get_once(agent: &ureq::Agent, url: &str, partial: &Path) -> anyhow::Result<()> {
    let have = std::fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
    let mut req = agent.get(url);
    if have > 0 {
        req = req.header("Range", format!("bytes={have}-"));
    }
    let mut resp = req.call()?;
    let status = resp.status().as_u16();
    let length = resp.body().content_length();
    let (mut file, start) = match status {
        206 => {
            let range = resp
                .headers()
                .get("content-range")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !range.starts_with(&format!("bytes {have}-")) {
                // Not the range asked for: start over.
                let _ = std::fs::remove_file(partial);
                bail!("the server answered a resume at {have} with Content-Range {range:?}");
            }
            (OpenOptions::new().append(true).open(partial)?, have)
        }
        200 => (File::create(partial)?, 0),
        416 if have > 0 => return Ok(()),
        408 | 429 | 500..=599 => bail!("HTTP {status}"),
        404 | 410 => bail!(Missing(format!("HTTP {status} for {}", display_url(url)))),
        _ => bail!(Fatal(format!("HTTP {status} for {}", display_url(url)))),
    };
    let total = length.map(|l| l + start);
    if start > 0 {
        tracing::info!(
            "resuming the download of {} at {:.1} MiB",
            display_url(url),
            start as f64 / 1048576.0
        );
    } else {
        tracing::info!(
            "downloading {} ({}) to {}",
            display_url(url),
            total.map_or("size unknown".into(), |t| format!(
                "{:.1} MiB",
                t as f64 / 1048576.0
            )),
            partial.display()
        );
    }
    let mut reader = resp.body_mut().as_reader();
    let mut buf = vec![0u8; 1 << 20];
    let (mut done, t0) = (start, Instant::now());
    let mut last_log = Instant::now();
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n])?;
        done += n as u64;
        if last_log.elapsed() >= Duration::from_secs(5) {
            last_log = Instant::now();
            let rate = (done - start) as f64 / 1048576.0 / t0.elapsed().as_secs_f64().max(1e-3);
            match total {
                Some(t) => tracing::info!(
                    "downloading the model: {:.1} of {:.1} MiB ({:.0} %), {rate:.1} MiB/s",
                    done as f64 / 1048576.0,
                    t as f64 / 1048576.0,
                    100.0 * done as f64 / t.max(1) as f64
                ),
                None => tracing::info!(
                    "downloading the model: {:.1} MiB, {rate:.1} MiB/s",
                    done as f64 / 1048576.0
                ),
            }
        }
    }
    file.sync_all()?;
    if let Some(t) = total
        && done != t
    {
        bail!("the connection ended at {done} of {t} bytes");
    }
    Ok(())
}

/// Files of a model directory fetched when the server has them (the tokenizer and generation
/// settings the engines read); `config.json` and the weights are required.
pub const DIRECTORY_OPTIONAL: &[&str] = &[
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
];

/// Files of which a model directory needs at least one for the engines to tokenise.
const TOKENIZER_FILES: &[&str] = &["tokenizer.json", "tokenizer.model", "vocab.json"];

/// Written into a fetched directory last: its presence means the fetch is complete.
pub const COMPLETE_MARKER: &str = ".tessera-fetched";

/// Whether a model file already on disk may be used: always without a checksum, else only when
/// its SHA-256 matches (a file from an earlier, different or corrupted download must not be
/// served).
pub fn existing_matches(path: &Path, sha256: Option<&str>) -> anyhow::Result<bool> {
    let Some(want) = sha256 else { return Ok(true) };
    if !path.is_file() {
        return Ok(true);
    }
    let got = sha256_file(path)?;
    if got.eq_ignore_ascii_case(want) {
        tracing::info!("sha256 {got} of the model on disk verified");
        Ok(true)
    } else {
        tracing::warn!("the model on disk has sha256 {got}, expected {want}");
        Ok(false)
    }
}

/// Whether `uri` names a model directory (its path, before any query, ends in `/`).
pub fn is_directory_uri(uri: &str) -> bool {
    uri.split(['?', '#']).next().unwrap_or(uri).ends_with('/')
}

/// `base` (a directory URI ending in `/`, maybe with a query such as a signature) joined with
/// `file`, the query kept at the end.
fn join_uri(base: &str, file: &str) -> String {
    match base.split_once('?') {
        Some((path, query)) => format!("{path}{file}?{query}"),
        None => format!("{base}{file}"),
    }
}

/// What [`fetch_model`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Fetched {
    /// Files downloaded now (relative to the destination).
    pub downloaded: Vec<String>,
    /// Optional files the server does not have.
    pub absent: Vec<String>,
    /// True when everything was already there (nothing was requested).
    pub already_there: bool,
}

/// Fetch the model at `uri` to `dest`: a file (resumed, checked against `sha256` when given; a
/// file already there is used only when it matches) or, for a URI ending in `/`, a Hugging Face
/// model directory (see the module docs; `sha256` is refused there: it names one file).
pub fn fetch_model(
    uri: &str,
    dest: &Path,
    sha256: Option<&str>,
    opts: DownloadOptions,
) -> anyhow::Result<Fetched> {
    if !(uri.starts_with("http://") || uri.starts_with("https://")) {
        bail!(
            "{}={:?}: only http:// and https:// URIs are fetched; give the model's URL (ending in / for a model directory)",
            opts.names.uri,
            display_url(uri)
        );
    }
    if is_directory_uri(uri) {
        if sha256.is_some() {
            bail!(
                "{} names the checksum of one file, but {}={:?} is a model directory (it ends in /): remove the checksum, or pin the directory by a revision in its URL",
                opts.names.sha256,
                opts.names.uri,
                display_url(uri)
            );
        }
        return fetch_directory(uri, dest, opts);
    }
    if dest.is_file() && !existing_matches(dest, sha256)? {
        tracing::warn!(
            path = %dest.display(),
            "the model downloaded before does not match {}; downloading it again",
            opts.names.sha256
        );
        std::fs::remove_file(dest).with_context(|| format!("removing {}", dest.display()))?;
    }
    if dest.is_file() {
        tracing::info!(path = %dest.display(), "using the model downloaded before");
        return Ok(Fetched {
            already_there: true,
            ..Fetched::default()
        });
    }
    download_with(uri, dest, sha256, opts)?;
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned());
    Ok(Fetched {
        downloaded: name.into_iter().collect(),
        ..Fetched::default()
    })
}

/// Whether `e` (or what it wraps) says the server has no such file.
fn is_missing(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<Missing>())
}

fn fetch_directory(uri: &str, dest: &Path, opts: DownloadOptions) -> anyhow::Result<Fetched> {
    let marker = dest.join(COMPLETE_MARKER);
    if marker.is_file() {
        tracing::info!(path = %dest.display(), "using the model directory fetched before");
        return Ok(Fetched {
            already_there: true,
            ..Fetched::default()
        });
    }
    std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    let mut done = Fetched::default();
    let get = |file: &str, done: &mut Fetched| -> anyhow::Result<()> {
        let path = dest.join(file);
        if !path.is_file() {
            download_with(&join_uri(uri, file), &path, None, opts)?;
            done.downloaded.push(file.to_owned());
        }
        Ok(())
    };
    get("config.json", &mut done).with_context(|| {
        format!(
            "{}={:?} is a model directory (it ends in /) and needs config.json",
            opts.names.uri,
            display_url(uri)
        )
    })?;
    for file in DIRECTORY_OPTIONAL {
        match get(file, &mut done) {
            Ok(()) => {}
            Err(e) if is_missing(&e) => done.absent.push((*file).to_owned()),
            Err(e) => return Err(e),
        }
    }
    if !TOKENIZER_FILES.iter().any(|f| dest.join(f).is_file()) {
        bail!(
            "{}={:?} has none of {}: the engines need the model's tokenizer; add it to the directory",
            opts.names.uri,
            display_url(uri),
            TOKENIZER_FILES.join(", ")
        );
    }
    let index = "model.safetensors.index.json";
    match get(index, &mut done) {
        Ok(()) => {
            for shard in shards_of_index(&dest.join(index))? {
                get(&shard, &mut done)?;
            }
        }
        Err(e) if is_missing(&e) => {
            done.absent.push(index.to_owned());
            get("model.safetensors", &mut done).with_context(|| {
                format!(
                    "{}={:?} has neither {index} nor model.safetensors: a Hugging Face model directory holds one of them",
                    opts.names.uri,
                    display_url(uri)
                )
            })?;
        }
        Err(e) => return Err(e),
    }
    let mut list = String::new();
    for entry in std::fs::read_dir(dest)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name != COMPLETE_MARKER {
                list.push_str(&format!("{name} {}\n", entry.metadata()?.len()));
            }
        }
    }
    std::fs::write(&marker, list).with_context(|| format!("writing {}", marker.display()))?;
    tracing::info!(
        path = %dest.display(),
        files = done.downloaded.len(),
        "model directory fetched"
    );
    Ok(done)
}

/// The weight files a `model.safetensors.index.json` names (its `weight_map` values), each once,
/// in order. A name must be a plain `*.safetensors` file name: an index cannot send a download
/// outside the destination.
pub fn shards_of_index(path: &Path) -> anyhow::Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{} has no weight_map object", path.display()))?;
    let mut shards: Vec<String> = Vec::new();
    for (tensor, file) in map {
        let file = file.as_str().with_context(|| {
            format!("{}: weight_map[{tensor:?}] is not a string", path.display())
        })?;
        let plain = !file.is_empty()
            && !file.contains(['/', '\\'])
            && file != ".."
            && !file.starts_with('.')
            && file.ends_with(".safetensors");
        if !plain {
            bail!(
                "{}: weight_map[{tensor:?}] = {file:?} is not a plain *.safetensors file name in the same directory",
                path.display()
            );
        }
        if !shards.iter().any(|s| s == file) {
            shards.push(file.to_owned());
        }
    }
    if shards.is_empty() {
        bail!("{}: weight_map names no file", path.display());
    }
    Ok(shards)
}

/// `tessera-worker fetch`: the model at `uri` into `dest`, then a one-line summary on stdout.
pub fn run(uri: &str, dest: &Path, sha256: Option<&str>) -> anyhow::Result<()> {
    let opts = DownloadOptions {
        names: Names::FETCH,
        ..DownloadOptions::default()
    };
    let t = Instant::now();
    let done = fetch_model(uri, dest, sha256, opts)?;
    if done.already_there {
        println!("{} is already there; nothing fetched", dest.display());
    } else {
        println!(
            "fetched {} file(s) to {} in {:.1} s{}",
            done.downloaded.len(),
            dest.display(),
            t.elapsed().as_secs_f64(),
            if done.absent.is_empty() {
                String::new()
            } else {
                format!(" (not on the server: {})", done.absent.join(", "))
            }
        );
    }
    Ok(())
}
