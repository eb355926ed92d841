#!/usr/bin/env bash
# Issue 13's comparison with the original design, made as its check makes
# it: the same `wrk` load on the original `POST /start` route (1, 16 and 64
# connections, a `bash` no-op script, two workers) against
#   1. the original design's Go scheduler and worker (plaintext), built
#      from its sources (github.com/koraygocmen/scheduler-worker-grpc);
#   2. ours in insecure mode (plaintext HTTP and gRPC);
#   3. ours over HTTPS with a bearer token, mutual TLS to the workers;
# then `clusterctl bench start` with the floor measured in the same run
# (local `bash noop.sh` spawned and reaped 16 at a time).
#
#   scripts/side-by-side.sh /path/to/scheduler-worker-grpc [SECONDS [ROUNDS]]
#   JOBCLUSTER_BENCH_BIN=/old/release scripts/side-by-side.sh ...  # other daemons
#
# ROUNDS (default 1) repeats the three setups in turn, each on fresh
# daemons, and ends with the median of the rounds for every figure: on a
# shared VM one run of 10 s moves by a quarter from the next, so only
# rounds taken in turn compare the setups.
#
# Needs wrk, and Go with the original's libraries. The original predates
# Go modules; it builds in GOPATH mode against Debian's packages:
#   apt-get install wrk golang-go golang-github-burntsushi-toml-dev \
#     golang-github-google-uuid-dev golang-google-grpc-dev \
#     golang-github-golang-protobuf-1-5-dev \
#     golang-github-julienschmidt-httprouter-dev
#
# One line per run: requests, p50 and p99 in ms, starts per second, and
# the CPU each daemon spent per start (utime + stime over the run) with
# the whole machine's; with more than one round, a table of medians. Nothing is kept: the temporary directory goes at
# the end, not between runs (on ext4 without a journal, files deleted in
# the last minutes slow the creation of new ones, which a start pays).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
[ $# -ge 1 ] || { echo "usage: scripts/side-by-side.sh ORIGINAL_SOURCES [SECONDS [ROUNDS]]" >&2; exit 2; }
original=$(cd "$1" && pwd)
seconds=${2:-10}
rounds=${3:-1}
case "$seconds$rounds" in *[!0-9]*) echo "side-by-side: SECONDS and ROUNDS are whole numbers" >&2; exit 2 ;; esac
[ "$seconds" -ge 1 ] && [ "$rounds" -ge 1 ] || { echo "side-by-side: SECONDS and ROUNDS are at least 1" >&2; exit 2; }
for tool in wrk go curl python3; do
  command -v "$tool" >/dev/null || { echo "side-by-side: $tool is missing (see the comment at the top)" >&2; exit 1; }
done
[ -f "$original/scheduler/api.go" ] || { echo "side-by-side: $original holds no scheduler/api.go: not the original's sources" >&2; exit 1; }

. "$root/scripts/bench-lib.sh"
release_binaries
warn_recent_deletion

dir=$(mktemp -d /tmp/jobcluster-side.XXXXXX)
chmod 0755 "$dir"
pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  pids=()
}
trap 'stop_all; delete_marked "$dir"' EXIT
printf 'true\n' >"$dir/noop.sh"

# The original in GOPATH mode: its import path under a GOPATH of our own,
# Debian's Go packages as the second.
gopath="$dir/go"
mkdir -p "$gopath/src/github.com/koraygocmen"
ln -s "$original" "$gopath/src/github.com/koraygocmen/scheduler-worker-grpc"
(cd "$gopath/src/github.com/koraygocmen/scheduler-worker-grpc" &&
  GO111MODULE=off GOPATH="$gopath:/usr/share/gocode" GOCACHE="$dir/go-cache" GOFLAGS= \
    go build -o "$dir/original-scheduler" ./scheduler &&
  GO111MODULE=off GOPATH="$gopath:/usr/share/gocode" GOCACHE="$dir/go-cache" GOFLAGS= \
    go build -o "$dir/original-worker" ./worker)

machine_cpu() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8}' /proc/stat; }

