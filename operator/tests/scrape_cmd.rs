//! `tessera-operator scrape` against a leader on loopback that answers like vLLM: the engine's
//! series are read, tokens/s is the rate between the two scrapes, and the decision follows.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use tessera_operator::autoscale::decide::Reason;
use tessera_operator::scrape_cmd::{ScrapeArgs, run};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DEPLOYMENT: &str = r#"
apiVersion: tessera.dev/v1alpha1
kind: ModelDeployment
metadata: {name: smollm2-vllm, namespace: demo}
spec:
  model:
    uri: pvc://models/smollm2
    architecture: {parameters: 134515008, layers: 30, hiddenSize: 576, attentionHeads: 9,
      kvHeads: 3, intermediateSize: 1536, vocabSize: 49152, contextLength: 8192,
      bytesPerParameter: 4}
  engine: {name: vllm}
  autoscaling: {enabled: true, minReplicas: 1, maxReplicas: 4, metric: queueDepth, target: 2,
    scaleUpStabilizationSeconds: 0}
"#;

/// Serve `/metrics` like vLLM: 5 waiting and 3 running; the token counter grows by 50 per scrape.
async fn fake_vllm() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let scrapes = Arc::new(AtomicU32::new(0));
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let n = scrapes.fetch_add(1, Ordering::SeqCst);
            let mut buf = [0u8; 2048];
            let _ = s.read(&mut buf).await;
            let body = format!(
                "vllm:num_requests_waiting{{engine=\"0\",model_name=\"m\"}} 5.0\n\
                 vllm:num_requests_running{{engine=\"0\",model_name=\"m\"}} 3.0\n\
                 vllm:kv_cache_usage_perc{{engine=\"0\",model_name=\"m\"}} 0.25\n\
                 vllm:generation_tokens_total{{engine=\"0\",model_name=\"m\"}} {}\n",
                1000 + 50 * n
            );
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
        }
    });
    addr
}

#[tokio::test]
async fn scrape_reads_the_engines_series_and_decides() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("md.yaml");
    std::fs::write(&file, DEPLOYMENT).unwrap();
    let leader = fake_vllm().await;
    let report = run(&ScrapeArgs {
        file,
        leader,
        replicas: 1,
        interval_seconds: 0.5,
        timeout_seconds: 5.0,
    })
    .await
    .expect("scrape");
    assert_eq!(report.engine, "vllm");
    assert_eq!(report.metrics.waiting, Some(5.0));
    assert_eq!(report.metrics.running, Some(3.0));
    assert_eq!(report.metrics.kv_cache_utilization, Some(0.25));
    assert_eq!(report.metrics.generated_tokens_total, Some(1050.0));
    let tps = report.sample.tokens_per_second.expect("a rate");
    assert!((tps - 100.0).abs() < 1e-6, "{tps}");
    // 8 requests at a target of 2 per replica: 4 replicas, the maximum.
    assert_eq!(
        report.decision.reason,
        Reason::ScaleUp,
        "{}",
        report.decision.message
    );
    assert_eq!(report.decision.replicas, 4);
}

#[tokio::test]
async fn a_leader_that_does_not_answer_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("md.yaml");
    std::fs::write(&file, DEPLOYMENT).unwrap();
    // A port nothing listens on.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let leader = l.local_addr().unwrap();
    drop(l);
    let e = run(&ScrapeArgs {
        file,
        leader,
        replicas: 1,
        interval_seconds: 0.0,
        timeout_seconds: 1.0,
    })
    .await
    .expect_err("nothing listens");
    assert!(e.contains(&format!("http://{leader}/metrics")), "{e}");
}
