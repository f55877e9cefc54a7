//! `tessera-worker fetch` and [`fetch::fetch_model`]: model directories fetched file by file
//! from a real HTTP server (which answers 404 for what it lacks, honours Range, and can cut a
//! response short), resumed, refused when unsafe, and skipped once complete.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tessera_worker::fetch::{self, COMPLETE_MARKER, DownloadOptions, Names};

/// A static HTTP server over `files` (path -> body). Records every request line's path
/// (query included). Paths in `cut_once` have their first response cut after half the body.
struct Files {
    url: String,
    requests: Arc<Mutex<Vec<String>>>,
}

fn serve_files(files: BTreeMap<String, Vec<u8>>, cut_once: &[&str]) -> Files {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&requests);
    let mut cut: Vec<String> = cut_once.iter().map(|s| (*s).to_owned()).collect();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let Some((target, from)) = common::read_request_head(&s) else {
                continue;
            };
            seen.lock().unwrap().push(target.clone());
            let path = target.split('?').next().unwrap_or("").to_owned();
            let Some(data) = files.get(&path) else {
                let _ = s.write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                continue;
            };
            let body = &data[from..];
            let _ = s.write_all(common::range_head(from, data.len()).as_bytes());
            if let Some(i) = cut.iter().position(|c| *c == path) {
                cut.remove(i);
                let _ = s.write_all(&body[..body.len() / 2]);
            } else {
                let _ = s.write_all(body);
            }
        }
    });
    Files { url, requests }
}

fn quick() -> DownloadOptions {
    DownloadOptions {
        idle_timeout: Duration::from_secs(5),
        max_failures: 3,
        backoff: Duration::from_millis(5),
        names: Names::FETCH,
    }
}

fn bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A sharded Hugging Face directory: config, tokenizer, an index naming two shards.
fn sharded_model(prefix: &str) -> BTreeMap<String, Vec<u8>> {
    let index = serde_json::json!({
        "metadata": {"total_size": 300_000},
        "weight_map": {
            "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "model.layers.0.mlp.up_proj.weight": "model-00001-of-00002.safetensors",
            "lm_head.weight": "model-00002-of-00002.safetensors",
        }
    });
    BTreeMap::from([
        (
            format!("{prefix}config.json"),
            br#"{"model_type":"llama"}"#.to_vec(),
        ),
        (
            format!("{prefix}tokenizer.json"),
            br#"{"version":"1.0"}"#.to_vec(),
        ),
        (format!("{prefix}tokenizer_config.json"), b"{}".to_vec()),
        (
            format!("{prefix}model.safetensors.index.json"),
            serde_json::to_vec(&index).unwrap(),
        ),
        (
            format!("{prefix}model-00001-of-00002.safetensors"),
            bytes(200_000, 1),
        ),
        (
            format!("{prefix}model-00002-of-00002.safetensors"),
            bytes(100_000, 2),
        ),
    ])
}

