//! The node agent's exact API requests (scripted with tower-test): a GET of its node, then a
//! server-side apply under its own field manager, and no write when the node is up to date.

use http::{Method, Request, Response};
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use kube::client::Body;
use tessera_worker::agent::{self, FIELD_MANAGER};
use tessera_worker::telemetry::{Telemetry, fake::FakeTelemetry};

fn snapshot() -> tessera_worker::telemetry::Snapshot {
    let path =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/h800-hgx.json");
    FakeTelemetry::from_file(&path).expect("fixture").snapshot()
}

fn node_json(labels: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "h800-1", "labels": labels}
    }))
    .expect("json")
}

async fn body_bytes(req: Request<Body>) -> (http::request::Parts, Vec<u8>) {
    let (parts, body) = req.into_parts();
    let bytes = body.collect_bytes().await.expect("body");
    (parts, bytes.to_vec())
}

#[tokio::test]
async fn publishes_with_server_side_apply_under_its_own_manager() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let nodes: Api<Node> = Api::all(client);
    let s = snapshot();
    let server = tokio::spawn(async move {
        // 1. GET the node: it has GFD labels only.
        let (req, send) = handle.next_request().await.expect("GET");
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri().path(), "/api/v1/nodes/h800-1");
        send.send_response(
            Response::builder()
                .body(Body::from(node_json(
                    &serde_json::json!({"nvidia.com/gpu.product": "NVIDIA-H800"}),
                )))
                .expect("response"),
        );
        // 2. Server-side apply of exactly the agent's fields.
        let (req, send) = handle.next_request().await.expect("PATCH");
        let (parts, body) = body_bytes(req).await;
        assert_eq!(parts.method, Method::PATCH);
        assert_eq!(parts.uri.path(), "/api/v1/nodes/h800-1");
        let query = parts.uri.query().expect("query");
        assert!(
            query.contains(&format!("fieldManager={FIELD_MANAGER}")),
            "{query}"
        );
        assert!(query.contains("force=true"), "{query}");
        assert_eq!(
            parts.headers["content-type"],
            "application/apply-patch+yaml"
        );
        let applied: serde_json::Value = serde_json::from_slice(&body).expect("JSON body");
        assert_eq!(
            applied["metadata"]["labels"]["tessera.dev/nvlink.gbps"],
            "200"
        );
        assert_eq!(
            applied["metadata"]["labels"]["tessera.dev/nvlink.domains"],
            "0-7"
        );
        assert!(
            applied["metadata"]["labels"]
                .get("nvidia.com/gpu.product")
                .is_none()
        );
        assert!(
            applied["spec"].is_null(),
            "the agent owns labels and one annotation only"
        );
        send.send_response(
            Response::builder()
                .body(Body::from(body))
                .expect("response"),
        );
    });
    let wrote = agent::publish(&nodes, "h800-1", &s).await.expect("publish");
    assert!(wrote);
    server.await.expect("server script");
}

#[tokio::test]
async fn writes_nothing_when_the_node_is_up_to_date() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let nodes: Api<Node> = Api::all(client);
    let s = snapshot();
    let current = serde_json::to_vec(&agent::apply_body("h800-1", &s)).expect("json");
    let server = tokio::spawn(async move {
        let (req, send) = handle.next_request().await.expect("GET");
        assert_eq!(req.method(), Method::GET);
        send.send_response(
            Response::builder()
                .body(Body::from(current))
                .expect("response"),
        );
        // No further request: the mock would hang the client if it sent one, and the handle
        // sees the client dropped.
        assert!(handle.next_request().await.is_none(), "unexpected write");
    });
    let wrote = agent::publish(&nodes, "h800-1", &s).await.expect("publish");
    assert!(!wrote);
    drop(nodes);
    server.await.expect("server script");
}