# load URL BODY TOKEN LABEL: wrk on URL/start with 1, 16 and 64
# connections, each daemon's CPU per start beside it.
load() {
  local lua="$dir/post.lua"
  {
    echo 'wrk.method = "POST"'
    echo "wrk.body = '$2'"
    echo 'wrk.headers["Content-Type"] = "application/json"'
    [ -z "$3" ] || echo "wrk.headers[\"Authorization\"] = \"Bearer $3\""
    cat <<'LUA'
done = function(summary, latency, requests)
  local errors = summary.errors.status + summary.errors.connect + summary.errors.read
    + summary.errors.write + summary.errors.timeout
  io.write(string.format("RESULT %d %d %.2f %.2f %.0f\n", summary.requests, errors,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.requests / (summary.duration / 1e6)))
end
LUA
  } >"$lua"
  local clients threads before after m0 m1 result
  for clients in 1 16 64; do
    threads=$((clients > 1 ? 2 : 1))
    before=$(for p in "${pids[@]}"; do cpu_of "$p"; done | tr '\n' ' ')
    m0=$(machine_cpu)
    result=$(wrk -t"$threads" -c"$clients" -d"${seconds}s" -s "$lua" "$1/start" | grep '^RESULT')
    after=$(for p in "${pids[@]}"; do cpu_of "$p"; done | tr '\n' ' ')
    m1=$(machine_cpu)
    python3 - "$4" "$clients" "$result" "$before" "$after" "$m0" "$m1" "$(getconf CLK_TCK)" "$dir/results" <<'PY'
import json, sys
label, clients, result, before, after, m0, m1, tck, results = sys.argv[1:]
_, n, errors, p50, p99, rate = result.split()
n, tck = int(n), int(tck)
per = lambda a, b: (int(float(b)) - int(float(a))) * 1000 / tck / max(n, 1)
cpu = [per(a, b) for a, b in zip(before.split(), after.split())]
print(f"{label:<22} {clients:>3} clients: {rate:>5}/s  p50 {p50:>7} ms  p99 {p99:>7} ms"
      f"  errors {errors}  CPU ms per start: scheduler {cpu[0]:.2f}, worker {cpu[1]:.2f},"
      f" machine {per(m0, m1):.2f}")
with open(results, "a") as f:
    f.write(json.dumps({"label": label, "clients": int(clients), "rate": float(rate),
                        "p50": float(p50), "p99": float(p99), "errors": int(errors),
                        "scheduler": cpu[0], "worker": cpu[1]}) + "\n")
PY
    sleep 2
  done
}

