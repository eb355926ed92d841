//! Prometheus metrics through the real binaries: scraped before and after
//! jobs, parsed as the Prometheus text format, and compared by label.

use std::time::Duration;

use reqwest::StatusCode;
use std::collections::{BTreeMap, HashMap, HashSet};

use crate::cluster::Cluster;
use crate::security::{VIEWER_TOKEN, auth_config};

pub(crate) const METRICS_LISTENER: &str = "\n[metrics]\naddr = \"127.0.0.1:0\"\n";

/// The address a daemon logged for its `[metrics] addr` listener.
pub(crate) fn metrics_addr(log: &str) -> String {
    log.lines()
        .find_map(|line| {
            line.split_once("metrics server listening addr=")?
                .1
                .split_whitespace()
                .next()
        })
        .unwrap_or_else(|| panic!("no metrics listener in the log:\n{log}"))
        .to_owned()
}

/// One sample line of the exposition.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed exposition: each family's type (from `# TYPE`) and every sample.
#[derive(Debug)]
pub(crate) struct Scrape {
    types: HashMap<String, String>,
    samples: Vec<Sample>,
}

fn metric_name(s: &str) -> usize {
    s.char_indices()
        .find(|&(i, c)| {
            !(c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit()))
        })
        .map_or(s.len(), |(i, _)| i)
}

fn label_name(s: &str) -> usize {
    s.char_indices()
        .find(|&(i, c)| !(c.is_ascii_alphabetic() || c == '_' || (i > 0 && c.is_ascii_digit())))
        .map_or(s.len(), |(i, _)| i)
}

fn float(text: &str) -> Result<f64, String> {
    match text {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => text.parse().map_err(|_| format!("bad value {text:?}")),
    }
}

/// `{name="value",...}` at the start of `s`: the labels and what follows.
fn labels(mut s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    s = s.strip_prefix('{').ok_or("no {")?;
    loop {
        if let Some(rest) = s.strip_prefix('}') {
            return Ok((labels, rest));
        }
        let n = label_name(s);
        if n == 0 {
            return Err(format!("bad label name at {s:?}"));
        }
        let name = s[..n].to_owned();
        s = s[n..].strip_prefix("=\"").ok_or("no =\"")?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            match chars.next().ok_or("unterminated label value")? {
                (i, '"') => break i,
                (_, '\\') => match chars.next().ok_or("dangling escape")?.1 {
                    '\\' => value.push('\\'),
                    '"' => value.push('"'),
                    'n' => value.push('\n'),
                    c => return Err(format!("bad escape \\{c}")),
                },
                (_, c) => value.push(c),
            }
        };
        if labels.insert(name.clone(), value).is_some() {
            return Err(format!("label {name} twice"));
        }
        s = &s[end + 1..];
        s = s.strip_prefix(',').unwrap_or(s);
    }
}

