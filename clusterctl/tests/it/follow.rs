//! Following output through both hops: `bench follow --replay`, and the
//! group stream's long lines whatever size the worker's pieces have.

use std::time::Duration;

use jobcluster_proto::http::GroupLogLine;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::cluster::{Cluster, lines_of, stderr, stdout};

/// `bench follow --replay --floor` measures local pipes first, follows
/// the job live, then reads the finished job's log back from byte 0 with
/// every follower, checks every byte came and reports both passes as
/// shares of the floor (JSON with `-o json`, two tables without).
#[tokio::test(flavor = "multi_thread")]
async fn bench_follow_replays_the_finished_jobs_log() {
    // Room for more followers than floor pipes (64).
    let cluster = Cluster::start_with(&["w1"], "max_followers_per_job = 65\n", "").await;
    cluster.add_repo_script("blast.sh");

    let args = [
        "bench",
        "follow",
        "--worker",
        "w1",
        "--mib",
        "3",
        "--followers",
        "2",
        "--replay",
        "--floor",
    ];
    let out = cluster
        .ctl_output(&[["-o", "json"].as_slice(), &args].concat())
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["failed"], 0, "{report}");
    let bytes = |pass: &Value| -> Vec<u64> {
        pass["followers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                assert!(f["error"].is_null(), "{report}");
                f["bytes"].as_u64().unwrap()
            })
            .collect()
    };
    assert_eq!(bytes(&report), [3 << 20, 3 << 20]);
    let replay = &report["replay"];
    assert_eq!(bytes(replay), [3 << 20, 3 << 20]);
    assert!(
        replay["total_mib_per_second"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert!(
        stderr(&out).contains("reading job") && stderr(&out).contains("back from byte 0"),
        "{}",
        stderr(&out)
    );
    // The floor: two local pipes of 3 MiB each, and each pass's total as a
    // share of it.
    assert!(
        stderr(&out).contains("measuring the floor: 3 MiB from local `head -c 3145728"),
        "{}",
        stderr(&out)
    );
    let floor = report["floor_mib_per_second"].as_f64().unwrap();
    // Two pipes of 3 MiB: more than 1 MiB/s, less than any memory moves.
    assert!(floor > 1.0 && floor < 1e6, "{report}");
    assert_eq!(report["floor_pipes"], 2, "{report}");
    // 0 unless the user's pipe quota is nearly spent by other pipes.
    assert!(
        report["floor_small_pipes"].as_u64().unwrap() <= 2,
        "{report}"
    );
    for pass in [&report, replay] {
        let share = pass["share_of_floor"].as_f64().unwrap();
        let rate = pass["total_mib_per_second"].as_f64().unwrap();
        assert!((rate / floor - share).abs() < 0.01, "{report}");
    }
    // The job really is finished and kept all of it.
    let job = cluster.job(report["job_id"].as_str().unwrap()).await;
    assert_eq!(
        (job.state.as_str(), job.output_bytes),
        ("succeeded", 3 << 20)
    );

    let out = cluster.ctl_output(&args).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("replay of the finished job's log:"), "{text}");
    assert_eq!(text.matches("total ").count(), 2, "{text}");
    assert_eq!(text.matches("% of the floor").count(), 2, "{text}");

    // More followers than floor pipes: the floor reads at most 64.
    let out = cluster
        .ctl_output(&[
            "-o",
            "json",
            "bench",
            "follow",
            "--worker",
            "w1",
            "--mib",
            "1",
            "--followers",
            "65",
            "--floor",
        ])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (report["failed"].as_u64(), report["floor_pipes"].as_u64()),
        (Some(0), Some(64)),
        "{report}"
    );
    assert!(
        stderr(&out).contains("through a pipe, 64 at a time"),
        "{}",
        stderr(&out)
    );

    // Without --replay and --floor, neither is in the report.
    let out = cluster
        .ctl_output(&[
            "-o", "json", "bench", "follow", "--worker", "w1", "--mib", "1",
        ])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report.get("replay").is_none(), "{report}");
    for field in [
        "floor_pipes",
        "floor_small_pipes",
        "floor_mib_per_second",
        "share_of_floor",
    ] {
        assert!(report.get(field).is_none(), "{report}");
    }
}