#[test]
fn a_sharded_directory_is_fetched_resumed_and_then_left_alone() {
    let files = sharded_model("/org/m/resolve/abc123/");
    let server = serve_files(
        files.clone(),
        &["/org/m/resolve/abc123/model-00001-of-00002.safetensors"],
    );
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("model");
    // A signed URL: the query goes with every file.
    let uri = format!("{}/org/m/resolve/abc123/?sig=s3cret", server.url);
    let got = fetch::fetch_model(&uri, &dest, None, quick()).unwrap();
    for (path, body) in &files {
        let name = path.rsplit('/').next().unwrap();
        assert_eq!(&std::fs::read(dest.join(name)).unwrap(), body, "{name}");
    }
    assert!(!got.already_there);
    assert_eq!(got.downloaded.len(), files.len());
    for absent in [
        "generation_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
    ] {
        assert!(got.absent.iter().any(|a| a == absent), "{:?}", got.absent);
        assert!(!dest.join(absent).exists());
    }
    assert!(
        !got.absent
            .iter()
            .any(|a| a == "model.safetensors.index.json")
    );
    let reqs = server.requests.lock().unwrap().clone();
    assert!(reqs.iter().all(|r| r.ends_with("?sig=s3cret")), "{reqs:?}");
    // The cut shard was resumed, not started over; no partial file is left.
    let shard1 = "/org/m/resolve/abc123/model-00001-of-00002.safetensors?sig=s3cret";
    assert_eq!(reqs.iter().filter(|r| *r == shard1).count(), 2, "{reqs:?}");
    let leftovers: Vec<_> = std::fs::read_dir(&dest)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let marker = std::fs::read_to_string(dest.join(COMPLETE_MARKER)).unwrap();
    assert!(
        marker.contains("model-00002-of-00002.safetensors 100000"),
        "{marker}"
    );

    // A restarted init container finds the marker and asks the server for nothing.
    let before = server.requests.lock().unwrap().len();
    let again = fetch::fetch_model(&uri, &dest, None, quick()).unwrap();
    assert!(again.already_there);
    assert_eq!(server.requests.lock().unwrap().len(), before);
}

#[test]
fn an_interrupted_directory_fetch_asks_only_for_what_is_missing() {
    let files = sharded_model("/m/");
    let server = serve_files(files, &[]);
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("model");
    std::fs::create_dir_all(&dest).unwrap();
    // A first run got config.json and the first shard before it was killed (no marker).
    std::fs::write(dest.join("config.json"), br#"{"model_type":"llama"}"#).unwrap();
    std::fs::write(
        dest.join("model-00001-of-00002.safetensors"),
        bytes(200_000, 1),
    )
    .unwrap();
    let got = fetch::fetch_model(&format!("{}/m/", server.url), &dest, None, quick()).unwrap();
    let reqs = server.requests.lock().unwrap().clone();
    assert!(!reqs.iter().any(|r| r == "/m/config.json"), "{reqs:?}");
    assert!(
        !reqs.iter().any(|r| r.contains("00001")),
        "the shard on disk is not fetched again: {reqs:?}"
    );
    assert!(
        got.downloaded
            .iter()
            .any(|f| f == "model-00002-of-00002.safetensors")
    );
    assert!(dest.join(COMPLETE_MARKER).is_file());
}

#[test]
fn a_directory_without_an_index_uses_the_single_weights_file() {
    let files = BTreeMap::from([
        ("/d/config.json".to_owned(), b"{}".to_vec()),
        ("/d/tokenizer.model".to_owned(), bytes(1000, 7)),
        ("/d/model.safetensors".to_owned(), bytes(50_000, 3)),
    ]);
    let server = serve_files(files, &[]);
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("model");
    let got = fetch::fetch_model(&format!("{}/d/", server.url), &dest, None, quick()).unwrap();
    assert_eq!(
        std::fs::read(dest.join("model.safetensors")).unwrap(),
        bytes(50_000, 3)
    );
    assert!(
        got.absent
            .iter()
            .any(|a| a == "model.safetensors.index.json")
    );
}

#[test]
fn unsafe_or_incomplete_directories_are_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    // An index that names a file outside the directory: refused before anything is fetched
    // from it, nothing written outside the destination.
    let mut files = sharded_model("/x/");
    files.insert(
        "/x/model.safetensors.index.json".into(),
        br#"{"weight_map":{"w":"../../escape.safetensors"}}"#.to_vec(),
    );
    let server = serve_files(files, &[]);
    let dest = tmp.path().join("a/model");
    let e = fetch::fetch_model(&format!("{}/x/", server.url), &dest, None, quick())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("../../escape.safetensors") && e.contains("plain"),
        "{e}"
    );
    assert!(!tmp.path().join("escape.safetensors").exists());
    assert!(!dest.join(COMPLETE_MARKER).exists());

    // No tokenizer: the engines could not start; say which files were looked for.
    let files = BTreeMap::from([
        ("/y/config.json".to_owned(), b"{}".to_vec()),
        ("/y/model.safetensors".to_owned(), bytes(10, 3)),
    ]);
    let server = serve_files(files, &[]);
    let e = format!(
        "{:#}",
        fetch::fetch_model(
            &format!("{}/y/", server.url),
            &tmp.path().join("b"),
            None,
            quick()
        )
        .unwrap_err()
    );
    assert!(
        e.contains("tokenizer.json, tokenizer.model, vocab.json"),
        "{e}"
    );

    // No config.json: not a model directory.
    let server = serve_files(BTreeMap::new(), &[]);
    let e = format!(
        "{:#}",
        fetch::fetch_model(
            &format!("{}/z/", server.url),
            &tmp.path().join("c"),
            None,
            quick()
        )
        .unwrap_err()
    );
    assert!(e.contains("needs config.json") && e.contains("404"), "{e}");

    // Neither an index nor model.safetensors.
    let files = BTreeMap::from([
        ("/w/config.json".to_owned(), b"{}".to_vec()),
        ("/w/tokenizer.json".to_owned(), b"{}".to_vec()),
    ]);
    let server = serve_files(files, &[]);
    let e = format!(
        "{:#}",
        fetch::fetch_model(
            &format!("{}/w/", server.url),
            &tmp.path().join("d"),
            None,
            quick()
        )
        .unwrap_err()
    );
    assert!(
        e.contains("neither model.safetensors.index.json nor model.safetensors"),
        "{e}"
    );

    // A checksum names one file, not a directory; a URI that is not http(s) is refused.
    let e = fetch::fetch_model(
        "http://h/m/",
        &tmp.path().join("e"),
        Some(&"a".repeat(64)),
        quick(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("--sha256") && e.contains("model directory"),
        "{e}"
    );
    let e = fetch::fetch_model("s3://b/m.gguf", &tmp.path().join("f"), None, quick())
        .unwrap_err()
        .to_string();
    assert!(e.contains("--uri") && e.contains("http"), "{e}");
}

