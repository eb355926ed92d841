//! The HTTP API through a plain HTTPS client presenting the client certificate.

use std::time::{Duration, Instant};

use jobcluster_proto::http::{ErrorBody, JobInfo, JobList, JobStarted, WorkerList};
use nix::sys::signal::Signal;
use reqwest::StatusCode;
use serde_json::json;

use crate::cluster::Cluster;
use crate::harness::Daemon;

async fn worker_id(cluster: &Cluster, name: &str) -> String {
    let list: WorkerList = cluster.get_json("/v1/workers").await;
    list.workers
        .into_iter()
        .find(|w| w.name == name)
        .unwrap()
        .worker_id
}

#[tokio::test(flavor = "multi_thread")]
async fn the_original_routes_work_with_their_original_bodies() {
    let cluster = Cluster::start(&["w1", "w2"]).await;
    let http = cluster.http();
    let url = cluster.url();
    let w1 = worker_id(&cluster, "w1").await;

    let reply = http
        .post(format!("{url}/start"))
        .json(&json!({"worker_id": w1, "command": "bash", "path": "count.sh"}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::CREATED);
    let started: JobStarted = reply.json().await.unwrap();

    // /stream follows until the job ends.
    let body = http
        .post(format!("{url}/stream"))
        .json(&json!({"worker_id": w1, "job_id": started.job_id}))
        .send()
        .await
        .unwrap();
    assert_eq!(body.status(), StatusCode::OK);
    assert_eq!(body.headers()["content-type"], "application/octet-stream");
    let bytes = body.bytes().await.unwrap();
    let expected: String = (1..=10).map(|i| format!("{i}\n")).collect::<String>() + "done\n";
    assert_eq!(String::from_utf8_lossy(&bytes), expected);

    let q: serde_json::Value = http
        .post(format!("{url}/query"))
        .json(&json!({"worker_id": w1, "job_id": started.job_id}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (q["done"].as_bool(), q["error"].as_bool()),
        (Some(true), Some(false)),
        "{q}"
    );
    assert_eq!(q["error_text"], "");

    let stop: serde_json::Value = http
        .post(format!("{url}/stop"))
        .json(&json!({"worker_id": w1, "job_id": started.job_id}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stop["success"], true);

    // The job belongs to w1: asking w2 about it is a 404.
    let w2 = worker_id(&cluster, "w2").await;
    let reply = http
        .post(format!("{url}/query"))
        .json(&json!({"worker_id": w2, "job_id": started.job_id}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::NOT_FOUND);

    // And the v1 view of the same job.
    let job: JobInfo = http
        .get(format!("{url}/v1/jobs/{}", started.job_id))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (job.state.as_str(), job.exit_code, job.output_bytes),
        ("succeeded", Some(0), 26)
    );
    assert!(job.finished_at.is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_a_documented_4xx_and_the_cluster_keeps_working() {
    let cluster = Cluster::start(&["w1"]).await;
    let http = cluster.http();
    let url = cluster.url();
    let w1 = worker_id(&cluster, "w1").await;
    let unknown_job = uuid::Uuid::new_v4().to_string();
    let cases: Vec<(&str, String, Option<String>, StatusCode, &str)> = vec![
        (
            "POST",
            "/v1/jobs".into(),
            Some("{not json".into()),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "POST",
            "/v1/jobs".into(),
            Some("".into()),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "POST",
            "/v1/jobs".into(),
            Some(json!({"worker_id": w1}).to_string()),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/jobs".into(),
            Some(json!({"worker_id": w1, "path": 5}).to_string()),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/jobs".into(),
            Some(json!({"worker_id": "nobody", "path": "count.sh"}).to_string()),
            StatusCode::NOT_FOUND,
            "worker_not_found",
        ),
        (
            "POST",
            "/v1/jobs".into(),
            Some(json!({"worker_id": w1, "command": "cobol", "path": "count.sh"}).to_string()),
            StatusCode::BAD_REQUEST,
            "unknown_plugin",
        ),
        (
            "POST",
            "/v1/jobs".into(),
            Some(json!({"worker_id": w1, "path": "../../etc/passwd"}).to_string()),
            StatusCode::BAD_REQUEST,
            "invalid_path",
        ),
        (
            "POST",
            "/v1/jobs".into(),
            Some(json!({"worker_id": w1, "path": "/etc/passwd", "command": "bash"}).to_string()),
            StatusCode::BAD_REQUEST,
            "invalid_path",
        ),
        (
            "POST",
            "/v1/jobs".into(),
            Some(json!({"worker_id": w1, "path": "missing.sh", "command": "bash"}).to_string()),
            StatusCode::BAD_REQUEST,
            "invalid_path",
        ),
        (
            "POST",
            "/start".into(),
            Some(json!({"worker_id": w1, "path": "count.sh"}).to_string()),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "GET",
            format!("/v1/jobs/{unknown_job}"),
            None,
            StatusCode::NOT_FOUND,
            "job_not_found",
        ),
        (
            "GET",
            "/v1/jobs/not-a-uuid".into(),
            None,
            StatusCode::BAD_REQUEST,
            "invalid_job_id",
        ),
        (
            "POST",
            format!("/v1/jobs/{unknown_job}/stop"),
            None,
            StatusCode::NOT_FOUND,
            "job_not_found",
        ),
        (
            "GET",
            format!("/v1/jobs/{unknown_job}/logs"),
            None,
            StatusCode::NOT_FOUND,
            "job_not_found",
        ),
        (
            "POST",
            "/query".into(),
            Some(json!({"worker_id": w1, "job_id": unknown_job}).to_string()),
            StatusCode::NOT_FOUND,
            "job_not_found",
        ),
        (
            "POST",
            "/stop".into(),
            Some(json!({"worker_id": w1}).to_string()),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "GET",
            "/v1/workers/nobody".into(),
            None,
            StatusCode::NOT_FOUND,
            "worker_not_found",
        ),
        (
            "GET",
            "/v1/jobs?state=happy".into(),
            None,
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            "GET",
            "/v1/jobs?limit=lots".into(),
            None,
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            "GET",
            "/nowhere".into(),
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "DELETE",
            "/v1/jobs".into(),
            None,
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            "POST",
            "/v1/jobs".into(),
            Some("x".repeat(2 << 20)),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
    ];
    for (method, path, body, status, code) in cases {
        let mut request = http.request(method.parse().unwrap(), format!("{url}{path}"));
        if let Some(body) = body {
            request = request.body(body);
        }
        let reply = request.send().await.unwrap();
        assert_eq!(reply.status(), status, "{method} {path}");
        let error: ErrorBody = reply
            .json()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        assert_eq!(error.code, code, "{method} {path}: {}", error.error);
        assert!(!error.error.is_empty());
        // Still serving.
        let ok = http.get(format!("{url}/v1/workers")).send().await.unwrap();
        assert_eq!(ok.status(), StatusCode::OK);
    }
    // No escaped script ran and a valid job still works.
    let reply = http
        .post(format!("{url}/v1/jobs"))
        .json(&json!({"worker_id": "w1", "path": "count.sh", "args": ["1", "0"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::CREATED);
}

/// Without `[auth] tokens`, a client without a certificate gets through
/// the handshake for the health probes only: every other route, unknown
/// ones included, answers 401 and does nothing.
#[tokio::test(flavor = "multi_thread")]
async fn clients_without_a_certificate_reach_only_the_probes_and_other_roles_are_refused() {
    let cluster = Cluster::start(&["w1"]).await;
    let url = cluster.url();
    let anonymous = cluster.http_as(None);
    for probe in ["/healthz", "/readyz"] {
        let reply = anonymous.get(format!("{url}{probe}")).send().await.unwrap();
        assert_eq!(reply.status(), StatusCode::OK, "{probe}");
        assert_eq!(reply.text().await.unwrap(), "ok\n", "{probe}");
    }
    let refused = [
        anonymous.get(format!("{url}/v1/jobs")),
        anonymous.get(format!("{url}/v1/workers")),
        anonymous.get(format!("{url}/v1/no-such-route")),
        anonymous
            .post(format!("{url}/v1/jobs"))
            .json(&json!({"worker_id": "w1", "path": "count.sh", "args": ["1", "0"]})),
        anonymous
            .post(format!("{url}/start"))
            .json(&json!({"worker_id": "w1", "command": "bash", "path": "count.sh"})),
    ];
    for request in refused {
        let reply = request.send().await.unwrap();
        assert_eq!(reply.status(), StatusCode::UNAUTHORIZED);
        let error: ErrorBody = reply.json().await.unwrap();
        assert_eq!(error.code, "unauthenticated");
    }
    let jobs: JobList = cluster.get_json("/v1/jobs").await;
    assert!(jobs.jobs.is_empty(), "an anonymous start ran: {jobs:?}");

    // A worker certificate is from the right CA but not for the API.
    let reply = cluster
        .http_as(Some(("w1.pem", "w1-key.pem")))
        .get(format!("{url}/v1/workers"))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::FORBIDDEN);
    let error: ErrorBody = reply.json().await.unwrap();
    assert_eq!(error.code, "forbidden");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_with_a_certificate_from_another_ca_cannot_register() {
    let mut cluster = Cluster::start(&["w1"]).await;
    let other = cluster.tmp.path().join("other-pki");
    crate::cluster::run_ok(&["pki", "init", other.to_str().unwrap()]);
    crate::cluster::run_ok(&[
        "pki",
        "issue",
        other.to_str().unwrap(),
        "--role",
        "worker",
        "rogue",
    ]);
    let config =
        cluster.write_worker_config("rogue", "other-pki/rogue.pem", "other-pki/rogue-key.pem");
    let rogue = Daemon::spawn(
        &crate::cluster::bin("workerd"),
        &["--config", config.to_str().unwrap()],
    );
    rogue.wait_for_log("registration failed", 0).await;
    let list: WorkerList = cluster.get_json("/v1/workers?all=true").await;
    assert!(list.workers.iter().all(|w| w.name != "rogue"), "{list:?}");
    cluster.workers.push(("rogue".into(), rogue));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_worker_answers_503_within_seconds() {
    let mut cluster = Cluster::start(&["w1", "w2"]).await;
    cluster.worker("w2").signal(Signal::SIGKILL);
    cluster.worker("w2").wait(Duration::from_secs(10));
    let started = Instant::now();
    let reply = cluster
        .http()
        .post(format!("{}/v1/jobs", cluster.url()))
        .json(&json!({"worker_id": "w2", "path": "count.sh"}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::SERVICE_UNAVAILABLE);
    let error: ErrorBody = reply.json().await.unwrap();
    assert_eq!(error.code, "worker_unavailable");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    // w1 is unaffected.
    let reply = cluster
        .http()
        .post(format!("{}/v1/jobs", cluster.url()))
        .json(&json!({"worker_id": "w1", "path": "count.sh", "args": ["1", "0"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::CREATED);
}

/// `(status, code)` of an answer that must be an error body.
async fn refusal(reply: reqwest::Response) -> (StatusCode, String) {
    let status = reply.status();
    let body = reply.bytes().await.unwrap();
    let error: ErrorBody = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("{status}: not an error body ({e}): {body:?}"));
    (status, error.code)
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_over_the_limit_get_413_over_http1_and_http2() {
    let cluster = Cluster::start(&[]).await;
    let url = cluster.url();
    let too_large = (
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large".to_owned(),
    );
    for (http2, version) in [
        (false, reqwest::Version::HTTP_11),
        (true, reqwest::Version::HTTP_2),
    ] {
        let http = cluster.http_version(http2);
        // Within the bound the rest is read and dropped; past it (20 MiB)
        // the answer still arrives.
        for size in [3 << 20, 20 << 20] {
            let reply = http
                .post(format!("{url}/v1/jobs"))
                .body(vec![b'{'; size])
                .send()
                .await
                .unwrap_or_else(|e| panic!("{version:?}, {size} bytes: {e:?}"));
            assert_eq!(reply.version(), version);
            assert_eq!(refusal(reply).await, too_large, "{version:?}, {size} bytes");
        }
        // No Content-Length (chunked over HTTP/1.1): found out while reading.
        let chunks = futures_util::stream::iter(
            (0..48).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b' '; 64 << 10]))),
        );
        let reply = http
            .post(format!("{url}/v1/jobs"))
            .body(reqwest::Body::wrap_stream(chunks))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{version:?}, streamed: {e:?}"));
        assert_eq!(refusal(reply).await, too_large, "{version:?}, streamed");
        // Refused before authentication or routing, too.
        let reply = http
            .post(format!("{url}/nowhere"))
            .body(vec![b'x'; 2 << 20])
            .send()
            .await
            .unwrap();
        assert_eq!(
            refusal(reply).await,
            (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large".to_owned()
            )
        );
        let reply = http.get(format!("{url}/v1/workers")).send().await.unwrap();
        assert_eq!(reply.status(), StatusCode::OK, "{version:?}: still serving");
    }

    // curl, which reports a stream reset after an early answer as an error
    // (no status at all) over HTTP/2, and sends `Expect: 100-continue` for
    // large bodies over HTTP/1.1.
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!(
            "skipping the curl checks of bodies_over_the_limit_get_413: curl is not installed"
        );
        return;
    }
    let body = cluster.tmp.path().join("big.json");
    std::fs::write(&body, vec![b'{'; 4 << 20]).unwrap();
    let pki = cluster.pki();
    for (flag, expect) in [
        ("--http2", "Expect: 100-continue"),
        ("--http1.1", "Expect: 100-continue"),
        ("--http1.1", "Expect:"),
    ] {
        let out = tokio::process::Command::new("curl")
            .args([
                "-sS",
                flag,
                "-H",
                expect,
                "-w",
                "\n%{http_code} %{http_version}",
            ])
            .arg("--cacert")
            .arg(pki.join("ca.pem"))
            .arg("--cert")
            .arg(pki.join("client.pem"))
            .arg("--key")
            .arg(pki.join("client-key.pem"))
            .arg("--data-binary")
            .arg(format!("@{}", body.display()))
            .arg(format!("{url}/v1/jobs"))
            .output()
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "curl {flag} ({expect}): {}{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (json, status) = text.rsplit_once('\n').unwrap();
        let error: ErrorBody = serde_json::from_str(json).unwrap();
        assert!(status.starts_with("413 "), "curl {flag} ({expect}): {text}");
        assert_eq!(error.code, "payload_too_large");
    }
}

/// `GET /v1/workers` is paged by name like `/v1/jobs`; clusterctl reads
/// every page.
#[tokio::test(flavor = "multi_thread")]
async fn the_worker_list_is_paged_by_name() {
    let cluster = Cluster::start(&["w3", "w1", "w2"]).await;
    let first: WorkerList = cluster.get_json("/v1/workers?limit=2").await;
    let names: Vec<&str> = first.workers.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(names, ["w1", "w2"]);
    let cursor = first.next_cursor.clone().expect("a next page");
    let second: WorkerList = cluster
        .get_json(&format!("/v1/workers?limit=2&cursor={cursor}"))
        .await;
    let names: Vec<&str> = second.workers.iter().map(|w| w.name.as_str()).collect();
    assert_eq!((names, second.next_cursor), (vec!["w3"], None));

    let out = cluster.ctl_output(&["-o", "json", "workers"]).await;
    assert!(out.status.success(), "{}", crate::cluster::stderr(&out));
    let listed: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).expect("a JSON array of workers");
    assert_eq!(listed.len(), 3);
}