/// The group stream passes a line of up to 64 KiB whole and splits a
/// longer one into pieces of exactly 64 KiB, wherever the worker's output
/// pieces (now up to 256 KiB) happen to end.
#[tokio::test(flavor = "multi_thread")]
async fn group_lines_are_split_at_64_kib_whatever_the_pieces() {
    let cluster = Cluster::start(&["w1"]).await;
    cluster.add_script(
        "long.sh",
        "head -c 300000 /dev/zero | tr '\\0' a; echo\n\
         head -c 65536 /dev/zero | tr '\\0' b; echo\n\
         echo end\n",
    );
    let reply = cluster
        .http()
        .post(format!("{}/v1/groups", cluster.url()))
        .json(&json!({"all": true, "path": "long.sh"}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::CREATED);
    let started: jobcluster_proto::http::GroupStarted = reply.json().await.unwrap();
    let ndjson = cluster.group_ndjson(&started.group_id).await;
    let lines: Vec<(u64, String)> = ndjson
        .lines()
        .map(|l| {
            let line: GroupLogLine = serde_json::from_str(l).unwrap();
            (line.offset, line.line.unwrap())
        })
        .collect();
    let shape: Vec<(u64, usize, char)> = lines
        .iter()
        .map(|(offset, line)| (*offset, line.len(), line.chars().next().unwrap_or(' ')))
        .collect();
    const K64: u64 = 65536;
    assert_eq!(
        shape,
        [
            (0, 65536, 'a'),
            (K64, 65536, 'a'),
            (2 * K64, 65536, 'a'),
            (3 * K64, 65536, 'a'),
            (4 * K64, 300_000 - 4 * 65536, 'a'),
            (300_001, 65536, 'b'),
            (300_001 + K64 + 1, 3, 'e'),
        ]
    );
    assert_eq!(lines.last().map(|(_, l)| l.as_str()), Some("end"));
    assert!(
        lines[..lines.len() - 1]
            .iter()
            .all(|(_, l)| l.bytes().all(|c| c == l.as_bytes()[0])),
        "a line mixes characters"
    );
}

/// Followers attached while the job writes (who copy from the worker's
/// last piece in memory while they keep up) and a read of the finished
/// log all get exactly the bytes the job wrote, in order: single lines
/// between bursts that fill the pipe.
#[tokio::test(flavor = "multi_thread")]
async fn live_followers_and_a_replay_get_every_byte_in_order() {
    let listener = format!("---{}", crate::metrics::METRICS_LISTENER);
    let cluster = Cluster::start_with(&["w1"], "", &listener).await;
    cluster.add_script(
        "mixed.sh",
        "sleep 0.3\n\
         for round in 1 2 3 4 5; do\n\
           echo \"round $round\"\n\
           sleep 0.2\n\
           seq $((round * 1000000)) $((round * 1000000 + 150000))\n\
           sleep 0.2\n\
         done\n\
         echo end\n",
    );
    let mut expected = String::new();
    for round in 1..=5u64 {
        expected.push_str(&format!("round {round}\n"));
        for n in round * 1_000_000..=round * 1_000_000 + 150_000 {
            expected.push_str(&format!("{n}\n"));
        }
    }
    expected.push_str("end\n");

    let job = cluster.start_job("w1", "mixed.sh", &[]).await;
    let follow = || cluster.spawn_follow(&job).wait_with_output();
    let (first, second) = tokio::join!(follow(), follow());
    for out in [first.unwrap(), second.unwrap()] {
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            stdout(&out) == expected,
            "a live follower got {} bytes, not the job's {} in order",
            out.stdout.len(),
            expected.len()
        );
    }
    let replay = cluster.ctl_output(&["logs", &job]).await;
    assert!(replay.status.success(), "{}", stderr(&replay));
    assert!(stdout(&replay) == expected, "the replay differs");

    // The followers took at least the short lines from memory (each a
    // piece of its own that a follower waiting for it finds there).
    let addr = crate::metrics::metrics_addr(&cluster.workers[0].1.log());
    let scrape =
        crate::metrics::scrape_with(&cluster.http_as(None), &format!("http://{addr}/metrics"))
            .await;
    let from_memory = crate::metrics::value(
        &scrape,
        "workerd_output_streamed_from_memory_bytes_total",
        &[],
    );
    assert!(from_memory > 0.0, "no follower took output from memory");
}

