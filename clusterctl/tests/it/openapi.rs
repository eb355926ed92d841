//! `GET /v1/openapi.json`: a live scheduler serves an OpenAPI 3.1 document
//! that lists exactly the routes its router has, each reachable.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

use crate::cluster::Cluster;
use crate::security::{VIEWER_TOKEN, auth_config};

const METHODS: [&str; 7] = ["get", "post", "put", "delete", "patch", "head", "options"];

/// `(method, path)` of every `.route(...)` in the scheduler's router, read
/// from its source, so that a route added there without documentation
/// fails this test.
fn router_routes() -> BTreeSet<(String, String)> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../schedulerd/src/api/mod.rs");
    let text = std::fs::read_to_string(&source).unwrap();
    let text: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    let mut routes = BTreeSet::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find(".route(\"") {
        rest = &rest[at + ".route(\"".len()..];
        let end = rest.find('"').unwrap();
        let path = rest[..end].to_owned();
        // The method router: up to the `)` that closes `.route(`.
        let mut depth = 1;
        let mut close = 0;
        for (i, c) in rest.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        close = i;
                        break;
                    }
                }
                _ => {}
            }
        }
        let methods = &rest[end + 1..close];
        // Method calls at depth 0 of the method router: `get(..)`,
        // `.delete(..)`; their arguments (handlers) are skipped.
        let mut depth = 0;
        let mut word = String::new();
        for c in methods.chars() {
            match c {
                '(' => {
                    if depth == 0 && METHODS.contains(&word.as_str()) {
                        routes.insert((word.clone(), path.clone()));
                    }
                    depth += 1;
                    word.clear();
                }
                ')' => depth -= 1,
                c if c.is_alphanumeric() || c == '_' => word.push(c),
                _ => word.clear(),
            }
        }
        rest = &rest[close..];
    }
    assert!(
        routes.len() >= 16,
        "the router's routes were not found in {}: {routes:?}",
        source.display()
    );
    routes
}

fn documented_routes(doc: &Value) -> BTreeSet<(String, String)> {
    let mut routes = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if METHODS.contains(&method.as_str()) {
                routes.insert((method.clone(), path.clone()));
            }
        }
    }
    routes
}