/// Parses the Prometheus text format (0.0.4) strictly: valid names,
/// label values with their escapes, one `# TYPE` per family before its
/// samples, each family's samples together, counters named `_total`, and
/// histograms whose cumulative buckets end in a `+Inf` equal to `_count`.
fn parse(text: &str) -> Scrape {
    let fail = |line: &str, why: String| -> ! { panic!("{why} in line {line:?} of:\n{text}") };
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helps = HashSet::new();
    let mut samples = Vec::new();
    let mut done = HashSet::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix("# ") {
            if let Some(rest) = comment.strip_prefix("HELP ") {
                let name = rest.split(' ').next().unwrap_or_default();
                if metric_name(name) != name.len()
                    || name.is_empty()
                    || !helps.insert(name.to_owned())
                {
                    fail(line, "bad or repeated HELP".into());
                }
            } else if let Some(rest) = comment.strip_prefix("TYPE ") {
                let (name, kind) = rest
                    .split_once(' ')
                    .unwrap_or_else(|| fail(line, "TYPE without a type".into()));
                if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                    fail(line, format!("unknown type {kind}"));
                }
                if kind == "counter" && !name.ends_with("_total") {
                    fail(line, "a counter not named _total".into());
                }
                if types.insert(name.to_owned(), kind.to_owned()).is_some() || done.contains(name) {
                    fail(line, "TYPE repeated or after its samples".into());
                }
            }
            continue;
        }
        let n = metric_name(line);
        if n == 0 {
            fail(line, "no metric name".into());
        }
        let name = &line[..n];
        let (labels, rest) = if line[n..].starts_with('{') {
            labels(&line[n..]).unwrap_or_else(|e| fail(line, e))
        } else {
            (BTreeMap::new(), &line[n..])
        };
        let mut fields = rest
            .strip_prefix(' ')
            .unwrap_or_else(|| fail(line, "no space before the value".into()))
            .split(' ');
        let value = float(fields.next().unwrap_or_default()).unwrap_or_else(|e| fail(line, e));
        if let Some(ts) = fields.next() {
            ts.parse::<i64>()
                .unwrap_or_else(|_| fail(line, "bad timestamp".into()));
        }
        if fields.next().is_some() {
            fail(line, "trailing fields".into());
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                let base = name.strip_suffix(suffix)?;
                (types.get(base).map(String::as_str) == Some("histogram")).then_some(base)
            })
            .unwrap_or(name);
        if !types.contains_key(family) {
            fail(line, "a sample without a TYPE for its family".into());
        }
        if current.as_deref() != Some(family) {
            if done.contains(family) {
                fail(line, "a family's samples are not together".into());
            }
            if let Some(previous) = current.replace(family.to_owned()) {
                done.insert(previous);
            }
        }
        if name.ends_with("_bucket") && family != name && !labels.contains_key("le") {
            fail(line, "a bucket without le".into());
        }
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    // Buckets are cumulative and the +Inf one counts every observation.
    for count in samples.iter().filter(|s| {
        s.name
            .strip_suffix("_count")
            .is_some_and(|base| types.get(base).map(String::as_str) == Some("histogram"))
    }) {
        let base = count.name.strip_suffix("_count").unwrap();
        let mut buckets: Vec<(f64, f64)> = samples
            .iter()
            .filter(|b| b.name == format!("{base}_bucket"))
            .filter(|b| {
                let mut rest = b.labels.clone();
                rest.remove("le");
                rest == count.labels
            })
            .map(|b| (float(&b.labels["le"]).unwrap(), b.value))
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "{base} {:?}: buckets not cumulative",
            count.labels
        );
        assert_eq!(
            buckets.last().copied(),
            Some((f64::INFINITY, count.value)),
            "{base} {:?}: +Inf bucket and _count",
            count.labels
        );
    }
    Scrape { types, samples }
}

fn matches(sample: &Sample, name: &str, labels: &[(&str, &str)]) -> bool {
    sample.name == name
        && labels
            .iter()
            .all(|(k, v)| sample.labels.get(*k).map(String::as_str) == Some(*v))
}

/// The value of the one sample of `name` with `labels` (0 when there is
/// none: a counter not yet created); `kind` is the type its family has.
fn typed_value(scrape: &Scrape, name: &str, kind: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<&Sample> = scrape
        .samples
        .iter()
        .filter(|s| matches(s, name, labels))
        .collect();
    assert!(found.len() <= 1, "{name} {labels:?} matches {found:?}");
    if let Some(sample) = found.first() {
        let family = ["_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|b| scrape.types.contains_key(*b))
            })
            .unwrap_or(name);
        assert_eq!(scrape.types[family], kind, "{name}: type of {family}");
        sample.value
    } else {
        0.0
    }
}

pub(crate) fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let kind = if name.ends_with("_total") {
        "counter"
    } else {
        "gauge"
    };
    typed_value(scrape, name, kind, labels)
}

/// How many observations a histogram holds.
fn observations(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    typed_value(scrape, &format!("{name}_count"), "histogram", labels)
}