/// The frames of a job's output stream: its bytes and its trailers.
async fn read_stream(reply: reqwest::Response) -> (Vec<u8>, Option<reqwest::header::HeaderMap>) {
    read_stream_pausing(reply, Duration::ZERO).await
}

/// As [`read_stream`], pausing `pause` after every data frame.
async fn read_stream_pausing(
    reply: reqwest::Response,
    pause: Duration,
) -> (Vec<u8>, Option<reqwest::header::HeaderMap>) {
    use http_body_util::BodyExt;
    let mut body = reqwest::Body::from(reply);
    let (mut bytes, mut trailers) = (Vec::new(), None);
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap();
        match frame.into_data() {
            Ok(data) => {
                bytes.extend_from_slice(&data);
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
            }
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    (bytes, trailers)
}

/// What the trailer `name` of one output stream said when read over
/// HTTP/2, over HTTP/1.1 asking for trailers, and over HTTP/1.1 without.
struct Trailed {
    name: &'static str,
    reads: Vec<(reqwest::Version, bool, Option<reqwest::header::HeaderMap>)>,
}

impl Trailed {
    /// Each read that may carry the trailer carried `record`, as JSON;
    /// HTTP/1.1 without `TE: trailers` carried none.
    fn say(self, record: &Value) {
        for (version, te, trailers) in self.reads {
            if version == reqwest::Version::HTTP_11 && !te {
                assert!(trailers.is_none(), "{trailers:?}");
                continue;
            }
            let trailers = trailers.unwrap_or_else(|| panic!("no trailers over {version:?}"));
            let said: Value = serde_json::from_slice(trailers[self.name].as_bytes()).unwrap();
            assert_eq!(&said, record, "over {version:?}");
        }
    }
}

/// Reads `url`, a stream announcing the trailer `name`, over each
/// protocol; `check` sees each read's bytes.
async fn over_each_protocol(
    cluster: &Cluster,
    url: &str,
    name: &'static str,
    check: impl Fn(&[u8]),
) -> Trailed {
    let mut reads = Vec::new();
    for (client, te) in [
        (cluster.http_version(true), false),
        (cluster.http_version(false), true),
        (cluster.http_version(false), false),
    ] {
        let mut request = client.get(url);
        if te {
            request = request.header("te", "trailers");
        }
        let reply = request.send().await.unwrap();
        assert_eq!(reply.status(), StatusCode::OK);
        assert_eq!(reply.headers()["trailer"], name);
        let version = reply.version();
        let (bytes, trailers) = read_stream(reply).await;
        check(&bytes);
        reads.push((version, te, trailers));
    }
    Trailed { name, reads }
}

/// A follower that reads slowly keeps both hops' windows shut, so the
/// worker's messages (each output a frame of its own) reach the scheduler
/// cut wherever a window ended, and it decodes them from the pieces: the
/// follower still gets every byte in order, and the job's record last.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_follower_gets_every_byte_of_messages_cut_by_flow_control() {
    let cluster = Cluster::start(&["w1"]).await;
    cluster.add_script("burst.sh", "seq 1 700000\n");
    let expected: String = (1..=700_000).map(|n| format!("{n}\n")).collect();
    let job_id = cluster.start_job("w1", "burst.sh", &[]).await;
    let reply = cluster
        .http_version(true)
        .get(format!(
            "{}/v1/jobs/{job_id}/logs?follow=true",
            cluster.url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::OK);
    let (bytes, trailers) = read_stream_pausing(reply, Duration::from_millis(2)).await;
    assert!(
        bytes == expected.as_bytes(),
        "the slow follower got {} bytes, not the job's {} in order",
        bytes.len(),
        expected.len()
    );
    let trailers = trailers.expect("no trailers after the output");
    let job: Value = serde_json::from_slice(trailers["x-job"].as_bytes()).unwrap();
    assert_eq!(
        (&job["state"], &job["exit_code"]),
        (&json!("succeeded"), &json!(0))
    );
}

/// A job's output stream ends with the job's record in its `x-job`
/// trailer (over HTTP/2, and over HTTP/1.1 to a client that accepts
/// trailers), the very record `GET /v1/jobs/{id}` answers but its `args`;
/// `clusterctl run` takes the outcome from it and asks for nothing else.
#[tokio::test(flavor = "multi_thread")]
async fn an_output_stream_ends_with_the_jobs_record_and_run_asks_nothing_more() {
    use crate::metrics::scrape_with;
    let cluster = Cluster::start_with(&["w1"], &crate::security::auth_config(), "").await;
    let metrics = format!("{}/metrics", cluster.url());
    let asked = crate::metrics::gets_answered;
    let (records, streams) = (asked("/v1/jobs/{id}"), asked("/v1/jobs/{id}/logs"));

    let before = scrape_with(&cluster.http(), &metrics).await;
    let ok = cluster
        .ctl_output(&["run", "--worker", "w1", "count.sh", "--", "2", "0"])
        .await;
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert_eq!(stdout(&ok), "1\n2\ndone\n");
    let failed = cluster
        .ctl_output(&["run", "--worker", "w1", "fail.sh", "--", "7"])
        .await;
    assert_eq!(failed.status.code(), Some(7), "{}", stderr(&failed));
    assert!(
        stderr(&failed).contains("failed with exit code 7"),
        "{}",
        stderr(&failed)
    );
    let after = scrape_with(&cluster.http(), &metrics).await;
    assert_eq!(streams(&after) - streams(&before), 2.0);
    assert_eq!(records(&after) - records(&before), 0.0);

    // What the trailer says, over each protocol, against the record: the
    // first stream follows the job to its end, the others read it back.
    let job_id = cluster.start_job("w1", "fail.sh", &["5"]).await;
    let url = format!("{}/v1/jobs/{job_id}/logs?follow=true", cluster.url());
    let trailed = over_each_protocol(&cluster, &url, "x-job", |bytes| {
        assert_eq!(bytes, b"about to fail\nfailing on purpose\n");
    })
    .await;
    let mut record: Value = cluster.get_json(&format!("/v1/jobs/{job_id}")).await;
    record.as_object_mut().unwrap().remove("args");
    assert_eq!(record["state"], "failed");
    assert_eq!(record["exit_code"], 5);
    trailed.say(&record);

    // The original design's route keeps its contract: no trailer.
    let reply = cluster
        .http()
        .post(format!("{}/stream", cluster.url()))
        .json(&json!({"job_id": job_id, "worker_id": record["worker_id"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::OK);
    assert!(reply.headers().get("trailer").is_none());
    let (bytes, trailers) = read_stream(reply).await;
    assert_eq!(bytes, b"about to fail\nfailing on purpose\n");
    assert!(trailers.is_none(), "{trailers:?}");
}

/// A group's merged output that ends once every member's end is recorded
/// ends with the group's record as the trailer `x-group` (over HTTP/2, and
/// over HTTP/1.1 when asked for), as a job's stream ends with `x-job`:
/// `run --all` takes the group's outcome from it and asks for nothing more.
/// An output read without following ends at what there was, which says
/// nothing of how the group ended: no trailer.
#[tokio::test(flavor = "multi_thread")]
async fn a_group_output_ends_with_the_groups_record_and_run_all_asks_nothing_more() {
    use crate::metrics::scrape_with;
    let cluster = Cluster::start_with(&["w1", "w2"], &crate::security::auth_config(), "").await;
    let metrics = format!("{}/metrics", cluster.url());
    let asked = crate::metrics::gets_answered;
    let (records, streams) = (asked("/v1/groups/{id}"), asked("/v1/groups/{id}/logs"));
    let workers = asked("/v1/workers");

    let before = scrape_with(&cluster.http(), &metrics).await;
    let ok = cluster
        .ctl_output(&["run", "--all", "count.sh", "--", "2", "0"])
        .await;
    // The start's answer named every worker: their names are not asked.
    let between = scrape_with(&cluster.http(), &metrics).await;
    assert_eq!(workers(&between) - workers(&before), 0.0);
    assert!(ok.status.success(), "{}", stderr(&ok));
    let text = stdout(&ok);
    for w in ["w1", "w2"] {
        let lines = lines_of(&text, w);
        assert_eq!(lines, ["1", "2", "done"], "{w}:\n{text}");
    }
    let failed = cluster
        .ctl_output(&["run", "--all", "fail.sh", "--", "7"])
        .await;
    assert_eq!(failed.status.code(), Some(7), "{}", stderr(&failed));
    for w in ["w1", "w2"] {
        assert!(
            stderr(&failed).contains(&format!("clusterctl: {w}: job ")),
            "{}",
            stderr(&failed)
        );
    }
    let after = scrape_with(&cluster.http(), &metrics).await;
    assert_eq!(streams(&after) - streams(&before), 2.0);
    assert_eq!(records(&after) - records(&before), 0.0);

    // What the trailer says, over each protocol, against the record: the
    // first read follows the group to its end, the others read it back.
    let (status, started) = cluster
        .post_json(
            "/v1/groups",
            &json!({"all": true, "path": "fail.sh", "args": ["5"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{started}");
    let group_id = started["group_id"].as_str().unwrap().to_owned();
    let url = format!("{}/v1/groups/{group_id}/logs?follow=true", cluster.url());
    let trailed = over_each_protocol(&cluster, &url, "x-group", |bytes| {
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        for w in ["w1", "w2"] {
            assert!(text.contains(&format!("[{w}] about to fail\n")), "{text}");
        }
    })
    .await;
    let mut record: Value = cluster.get_json(&format!("/v1/groups/{group_id}")).await;
    record.as_object_mut().unwrap().remove("args");
    assert_eq!(
        (record["state"].as_str(), record["done"].as_bool()),
        (Some("failed"), Some(true))
    );
    assert_eq!(record["jobs"][0]["exit_code"], 5);
    trailed.say(&record);

    // Read without following: what there was, and no record, whether the
    // group ended (the one above) or runs (a new one).
    let (status, started) = cluster
        .post_json(
            "/v1/groups",
            &json!({"all": true, "path": "count.sh", "args": ["600", "0.1"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{started}");
    let running = started["group_id"].as_str().unwrap().to_owned();
    for id in [&group_id, &running] {
        let reply = cluster
            .http()
            .get(format!("{}/v1/groups/{id}/logs", cluster.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), StatusCode::OK);
        assert!(reply.headers().get("trailer").is_none());
        let (bytes, trailers) = read_stream(reply).await;
        assert!(id == &running || !bytes.is_empty());
        assert!(trailers.is_none(), "{trailers:?}");
    }
    let out = cluster.ctl_output(&["stop", &running]).await;
    assert!(out.status.success(), "{}", stderr(&out));
}

/// A record longer than the trailer's bound (4 KiB: here a path of nearly
/// 4,000 bytes) is left out of the stream's end; `run` then asks for it,
/// once, and exits with the job's code all the same.
#[tokio::test(flavor = "multi_thread")]
async fn a_record_too_long_for_the_trailer_is_asked_for_instead() {
    use crate::metrics::scrape_with;
    let cluster = Cluster::start_with(&["w1"], &crate::security::auth_config(), "").await;
    let deep = vec!["d".repeat(190); 20].join("/");
    std::fs::create_dir_all(cluster.tmp.path().join("scripts").join(&deep)).unwrap();
    let path = format!("{deep}/long.sh");
    cluster.add_script(&path, "echo deep\nexit 3\n");
    let metrics = format!("{}/metrics", cluster.url());
    let records = crate::metrics::gets_answered("/v1/jobs/{id}");

    let before = scrape_with(&cluster.http(), &metrics).await;
    let out = cluster.ctl_output(&["run", "--worker", "w1", &path]).await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(stdout(&out), "deep\n");
    let after = scrape_with(&cluster.http(), &metrics).await;
    assert_eq!(records(&after) - records(&before), 1.0);

    let job_id = cluster.start_job("w1", &path, &[]).await;
    let reply = cluster.follow_job(&job_id).await;
    assert_eq!(reply.status(), StatusCode::OK);
    let (bytes, trailers) = read_stream(reply).await;
    assert_eq!(bytes, b"deep\n");
    assert!(
        trailers.as_ref().is_none_or(|t| t.get("x-job").is_none()),
        "{trailers:?}"
    );
    let job = cluster.job(&job_id).await;
    assert_eq!((job.state.as_str(), job.exit_code), ("failed", Some(3)));
}