#[test]
fn a_missing_single_file_fails_at_once_naming_the_status() {
    let server = serve_files(BTreeMap::new(), &[]);
    let tmp = tempfile::tempdir().unwrap();
    let t = std::time::Instant::now();
    let e = format!(
        "{:#}",
        fetch::fetch_model(
            &format!("{}/m.gguf", server.url),
            &tmp.path().join("m.gguf"),
            None,
            quick()
        )
        .unwrap_err()
    );
    assert!(e.contains("HTTP 404") && e.contains("--uri"), "{e}");
    assert_eq!(
        server.requests.lock().unwrap().len(),
        1,
        "a 404 is not retried"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
}

/// The binary, as the init container runs it: a file with its checksum, then the same again
/// (nothing fetched), then a wrong checksum (exit status 1, the file replaced by nothing).
#[test]
fn the_fetch_command_downloads_verifies_and_skips() {
    let body = bytes(70_000, 9);
    let sha = {
        use sha2::Digest;
        let h = sha2::Sha256::digest(&body);
        h.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let server = serve_files(BTreeMap::from([("/m.gguf".to_owned(), body.clone())]), &[]);
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("cache/m.gguf");
    let run = |sha: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tessera-worker"))
            .args(["fetch", "--uri", &format!("{}/m.gguf", server.url)])
            .arg("--dest")
            .arg(&dest)
            .args(["--sha256", sha])
            .env_remove("TESSERA_MODEL_URI")
            .output()
            .unwrap()
    };
    let out = run(&sha);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("fetched 1 file(s)"),
        "{out:?}"
    );
    assert_eq!(std::fs::read(&dest).unwrap(), body);
    let out = run(&sha);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("already there"),
        "{out:?}"
    );
    assert_eq!(server.requests.lock().unwrap().len(), 1);

    let wrong = "0".repeat(64);
    let out = run(&wrong);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--sha256") && err.contains(&wrong), "{err}");
    assert!(!dest.exists());
}
