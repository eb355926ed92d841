//! Who may do what, hostile input, and hard limits, through the real binaries.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use jobcluster_pki::{Identity, Role, Roots, Validity};
use jobcluster_proto::http::{ErrorBody, JobInfo};
use jobcluster_proto::pb::scheduler_client::SchedulerClient;
use jobcluster_proto::pb::{DeregisterWorkerRequest, HeartbeatRequest, RegisterWorkerRequest};
use reqwest::StatusCode;
use serde_json::json;

use crate::cluster::{Cluster, stderr, stdout};

pub(crate) const OPERATOR_TOKEN: &str = "op-7f1c2a9e4b";
pub(crate) const VIEWER_TOKEN: &str = "view-3d8e5f0a1c";

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Scheduler config with an operator and a viewer token.
pub(crate) fn auth_config() -> String {
    format!(
        "\n[[auth.tokens]]\nname = \"ci\"\nsha256 = \"{}\"\nrole = \"operator\"\n\n[[auth.tokens]]\nname = \"dashboard\"\nsha256 = \"{}\"\nrole = \"viewer\"\n",
        sha256_hex(OPERATOR_TOKEN),
        sha256_hex(VIEWER_TOKEN)
    )
}

/// An HTTPS client trusting the cluster CA, without a certificate.
fn anonymous(cluster: &Cluster) -> reqwest::Client {
    cluster.http_as(None)
}

async fn status_and_code(reply: reqwest::Response) -> (StatusCode, String) {
    let status = reply.status();
    let code = reply
        .json::<ErrorBody>()
        .await
        .map(|e| e.code)
        .unwrap_or_default();
    (status, code)
}

