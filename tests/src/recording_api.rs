//! An in-memory Kubernetes API server behind a real `kube::Client` that records every call as
//! (API group, resource, verb, namespace, name): lists, watches (answered with an empty
//! stream, so watchers re-list), gets, creates, server-side applies (an apply that creates also
//! records `create`), replaces, deletes and subresource writes.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response};
use kube::client::Body;
use serde_json::{Value, json};

/// (API group, resource with subresource, verb, namespace or "", object name or "").
pub type Call = (String, String, String, String, String);

/// The API server's objects and the calls it saw.
#[derive(Default)]
pub struct FakeApi {
    /// Objects by `group/namespace/resource/name`.
    pub objects: BTreeMap<String, Value>,
    /// (group, resource, verb, namespace or "", object name or "").
    pub calls: BTreeSet<Call>,
    /// The last resourceVersion handed out.
    pub resource_version: u64,
}

fn conflict(message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
           "reason": "Conflict", "code": 409, "message": message})
}

fn list_kind(resource: &str) -> &'static str {
    match resource {
        "nodes" => "NodeList",
        "pods" => "PodList",
        "services" => "ServiceList",
        "deployments" => "DeploymentList",
        "networkpolicies" => "NetworkPolicyList",
        "modeldeployments" => "ModelDeploymentList",
        "leases" => "LeaseList",
        other => panic!("unexpected list of {other}"),
    }
}

