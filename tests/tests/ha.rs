//! Two operator replicas with leader election against one (in-memory) API server: both become
//! ready once their caches are synced, exactly one leads, and only the leader writes.
//! (Readiness used to wait for leadership, so a second replica never became ready and
//! `helm upgrade` and `kubectl drain` hung on the operator's PodDisruptionBudget.)

use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use serde_json::json;
use tessera_operator::cli::{Cli, Command};
use tessera_operator::controller::run::run_with_client;
use tessera_tests::recording_api::{FakeApi, client};

fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    let code = out.split(' ').nth(1)?.parse().ok()?;
    Some((code, out))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_replica_is_ready_and_only_one_leads() {
    let api = Arc::new(Mutex::new(FakeApi::default()));
    api.lock().expect("lock").put(
        "",
        "",
        "nodes",
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "h100-1"},
               "status": {"allocatable": {"nvidia.com/gpu": "8"}}}),
    );
    let mut replicas = Vec::new();
    for identity in ["operator-a", "operator-b"] {
        let (health, metrics) = (free_addr(), free_addr());
        let argv = [
            "tessera-operator",
            "run",
            "--leader-elect",
            "--leader-identity",
            identity,
            "--lease-namespace",
            "tessera-system",
            "--health-addr",
            &health.to_string(),
            "--metrics-addr",
            &metrics.to_string(),
        ]
        .map(str::to_owned);
        let Command::Run(args) = Cli::try_parse_from(argv).expect("arguments").command else {
            panic!("run");
        };
        let task = tokio::spawn(run_with_client(client(api.clone()), args));
        replicas.push((identity, health, metrics, task));
    }
    // Both ready within 10 s.
    let mut ready = [false, false];
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        for (i, (_, health, _, _)) in replicas.iter().enumerate() {
            ready[i] = http_get(*health, "/readyz")
                .await
                .is_some_and(|(c, _)| c == 200);
        }
        if ready == [true, true] {
            break;
        }
    }
    assert_eq!(
        ready,
        [true, true],
        "both replicas ready with synced caches"
    );
    // Exactly one holds the Lease, and its metrics say so; the other's say 0.
    let holder = api
        .lock()
        .expect("lock")
        .objects
        .get("coordination.k8s.io/tessera-system/leases/tessera-operator")
        .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_owned))
        .expect("a leader holds the Lease");
    let mut leading = Vec::new();
    for (identity, _, metrics, _) in &replicas {
        let (_, body) = http_get(*metrics, "/metrics").await.expect("metrics");
        let line = body
            .lines()
            .find(|l| l.starts_with("tessera_operator_leader "))
            .expect("the leader gauge")
            .to_owned();
        if line.ends_with(" 1") {
            leading.push(identity.to_string());
        }
    }
    assert_eq!(leading, [holder], "one leader, the Lease's holder");
    for (_, _, _, task) in replicas {
        task.abort();
    }
}