/// The count of `GET route` answered 200 in a scrape: a route's pattern,
/// as `/v1/jobs/{id}`.
pub(crate) fn gets_answered(route: &'static str) -> impl Fn(&Scrape) -> f64 {
    move |scrape| {
        value(
            scrape,
            "schedulerd_http_requests_total",
            &[("route", route), ("method", "GET"), ("status", "200")],
        )
    }
}

pub(crate) async fn scrape_with(client: &reqwest::Client, url: &str) -> Scrape {
    let reply = client.get(url).send().await.unwrap();
    assert_eq!(reply.status(), StatusCode::OK, "{url}");
    let content_type = reply.headers()[reqwest::header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{url}: {content_type}"
    );
    parse(&reply.text().await.unwrap())
}

async fn wait_ended(cluster: &Cluster, job_id: &str) -> String {
    for _ in 0..400 {
        let state = cluster.job(job_id).await.state;
        if ["succeeded", "failed", "stopped", "lost"].contains(&state.as_str()) {
            return state;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("job {job_id} never ended");
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_jobs_requests_output_and_store_operations() {
    let cluster = Cluster::start_with(
        &["w1"],
        &format!("{}{METRICS_LISTENER}", auth_config()),
        &format!("---{METRICS_LISTENER}"),
    )
    .await;
    let url = format!("{}/metrics", cluster.url());
    let worker_id = cluster.worker_info("w1").await.worker_id;
    let w = worker_id.as_str();
    let plain = cluster.http_as(None);
    let worker_url = format!(
        "http://{}/metrics",
        metrics_addr(&cluster.workers[0].1.log())
    );
    let scheduler_plain_url = format!("http://{}/metrics", metrics_addr(&cluster.scheduler.log()));

    let before = scrape_with(&cluster.http(), &url).await;
    let worker_before = scrape_with(&plain, &worker_url).await;

    let succeeding = [
        cluster.start_job("w1", "count.sh", &["2", "0"]).await,
        cluster.start_job("w1", "count.sh", &["3", "0"]).await,
    ];
    let failing = cluster.start_job("w1", "fail.sh", &[]).await;
    for id in &succeeding {
        assert_eq!(wait_ended(&cluster, id).await, "succeeded");
    }
    assert_eq!(wait_ended(&cluster, &failing).await, "failed");
    let logs = cluster
        .http()
        .get(format!("{}/v1/jobs/{}/logs", cluster.url(), succeeding[1]))
        .send()
        .await
        .unwrap();
    assert_eq!(logs.status(), StatusCode::OK);
    let streamed = logs.bytes().await.unwrap().len() as f64;
    assert_eq!(streamed, "1\n2\n3\ndone\n".len() as f64);

    let after = scrape_with(&cluster.http(), &url).await;
    let delta = |name: &str, labels: &[(&str, &str)]| {
        value(&after, name, labels) - value(&before, name, labels)
    };
    let bash = [("worker", w), ("plugin", "bash")];
    assert_eq!(delta("schedulerd_jobs_started_total", &bash), 3.0);
    let finished = |state| {
        delta(
            "schedulerd_jobs_finished_total",
            &[("state", state), ("worker", w), ("plugin", "bash")],
        )
    };
    assert_eq!(finished("succeeded"), 2.0);
    assert_eq!(finished("failed"), 1.0);
    assert_eq!(finished("stopped"), 0.0);
    let started_latency = observations(
        &after,
        "schedulerd_job_start_latency_seconds",
        &[("queued", "false")],
    ) - observations(
        &before,
        "schedulerd_job_start_latency_seconds",
        &[("queued", "false")],
    );
    assert_eq!(started_latency, 3.0);
    // Requests by their route template, never the raw path.
    let created = [("route", "/v1/jobs"), ("method", "POST"), ("status", "201")];
    assert_eq!(delta("schedulerd_http_requests_total", &created), 3.0);
    let shown = [
        ("route", "/v1/jobs/{id}"),
        ("method", "GET"),
        ("status", "200"),
    ];
    assert!(delta("schedulerd_http_requests_total", &shown) >= 3.0);
    let logs_route = [
        ("route", "/v1/jobs/{id}/logs"),
        ("method", "GET"),
        ("status", "200"),
    ];
    assert_eq!(delta("schedulerd_http_requests_total", &logs_route), 1.0);
    assert_eq!(
        observations(
            &after,
            "schedulerd_http_request_duration_seconds",
            &[("route", "/v1/jobs"), ("method", "POST")]
        ),
        3.0
    );
    for sample in &after.samples {
        if let Some(route) = sample.labels.get("route") {
            assert!(
                !succeeding
                    .iter()
                    .chain([&failing])
                    .any(|id| route.contains(id.as_str())),
                "a raw path became a label: {route}"
            );
        }
    }
    assert_eq!(
        delta("schedulerd_output_streamed_bytes_total", &[]),
        streamed
    );
    assert_eq!(value(&after, "schedulerd_followers", &[]), 0.0);
    assert_eq!(value(&after, "schedulerd_queued_jobs", &[]), 0.0);
    assert_eq!(
        value(&after, "schedulerd_workers", &[("state", "ready")]),
        1.0
    );
    assert_eq!(
        value(&after, "schedulerd_workers", &[("state", "down")]),
        0.0
    );
    assert_eq!(
        value(&after, "schedulerd_worker_slots_used", &[("worker", w)]),
        0.0
    );
    // A start on a named worker checks the queue in its record's write.
    let inserts: f64 = ["insert_job", "insert_job_unless_ahead"]
        .into_iter()
        .map(|operation| {
            let op = [("operation", operation)];
            observations(&after, "schedulerd_store_operation_duration_seconds", &op)
                - observations(&before, "schedulerd_store_operation_duration_seconds", &op)
        })
        .sum();
    assert_eq!(inserts, 3.0);
    assert!(
        observations(
            &after,
            "schedulerd_store_operation_duration_seconds",
            &[("operation", "update_started")]
        ) >= 3.0
    );
    assert!(
        after
            .samples
            .iter()
            .all(|s| s.labels.get("operation").map(String::as_str) != Some("other")),
        "a store operation without its name"
    );

    // The worker's own listener, plaintext on loopback.
    let worker_after = scrape_with(&plain, &worker_url).await;
    let worker_delta = |name: &str, labels: &[(&str, &str)]| {
        value(&worker_after, name, labels) - value(&worker_before, name, labels)
    };
    assert_eq!(
        worker_delta("workerd_jobs_started_total", &[("plugin", "bash")]),
        3.0
    );
    let worker_finished = |state| {
        worker_delta(
            "workerd_jobs_finished_total",
            &[("state", state), ("plugin", "bash")],
        )
    };
    assert_eq!(worker_finished("succeeded"), 2.0);
    assert_eq!(worker_finished("failed"), 1.0);
    let written = "1\n2\ndone\n".len()
        + "1\n2\n3\ndone\n".len()
        + "about to fail\nfailing on purpose\n".len();
    assert_eq!(
        worker_delta("workerd_output_written_bytes_total", &[]),
        written as f64
    );
    assert_eq!(
        worker_delta("workerd_output_streamed_bytes_total", &[]),
        streamed
    );
    assert_eq!(value(&worker_after, "workerd_job_slots_used", &[]), 0.0);
    assert_eq!(value(&worker_after, "workerd_followers", &[]), 0.0);
    let missing = plain
        .get(worker_url.replace("/metrics", "/other"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);

    // The scheduler's plaintext listener serves the same families.
    let scheduler_plain = scrape_with(&plain, &scheduler_plain_url).await;
    assert!(value(&scheduler_plain, "schedulerd_jobs_started_total", &bash) >= 3.0);
    let api_only = plain
        .get(scheduler_plain_url.replace("/metrics", "/v1/jobs"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        api_only.status(),
        StatusCode::NOT_FOUND,
        "the plain listener serves only /metrics"
    );

    // OpenMetrics for a scraper that asks for it.
    let openmetrics = cluster
        .http()
        .get(&url)
        .header("accept", "application/openmetrics-text;version=1.0.0")
        .send()
        .await
        .unwrap();
    assert!(
        openmetrics.headers()[reqwest::header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    assert!(openmetrics.text().await.unwrap().ends_with("# EOF\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_on_the_api_need_viewer_credentials_or_better() {
    let cluster = Cluster::start_with(&["w1"], &auth_config(), "").await;
    let url = format!("{}/metrics", cluster.url());
    let anonymous = cluster.http_as(None);

    let viewer = anonymous
        .get(&url)
        .bearer_auth(VIEWER_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(viewer.status(), StatusCode::OK);
    let text = viewer.text().await.unwrap();
    assert!(value(&parse(&text), "schedulerd_workers", &[("state", "ready")]) == 1.0);

    let nobody = anonymous.get(&url).send().await.unwrap();
    assert_eq!(nobody.status(), StatusCode::UNAUTHORIZED);
    let wrong = anonymous
        .get(&url)
        .bearer_auth("not-a-token")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);

    // Refusals are counted too, under their route.
    let scrape = scrape_with(&cluster.http(), &url).await;
    assert!(
        value(
            &scrape,
            "schedulerd_http_requests_total",
            &[("route", "/metrics"), ("method", "GET"), ("status", "401")]
        ) >= 2.0
    );
}

#[test]
fn a_metrics_addr_that_is_not_an_ip_and_port_is_refused_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("scripts")).unwrap();
    let insecure = "[grpc_server]\nuse_tls = false\ninsecure = true\n";
    let configs = [
        ("schedulerd", insecure.to_owned()),
        (
            "workerd",
            format!(
                "{insecure}\n[worker]\nname = \"w1\"\nscripts_dir = \"scripts\"\nstate_dir = \"state\"\n\n[plugins.bash]\nrunner = \"bash\"\n"
            ),
        ),
    ];
    for (daemon, config) in configs {
        let path = tmp.path().join(format!("{daemon}.toml"));
        for (addr, ok) in [
            ("127.0.0.1:9464", true),
            ("localhost:9464", false),
            ("9464", false),
        ] {
            std::fs::write(&path, format!("{config}\n[metrics]\naddr = \"{addr}\"\n")).unwrap();
            let out = std::process::Command::new(crate::cluster::bin(daemon))
                .args(["--config", path.to_str().unwrap(), "--check-config"])
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.success(), ok, "{daemon} with {addr}: {stderr}");
            if !ok {
                assert!(stderr.contains("metrics.addr"), "{daemon}: {stderr}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_follow_the_queue_slots_and_open_streams() {
    let cluster = Cluster::start_with(
        &["w1"],
        METRICS_LISTENER,
        &format!("max_jobs = 1\n---{METRICS_LISTENER}"),
    )
    .await;
    let url = format!("{}/metrics", cluster.url());
    let worker_id = cluster.worker_info("w1").await.worker_id;
    let w = worker_id.as_str();
    let plain = cluster.http_as(None);
    let worker_url = format!(
        "http://{}/metrics",
        metrics_addr(&cluster.workers[0].1.log())
    );

    // The only slot is taken by a job that waits for its stream to be read
    // (count.sh pauses), so the second one queues.
    let running = cluster.start_job("w1", "count.sh", &["30", "0.2"]).await;
    let (status, answer) = cluster
        .post_json(
            "/v1/jobs",
            &serde_json::json!({"worker_id": "w1", "path": "count.sh", "args": ["1", "0"]}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let queued = answer["job_id"].as_str().unwrap().to_owned();
    let follower = cluster.follow_job(&running).await;
    assert_eq!(follower.status(), StatusCode::OK);

    let during = scrape_with(&cluster.http(), &url).await;
    assert_eq!(value(&during, "schedulerd_queued_jobs", &[]), 1.0);
    let slot = [("worker", w)];
    assert_eq!(value(&during, "schedulerd_worker_slots", &slot), 1.0);
    assert_eq!(value(&during, "schedulerd_worker_slots_used", &slot), 1.0);
    assert_eq!(value(&during, "schedulerd_followers", &[]), 1.0);
    let worker_during = scrape_with(&plain, &worker_url).await;
    assert_eq!(value(&worker_during, "workerd_job_slots", &[]), 1.0);
    assert_eq!(value(&worker_during, "workerd_job_slots_used", &[]), 1.0);
    assert_eq!(value(&worker_during, "workerd_followers", &[]), 1.0);

    // Reading the stream to its end closes it on both daemons.
    let streamed = follower.bytes().await.unwrap().len() as f64;
    assert_eq!(wait_ended(&cluster, &running).await, "succeeded");
    assert_eq!(wait_ended(&cluster, &queued).await, "succeeded");
    let after = scrape_with(&cluster.http(), &url).await;
    assert_eq!(value(&after, "schedulerd_queued_jobs", &[]), 0.0);
    assert_eq!(value(&after, "schedulerd_followers", &[]), 0.0);
    assert_eq!(
        value(&after, "schedulerd_output_streamed_bytes_total", &[]),
        streamed
    );
    assert_eq!(
        value(
            &after,
            "schedulerd_jobs_started_total",
            &[("worker", w), ("plugin", "bash")]
        ),
        2.0
    );
    let latency = |queued| {
        observations(
            &after,
            "schedulerd_job_start_latency_seconds",
            &[("queued", queued)],
        )
    };
    assert_eq!((latency("false"), latency("true")), (1.0, 1.0));
    let worker_after = scrape_with(&plain, &worker_url).await;
    assert_eq!(value(&worker_after, "workerd_followers", &[]), 0.0);
    assert_eq!(value(&worker_after, "workerd_job_slots_used", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_given_up_with_its_worker_is_counted_lost_and_the_worker_down() {
    let mut cluster = Cluster::start(&["w1"]).await;
    let url = format!("{}/metrics", cluster.url());
    let worker_id = cluster.worker_info("w1").await.worker_id;
    // Ends by itself within seconds once its worker is gone (its output
    // pipe closes), so nothing outlives the test.
    let running = cluster.start_job("w1", "count.sh", &["100", "0.05"]).await;
    cluster
        .worker("w1")
        .signal(nix::sys::signal::Signal::SIGKILL);
    cluster.worker("w1").wait(Duration::from_secs(10));
    // lost_after is 3 s in the test cluster.
    assert_eq!(wait_ended(&cluster, &running).await, "lost");
    let scrape = scrape_with(&cluster.http(), &url).await;
    let lost = [
        ("state", "lost"),
        ("worker", worker_id.as_str()),
        ("plugin", "bash"),
    ];
    assert_eq!(value(&scrape, "schedulerd_jobs_finished_total", &lost), 1.0);
    assert_eq!(
        value(&scrape, "schedulerd_workers", &[("state", "down")]),
        1.0
    );
    assert_eq!(
        value(&scrape, "schedulerd_workers", &[("state", "ready")]),
        0.0
    );
}

/// Followers of one job read one worker stream together, and one that
/// stops reading neither holds the others back nor loses a byte: it falls
/// behind, goes on from where it was on a stream of its own, and gets the
/// whole output in order like the rest.
#[tokio::test(flavor = "multi_thread")]
async fn followers_of_one_job_share_its_worker_stream_and_one_that_stalls_goes_on_alone() {
    let cluster = Cluster::start(&["w1"]).await;
    let url = format!("{}/metrics", cluster.url());
    let streams = |scrape: &Scrape| value(scrape, "schedulerd_output_worker_streams_total", &[]);
    // 79 MB of distinct lines, far past the 32 MiB a shared stream holds
    // behind its fastest follower, once all three followers are there.
    let lines = 10_000_000;
    cluster.add_script(
        "later.sh",
        &format!("#!/bin/bash\n{}seq 1 \"$1\"\n", crate::cluster::WAIT_TO_GO),
    );
    let job = cluster
        .start_job("w1", "later.sh", &[&lines.to_string()])
        .await;
    let before = streams(&scrape_with(&cluster.http(), &url).await);
    // The one that stalls speaks HTTP/1.1: with no stream window of its
    // own, what it does not read is held only by the sockets' buffers, a
    // few MiB, so it falls behind for certain. Its client has no deadline:
    // it reads only once the others are done.
    let stalled = cluster
        .http_version_within(false, None)
        .get(format!("{}/v1/jobs/{job}/logs?follow=true", cluster.url()))
        .send();
    let (a, b, stalled) = tokio::join!(cluster.follow_job(&job), cluster.follow_job(&job), stalled);
    let stalled = stalled.unwrap();
    for follower in [&a, &b, &stalled] {
        assert_eq!(follower.status(), StatusCode::OK);
    }
    cluster.let_go();
    let together = streams(&scrape_with(&cluster.http(), &url).await);
    assert_eq!(together - before, 1.0, "three followers, one worker stream");

    let expected: String = (1..=lines).map(|i| format!("{i}\n")).collect();
    let (a, b) = tokio::join!(a.bytes(), b.bytes());
    for read in [a.unwrap(), b.unwrap()] {
        assert!(read == expected.as_bytes(), "a follower that kept up");
    }
    assert_eq!(wait_ended(&cluster, &job).await, "succeeded");
    // The stalled follower left the shared stream behind; reading now, it
    // goes on from its offset on a stream of its own.
    let late = stalled.bytes().await.unwrap();
    assert_eq!(late.len(), expected.len());
    assert!(late == expected.as_bytes(), "the follower that stalled");
    let after = streams(&scrape_with(&cluster.http(), &url).await);
    assert_eq!(after - before, 2.0, "the stalled follower's own stream");
}

/// On a shared worker stream, a follower that leaves mid-stream (its
/// client gone, perhaps while it was reading for the others) cuts no one:
/// the other reads every line on the same stream. A worker killed under a
/// shared stream cuts every follower on it, as it cuts a lone one.
#[tokio::test(flavor = "multi_thread")]
async fn a_follower_leaving_a_shared_stream_cuts_no_one_and_a_killed_worker_cuts_all() {
    let mut cluster = Cluster::start(&["w1"]).await;
    let url = format!("{}/metrics", cluster.url());
    let streams = |scrape: &Scrape| value(scrape, "schedulerd_output_worker_streams_total", &[]);
    // Its output waits for both followers (later jobs find the flag).
    cluster.add_script(
        "slow.sh",
        &format!(
            "#!/bin/bash\n{}for i in $(seq 1 \"$1\"); do echo \"$i\"; sleep 0.05; done\n",
            crate::cluster::WAIT_TO_GO
        ),
    );
    let job = cluster.start_job("w1", "slow.sh", &["40"]).await;
    let before = streams(&scrape_with(&cluster.http(), &url).await);
    let (mut leaving, staying) = tokio::join!(cluster.follow_job(&job), cluster.follow_job(&job));
    cluster.let_go();
    let start = leaving.chunk().await.unwrap().unwrap();
    assert!(start.starts_with(b"1\n"), "{start:?}");
    drop(leaving);
    let expected: String = (1..=40).map(|i| format!("{i}\n")).collect();
    assert_eq!(staying.text().await.unwrap(), expected);
    let after = streams(&scrape_with(&cluster.http(), &url).await);
    assert_eq!(after - before, 1.0, "both on one worker stream to the end");

    let job = cluster.start_job("w1", "slow.sh", &["1000"]).await;
    let (mut first, mut second) = tokio::join!(cluster.follow_job(&job), cluster.follow_job(&job));
    for follower in [&mut first, &mut second] {
        let output = follower.chunk().await.unwrap().unwrap();
        assert!(output.starts_with(b"1\n"), "{output:?}");
    }
    cluster
        .worker("w1")
        .signal(nix::sys::signal::Signal::SIGKILL);
    // Cut at once for both, not left waiting until the client gives up.
    let (first, second) = tokio::join!(first.bytes(), second.bytes());
    for read in [first, second] {
        assert!(
            read.as_ref().is_err_and(|e| !e.is_timeout()),
            "a cut stream, not an end or a wait: {read:?}"
        );
    }
}

/// Job reports the scheduler's store took (one per heartbeat or
/// registration with jobs in it).
fn reports(scrape: &Scrape) -> f64 {
    observations(
        scrape,
        "schedulerd_store_operation_duration_seconds",
        &[("operation", "apply_reports")],
    )
}

/// A worker reports each job's end at once, and starts that come while
/// that report is under way wait for the next one: they cost no
/// heartbeat of their own (the scheduler has their `running` from their
/// starts' answers). Each report with jobs in it is one store
/// transaction on the scheduler; starts one after another used to cost
/// about 1.4 of them per job.
#[tokio::test(flavor = "multi_thread")]
async fn starts_one_after_another_cost_one_report_per_job_end() {
    const JOBS: usize = 60;
    let cluster = Cluster::start(&["w1"]).await;
    let url = format!("{}/metrics", cluster.url());
    let before = scrape_with(&cluster.http(), &url).await;
    let began = std::time::Instant::now();
    let mut jobs = Vec::with_capacity(JOBS);
    for _ in 0..JOBS {
        jobs.push(cluster.start_job("w1", "count.sh", &["0"]).await);
    }
    for job in &jobs {
        assert_eq!(wait_ended(&cluster, job).await, "succeeded");
    }
    let reported = reports(&scrape_with(&cluster.http(), &url).await) - reports(&before);
    // One per end, and the cluster's heartbeats (every 250 ms) meanwhile;
    // the registration's own report may land after the first scrape.
    let beats = began.elapsed().as_millis() / 250 + 2;
    let most = JOBS as f64 + beats as f64;
    assert!(
        reported <= most,
        "{reported} reports for {JOBS} jobs in {:?} (at most {most})",
        began.elapsed()
    );
}

/// A worker with more unreported ends than one call carries (a restart
/// after many) reports all of them at once: its registration carries the
/// first 1,000, and a call that carried all it may is followed at once by
/// the next, not after the heartbeat interval (30 s here).
#[tokio::test(flavor = "multi_thread")]
async fn a_restart_with_more_ends_than_a_call_carries_reports_them_without_waiting() {
    const ENDS: usize = 2_100;
    let mut cluster = Cluster::start_tuned(
        &["w1"],
        &[
            ("heartbeat_interval", "30s"),
            ("down_after", "90s"),
            ("lost_after", "180s"),
        ],
    )
    .await;
    // Stopped, it leaves the scheduler: the same name registers again.
    cluster
        .worker("w1")
        .signal(nix::sys::signal::Signal::SIGTERM);
    cluster.worker("w1").wait(Duration::from_secs(10));
    // Ends the worker recorded after the scheduler last acknowledged its
    // reports (a minute before), never reported. The acknowledgement is
    // named, not left to "the latest 10 s", a window that writing 2,100
    // records and a restart on a loaded machine could outlast.
    let state = cluster.tmp.path().join("state/w1");
    let now = crate::hung::now_ms();
    std::fs::write(state.join("reported_until"), (now - 60_000).to_string()).unwrap();
    crate::hung::write_history(&state, ENDS, 0, now);
    let url = format!("{}/metrics", cluster.url());
    let client = cluster.http();
    let before = reports(&scrape_with(&client, &url).await);
    cluster.restart_worker("w1");
    // The registration, a full heartbeat, and one with the last 100: all
    // well within one interval.
    crate::faults::until(Duration::from_secs(15), "three reports", || async {
        reports(&scrape_with(&client, &url).await) - before >= 3.0
    })
    .await;
}