/// Every `$ref` in `value` names a component the document has.
fn check_refs(doc: &Value, value: &Value) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(target)) = map.get("$ref") {
                let pointer = target.strip_prefix('#').unwrap_or_else(|| {
                    panic!("{target} is not a reference into the document");
                });
                assert!(doc.pointer(pointer).is_some(), "{target} is not defined");
            }
            map.values().for_each(|v| check_refs(doc, v));
        }
        Value::Array(items) => items.iter().for_each(|v| check_refs(doc, v)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_openapi_document_lists_every_route_of_the_router() {
    let cluster = Cluster::start_with(&["w1"], &auth_config(), "").await;
    let http = cluster.http();
    let reply = http
        .get(format!("{}/v1/openapi.json", cluster.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), reqwest::StatusCode::OK);
    assert_eq!(
        reply.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    let doc: Value = reply.json().await.unwrap();

    // The skeleton OpenAPI 3.1 asks for, and every reference resolving.
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1."),
        "{doc}"
    );
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for name in [
        "ErrorBody",
        "StartJob",
        "JobInfo",
        "WorkerInfo",
        "GroupInfo",
    ] {
        assert!(schemas.contains_key(name), "no schema {name}");
    }
    check_refs(&doc, &doc);

    let documented = documented_routes(&doc);
    let routed = router_routes();
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    assert!(
        undocumented.is_empty() && unrouted.is_empty(),
        "routes without documentation: {undocumented:?}; documented routes the router lacks: {unrouted:?}"
    );

    for (method, path) in &documented {
        let op = &doc["paths"][path][method];
        let responses = op["responses"].as_object().unwrap();
        // Every answer the layers around the handlers give, and an error
        // body on every error.
        // (Not the probes: they sit outside all of those layers.)
        let public = ["/healthz", "/readyz"].contains(&path.as_str());
        for status in ["401", "403", "413", "504"] {
            assert_eq!(
                responses.contains_key(status),
                !public,
                "{method} {path}: {status}"
            );
        }
        for (status, response) in responses {
            // The probes answer plain text, ok or not ok, and nothing more.
            if !public && (status.starts_with('4') || status.starts_with('5')) {
                assert_eq!(
                    response["content"]["application/json"]["schema"]["$ref"],
                    "#/components/schemas/ErrorBody",
                    "{method} {path} {status}"
                );
            }
        }
        // The live router has it: no fallback answer (404 not_found, 405).
        let url = format!(
            "{}{}",
            cluster.url(),
            path.replace("{id}", "00000000-0000-4000-8000-000000000000")
        );
        let request = match method.as_str() {
            "get" => http.get(&url),
            "post" => http.post(&url),
            "delete" => http.delete(&url),
            other => panic!("{other} {path}: a method this test does not send"),
        };
        let reply = request.send().await.unwrap();
        let status = reply.status();
        let body = reply.bytes().await.unwrap_or_default();
        let code = serde_json::from_slice::<Value>(&body).unwrap_or_default()["code"].clone();
        assert!(
            status != reqwest::StatusCode::METHOD_NOT_ALLOWED && code != "not_found",
            "{method} {path}: {status} {code}"
        );
        assert!(
            responses.contains_key(status.as_str()),
            "{method} {path}: {status} is not documented"
        );
    }

    // The output streams' content types are the ones they are served with.
    let job = cluster.start_job("w1", "count.sh", &["1", "0"]).await;
    let reply = http
        .get(format!("{}/v1/jobs/{job}/logs?follow=true", cluster.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), reqwest::StatusCode::OK);
    let served = reply.headers()["content-type"].to_str().unwrap().to_owned();
    let documented = &doc["paths"]["/v1/jobs/{id}/logs"]["get"]["responses"]["200"]["content"];
    assert!(
        documented.get(&served).is_some(),
        "{served} not in {documented}"
    );
    assert_eq!(
        String::from_utf8_lossy(&reply.bytes().await.unwrap()),
        "1\ndone\n"
    );
    let group = &doc["paths"]["/v1/groups/{id}/logs"]["get"]["responses"]["200"]["content"];
    for media in ["text/plain", "application/x-ndjson"] {
        assert!(group.get(media).is_some(), "{media} not in {group}");
    }

    // A viewer token reads it; without credentials it is refused like
    // any other route.
    let anonymous = cluster.http_as(None);
    let url = format!("{}/v1/openapi.json", cluster.url());
    let reply = anonymous
        .get(&url)
        .bearer_auth(VIEWER_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), reqwest::StatusCode::OK);
    assert_eq!(reply.json::<Value>().await.unwrap(), doc);
    let reply = anonymous.get(&url).send().await.unwrap();
    assert_eq!(reply.status(), reqwest::StatusCode::UNAUTHORIZED);
}

/// What the fuzzer found answered 5xx: the output of a queued job, and a
/// fan-out every worker refused for what it asked. Both are the request's
/// doing, so 4xx, as the document says.
#[tokio::test(flavor = "multi_thread")]
async fn a_queued_jobs_output_and_a_group_every_worker_refuses_are_client_errors() {
    let cluster = Cluster::start(&["w1", "w2"]).await;
    let http = cluster.http();
    let url = cluster.url();
    let error_of = |body: &[u8]| -> (String, Option<String>) {
        let e: jobcluster_proto::http::ErrorBody = serde_json::from_slice(body).unwrap();
        (e.code, e.job_id)
    };

    let reply = http
        .post(format!("{url}/v1/jobs"))
        .json(&serde_json::json!({
            "path": "count.sh",
            "selector": {"zone": "nowhere"},
            "wait_for_worker": true,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), reqwest::StatusCode::ACCEPTED);
    let queued: jobcluster_proto::http::JobStarted = reply.json().await.unwrap();
    let reply = http
        .get(format!("{url}/v1/jobs/{}/logs", queued.job_id))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), reqwest::StatusCode::CONFLICT);
    let (code, job_id) = error_of(&reply.bytes().await.unwrap());
    assert_eq!(
        (code.as_str(), job_id.as_deref()),
        ("job_not_started", Some(queued.job_id.as_str()))
    );

    let reply = http
        .post(format!("{url}/v1/groups"))
        .json(&serde_json::json!({"all": true, "path": "no-such-script.sh"}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), reqwest::StatusCode::BAD_REQUEST);
    let body = reply.bytes().await.unwrap();
    assert_eq!(error_of(&body).0, "invalid_path");
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("no worker could start the job"), "{text}");
}