#[tokio::test(flavor = "multi_thread")]
async fn bearer_tokens_have_roles_and_never_show_up_in_logs() {
    let cluster = Cluster::start_with(&["w1"], &auth_config(), "").await;
    let url = cluster.url();
    let http = anonymous(&cluster);

    let reply = http.get(format!("{url}/v1/workers")).send().await.unwrap();
    assert_eq!(
        status_and_code(reply).await,
        (StatusCode::UNAUTHORIZED, "unauthenticated".into())
    );
    let reply = http
        .get(format!("{url}/v1/workers"))
        .bearer_auth("wrong-token")
        .send()
        .await
        .unwrap();
    assert_eq!(
        status_and_code(reply).await,
        (StatusCode::UNAUTHORIZED, "unauthenticated".into())
    );
    let reply = http
        .get(format!("{url}/v1/workers"))
        .header("authorization", "Basic Zm9vOmJhcg==")
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::UNAUTHORIZED);

    // A viewer reads, including the original read routes, but never writes.
    let reply = http
        .get(format!("{url}/v1/workers"))
        .bearer_auth(VIEWER_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::OK);
    let start = json!({"worker_id": "w1", "path": "count.sh", "args": ["1", "0"]});
    let reply = http
        .post(format!("{url}/v1/jobs"))
        .bearer_auth(VIEWER_TOKEN)
        .json(&start)
        .send()
        .await
        .unwrap();
    assert_eq!(
        status_and_code(reply).await,
        (StatusCode::FORBIDDEN, "forbidden".into())
    );

    // An operator does everything.
    let reply = http
        .post(format!("{url}/v1/jobs"))
        .bearer_auth(OPERATOR_TOKEN)
        .json(&start)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::CREATED);
    let job: serde_json::Value = reply.json().await.unwrap();
    let job_id = job["job_id"].as_str().unwrap().to_owned();
    let reply = http
        .post(format!("{url}/query"))
        .bearer_auth(VIEWER_TOKEN)
        .json(&json!({"worker_id": "w1", "job_id": job_id}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::OK);
    let reply = http
        .post(format!("{url}/v1/jobs/{job_id}/stop"))
        .bearer_auth(VIEWER_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::FORBIDDEN);

    // clusterctl with a token and no certificate.
    let out = cluster
        .ctl()
        .env_remove("CLUSTERCTL_CERT")
        .env_remove("CLUSTERCTL_KEY")
        .env("CLUSTERCTL_TOKEN", OPERATOR_TOKEN)
        .args(["run", "--worker", "w1", "count.sh", "--", "2", "0"])
        .output()
        .await
        .unwrap();
    assert_eq!(
        (out.status.code(), stdout(&out).as_str()),
        (Some(0), "1\n2\ndone\n"),
        "{}",
        stderr(&out)
    );

    // Client certificates still work beside tokens.
    let reply = cluster
        .http()
        .get(format!("{url}/v1/workers"))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::OK);

    let log = cluster.scheduler.log();
    for secret in [OPERATOR_TOKEN, VIEWER_TOKEN, "wrong-token"] {
        assert!(!log.contains(secret), "a token leaked into the log");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn plugin_limits_end_jobs_that_overstep_them() {
    let worker_extra = r#"max_jobs = 2
---
[plugins.slow]
runner = "bash"
timeout = "1s"
stop_grace = "1s"

[plugins.capped]
runner = "bash"
max_output_bytes = 1000

[plugins.narrow]
runner = "bash"
limits = { open_files = 17, cpu_time = "7s" }
"#;
    let cluster = Cluster::start_with(&["w1"], "", worker_extra).await;
    let scripts = cluster.tmp.path().join("scripts");
    std::fs::write(scripts.join("blast.sh"), "head -c \"$1\" /dev/zero\n").unwrap();
    std::fs::write(scripts.join("limits.sh"), "ulimit -n\nulimit -t\n").unwrap();

    let out = cluster
        .ctl_output(&[
            "run",
            "--worker",
            "w1",
            "--command",
            "slow",
            "count.sh",
            "--",
            "100",
            "0.1",
        ])
        .await;
    // Ended by SIGTERM: 128 + 15.
    assert_eq!(out.status.code(), Some(143), "{}", stderr(&out));
    let jobs: Vec<JobInfo> =
        serde_json::from_slice(&cluster.ctl_output(&["jobs", "-o", "json"]).await.stdout).unwrap();
    assert_eq!(jobs[0].state, "failed");
    assert_eq!(jobs[0].error_text, "timed out after 1s");

    let out = cluster
        .ctl_output(&[
            "run",
            "--worker",
            "w1",
            "--command",
            "capped",
            "blast.sh",
            "--",
            "100000",
        ])
        .await;
    assert_ne!(out.status.code(), Some(0));
    assert_eq!(out.stdout.len(), 1000, "output kept up to the limit");
    let jobs: Vec<JobInfo> =
        serde_json::from_slice(&cluster.ctl_output(&["jobs", "-o", "json"]).await.stdout).unwrap();
    assert_eq!(
        (jobs[0].state.as_str(), jobs[0].output_bytes),
        ("failed", 1000)
    );
    assert!(
        jobs[0].error_text.contains("output limit"),
        "{}",
        jobs[0].error_text
    );
    assert_eq!(cluster.worker_log("w1", &jobs[0].job_id).len(), 1000);

    let out = cluster
        .ctl_output(&["run", "--worker", "w1", "--command", "narrow", "limits.sh"])
        .await;
    assert_eq!(stdout(&out), "17\n7\n", "{}", stderr(&out));

    // max_jobs = 2: a third concurrent job that may not wait is refused
    // with 429.
    let a = cluster.start_job("w1", "count.sh", &["100", "0.1"]).await;
    let b = cluster.start_job("w1", "count.sh", &["100", "0.1"]).await;
    let reply = cluster
        .http()
        .post(format!("{}/v1/jobs", cluster.url()))
        .json(&json!({"worker_id": "w1", "path": "count.sh", "queue": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        status_and_code(reply).await,
        (StatusCode::TOO_MANY_REQUESTS, "worker_busy".into())
    );
    for job in [a, b] {
        assert!(cluster.ctl_output(&["stop", &job]).await.status.success());
    }
    // The slots come back: a job waiting for one (if the stopped jobs have
    // not ended yet) starts and runs.
    let out = cluster
        .ctl_output(&["run", "--worker", "w1", "count.sh", "--", "1", "0"])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
}

fn grpc_as(cluster: &Cluster, identity: &Identity) -> SchedulerClient<tonic::transport::Channel> {
    let roots = Roots::load(&cluster.pki().join("ca.pem")).unwrap();
    let tls = jobcluster_pki::client_config(&roots, Some(identity), &[b"h2"]).unwrap();
    let channel =
        jobcluster_proto::transport::tls_channel(&cluster.grpc_addr, tls, Duration::from_secs(5))
            .unwrap();
    SchedulerClient::new(channel)
}

fn load_identity(cluster: &Cluster, name: &str) -> Identity {
    let pki = cluster.pki();
    Identity::load(
        &pki.join(format!("{name}.pem")),
        &pki.join(format!("{name}-key.pem")),
    )
    .unwrap()
}

/// Every case is sent through the real binaries; after each, the cluster
/// must still serve a valid request.
#[tokio::test(flavor = "multi_thread")]
async fn hostile_input_gets_clear_refusals_and_the_cluster_keeps_serving() {
    let cluster = Cluster::start_with(&["w1", "w2"], &auth_config(), "").await;
    let url = cluster.url();
    let scripts = cluster.tmp.path().join("scripts");
    std::fs::create_dir_all(scripts.join("sub")).unwrap();
    std::os::unix::fs::symlink("../../scheduler.toml", scripts.join("sub/hop1.sh")).unwrap();
    std::os::unix::fs::symlink("sub/hop1.sh", scripts.join("chain.sh")).unwrap();
    let w1_id = cluster.worker_info("w1").await.worker_id;

    let still_serving = || async {
        let reply = cluster
            .http()
            .get(format!("{url}/v1/workers"))
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), StatusCode::OK, "the API stopped serving");
    };

    // HTTP: identities.
    let pki = cluster.pki();
    let as_cert = |name: &str| {
        cluster
            .http_as(Some((&format!("{name}.pem"), &format!("{name}-key.pem"))))
            .get(format!("{url}/v1/workers"))
    };
    let cases_identity = [
        (as_cert("w1"), StatusCode::FORBIDDEN, "forbidden"),
        (as_cert("scheduler"), StatusCode::FORBIDDEN, "forbidden"),
        (
            anonymous(&cluster).get(format!("{url}/v1/workers")),
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
        ),
        (
            anonymous(&cluster)
                .get(format!("{url}/v1/workers"))
                .bearer_auth(""),
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
        ),
        (
            anonymous(&cluster)
                .get(format!("{url}/v1/workers"))
                .bearer_auth("x".repeat(10_000)),
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
        ),
        (
            anonymous(&cluster).get(format!("{url}/v1/workers")).header(
                "authorization",
                reqwest::header::HeaderValue::from_bytes(b"Bearer \xfe\xff").unwrap(),
            ),
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
        ),
    ];
    for (i, (request, status, code)) in cases_identity.into_iter().enumerate() {
        let reply = request.send().await.unwrap();
        assert_eq!(
            status_and_code(reply).await,
            (status, code.to_owned()),
            "identity case {i}"
        );
        still_serving().await;
    }

    // HTTP: bodies and paths.
    let long_path = "a/".repeat(3000) + "x.sh";
    let body_cases: Vec<(&str, String, Vec<u8>, StatusCode, &str)> = vec![
        (
            "POST",
            "/v1/jobs".into(),
            b"{\"worker_id\": \"w1\", \"path\": \"\xff\xfe.sh\"}".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "POST",
            "/v1/jobs".into(),
            b"[1, 2, 3]".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/jobs".into(),
            b"null".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/jobs".into(),
            b"{\"worker_id\": \"w1\", \"path\": \"count.sh\"} trailing".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "POST",
            "/v1/jobs".into(),
            json!({"worker_id": "w1", "path": "count.sh", "args": "not-a-list"})
                .to_string()
                .into_bytes(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/jobs".into(),
            json!({"worker_id": "w1", "path": "count.sh", "surprise": 1})
                .to_string()
                .into_bytes(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/jobs".into(),
            json!({"worker_id": "w1", "path": "chain.sh", "command": "bash"})
                .to_string()
                .into_bytes(),
            StatusCode::BAD_REQUEST,
            "invalid_path",
        ),
        (
            "POST",
            "/v1/jobs".into(),
            json!({"worker_id": "w1", "path": "sub/./../../x.sh", "command": "bash"})
                .to_string()
                .into_bytes(),
            StatusCode::BAD_REQUEST,
            "invalid_path",
        ),
        (
            "POST",
            "/v1/jobs".into(),
            json!({"worker_id": "w1", "path": "count.sh/..", "command": "bash"})
                .to_string()
                .into_bytes(),
            StatusCode::BAD_REQUEST,
            "invalid_path",
        ),
        (
            "POST",
            "/v1/jobs".into(),
            json!({"worker_id": "w1", "path": long_path, "command": "bash"})
                .to_string()
                .into_bytes(),
            StatusCode::BAD_REQUEST,
            "invalid_path",
        ),
        (
            "POST",
            "/v1/jobs".into(),
            json!({"worker_id": "w1", "path": "count.sh\u{0}", "command": "bash"})
                .to_string()
                .into_bytes(),
            StatusCode::BAD_REQUEST,
            "invalid_path",
        ),
        (
            "POST",
            "/v1/jobs".into(),
            json!({"worker_id": "w1", "path": "count.sh", "env": {"A=B": "c"}})
                .to_string()
                .into_bytes(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        // Request env passes only a plugin's allow list (none here).
        (
            "POST",
            "/v1/jobs".into(),
            json!({"worker_id": "w1", "path": "count.py", "env": {
                "PYTHONWARNINGS": "all:0:antigravity.x:0:0",
                "BROWSER": "/bin/sh -c 'kill -9 $PPID' %s",
            }})
            .to_string()
            .into_bytes(),
            StatusCode::BAD_REQUEST,
            "env_not_allowed",
        ),
        (
            "POST",
            "/v1/jobs".into(),
            json!({"worker_id": "w1", "path": "count.sh", "env": {"GREETING": "hi"}})
                .to_string()
                .into_bytes(),
            StatusCode::BAD_REQUEST,
            "env_not_allowed",
        ),
        (
            "POST",
            "/v1/jobs".into(),
            json!({"path": "count.sh", "env": {"LD_PRELOAD": "/tmp/evil.so"}})
                .to_string()
                .into_bytes(),
            StatusCode::BAD_REQUEST,
            "env_not_allowed",
        ),
        (
            "POST",
            "/v1/jobs".into(),
            json!({"worker_id": "w1", "path": "count.sh", "args": ["a\u{0}b"]})
                .to_string()
                .into_bytes(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/jobs".into(),
            vec![b'{'; 4 << 20],
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            "GET",
            "/v1/jobs/%2e%2e%2f%2e%2e".into(),
            vec![],
            StatusCode::BAD_REQUEST,
            "invalid_job_id",
        ),
        (
            "GET",
            "/v1/jobs?limit=-1".into(),
            vec![],
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            "GET",
            "/v1/jobs?cursor=abc".into(),
            vec![],
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            "GET",
            format!("/v1/jobs/{}/logs?offset=nope", uuid::Uuid::new_v4()),
            vec![],
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            "POST",
            "/stream".into(),
            json!({"worker_id": w1_id, "job_id": "../../etc"})
                .to_string()
                .into_bytes(),
            StatusCode::BAD_REQUEST,
            "invalid_job_id",
        ),
    ];
    for (method, path, body, status, code) in body_cases {
        let reply = cluster
            .http()
            .request(method.parse().unwrap(), format!("{url}{path}"))
            .body(body)
            .send()
            .await
            .unwrap();
        let shown = &path[..path.len().min(60)];
        assert_eq!(
            status_and_code(reply).await,
            (status, code.to_owned()),
            "{method} {shown}"
        );
        still_serving().await;
    }
    assert!(
        !cluster.tmp.path().join("state/w1/jobs").exists()
            || std::fs::read_dir(cluster.tmp.path().join("state/w1/jobs"))
                .unwrap()
                .count()
                == 0,
        "no refused request started a job"
    );

    // gRPC: a worker may act only as itself; clients and the scheduler may not register.
    let w2 = load_identity(&cluster, "w2");
    let mut stolen = grpc_as(&cluster, &w2);
    let err = stolen
        .heartbeat(HeartbeatRequest {
            worker_id: w1_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::PermissionDenied,
        "heartbeat with a stolen id"
    );
    let err = stolen
        .deregister_worker(DeregisterWorkerRequest {
            worker_id: w1_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::PermissionDenied,
        "deregister with a stolen id"
    );
    let err = stolen
        .register_worker(RegisterWorkerRequest {
            address: "127.0.0.1:1".into(),
            name: "w1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::PermissionDenied,
        "register under another name"
    );
    for name in ["client", "scheduler"] {
        let mut wrong = grpc_as(&cluster, &load_identity(&cluster, name));
        let err = wrong
            .register_worker(RegisterWorkerRequest {
                address: "127.0.0.1:1".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            tonic::Code::PermissionDenied,
            "{name} registering"
        );
    }
    assert_eq!(cluster.worker_info("w1").await.state, "ready");
    still_serving().await;

    // TLS: expired, not yet valid, self-signed and other-CA client certificates.
    let ca = jobcluster_pki::CertificateAuthority::load(&pki).unwrap();
    let now = std::time::SystemTime::now();
    let day = Duration::from_secs(86_400);
    let expired = ca
        .issue_with_validity(
            Role::Client,
            "old",
            &[],
            Validity {
                not_before: now - 10 * day,
                not_after: now - day,
            },
        )
        .unwrap();
    let future = ca
        .issue_with_validity(
            Role::Client,
            "early",
            &[],
            Validity {
                not_before: now + day,
                not_after: now + 10 * day,
            },
        )
        .unwrap();
    let stranger = jobcluster_pki::CertificateAuthority::generate("stranger")
        .unwrap()
        .issue(Role::Client, "client", &[])
        .unwrap();
    let roots = Roots::load(&pki.join("ca.pem")).unwrap();
    for (what, cert) in [
        ("expired", expired),
        ("not yet valid", future),
        ("other CA", stranger),
    ] {
        let id = Identity::from_pem(cert.cert_pem.as_bytes(), cert.key_pem.as_bytes()).unwrap();
        let tls = jobcluster_pki::client_config(&roots, Some(&id), &[b"http/1.1"]).unwrap();
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured((*tls).clone())
            .build()
            .unwrap();
        let result = client.get(format!("{url}/v1/workers")).send().await;
        assert!(result.is_err(), "{what} certificate was accepted");
        still_serving().await;
    }

    // Plaintext to a TLS port gets no HTTP answer.
    let addr = cluster.http_addr.clone();
    let answer = tokio::task::spawn_blocking(move || {
        let mut tcp = std::net::TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        tcp.write_all(b"GET /v1/workers HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut buf = Vec::new();
        let _ = tcp.read_to_end(&mut buf);
        buf
    })
    .await
    .unwrap();
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plaintext got an HTTP answer"
    );
    still_serving().await;

    // A flood of starts: every one answered, the cluster still serves.
    let floods: Vec<_> = (0..60)
        .map(|_| {
            let http = cluster.http();
            let url = url.clone();
            tokio::spawn(async move {
                http.post(format!("{url}/v1/jobs"))
                    .json(&json!({"worker_id": "w2", "path": "count.sh", "args": ["1", "0"]}))
                    .send()
                    .await
                    .map(|r| r.status())
            })
        })
        .collect();
    for flood in floods {
        let status = flood.await.unwrap().unwrap();
        assert!(
            status == StatusCode::CREATED || status == StatusCode::TOO_MANY_REQUESTS,
            "{status}"
        );
    }
    still_serving().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_clients_and_crowds_of_followers_starve_nobody() {
    let cluster = Cluster::start_with(&["w1"], "max_followers_per_job = 2\n", "").await;
    let url = cluster.url();

    // Clients that never finish their request headers.
    let roots = Roots::load(&cluster.pki().join("ca.pem")).unwrap();
    let id = load_identity(&cluster, "client");
    let tls = jobcluster_pki::client_config(&roots, Some(&id), &[b"http/1.1"]).unwrap();
    let connector = tokio_rustls::TlsConnector::from(tls);
    let mut slow = Vec::new();
    for _ in 0..5 {
        let tcp = tokio::net::TcpStream::connect(&cluster.http_addr)
            .await
            .unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut tls, b"GET /v1/workers HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        slow.push(tls);
    }
    let started = std::time::Instant::now();
    let reply = cluster
        .http()
        .get(format!("{url}/v1/workers"))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::OK);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a slow client held others up"
    );
    // The server gives up on them (header read timeout) rather than waiting forever.
    for mut conn in slow {
        let mut buf = Vec::new();
        let read = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::io::AsyncReadExt::read_to_end(&mut conn, &mut buf),
        )
        .await;
        assert!(read.is_ok(), "a half-sent request kept its connection open");
    }

    // At most two followers per job; the third is told to come back later.
    let job = cluster.start_job("w1", "count.sh", &["100", "0.1"]).await;
    let follow = || {
        cluster
            .http()
            .get(format!("{url}/v1/jobs/{job}/logs?follow=true"))
            .send()
    };
    let first = follow().await.unwrap();
    let second = follow().await.unwrap();
    assert_eq!(
        (first.status(), second.status()),
        (StatusCode::OK, StatusCode::OK)
    );
    let reply = follow().await.unwrap();
    assert_eq!(
        status_and_code(reply).await,
        (StatusCode::TOO_MANY_REQUESTS, "too_many_followers".into())
    );
    // A follower that leaves frees its slot.
    drop(first);
    let mut freed = false;
    for _ in 0..100 {
        let reply = follow().await.unwrap();
        if reply.status() == StatusCode::OK {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(freed, "a departed follower's slot was never freed");
    drop(second);
    assert!(cluster.ctl_output(&["stop", &job]).await.status.success());
}

/// The certificate a TLS server presents at `addr` now.
async fn presented_cert(cluster: &Cluster, addr: &str, alpn: &[u8]) -> Vec<u8> {
    let stream = tls_as(cluster, addr, "client", alpn).await;
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// A TLS connection to `addr` with the certificate of `who` (a name in
/// the cluster's PKI), offering `alpn`.
async fn tls_as(
    cluster: &Cluster,
    addr: &str,
    who: &str,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let roots = Roots::load(&cluster.pki().join("ca.pem")).unwrap();
    let id = load_identity(cluster, who);
    let tls = jobcluster_pki::client_config(&roots, Some(&id), &[alpn]).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .unwrap()
}

fn reissue(cluster: &Cluster, role: &str, name: &str) {
    let pki = cluster.pki();
    std::fs::remove_file(pki.join(format!("{name}.pem"))).unwrap();
    std::fs::remove_file(pki.join(format!("{name}-key.pem"))).unwrap();
    crate::cluster::run_ok(&["pki", "issue", pki.to_str().unwrap(), "--role", role, name]);
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_certificates_without_dropping_jobs_or_followers() {
    let mut cluster = Cluster::start(&["w1"]).await;
    let job = cluster.start_job("w1", "count.sh", &["60", "0.05"]).await;
    let follower = cluster
        .ctl()
        .args(["logs", "-f", &job])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let worker_addr = cluster.worker_info("w1").await.address;
    let before = presented_cert(&cluster, &worker_addr, b"h2").await;

    reissue(&cluster, "worker", "w1");
    cluster
        .worker("w1")
        .signal(nix::sys::signal::Signal::SIGHUP);
    cluster
        .worker("w1")
        .wait_for_log("certificates reloaded", 0)
        .await;
    let after = presented_cert(&cluster, &worker_addr, b"h2").await;
    assert_ne!(before, after, "new connections get the new certificate");

    let before = presented_cert(&cluster, &cluster.http_addr.clone(), b"http/1.1").await;
    reissue(&cluster, "scheduler", "scheduler");
    cluster.scheduler.signal(nix::sys::signal::Signal::SIGHUP);
    cluster
        .scheduler
        .wait_for_log("certificates reloaded", 0)
        .await;
    let after = presented_cert(&cluster, &cluster.http_addr.clone(), b"http/1.1").await;
    assert_ne!(before, after);

    // A broken file is refused and the material in force stays.
    std::fs::write(cluster.pki().join("scheduler-key.pem"), "not a key").unwrap();
    cluster.scheduler.signal(nix::sys::signal::Signal::SIGHUP);
    cluster.scheduler.wait_for_log("reload failed", 0).await;
    assert_eq!(
        presented_cert(&cluster, &cluster.http_addr.clone(), b"http/1.1").await,
        after
    );

    // The job ran on and the follower saw every line.
    let out = tokio::time::timeout(Duration::from_secs(30), follower.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let expected: String = (1..=60).map(|i| format!("{i}\n")).collect::<String>() + "done\n";
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
    assert_eq!(cluster.job(&job).await.state, "succeeded");
    // And the scheduler still reaches the worker over the new certificates.
    let job = cluster.start_job("w1", "count.sh", &["1", "0"]).await;
    let out = cluster.ctl_output(&["logs", "-f", &job]).await;
    assert_eq!(stdout(&out), "1\ndone\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn plaintext_needs_an_explicit_insecure_and_warns_at_every_start() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("scripts")).unwrap();
    std::fs::copy(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/count.sh"),
        dir.join("scripts/count.sh"),
    )
    .unwrap();
    crate::cluster::open_to_jobs(dir);
    let scheduler = |extra: &str| {
        format!(
            "[grpc_server]\naddr = \"127.0.0.1:0\"\nuse_tls = false\n{extra}\n[http_server]\naddr = \"127.0.0.1:0\"\n[store]\npath = \"s.db\"\n"
        )
    };
    // use_tls = false alone is refused, naming the key to set.
    std::fs::write(dir.join("s.toml"), scheduler("")).unwrap();
    let out = std::process::Command::new(crate::cluster::bin("schedulerd"))
        .args([
            "--config",
            dir.join("s.toml").to_str().unwrap(),
            "--check-config",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("grpc_server.use_tls") && stderr(&out).contains("insecure"),
        "{}",
        stderr(&out)
    );

    std::fs::write(dir.join("s.toml"), scheduler("insecure = true")).unwrap();
    let scheduler = crate::harness::Daemon::spawn_with(
        &crate::cluster::bin("schedulerd"),
        &["--config", dir.join("s.toml").to_str().unwrap()],
        &["grpc", "http"],
        &[],
    );
    assert!(scheduler.log().contains("INSECURE MODE"));
    std::fs::write(
        dir.join("w.toml"),
        format!(
            "[grpc_server]\naddr = \"127.0.0.1:0\"\nuse_tls = false\ninsecure = true\n[scheduler]\naddr = \"{}\"\n[worker]\nname = \"dev\"\nscripts_dir = \"scripts\"\nstate_dir = \"state\"\n[plugins.bash]\nrunner = \"bash\"\n",
            scheduler.addrs["grpc"]
        ),
    )
    .unwrap();
    let worker = crate::harness::Daemon::spawn(
        &crate::cluster::bin("workerd"),
        &["--config", dir.join("w.toml").to_str().unwrap()],
    );
    let url = format!("http://{}", scheduler.addrs["http"]);
    let ctl = || {
        let mut cmd = tokio::process::Command::new(crate::cluster::bin("clusterctl"));
        cmd.env("CLUSTERCTL_SCHEDULER", &url)
            .env_remove("CLUSTERCTL_CA");
        cmd
    };
    let mut registered = false;
    for _ in 0..200 {
        let out = ctl()
            .args(["workers", "-o", "json"])
            .output()
            .await
            .unwrap();
        if stdout(&out).contains("\"ready\"") {
            registered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(registered, "worker never registered:\n{}", worker.log());
    assert!(worker.log().contains("INSECURE MODE"));
    let out = ctl()
        .args(["run", "--worker", "dev", "count.sh", "--", "2", "0"])
        .output()
        .await
        .unwrap();
    assert_eq!(
        (out.status.code(), stdout(&out).as_str()),
        (Some(0), "1\n2\ndone\n"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("plaintext"),
        "clusterctl warns too: {}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn jobs_run_as_the_configured_user_and_cannot_read_worker_records() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: switching users needs root");
        return;
    }
    let cluster = Cluster::start_with(&["w1"], "", "run_as_user = \"nobody\"\n---\n").await;
    let scripts = cluster.tmp.path().join("scripts");
    std::fs::write(
        scripts.join("whoami.sh"),
        "id -un\necho \"$HOME\"\ncat \"$1/$JOB_ID/output.log\" >/dev/null 2>&1 && echo read-own-log || echo denied\nls \"$1\" >/dev/null 2>&1 && echo listed-records || echo denied\n",
    )
    .unwrap();
    let state = cluster.tmp.path().join("state/w1");
    let reply = cluster
        .http()
        .post(format!("{}/v1/jobs", cluster.url()))
        .json(&json!({"worker_id": "w1", "path": "whoami.sh", "args": [state.join("jobs")]}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::CREATED);
    let started: jobcluster_proto::http::JobStarted = reply.json().await.unwrap();
    let out = cluster.ctl_output(&["logs", "-f", &started.job_id]).await;
    let home = nix::unistd::User::from_name("nobody").unwrap().unwrap().dir;
    assert_eq!(
        stdout(&out),
        format!("nobody\n{}\ndenied\ndenied\n", home.display()),
        "{}",
        stderr(&out)
    );
    // The log exists and is the worker's (root reads it; the job could not).
    assert!(!cluster.worker_log("w1", &started.job_id).is_empty());
}

/// Request environments that would run code outside the scripts, and the
/// users jobs run as: every refusal is `400 env_not_allowed` naming the
/// variables and what the plugin allows, nothing runs, and the cluster
/// keeps serving; what is allowed arrives; jobs of a root worker run as
/// nobody unless a plugin names root, which is warned at start.
#[tokio::test(flavor = "multi_thread")]
async fn hostile_environments_are_refused_and_jobs_run_as_nobody_by_default() {
    let root = nix::unistd::geteuid().is_root();
    let rooted = if root {
        "\n[plugins.rooted]\nrunner = \"bash\"\nextensions = []\nuser = \"root\"\n"
    } else {
        ""
    };
    let extra = format!(
        "---\n[plugins.greet]\nrunner = \"bash\"\nextensions = []\nallow_env = [\"GREETING\", \"APP_*\"]\n{rooted}"
    );
    let cluster = Cluster::start_with(&["w1"], "", &extra).await;
    let url = cluster.url();
    let scripts = cluster.tmp.path().join("scripts");
    // Whatever user a job runs as, it could leave a mark here.
    let marks = cluster.tmp.path().join("marks");
    std::fs::create_dir(&marks).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&marks, std::fs::Permissions::from_mode(0o1777)).unwrap();
    }
    let mark = |name: &str| marks.join(name).display().to_string();
    std::fs::write(
        scripts.join("mark.sh"),
        format!("touch {}\n", mark("script")),
    )
    .unwrap();
    std::fs::write(scripts.join("hook.sh"), format!("touch {}\n", mark("hook"))).unwrap();
    std::fs::write(
        scripts.join("mark.py"),
        format!("open('{}', 'w').close()\n", mark("python")),
    )
    .unwrap();
    std::fs::write(
        scripts.join("env.sh"),
        "echo \"${GREETING-unset} ${APP_MODE-unset} ${OTHER-unset}\"\n",
    )
    .unwrap();
    std::fs::write(scripts.join("who.sh"), "id -u\nulimit -n\n").unwrap();

    let browser = format!("/bin/sh -c 'touch {}' %s", mark("browser"));
    let hook = scripts.join("hook.sh").display().to_string();
    let cases: Vec<(&str, &str, serde_json::Value, &[&str])> = vec![
        // The reported attack: PYTHONWARNINGS makes python import a module
        // that runs BROWSER through a shell.
        (
            "python",
            "mark.py",
            json!({"PYTHONWARNINGS": "all:0:antigravity.x:0:0", "BROWSER": browser}),
            &["never allowed", "PYTHONWARNINGS", "BROWSER", "allows none"],
        ),
        // An allow list does not open the deny list.
        (
            "greet",
            "mark.sh",
            json!({"BASH_ENV": hook, "GREETING": "hi"}),
            &["never allowed: BASH_ENV", "allows GREETING, APP_*"],
        ),
        (
            "greet",
            "mark.sh",
            json!({"BASH_FUNC_touch%%": "() { :; }"}),
            &["never allowed", "BASH_FUNC_touch%%"],
        ),
        (
            "greet",
            "mark.sh",
            json!({"LD_PRELOAD": "/tmp/evil.so", "PATH": "/tmp"}),
            &["LD_PRELOAD", "PATH"],
        ),
        (
            "greet",
            "mark.sh",
            json!({"PERL5OPT": "-d", "RUBYOPT": "-rx", "NODE_OPTIONS": "--require x", "GIT_SSH_COMMAND": "x"}),
            &["PERL5OPT", "RUBYOPT", "NODE_OPTIONS", "GIT_SSH_COMMAND"],
        ),
        // Not allowed, named with what is.
        (
            "greet",
            "mark.sh",
            json!({"GREETING": "hi", "OTHER": "x"}),
            &["not allowed: OTHER", "allows GREETING, APP_*"],
        ),
        (
            "greet",
            "mark.sh",
            json!({"APP_\nX": "x"}),
            &["not allowed", "APP_\\nX"],
        ),
        (
            "bash",
            "mark.sh",
            json!({"GREETING": "hi"}),
            &["not allowed: GREETING", "allows none"],
        ),
    ];
    for (i, (command, path, env, parts)) in cases.into_iter().enumerate() {
        let reply = cluster
            .http()
            .post(format!("{url}/v1/jobs"))
            .json(&json!({"worker_id": "w1", "command": command, "path": path, "env": env}))
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), StatusCode::BAD_REQUEST, "case {i}");
        let body: ErrorBody = reply.json().await.unwrap();
        assert_eq!(body.code, "env_not_allowed", "case {i}: {}", body.error);
        for part in parts {
            assert!(
                body.error.contains(part),
                "case {i}: {part} in {}",
                body.error
            );
        }
        let reply = cluster
            .http()
            .get(format!("{url}/v1/workers"))
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), StatusCode::OK, "the API stopped serving");
    }
    let left: Vec<String> = std::fs::read_dir(&marks)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.is_empty(), "refused jobs ran: {left:?}");
    let jobs: Vec<JobInfo> =
        serde_json::from_slice(&cluster.ctl_output(&["jobs", "-o", "json"]).await.stdout).unwrap();
    assert!(jobs.is_empty(), "refused starts left jobs: {jobs:?}");

    // What the plugin allows reaches the script.
    let reply = cluster
        .http()
        .post(format!("{url}/v1/jobs"))
        .json(
            &json!({"worker_id": "w1", "command": "greet", "path": "env.sh",
            "env": {"GREETING": "hello", "APP_MODE": "fast"}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::CREATED);
    let started: jobcluster_proto::http::JobStarted = reply.json().await.unwrap();
    let out = cluster.ctl_output(&["logs", "-f", &started.job_id]).await;
    assert_eq!(stdout(&out), "hello fast unset\n", "{}", stderr(&out));

    if !root {
        eprintln!("skipped the job users: they need a root worker");
        return;
    }
    // A root worker's jobs run as nobody, with the default limits, unless
    // a plugin names root; that is warned at start.
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap().uid;
    let out = cluster
        .ctl_output(&["run", "--worker", "w1", "who.sh"])
        .await;
    assert_eq!(
        stdout(&out),
        format!("{nobody}\n1024\n"),
        "{}",
        stderr(&out)
    );
    let out = cluster
        .ctl_output(&["run", "--worker", "w1", "--command", "rooted", "who.sh"])
        .await;
    assert_eq!(stdout(&out), "0\n1024\n", "{}", stderr(&out));
    let log = cluster.workers[0].1.log();
    let warned: Vec<&str> = log.lines().filter(|l| l.contains("run as root")).collect();
    assert_eq!(warned.len(), 1, "{log}");
    assert!(
        warned[0].contains("WARN") && warned[0].contains("rooted"),
        "{}",
        warned[0]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_dials_only_the_schedulers_certificate() {
    let cluster = Cluster::start(&["w1"]).await;
    // Point a new worker at w1's port, where a worker certificate answers.
    let w1_addr = cluster.worker_info("w1").await.address;
    cluster.issue_worker_cert("w9");
    let config = cluster.write_worker_config("w9", "pki/w9.pem", "pki/w9-key.pem");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        &format!("addr = \"{}\"", cluster.grpc_addr),
        &format!("addr = \"{w1_addr}\""),
    );
    std::fs::write(&config, text).unwrap();
    let w9 = crate::harness::Daemon::spawn(
        &crate::cluster::bin("workerd"),
        &["--config", config.to_str().unwrap()],
    );
    w9.wait_for_log("registration failed", 0).await;
    assert!(w9.log().contains("expected scheduler"), "{}", w9.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_scheduler_refuses_a_worker_whose_certificate_does_not_name_its_address() {
    let mut cluster = Cluster::start(&["w1"]).await;
    // 127.0.0.2 is loopback too, but not among the certificate's names.
    cluster.issue_worker_cert("w5");
    let config = cluster.write_worker_config("w5", "pki/w5.pem", "pki/w5-key.pem");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replacen("127.0.0.1:0", "127.0.0.2:0", 1);
    std::fs::write(&config, text).unwrap();
    let w5 = crate::harness::Daemon::spawn(
        &crate::cluster::bin("workerd"),
        &["--config", config.to_str().unwrap()],
    );
    cluster.workers.push(("w5".into(), w5));
    cluster.wait_state("w5", "ready").await;
    let reply = cluster
        .http()
        .post(format!("{}/v1/jobs", cluster.url()))
        .json(&json!({"worker_id": "w5", "path": "count.sh"}))
        .send()
        .await
        .unwrap();
    let (status, code) = status_and_code(reply).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "worker_unavailable")
    );
}

// ---- Issue 10: nothing before authentication holds the server; bounded
// bodies and requests; tokens out of `ps`; a private store. ----

/// The hostile crowds below need a descriptor each in this process too.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    }
}

/// A process's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    crate::cluster::status_kib(pid, "VmRSS")
}

/// `n` TCP connections to `addr`, opened all at once, that never send a
/// byte. Each must be accepted within [`QUICK`]: a server that stops
/// accepting leaves them (and everyone after them) waiting in its listen
/// backlog, then retransmitting their SYNs for seconds.
async fn silent_connections(addr: &str, n: usize) -> Vec<tokio::net::TcpStream> {
    let started = std::time::Instant::now();
    let connects: Vec<_> = (0..n)
        .map(|_| tokio::spawn(tokio::net::TcpStream::connect(addr.to_owned())))
        .collect();
    let mut crowd = Vec::with_capacity(n);
    for connect in connects {
        crowd.push(connect.await.unwrap().unwrap());
    }
    let took = started.elapsed();
    assert!(took < QUICK, "{n} connections to {addr} took {took:?}");
    crowd
}

/// One HTTP/2 frame.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut frame = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// A `GET path` HEADERS frame on `stream`, without credentials (HPACK
/// literals only, so no encoder is needed), ending the stream.
fn h2_get(stream: u32, path: &str) -> Vec<u8> {
    h2_request(stream, &[(":path", path)])
}

/// A GET's HEADERS frame on `stream` with `headers` after `:method`,
/// `:scheme` and `:authority` (each under 128 bytes), ending the stream.
fn h2_request(stream: u32, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut block = Vec::new();
    let fixed = [
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", "127.0.0.1"),
    ];
    for (name, value) in fixed.iter().chain(headers) {
        block.push(0);
        block.push(name.len() as u8);
        block.extend_from_slice(name.as_bytes());
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    // END_STREAM | END_HEADERS
    h2_frame(1, 0x5, stream, &block)
}

/// An HTTP/2 client without a certificate that (after one request without
/// credentials, if `ask_first`) only pings, every 500 ms, and answers the
/// server's pings. Resolves to how long the server kept it open after the
/// handshake, or `None` if it was still open after `give_up`.
async fn pinger(
    addr: String,
    tls: Arc<rustls::ClientConfig>,
    ask_first: bool,
    give_up: Duration,
) -> Option<Duration> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let opened = std::time::Instant::now();
    // More handshakes at once than the server's handshake slots: the
    // oldest are closed for the newest.
    let Ok(tls) = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
    else {
        return Some(opened.elapsed());
    };
    let (mut rd, mut wr) = tokio::io::split(tls);
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(h2_frame(4, 0, 0, &[]));
    if ask_first {
        hello.extend(h2_get(1, "/v1/workers"));
    }
    if wr.write_all(&hello).await.is_err() {
        return Some(opened.elapsed());
    }
    let (pongs_tx, mut pongs) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let reader = async move {
        let mut head = [0u8; 9];
        loop {
            if rd.read_exact(&mut head).await.is_err() {
                return;
            }
            let len =
                (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
            let mut payload = vec![0u8; len];
            if rd.read_exact(&mut payload).await.is_err() {
                return;
            }
            match (head[3], head[4] & 1) {
                // SETTINGS: acknowledged, as a real client would.
                (4, 0) => {
                    let _ = pongs_tx.send(h2_frame(4, 1, 0, &[]));
                }
                // A PING from the server: answered.
                (6, 0) => {
                    let _ = pongs_tx.send(h2_frame(6, 1, 0, &payload));
                }
                _ => {}
            }
        }
    };
    let writer = async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            let frame = tokio::select! {
                _ = tick.tick() => h2_frame(6, 0, 0, b"hostile!"),
                Some(pong) = pongs.recv() => pong,
            };
            if wr.write_all(&frame).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        () = reader => Some(opened.elapsed()),
        () = writer => Some(opened.elapsed()),
        () = tokio::time::sleep(give_up) => None,
    }
}

/// Generous for a loaded test machine; a request takes milliseconds.
const QUICK: Duration = Duration::from_secs(3);

/// A request with a client certificate and one with a token, each answered
/// within [`QUICK`].
async fn legit_requests(cluster: &Cluster) {
    let url = cluster.url();
    let cases = [
        (
            "client certificate",
            cluster.http().get(format!("{url}/v1/workers")),
        ),
        (
            "operator token",
            anonymous(cluster)
                .get(format!("{url}/v1/workers"))
                .bearer_auth(OPERATOR_TOKEN),
        ),
    ];
    for (who, request) in cases {
        let started = std::time::Instant::now();
        let reply = request.send().await.unwrap();
        let took = started.elapsed();
        assert_eq!(reply.status(), StatusCode::OK, "{who}");
        assert!(took < QUICK, "a request with a {who} took {took:?}");
        eprintln!("request with a {who}: {took:?}");
    }
}

/// Under a thousand and more connections that never authenticate (silent
/// TCP on every port, HTTP/2 without credentials that only pings) a
/// certificate holder, a token holder and a worker still get through at
/// once; the crowds are closed by their deadlines, and the scheduler's
/// memory stays bounded (the figures are in docs/SECURITY.md).
#[tokio::test(flavor = "multi_thread")]
async fn crowds_that_never_authenticate_lock_nobody_out_and_are_closed_in_time() {
    raise_open_files_limit();
    let mut cluster = Cluster::start_with(&["w1"], &auth_config(), "").await;
    let scheduler_pid = cluster.scheduler.child.id();
    let w1_addr = cluster.worker_info("w1").await.address;
    legit_requests(&cluster).await;
    let baseline = rss_kib(scheduler_pid);

    // Silent TCP connections on the API, the scheduler's gRPC port and the
    // worker's gRPC port: more than the handshake slots of each.
    let mut silent = Vec::new();
    for (addr, n) in [
        (cluster.http_addr.clone(), 600),
        (cluster.grpc_addr.clone(), 600),
        (w1_addr.clone(), 600),
    ] {
        silent.extend(silent_connections(&addr, n).await);
    }
    legit_requests(&cluster).await;
    // Through the worker's crowded port.
    let started = std::time::Instant::now();
    cluster.start_job("w1", "count.sh", &["1", "0"]).await;
    assert!(
        started.elapsed() < QUICK,
        "a start took {:?}",
        started.elapsed()
    );
    // Through the scheduler's crowded gRPC port.
    cluster.add_worker_with("w2", "");
    cluster.wait_state("w2", "ready").await;
    drop(silent);

    // HTTP/2 without credentials that only pings; some ask once first
    // (401) and then only ping.
    let roots = Roots::load(&cluster.pki().join("ca.pem")).unwrap();
    let tls = jobcluster_pki::client_config(&roots, None, &[b"h2"]).unwrap();
    let give_up = Duration::from_secs(60);
    let mut pingers = Vec::new();
    for i in 0..1000 {
        let ask_first = i % 9 == 0;
        pingers.push((
            ask_first,
            tokio::spawn(pinger(
                cluster.http_addr.clone(),
                tls.clone(),
                ask_first,
                give_up,
            )),
        ));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let crowded = rss_kib(scheduler_pid);
    assert!(
        crowded < baseline + 80 * 1024,
        "the crowd took the scheduler from {baseline} KiB to {crowded} KiB"
    );
    legit_requests(&cluster).await;
    for (ask_first, pinger) in pingers {
        let open = pinger.await.unwrap();
        // Silent ones: no request within 10 s. The others: 30 s at most
        // without an identity. Both with room for a loaded machine.
        let bound = if ask_first { 40 } else { 20 };
        assert!(
            open.is_some_and(|o| o < Duration::from_secs(bound)),
            "a pinging connection without credentials (asked first: {ask_first}) stayed open {open:?}"
        );
    }
    legit_requests(&cluster).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(scheduler_pid);
    eprintln!(
        "scheduler VmRSS: {baseline} KiB before, {crowded} KiB with 1000 pinging connections, {after} KiB after"
    );
    assert!(
        after < baseline + 40 * 1024,
        "the scheduler kept {} KiB after the crowd left ({baseline} KiB before)",
        after - baseline
    );
}

/// gRPC ports (the scheduler's and a worker's) close a peer without a
/// certificate of the cluster's CA at the handshake.
#[tokio::test(flavor = "multi_thread")]
async fn grpc_ports_close_peers_without_a_cluster_certificate_at_the_handshake() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cluster = Cluster::start(&["w1"]).await;
    let w1_addr = cluster.worker_info("w1").await.address;
    let roots = Roots::load(&cluster.pki().join("ca.pem")).unwrap();
    let stranger = jobcluster_pki::CertificateAuthority::generate("stranger")
        .unwrap()
        .issue(Role::Scheduler, "scheduler", &[])
        .unwrap();
    let stranger =
        Identity::from_pem(stranger.cert_pem.as_bytes(), stranger.key_pem.as_bytes()).unwrap();
    for (port, addr) in [("scheduler", &cluster.grpc_addr), ("worker", &w1_addr)] {
        for (who, identity) in [("no certificate", None), ("another CA's", Some(&stranger))] {
            let tls = jobcluster_pki::client_config(&roots, identity, &[b"h2"]).unwrap();
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
            let refused = tokio::time::timeout(Duration::from_secs(10), async {
                // With TLS 1.3 the client may finish before the server has
                // judged its certificate: the refusal then comes on read.
                let Ok(mut tls) = tokio_rustls::TlsConnector::from(tls)
                    .connect(name, tcp)
                    .await
                else {
                    return true;
                };
                let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
                let mut buf = [0u8; 64];
                matches!(tls.read(&mut buf).await, Err(_) | Ok(0))
            })
            .await;
            assert_eq!(refused, Ok(true), "{port} port, {who}");
        }
    }
}

/// Streams a peer makes the server reset, as fast as it can, get its
/// connection sent away with `GOAWAY` `ENHANCE_YOUR_CALM` well before its
/// 5,000th stream, on the API and on both gRPC ports, whether it resets
/// them itself (rapid reset, CVE-2023-44487: 20 streams reset before they
/// were taken up) or sends requests the server resets for their errors
/// ("MadeYouReset", CVE-2025-8671: 1,024), though it holds a cluster
/// certificate; the cluster goes on serving. The bounds are
/// `proto::transport`'s, set by each server's builder (docs/SECURITY.md,
/// §7).
#[tokio::test(flavor = "multi_thread")]
async fn streams_reset_as_fast_as_they_open_get_their_connection_sent_away() {
    use jobcluster_proto::transport::{H2_MAX_ERROR_RESETS, H2_MAX_PENDING_RESETS};
    const ENHANCE_YOUR_CALM: u32 = 0xb;
    let cluster = Cluster::start(&["w1"]).await;
    // Each flood: the frames of its `n`th stream (odd ids from 1), and how
    // many streams at most may pass before the connection goes.
    let rapid_reset = |stream: u32| {
        let mut frames = h2_get(stream, "/v1/workers");
        // RST_STREAM, CANCEL
        frames.extend(h2_frame(3, 0, stream, &8u32.to_be_bytes()));
        frames
    };
    // A request that says it has a body and ends without one: malformed,
    // so h2 resets it.
    let made_you_reset =
        |stream: u32| h2_request(stream, &[(":path", "/v1/workers"), ("content-length", "5")]);
    let floods: [(&str, StreamFrames, usize); 2] = [
        ("rapid reset", rapid_reset, H2_MAX_PENDING_RESETS),
        ("made-you-reset", made_you_reset, H2_MAX_ERROR_RESETS),
    ];
    for (port, addr, who) in tls_ports(&cluster).await {
        let addr = &addr;
        for (kind, frames, bound) in floods {
            let tls = tls_as(&cluster, addr, who, b"h2").await;
            let (last, code) = flood_until_goaway(tls, 5_000, frames)
                .await
                .unwrap_or_else(|| panic!("{port}, {kind}: closed without GOAWAY"));
            eprintln!("{port}, {kind}: GOAWAY after stream {last}, code {code}");
            assert_eq!(code, ENHANCE_YOUR_CALM, "{port}, {kind}");
            // Stream n's id is 2n - 1; a little past the bound for
            // the streams already on their way.
            let allowed = 2 * (bound as u32 + 64);
            assert!(
                last < allowed,
                "{port}, {kind}: sent away only after stream {last}"
            );
        }
    }
    still_serves_and_runs(&cluster).await;
}

/// Every TLS port of `cluster` (the API, the scheduler's and w1's gRPC
/// ports), each with its address and a name in the PKI whose certificate
/// it takes.
async fn tls_ports(cluster: &Cluster) -> [(&'static str, String, &'static str); 3] {
    let w1_addr = cluster.worker_info("w1").await.address;
    [
        ("API", cluster.http_addr.clone(), "client"),
        ("scheduler's gRPC", cluster.grpc_addr.clone(), "w1"),
        ("worker's gRPC", w1_addr, "scheduler"),
    ]
}

/// The HTTP/2 frames of a flood's stream with this id.
type StreamFrames = fn(u32) -> Vec<u8>;

/// Sends the HTTP/2 preface and `streams` streams of `frames` at once on
/// `tls`, reading what comes back; the last `GOAWAY`'s last stream and
/// error code, once the server has closed (within 20 s).
async fn flood_until_goaway(
    tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    streams: u32,
    frames: StreamFrames,
) -> Option<(u32, u32)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut rd, mut wr) = tokio::io::split(tls);
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(h2_frame(4, 0, 0, &[]));
    for i in 0..streams {
        out.extend(frames(2 * i + 1));
    }
    let flood = async move {
        // The server may close before it has read it all.
        let _ = wr.write_all(&out).await;
        let _ = wr.flush().await;
        wr
    };
    let answer = async move {
        let mut goaway = None;
        let mut head = [0u8; 9];
        while rd.read_exact(&mut head).await.is_ok() {
            let len =
                (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
            let mut payload = vec![0u8; len];
            if rd.read_exact(&mut payload).await.is_err() {
                break;
            }
            if head[3] == 7 && len >= 8 {
                let last = u32::from_be_bytes(payload[0..4].try_into().unwrap());
                let code = u32::from_be_bytes(payload[4..8].try_into().unwrap());
                goaway = Some((last, code));
            }
        }
        goaway
    };
    let (_wr, goaway) = tokio::time::timeout(Duration::from_secs(20), async {
        tokio::join!(flood, answer)
    })
    .await
    .expect("the connection stayed open");
    goaway
}

/// Every TLS port agrees on AES-128-GCM with the cluster's own clients
/// (the daemons' suite order, `pki::tls`), and on AES-256-GCM with a
/// client that puts it first (ring's own order): a server follows its
/// client's order, so no client loses the suite it prefers.
#[tokio::test(flavor = "multi_thread")]
async fn tls_ports_agree_on_aes_128_gcm_with_ours_and_on_the_clients_choice_with_others() {
    use rustls::CipherSuite;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let cluster = Cluster::start(&["w1"]).await;
    for (port, addr, who) in tls_ports(&cluster).await {
        let addr = &addr;
        let ours = tls_as(&cluster, addr, who, b"h2").await;
        let agreed = ours.get_ref().1.negotiated_cipher_suite().unwrap().suite();
        assert_eq!(agreed, CipherSuite::TLS13_AES_128_GCM_SHA256, "{port}");

        let pki = cluster.pki();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(pki.join("ca.pem")).unwrap())
            .unwrap();
        let chain = CertificateDer::pem_file_iter(pki.join(format!("{who}.pem")))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(pki.join(format!("{who}-key.pem"))).unwrap();
        let ring_order = rustls::crypto::ring::default_provider();
        let theirs = rustls::ClientConfig::builder_with_provider(Arc::new(ring_order))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let theirs = tokio_rustls::TlsConnector::from(Arc::new(theirs))
            .connect(name, tcp)
            .await
            .unwrap();
        let agreed = theirs
            .get_ref()
            .1
            .negotiated_cipher_suite()
            .unwrap()
            .suite();
        assert_eq!(agreed, CipherSuite::TLS13_AES_256_GCM_SHA384, "{port}");
    }
}

/// A handshake message larger than TLS servers here accept (64 KiB, as
/// rustls's own connection allows) closes the connection at once on every
/// TLS port, including the scheduler's gRPC port, whose stream joins a
/// handshake's records in a buffer of its own (`lean_tls`): a peer cannot
/// make a server hold more of it. The cluster goes on serving.
#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_handshake_message_closes_the_connection_on_every_tls_port() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cluster = Cluster::start(&["w1"]).await;
    // A ClientHello that says it is 16 MiB long, then a MiB of it, in
    // records of 16 KiB; and one that says 70,000 bytes, all of it sent.
    let record = |payload: &[u8]| {
        let mut r = vec![0x16, 0x03, 0x01];
        r.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        r.extend_from_slice(payload);
        r
    };
    let hello = |declared: u32, total: usize| {
        let mut message = vec![0x01];
        message.extend_from_slice(&declared.to_be_bytes()[1..]);
        message.resize(total, 0x42);
        message
            .chunks(16 * 1024)
            .flat_map(record)
            .collect::<Vec<u8>>()
    };
    let cases = [
        ("declared 16 MiB", hello(0xFF_FFFF, 1024 * 1024)),
        ("70,000 bytes", hello(70_000, 70_004)),
    ];
    for (port, addr, _) in tls_ports(&cluster).await {
        let addr = &addr;
        for (what, bytes) in &cases {
            let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            // Refused when the message's length is read, in milliseconds;
            // a server that waited for the rest would close it only at the
            // handshake's 5 s deadline.
            let closed = tokio::time::timeout(Duration::from_secs(4), async {
                // Refused before it is all read: the write may fail.
                let (mut rd, mut wr) = tcp.split();
                let send = async {
                    let _ = wr.write_all(bytes).await;
                };
                let read = async {
                    let mut answer = Vec::new();
                    let _ = rd.read_to_end(&mut answer).await;
                    answer
                };
                tokio::join!(send, read).1
            })
            .await
            .unwrap_or_else(|_| panic!("{port}, {what}: the connection stayed open for 4 s"));
            // Nothing but a TLS alert, if anything, comes back.
            assert!(
                closed.is_empty() || closed[0] == 0x15,
                "{port}, {what}: answered {:?}",
                &closed[..closed.len().min(16)]
            );
        }
    }
    still_serves_and_runs(&cluster).await;
}

/// A body that does not arrive within 30 s gets 408 `body_timeout` and
/// its connection closed (HTTP/1.1 and HTTP/2); `args` and `env` over
/// their bounds get 413 `request_too_large` on every start route, naming
/// the bound; listings leave `args` out.
#[tokio::test(flavor = "multi_thread")]
async fn slow_bodies_get_408_oversized_starts_413_and_listings_leave_args_out() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cluster = Cluster::start(&["w1"]).await;
    let url = cluster.url();
    std::fs::write(cluster.tmp.path().join("scripts/nargs.sh"), "echo $#\n").unwrap();

    // 12 of 1,000 announced bytes, over HTTP/1.1.
    let roots = Roots::load(&cluster.pki().join("ca.pem")).unwrap();
    let id = load_identity(&cluster, "client");
    let tls = jobcluster_pki::client_config(&roots, Some(&id), &[b"http/1.1"]).unwrap();
    let addr = cluster.http_addr.clone();
    let slow_h1 = tokio::spawn(async move {
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut conn = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .unwrap();
        let started = std::time::Instant::now();
        conn.write_all(
            b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"path\": \"c",
        )
        .await
        .unwrap();
        let mut answer = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(60), conn.read_to_end(&mut answer)).await;
        (
            started.elapsed(),
            closed.is_ok(),
            String::from_utf8_lossy(&answer).into_owned(),
        )
    });
    // A body that never ends, over HTTP/2.
    let pki = cluster.pki();
    let identity = Identity::load(&pki.join("client.pem"), &pki.join("client-key.pem")).unwrap();
    let tls = jobcluster_pki::client_config(&roots, Some(&identity), &[b"h2"]).unwrap();
    let h2 = reqwest::Client::builder()
        .tls_backend_preconfigured((*tls).clone())
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let slow_h2 = tokio::spawn({
        let url = url.clone();
        async move {
            let body = futures_util::stream::iter([Ok::<_, std::io::Error>(
                bytes::Bytes::from_static(b"{\"path\": \"c"),
            )])
            .chain(futures_util::stream::pending());
            let started = std::time::Instant::now();
            let reply = h2
                .post(format!("{url}/v1/jobs"))
                .body(reqwest::Body::wrap_stream(body))
                .send()
                .await
                .unwrap();
            (started.elapsed(), status_and_code(reply).await)
        }
    });

    let big = "x".repeat(130 * 1024);
    let third = "x".repeat(100 * 1024);
    let many_args: Vec<String> = (0..1025).map(|i| i.to_string()).collect();
    let many_env: serde_json::Map<String, serde_json::Value> =
        (0..257).map(|i| (format!("V{i}"), json!("1"))).collect();
    let cases = [
        (
            "/v1/jobs",
            json!({"worker_id": "w1", "path": "nargs.sh", "args": [big]}),
            "131071",
        ),
        (
            "/v1/jobs",
            json!({"path": "nargs.sh", "args": [third, third, third]}),
            "262144",
        ),
        (
            "/v1/jobs",
            json!({"worker_id": "w1", "path": "nargs.sh", "args": many_args}),
            "1024",
        ),
        (
            "/v1/jobs",
            json!({"worker_id": "w1", "path": "nargs.sh", "env": many_env}),
            "256",
        ),
        (
            "/v1/jobs",
            json!({"worker_id": "w1", "path": "nargs.sh", "env": {"BIG": big}}),
            "131071",
        ),
        (
            "/start",
            json!({"worker_id": "w1", "command": "bash", "path": "nargs.sh", "args": [big]}),
            "131071",
        ),
        (
            "/v1/groups",
            json!({"all": true, "path": "nargs.sh", "args": [third, third, third]}),
            "262144",
        ),
    ];
    for (i, (route, body, limit)) in cases.into_iter().enumerate() {
        let reply = cluster
            .http()
            .post(format!("{url}{route}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), StatusCode::PAYLOAD_TOO_LARGE, "case {i}");
        let error: ErrorBody = reply.json().await.unwrap();
        assert_eq!(error.code, "request_too_large", "case {i}");
        assert!(error.error.contains(limit), "case {i}: {}", error.error);
    }

    // Within the bounds: started; shown with its args, listed without.
    let arg = "y".repeat(120 * 1024);
    let mut ids = Vec::new();
    for _ in 0..4 {
        let reply = cluster
            .http()
            .post(format!("{url}/v1/jobs"))
            .json(&json!({"worker_id": "w1", "path": "nargs.sh", "args": [arg, arg]}))
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), StatusCode::CREATED);
        let started: jobcluster_proto::http::JobStarted = reply.json().await.unwrap();
        ids.push(started.job_id);
    }
    let out = cluster.ctl_output(&["logs", "-f", &ids[0]]).await;
    assert_eq!(stdout(&out), "2\n", "{}", stderr(&out));
    let job = cluster.job(&ids[0]).await;
    assert_eq!(job.args, Some(vec![arg.clone(), arg.clone()]));
    let listing = cluster
        .http()
        .get(format!("{url}/v1/jobs?limit=1000"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let listed: serde_json::Value = serde_json::from_slice(&listing).unwrap();
    assert_eq!(listed["jobs"].as_array().unwrap().len(), 4);
    assert!(
        listed["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|j| j.get("args").is_none()),
        "a listing carried args"
    );
    assert!(listing.len() < 16 * 1024, "{} bytes listed", listing.len());

    let (took, answered) = slow_h2.await.unwrap();
    assert_eq!(
        answered,
        (StatusCode::REQUEST_TIMEOUT, "body_timeout".to_owned()),
        "HTTP/2 after {took:?}"
    );
    let (took, closed, answer) = slow_h1.await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 408") && answer.contains("body_timeout"),
        "after {took:?}: {answer}"
    );
    assert!(closed, "the connection of a slow body stayed open");
    assert!(
        took >= Duration::from_secs(25) && took < Duration::from_secs(45),
        "answered after {took:?}"
    );
    still_serves(&cluster).await;
}

/// The API answers and a job still runs to its end on w1.
async fn still_serves_and_runs(cluster: &Cluster) {
    still_serves(cluster).await;
    let out = cluster
        .ctl_output(&["run", "--worker", "w1", "count.sh", "--", "1", "0"])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
}

async fn still_serves(cluster: &Cluster) {
    let reply = cluster
        .http()
        .get(format!("{}/v1/workers", cluster.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::OK, "the API stopped serving");
}

/// `--token-file` and the environment keep a token out of `ps`; `--token`
/// still works but says it is visible there. The scheduler's database is
/// its owner's alone.
#[tokio::test(flavor = "multi_thread")]
async fn tokens_stay_out_of_ps_and_the_store_is_the_schedulers_alone() {
    use std::os::unix::fs::PermissionsExt;
    let cluster = Cluster::start_with_on_sqlite(&["w1"], &auth_config(), "").await;
    let file = cluster.tmp.path().join("operator.token");
    std::fs::write(&file, format!("{OPERATOR_TOKEN}\n")).unwrap();
    let file = file.to_str().unwrap();
    let missing = cluster.tmp.path().join("missing.token");
    let missing = missing.to_str().unwrap();
    type Case<'a> = (&'a str, Vec<&'a str>, Vec<(&'a str, &'a str)>, bool, bool);
    let cases: Vec<Case<'_>> = vec![
        (
            "--token-file",
            vec!["--token-file", file],
            vec![],
            true,
            false,
        ),
        (
            "CLUSTERCTL_TOKEN_FILE",
            vec![],
            vec![("CLUSTERCTL_TOKEN_FILE", file)],
            true,
            false,
        ),
        (
            "CLUSTERCTL_TOKEN",
            vec![],
            vec![("CLUSTERCTL_TOKEN", OPERATOR_TOKEN)],
            true,
            false,
        ),
        (
            "--token",
            vec!["--token", OPERATOR_TOKEN],
            vec![],
            true,
            true,
        ),
        (
            "missing file",
            vec!["--token-file", missing],
            vec![],
            false,
            false,
        ),
    ];
    for (what, args, env, works, warns) in cases {
        let out = cluster
            .ctl()
            .env_remove("CLUSTERCTL_CERT")
            .env_remove("CLUSTERCTL_KEY")
            .envs(env)
            .args(args)
            .args(["workers", "-o", "json"])
            .output()
            .await
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.success(), works, "{what}: {err}");
        assert_eq!(
            err.contains("visible to every user"),
            warns,
            "{what}: {err}"
        );
        if works {
            assert!(stdout(&out).contains("\"ready\""), "{what}: {err}");
        } else {
            assert!(err.contains("missing.token"), "{what}: {err}");
        }
        assert!(
            !err.contains(OPERATOR_TOKEN),
            "{what}: the token was echoed"
        );
    }

    let db = cluster.tmp.path().join("state/scheduler.db");
    for suffix in ["", "-wal", "-shm"] {
        let path = format!("{}{suffix}", db.display());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{path}");
    }
}

/// Posts `body` to `path` in a task of its own, so a test can see whether
/// the answer waits; the task gives the status and the body.
fn post_in_background(
    cluster: &Cluster,
    path: &'static str,
    body: serde_json::Value,
) -> tokio::task::JoinHandle<(StatusCode, String)> {
    let (http, url) = (cluster.http(), cluster.url());
    tokio::spawn(async move {
        let reply = http
            .post(format!("{url}{path}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        (reply.status(), reply.text().await.unwrap())
    })
}

/// Another writer (python3's sqlite3) holds the scheduler's database from
/// the moment this returns until [`Holder::release`] (or the test's end:
/// its stdin closes), so no check races a fixed hold time on a loaded
/// machine.
pub(crate) fn hold_store(cluster: &Cluster) -> Holder {
    let db = cluster.tmp.path().join("state").join("scheduler.db");
    let mut child = std::process::Command::new("python3")
        .args([
            "-c",
            "import sqlite3, sys\n\
             c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)\n\
             c.execute('BEGIN IMMEDIATE')\n\
             print('held', flush=True)\n\
             sys.stdin.readline()\n\
             c.execute('COMMIT')\n",
        ])
        .arg(&db)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = child.stdout.take().unwrap();
    let mut held = [0u8; 5];
    said.read_exact(&mut held).unwrap();
    assert_eq!(&held, b"held\n");
    let stdin = child.stdin.take();
    Holder { child, stdin }
}

pub(crate) struct Holder {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
}

impl Holder {
    /// Lets the store go: the holder commits and ends.
    pub(crate) fn release(mut self) {
        drop(self.stdin.take());
        assert!(self.child.wait().unwrap().success());
    }
}

/// A worker new to the scheduler whose first registration the store
/// cannot record (held by another writer past the 5 s a write waits) is
/// not shown, and a start and a drain naming it, which waited for its
/// record, are refused `503 worker_unavailable` once the write failed:
/// nothing is recorded under an id the store never held.
#[tokio::test(flavor = "multi_thread")]
async fn a_start_waiting_for_a_registration_the_store_cannot_record_is_refused() {
    let cluster = Cluster::start_with_on_sqlite(&["w1"], "", "").await;
    cluster.issue_worker_cert("w9");
    let mut w9 = grpc_as(&cluster, &load_identity(&cluster, "w9"));
    let holder = hold_store(&cluster);
    let mut request = tonic::Request::new(RegisterWorkerRequest {
        name: "w9".into(),
        address: "127.0.0.1:1".into(),
        instance_id: "a1b2c3d4-0000-4000-8000-000000000019".into(),
        plugins: vec!["bash".into()],
        ..Default::default()
    });
    request.set_timeout(Duration::from_millis(300));
    let first = w9.register_worker(request).await.unwrap_err();
    assert_eq!(first.code(), tonic::Code::Cancelled, "{first:?}");
    let ask = |path, body| post_in_background(&cluster, path, body);
    let drain = ask("/v1/workers/w9/drain", json!({}));
    let start = ask("/v1/jobs", json!({"worker_id": "w9", "path": "count.sh"}));
    // They wait for the write instead of being refused at once.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!drain.is_finished() && !start.is_finished());
    for (what, answer) in [("drain", drain), ("start", start)] {
        let (status, text) = answer.await.unwrap();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{what}: {text}");
        let error: ErrorBody = serde_json::from_str(&text).unwrap();
        assert_eq!(error.code, "worker_unavailable", "{what}: {error:?}");
        assert!(
            error.error.contains("still registering"),
            "{what}: {error:?}"
        );
    }
    // Answered while the store was still held: the write had failed.
    holder.release();
    let workers: jobcluster_proto::http::WorkerList = cluster.get_json("/v1/workers").await;
    assert!(
        !workers.workers.iter().any(|w| w.name == "w9"),
        "a worker the store does not hold is listed: {workers:?}"
    );
    let jobs: jobcluster_proto::http::JobList = cluster.get_json("/v1/jobs?limit=1000").await;
    assert!(jobs.jobs.is_empty(), "{jobs:?}");
}

/// A worker that gives up on its registration and sends another while the
/// first is still being written (the store held by another writer) is
/// refused, `aborted`, until the first is settled: one registration per
/// worker at a time, so none can pile up behind a slow store, and an undo
/// only ever goes back to what it replaced. Meanwhile a start and a drain
/// naming the new worker wait for its record (an undo would forget the id
/// they name). The first lands once the store is free; then the drain is
/// kept, the start goes ahead, and the worker's next registration is
/// taken.
#[tokio::test(flavor = "multi_thread")]
async fn a_registration_sent_again_while_the_first_is_written_is_refused() {
    let cluster = Cluster::start_with_on_sqlite(&["w1"], "", "").await;
    cluster.issue_worker_cert("w9");
    let mut w9 = grpc_as(&cluster, &load_identity(&cluster, "w9"));
    let request = || {
        let mut request = tonic::Request::new(RegisterWorkerRequest {
            name: "w9".into(),
            address: "127.0.0.1:1".into(),
            instance_id: "a1b2c3d4-0000-4000-8000-000000000009".into(),
            plugins: vec!["bash".into()],
            ..Default::default()
        });
        request.set_timeout(Duration::from_millis(300));
        request
    };

    // Another writer holds the database until the checks below are done
    // (the scheduler's writes wait up to 5 s for it; the checks take about
    // a second).
    let holder = hold_store(&cluster);

    let first = w9.register_worker(request()).await.unwrap_err();
    assert_eq!(first.code(), tonic::Code::Cancelled, "{first:?}");
    let again = w9.register_worker(request()).await.unwrap_err();
    assert_eq!(again.code(), tonic::Code::Aborted, "{again:?}");
    assert!(
        again.message().contains("still being recorded"),
        "{again:?}"
    );
    // A drain and a start naming w9 now wait for its record: an answer
    // before it lands could name an id the store never holds.
    let ask = |path, body| post_in_background(&cluster, path, body);
    let drain = ask("/v1/workers/w9/drain", json!({}));
    let start = ask("/v1/jobs", json!({"worker_id": "w9", "path": "count.sh"}));
    // The store is still held: neither can have answered.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!drain.is_finished() && !start.is_finished());
    holder.release();
    // Then the drain is kept, and the start reaches w9's (unreachable)
    // address instead of being refused as still registering.
    let (status, text) = drain.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{text}");
    let (status, text) = start.await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    let error: ErrorBody = serde_json::from_str(&text).unwrap();
    assert!(
        ["worker_unavailable", "worker_unresponsive"].contains(&error.code.as_str())
            && !error.error.contains("still registering"),
        "{error:?}"
    );
    let mut registered = None;
    for _ in 0..100 {
        match w9.register_worker(request()).await {
            Ok(reply) => {
                registered = Some(reply.into_inner().worker_id);
                break;
            }
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let id = registered.expect("registered once the store was free");
    assert_eq!(cluster.worker_info("w9").await.worker_id, id);
    let out = cluster.ctl_output(&["workers", "drain", "w9"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
}