"$ctl" pki init "$dir/pki" >/dev/null 2>&1
for w in w1 w2; do "$ctl" pki issue "$dir/pki" --role worker "$w" >/dev/null 2>&1; done
token=$(python3 -c 'import secrets; print(secrets.token_hex(24))')
digest=$(printf %s "$token" | sha256sum | cut -d' ' -f1)
tls_keys() { # ROLE
  printf 'use_tls = true\ncrt_file = "%s/pki/%s.pem"\nkey_file = "%s/pki/%s-key.pem"\nca_file = "%s/pki/ca.pem"\n' \
    "$dir" "$1" "$dir" "$1" "$dir"
}
for round in $(seq "$rounds"); do
  [ "$rounds" -eq 1 ] || echo "== round $round of $rounds"
  # Each round on fresh daemons in a directory of its own.
  rdir="$dir/round$round"
  # 1. The original: it reads scheduler/config.toml and worker/config.toml
  # from its working directory, and runs `command path` there.
  og=$(free_port) oh=$(free_port)
  mkdir -p "$rdir/original/scheduler"
  printf '[grpc_server]\naddr = "127.0.0.1:%s"\nuse_tls = false\n\n[http_server]\naddr = "127.0.0.1:%s"\n' \
    "$og" "$oh" >"$rdir/original/scheduler/config.toml"
  (cd "$rdir/original" && exec "$dir/original-scheduler" >log 2>&1) &
  pids+=($!)
  sleep 0.5
  for w in 1 2; do
    mkdir -p "$rdir/original-w$w/worker"
    cp "$dir/noop.sh" "$rdir/original-w$w/"
    printf '[grpc_server]\naddr = "127.0.0.1:%s"\nuse_tls = false\n\n[scheduler]\naddr = "127.0.0.1:%s"\n' \
      "$(free_port)" "$og" >"$rdir/original-w$w/worker/config.toml"
    (cd "$rdir/original-w$w" && exec "$dir/original-worker" >log 2>&1) &
    pids+=($!)
  done
  for _ in $(seq 50); do
    id=$(sed -n 's/.*Registered ID: //p' "$rdir/original-w1/log")
    [ -n "$id" ] && break
    sleep 0.1
  done
  [ -n "$id" ] || { echo "side-by-side: the original's worker did not register: $(cat "$rdir/original-w1/log")" >&2; exit 1; }
  load "http://127.0.0.1:$oh" "{\"worker_id\":\"$id\",\"command\":\"bash\",\"path\":\"noop.sh\"}" "" "original (plaintext)"
  stop_all

  # 2 and 3. Ours, one fresh cluster each, a bearer token for wrk.
  for mode in plain tls; do
    d="$rdir/$mode" g=$(free_port) h=$(free_port)
    mkdir -p "$d/scripts"
    cp "$dir/noop.sh" "$d/scripts/"
    chmod -R a+rX "$d"
    {
      printf '[grpc_server]\naddr = "127.0.0.1:%s"\n' "$g"
      if [ $mode = tls ]; then tls_keys scheduler; else printf 'use_tls = false\ninsecure = true\n'; fi
      printf '\n[http_server]\naddr = "127.0.0.1:%s"\n\n[store]\npath = "state/scheduler.db"\n' "$h"
      printf '\n[[auth.tokens]]\nname = "bench"\nsha256 = "%s"\nrole = "operator"\n' "$digest"
    } >"$d/scheduler.toml"
    (cd "$d" && exec "$bin/schedulerd" --config scheduler.toml >scheduler.log 2>&1) &
    pids+=($!)
    for w in w1 w2; do
      {
        printf '[grpc_server]\naddr = "127.0.0.1:%s"\n' "$(free_port)"
        if [ $mode = tls ]; then tls_keys "$w"; else printf 'use_tls = false\ninsecure = true\n'; fi
        printf '\n[scheduler]\naddr = "127.0.0.1:%s"\n\n[worker]\nname = "%s"\n' "$g" "$w"
        printf 'scripts_dir = "%s/scripts"\nstate_dir = "state/%s"\nmax_jobs = 0\n' "$d" "$w"
        printf '\n[plugins.bash]\nrunner = "bash"\nextensions = ["sh"]\n'
      } >"$d/$w.toml"
      (cd "$d" && exec "$bin/workerd" --config "$w.toml" >"$w.log" 2>&1) &
      pids+=($!)
    done
    scheme=https; [ $mode = tls ] || scheme=http
    url="$scheme://127.0.0.1:$h"
    id=""
    for _ in $(seq 100); do
      id=$(curl -sk -H "Authorization: Bearer $token" "$url/v1/workers/w1" |
        python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["worker_id"] if d.get("state") == "ready" else "")' 2>/dev/null || true)
      [ -n "$id" ] && break
      sleep 0.1
    done
    [ -n "$id" ] || { echo "side-by-side: our w1 did not become ready ($mode); see $d/*.log" >&2; exit 1; }
    label="ours (HTTPS + token)"; [ $mode = tls ] || label="ours (plaintext)"
    load "$url" "{\"worker_id\":\"$id\",\"command\":\"bash\",\"path\":\"noop.sh\"}" "$token" "$label"
    if [ $mode = tls ] && [ "$round" -eq "$rounds" ]; then
      CLUSTERCTL_SCHEDULER=$url CLUSTERCTL_CA="$dir/pki/ca.pem" CLUSTERCTL_CERT="$dir/pki/client.pem" \
        CLUSTERCTL_KEY="$dir/pki/client-key.pem" \
        "$ctl" bench start --worker w1 --script noop.sh --clients 16 --jobs 2000 --floor 2>/dev/null |
        sed 's/^/clusterctl bench start, 16 clients: /'
    fi
    stop_all
  done
  # Nothing is deleted between rounds: on ext4 without a journal, files
  # deleted in the last minutes slow the creation of new ones.
done

if [ "$rounds" -gt 1 ]; then
  python3 - "$dir/results" "$rounds" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"\nmedians of {sys.argv[2]} rounds:")
print(f"{'':<22} {'clients':>7} {'starts/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}  CPU ms per start: scheduler, worker")
seen = []
for r in rows:
    key = (r["label"], r["clients"])
    if key not in seen:
        seen.append(key)
for label, clients in seen:
    runs = [r for r in rows if (r["label"], r["clients"]) == (label, clients)]
    m = lambda k: statistics.median(r[k] for r in runs)
    print(f"{label:<22} {clients:>7} {m('rate'):>9.0f} {m('p50'):>8.2f} {m('p99'):>8.2f}"
          f" {sum(r['errors'] for r in runs):>6}  {m('scheduler'):.2f}, {m('worker'):.2f}")
PY
fi
