//! The HTTPS client against a tiny local TLS server: real reqwest, hyper and
//! rustls error chains, and a follower resuming after a cut body.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use jobcluster_pki::{Identity, Roots};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::api::{Api, ApiError, ConnectOptions};
use crate::follow::{JobLogs, Retry, stream_output};

/// A cluster PKI directory made by `pki init`, removed on drop.
struct PkiDir(PathBuf);

impl PkiDir {
    fn new(name: &str) -> PkiDir {
        let dir = std::env::temp_dir().join(format!("clusterctl-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        jobcluster_pki::init_dir(&dir, &[]).unwrap();
        PkiDir(dir)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for PkiDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Client options trusting `trust`'s CA and presenting `client_of`'s client
/// certificate.
fn client(scheduler: String, trust: &PkiDir, client_of: &PkiDir) -> Api {
    Api::new(&ConnectOptions {
        scheduler,
        ca: Some(trust.path("ca.pem")),
        cert: Some(client_of.path("client.pem")),
        key: Some(client_of.path("client-key.pem")),
        token: None,
    })
    .unwrap()
}

/// Serves HTTP/1.1 over TLS with `dir`'s scheduler certificate, requiring
/// client certificates of `dir`'s CA. `respond` gets the request head and
/// the number of the request, and returns the raw bytes to send before the
/// connection is closed (so a response may be cut anywhere).
async fn serve(
    dir: &Path,
    respond: impl Fn(&str, usize) -> Vec<u8> + Send + Sync + 'static,
) -> String {
    let identity =
        Identity::load(&dir.join("scheduler.pem"), &dir.join("scheduler-key.pem")).unwrap();
    let roots = Roots::load(&dir.join("ca.pem")).unwrap();
    let config = jobcluster_pki::server_config(&identity, &roots, &[b"http/1.1"]).unwrap();
    let acceptor = TlsAcceptor::from(config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let respond = Arc::new(respond);
    let count = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let respond = respond.clone();
            let count = count.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let n = count.fetch_add(1, Ordering::SeqCst);
                let answer = respond(&String::from_utf8_lossy(&head), n);
                let _ = tls.write_all(&answer).await;
                let _ = tls.flush().await;
                // Dropped without close_notify or a last chunk: a cut body.
            });
        }
    });
    format!("https://localhost:{}", addr.port())
}

fn json_response(status: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn chunked_head() -> String {
    "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n\
     transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        .to_owned()
}

fn chunk(data: &str) -> String {
    format!("{:x}\r\n{data}\r\n", data.len())
}

#[tokio::test(flavor = "current_thread")]
async fn connection_refused_says_to_start_the_scheduler() {
    let pki = PkiDir::new("refused");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let api = client(format!("https://127.0.0.1:{port}"), &pki, &pki);
    let err = api.job("j1").await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "cannot reach the scheduler at https://127.0.0.1:{port}: connection refused \
             (is schedulerd running? set --scheduler or CLUSTERCTL_SCHEDULER)"
        )
    );
    assert!(err.is_retryable());
}

#[tokio::test(flavor = "current_thread")]
async fn a_scheduler_of_another_ca_is_an_unknown_ca() {
    let ours = PkiDir::new("ours-1");
    let theirs = PkiDir::new("theirs-1");
    let url = serve(&theirs.0, |_, _| json_response("200 OK", "{}")).await;
    let api = client(url, &ours, &ours);
    let err = api.job("j1").await.unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("certificate signed by an unknown CA (check --ca / CLUSTERCTL_CA)"),
        "{message}"
    );
    assert!(!err.is_retryable());
}

#[tokio::test(flavor = "current_thread")]
async fn a_client_certificate_of_another_ca_is_refused() {
    let ours = PkiDir::new("ours-2");
    let theirs = PkiDir::new("theirs-2");
    let url = serve(&ours.0, |_, _| json_response("200 OK", "{}")).await;
    let api = client(url, &ours, &theirs);
    let err = api.job("j1").await.unwrap_err();
    let message = err.to_string();
    assert!(message.contains("--cert/--key"), "{message}");
}