impl FakeApi {
    /// Answer one request.
    pub fn handle(
        &mut self,
        method: &Method,
        path: &str,
        query: &str,
        body: &[u8],
    ) -> (u16, Value) {
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        // /api/v1/... or /apis/GROUP/VERSION/...
        let (group, rest) = match parts[0] {
            "api" => (String::new(), &parts[2..]),
            _ => (parts[1].to_owned(), &parts[3..]),
        };
        let (namespace, rest) = match rest.first() {
            Some(&"namespaces") if rest.len() > 2 => (rest[1].to_owned(), &rest[2..]),
            _ => (String::new(), rest),
        };
        let resource = rest[0].to_owned();
        let name = rest.get(1).map(|s| s.to_string()).unwrap_or_default();
        let sub = rest.get(2).map(|s| format!("/{s}")).unwrap_or_default();
        let key = format!("{group}/{namespace}/{resource}/{name}");
        let exists = self.objects.contains_key(&key);
        let watch = query
            .split('&')
            .any(|q| q == "watch=true" || q == "watch=1");
        let verb = match (method.clone(), name.is_empty()) {
            (Method::GET, true) if watch => "watch",
            (Method::GET, true) => "list",
            (Method::GET, false) => "get",
            (Method::POST, _) => "create",
            (Method::PUT, _) => "update",
            (Method::PATCH, _) => "patch",
            (Method::DELETE, _) => "delete",
            (m, _) => panic!("unexpected {m} {path}"),
        };
        let mut record = |verb: &str| {
            self.calls.insert((
                group.clone(),
                format!("{resource}{sub}"),
                verb.to_owned(),
                namespace.clone(),
                name.clone(),
            ))
        };
        record(verb);
        // An apply that creates the object needs create as well as patch.
        if verb == "patch" && sub.is_empty() && !exists {
            record("create");
        }
        match verb {
            "watch" => (200, Value::Null),
            "list" => {
                let prefix = format!("{group}/");
                let items: Vec<Value> = self
                    .objects
                    .iter()
                    .filter(|(k, _)| k.starts_with(&prefix))
                    .filter(|(k, _)| {
                        let p: Vec<&str> = k.split('/').collect();
                        p[2] == resource && (namespace.is_empty() || p[1] == namespace)
                    })
                    .map(|(_, v)| v.clone())
                    .collect();
                (
                    200,
                    json!({"apiVersion": "v1", "kind": list_kind(&resource),
                           "metadata": {"resourceVersion": "1"}, "items": items}),
                )
            }
            "get" => match self.objects.get(&key) {
                Some(v) => (200, v.clone()),
                None => (
                    404,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "reason": "NotFound", "code": 404, "message": "not found"}),
                ),
            },
            "delete" => {
                self.objects.remove(&key);
                (
                    200,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
                )
            }
            _ => {
                let mut v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                if resource == "events" {
                    return (201, v);
                }
                self.resource_version += 1;
                let rv = self.resource_version.to_string();
                // As unkind as the real thing: a create of an existing object and a replace
                // with a stale resourceVersion are refused.
                if verb == "create" {
                    let named = v["metadata"]["name"].as_str().unwrap_or_default();
                    if self
                        .objects
                        .contains_key(&format!("{group}/{namespace}/{resource}/{named}"))
                    {
                        return (
                            409,
                            json!({"kind": "Status", "apiVersion": "v1",
                            "status": "Failure", "reason": "AlreadyExists", "code": 409,
                            "message": "already exists"}),
                        );
                    }
                }
                if verb == "update"
                    && let (Some(want), Some(have)) = (
                        v["metadata"]["resourceVersion"].as_str(),
                        self.objects
                            .get(&key)
                            .and_then(|o| o["metadata"]["resourceVersion"].as_str()),
                    )
                    && want != have
                {
                    return (409, conflict("the object has been modified"));
                }
                if !sub.is_empty() {
                    // Subresources answer with the whole object.
                    let Some(mut whole) = self.objects.get(&key).cloned() else {
                        return (
                            404,
                            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                   "reason": "NotFound", "code": 404, "message": "not found"}),
                        );
                    };
                    if sub == "/status" {
                        whole["status"] = v["status"].clone();
                    }
                    whole["metadata"]["resourceVersion"] = json!(rv);
                    self.objects.insert(key.clone(), whole.clone());
                    if sub == "/scale" {
                        return (
                            200,
                            json!({"apiVersion": "autoscaling/v1", "kind": "Scale",
                                   "metadata": {"name": name, "namespace": namespace},
                                   "spec": {"replicas": v["spec"]["replicas"]}}),
                        );
                    }
                    return (200, whole);
                }
                v["metadata"]["resourceVersion"] = json!(rv);
                // A POST names the object in its body.
                let name = if name.is_empty() {
                    v["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned()
                } else {
                    name
                };
                v["metadata"]["name"] = json!(name);
                if !namespace.is_empty() {
                    v["metadata"]["namespace"] = json!(namespace);
                }
                let key = format!("{group}/{namespace}/{resource}/{name}");
                self.objects.insert(key, v.clone());
                (if exists { 200 } else { 201 }, v)
            }
        }
    }

    /// Store an object (no call recorded).
    pub fn put(&mut self, group: &str, namespace: &str, resource: &str, v: Value) {
        let name = v["metadata"]["name"].as_str().expect("name").to_owned();
        self.objects
            .insert(format!("{group}/{namespace}/{resource}/{name}"), v);
    }
}

/// A client whose every request the shared API server answers.
pub fn client(api: Arc<Mutex<FakeApi>>) -> kube::Client {
    client_from(move |method, path, query, body| {
        api.lock().expect("lock").handle(method, path, query, body)
    })
}

/// A `kube::Client` whose every request `handle(method, path, query, body)` answers with a
/// status code and a JSON body (`null`: an empty body, as a watch that ends at once).
pub fn client_from<F>(handle: F) -> kube::Client
where
    F: Fn(&Method, &str, &str, &[u8]) -> (u16, Value) + Clone + Send + Sync + 'static,
{
    let svc = tower::service_fn(move |req: Request<Body>| {
        let handle = handle.clone();
        async move {
            let (parts, body) = req.into_parts();
            let bytes = body.collect_bytes().await.expect("body");
            let (code, v) = handle(
                &parts.method,
                parts.uri.path(),
                parts.uri.query().unwrap_or_default(),
                &bytes,
            );
            let body = if v.is_null() {
                Body::empty()
            } else {
                Body::from(serde_json::to_vec(&v).expect("json"))
            };
            Ok::<_, Infallible>(
                Response::builder()
                    .status(code)
                    .body(body)
                    .expect("response"),
            )
        }
    });
    kube::Client::new(svc, "default")
}