#[tokio::test(flavor = "current_thread")]
async fn api_errors_print_the_error_body() {
    let pki = PkiDir::new("status");
    let url = serve(&pki.0, |head, _| {
        assert!(
            head.starts_with("GET /v1/jobs/nope%2Fx HTTP/1.1\r\n"),
            "{head}"
        );
        json_response(
            "404 Not Found",
            r#"{"error":"unknown job nope/x","code":"job_not_found"}"#,
        )
    })
    .await;
    let api = client(url, &pki, &pki);
    let err = api.job("nope/x").await.unwrap_err();
    assert!(matches!(err, ApiError::Status { .. }));
    assert_eq!(err.to_string(), "unknown job nope/x (job_not_found)");
}

#[tokio::test(flavor = "current_thread")]
async fn a_cut_body_is_resumed_from_the_last_byte() {
    let pki = PkiDir::new("follow");
    let job = r#"{"job_id":"j1","worker_id":"w1","command":"bash","path":"count.sh",
        "args":[],"state":"failed","done":true,"error":true,"error_text":"",
        "exit_code":3,"signal":null,"created_at":"2025-01-01T00:00:00Z",
        "started_at":null,"finished_at":null,"output_bytes":21}"#;
    let url = serve(&pki.0, move |head, n| {
        let line = head.lines().next().unwrap_or_default().to_owned();
        match n {
            0 => {
                assert!(
                    line.contains("/v1/jobs/j1/logs?follow=true&offset=0 "),
                    "{line}"
                );
                // Cut in the middle of the second chunk.
                (chunked_head() + &chunk("line 1\n") + "7\r\nlin").into_bytes()
            }
            // "lin" arrived inside an unfinished chunk; hyper hands out
            // chunk data as it comes, so the next offset is 7 or 10.
            1 if line.contains("offset=7 ") => {
                (chunked_head() + &chunk("line 2\nline 3\n") + "0\r\n\r\n").into_bytes()
            }
            1 if line.contains("offset=10 ") => {
                (chunked_head() + &chunk("e 2\nline 3\n") + "0\r\n\r\n").into_bytes()
            }
            _ if line.starts_with("GET /v1/jobs/j1 ") => json_response("200 OK", job),
            _ => panic!("unexpected request {n}: {line}"),
        }
    })
    .await;
    let api = client(url, &pki, &pki);
    let mut out = Vec::new();
    let retry = Retry {
        first_delay: Duration::from_millis(1),
        ..Retry::default()
    };
    let source = JobLogs {
        api: &api,
        job_id: "j1",
    };
    let job = stream_output(&source, "j1", 0, true, false, &mut out, &retry)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(String::from_utf8(out).unwrap(), "line 1\nline 2\nline 3\n");
    assert_eq!(crate::follow::exit_code_of(&job), 3);
}

/// A stop of a job whose start has not reached its worker yet (just
/// dispatched) is asked again, not given up with the job left to run.
#[tokio::test(flavor = "current_thread")]
async fn a_stop_of_a_job_still_starting_is_asked_again() {
    let pki = PkiDir::new("stop-starting");
    let url = serve(&pki.0, |head, n| {
        assert!(
            head.starts_with("POST /v1/jobs/j1/stop HTTP/1.1\r\n"),
            "{head}"
        );
        match n {
            0 => json_response(
                "503 Service Unavailable",
                r#"{"error":"job j1 is not running on worker w1 yet","code":"job_starting","job_id":"j1"}"#,
            ),
            _ => json_response("200 OK", r#"{"success":true,"state":"stopped"}"#),
        }
    })
    .await;
    let api = client(url, &pki, &pki);
    let answer = api.stop("j1").await.unwrap();
    assert_eq!(answer.parsed.state, "stopped");
}
