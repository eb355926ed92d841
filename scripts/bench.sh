#!/usr/bin/env bash
# Measures the cluster side by side in one run, on release binaries, and
# prints every figure next to the floor measured in the same run:
#
#   scripts/bench.sh                 # everything, a few minutes
#   scripts/bench.sh --quick         # fewer jobs and bytes, for a smoke run
#   scripts/bench.sh --rounds 5      # every figure 5 times on the one
#                                    # cluster, then medians (and ranges)
#   scripts/bench.sh --postgres      # the scheduler on PostgreSQL (a throwaway
#                                    # server from Debian's postgresql package)
#   scripts/bench.sh --serve         # start the same cluster, print its
#                                    # CLUSTERCTL_* settings and pids, and keep
#                                    # it up until interrupted (for profiling)
#   JOBCLUSTER_BENCH_BIN=/old/release scripts/bench.sh   # other daemons
#
# It builds the release binaries, creates a throwaway PKI and state in a
# temporary directory, starts one schedulerd and two workerd on free
# loopback ports (HTTPS with a client certificate, mTLS to the workers,
# `max_jobs = 0` so that no start waits for a slot), runs `clusterctl bench`
# and `clusterctl run true.sh`, and stops everything it started. The
# figures go to standard output as JSON lines and a table; nothing is kept.
# Figures vary by 20 % and more on a shared VM: take the median of runs.
# Leave six minutes between runs: each deletes thousands of job files at
# its end, and on this VM's ext4 (no journal) creating files for minutes
# after that is slower (new inodes skip recently deleted ones), which
# starts pay for; a run that starts sooner says so (bench-lib.sh).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
quick=0 postgres=0 serve=0 rounds=1
. "$root/scripts/bench-lib.sh"
usage() { echo "usage: scripts/bench.sh [--quick] [--postgres] [--serve] [--rounds N]" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case $1 in
    --quick) quick=1 ;;
    --postgres) postgres=1 ;;
    --serve) serve=1 ;;
    --rounds)
      shift
      check_rounds "${1:-}" || usage
      rounds=$1
      ;;
    *) usage ;;
  esac
  shift
done
if [ "$serve" = 1 ] && [ "$rounds" != 1 ]; then
  echo "bench: --serve only starts a cluster; --rounds goes with the benches" >&2
  exit 2
fi

release_binaries
warn_recent_deletion

dir=$(mktemp -d /tmp/jobcluster-bench.XXXXXX)
# Run as root, workerd runs jobs as nobody, who must reach the scripts.
chmod 0755 "$dir"
pids=()
pg_ctl=""
# PostgreSQL refuses to run as root: as root, its server runs as `postgres`.
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  [ -n "$pg_ctl" ] && as_pg "$pg_ctl" -D "$dir/pg/data" -m fast -w stop >/dev/null 2>&1
  delete_marked "$dir"
}
trap cleanup EXIT

http=$(free_port); grpc=$(free_port); p1=$(free_port); p2=$(free_port)

mkdir -p "$dir/scripts" "$dir/state"
cp "$root"/scripts/*.sh "$dir/scripts/"
chmod -R a+rX "$dir/scripts"
"$ctl" pki init "$dir/pki" >/dev/null 2>&1
for w in w1 w2; do "$ctl" pki issue "$dir/pki" --role worker "$w" >/dev/null 2>&1; done

cat >"$dir/scheduler.toml" <<TOML
[grpc_server]
addr = "127.0.0.1:$grpc"
use_tls = true
crt_file = "pki/scheduler.pem"
key_file = "pki/scheduler-key.pem"
ca_file = "pki/ca.pem"

[http_server]
addr = "127.0.0.1:$http"

TOML
if [ $postgres -eq 1 ]; then
  pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
  [ -x "$pg_bin/initdb" ] || { echo "--postgres needs Debian's postgresql package" >&2; exit 1; }
  pg_port=$(free_port)
  mkdir -p "$dir/pg"
  [ "$(id -u)" = 0 ] && chown postgres "$dir/pg"
  as_pg "$pg_bin/initdb" -D "$dir/pg/data" -U postgres --auth=trust -E UTF8 >/dev/null
  pg_ctl="$pg_bin/pg_ctl"
  as_pg "$pg_ctl" -D "$dir/pg/data" -l "$dir/pg/server.log" -w \
    -o "-p $pg_port -k $dir/pg -c listen_addresses=127.0.0.1" start >/dev/null
  printf '[store]\nurl = "postgres://postgres@127.0.0.1:%s/postgres"\n' "$pg_port" >>"$dir/scheduler.toml"
else
  printf '[store]\npath = "state/scheduler.db"\n' >>"$dir/scheduler.toml"
fi
port_of() { if [ "$1" = w1 ]; then echo "$p1"; else echo "$p2"; fi; }
for w in w1 w2; do
  cat >"$dir/$w.toml" <<TOML
[grpc_server]
addr = "127.0.0.1:$(port_of "$w")"
use_tls = true
crt_file = "pki/$w.pem"
key_file = "pki/$w-key.pem"
ca_file = "pki/ca.pem"

[scheduler]
addr = "127.0.0.1:$grpc"

[worker]
name = "$w"
scripts_dir = "$dir/scripts"
state_dir = "state/$w"
max_jobs = 0

[plugins.bash]
runner = "bash"
extensions = ["sh"]
TOML
done

cd "$dir"
"$bin/schedulerd" --config scheduler.toml >scheduler.log 2>&1 &
pids+=($!)
for w in w1 w2; do
  "$bin/workerd" --config "$w.toml" >"$w.log" 2>&1 &
  pids+=($!)
done
export CLUSTERCTL_SCHEDULER="https://127.0.0.1:$http" CLUSTERCTL_CA="$dir/pki/ca.pem" \
  CLUSTERCTL_CERT="$dir/pki/client.pem" CLUSTERCTL_KEY="$dir/pki/client-key.pem"
for i in $(seq 1 100); do
  ready=$("$ctl" workers -o json 2>/dev/null | grep -c '"ready"' || true)
  [ "$ready" -ge 2 ] && break
  [ "$i" -eq 100 ] && { echo "the workers did not register; see $dir/*.log" >&2; exit 1; }
  sleep 0.1
done

if [ $serve -eq 1 ]; then
  echo "export CLUSTERCTL_SCHEDULER=$CLUSTERCTL_SCHEDULER CLUSTERCTL_CA=$CLUSTERCTL_CA CLUSTERCTL_CERT=$CLUSTERCTL_CERT CLUSTERCTL_KEY=$CLUSTERCTL_KEY"
  echo "# schedulerd, workerd w1, workerd w2: ${pids[*]}; interrupt to stop"
  wait "${pids[0]}"
  exit 0
fi

jobs1=500 jobs16=2000 mib=256 runs=50 apart=200
[ $quick -eq 1 ] && { jobs1=100; jobs16=300; mib=32; runs=10; apart=50; }

bench() { "$ctl" -o json bench "$@" 2>/dev/null | tr -d '\n '; echo; }
# The disk's own floor for a durable start: one 4 KiB write and fdatasync
# in the scheduler's state directory, as its log's sync does. On this VM it
# takes 0.1 ms at best and 4 ms while the disk is throttled after heavy
# writes (a build), which moves every start's latency with it.
sync_floor() {
  python3 - "$dir/state" <<'PY'
import json, os, sys, time
path = os.path.join(sys.argv[1], "sync-floor")
fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
t = []
for i in range(200):
    os.pwrite(fd, b"x" * 4096, (i % 32) * 4096)
    a = time.perf_counter(); os.fdatasync(fd); t.append((time.perf_counter() - a) * 1000)
os.close(fd); os.unlink(path); t.sort()
print(json.dumps({"mode": "sync_floor", "fdatasync_ms": {"p50": round(t[100], 3), "p99": round(t[198], 3)}}))
PY
}
# The scheduler's metrics into the file `$1` (files, not arguments: a
# scrape may pass the kernel's limit on one argument).
scrape() {
  curl -sS --cacert "$CLUSTERCTL_CA" --cert "$CLUSTERCTL_CERT" --key "$CLUSTERCTL_KEY" \
    "$CLUSTERCTL_SCHEDULER/metrics" >"$1"
}
# Means (ms) of the scheduler's own timings of a start between two scrapes
# (files).
start_breakdown() {
  python3 - "$1" "$2" <<'PY'
import json, re, sys
def parse(text):
    sums, counts = {}, {}
    for line in text.splitlines():
        m = re.match(r"(\w+?)_(sum|count)\{(.*)\} (\S+)$", line.strip())
        if not m:
            continue
        name, kind, labels, value = m.groups()
        (sums if kind == "sum" else counts)[(name, labels)] = float(value)
    return sums, counts
(s0, c0), (s1, c1) = (parse(open(path).read()) for path in sys.argv[1:3])
def mean_ms(name, want):
    for (n, labels), total in s1.items():
        if n == name and all(w in labels for w in want):
            key = (n, labels)
            c = c1.get(key, 0) - c0.get(key, 0)
            return round((total - s0.get(key, 0)) / c * 1000, 3) if c else None
print(json.dumps({"mode": "start_breakdown", "mean_ms": {
    "http_post_v1_jobs": mean_ms("schedulerd_http_request_duration_seconds", ["route=\"/v1/jobs\"", "method=\"POST\""]),
    "store_waiting_ahead": mean_ms("schedulerd_store_operation_duration_seconds", ["operation=\"waiting_ahead\""]),
    "store_insert_job_synced": mean_ms("schedulerd_store_operation_duration_seconds", ["operation=\"insert_job\""]),
    "store_insert_job_unless_ahead_synced": mean_ms("schedulerd_store_operation_duration_seconds", ["operation=\"insert_job_unless_ahead\""]),
    "request_to_worker_confirmed": mean_ms("schedulerd_job_start_latency_seconds", ["queued=\"false\""]),
    "store_update_started": mean_ms("schedulerd_store_operation_duration_seconds", ["operation=\"update_started\""]),
}}))
PY
}
one_round() {
  echo "== the disk's sync floor (4 KiB write + fdatasync)" >&2
  floor_before=$(sync_floor)
  echo "$floor_before"
  echo "== start, 1 client (HTTPS + client certificate, mTLS to the worker)" >&2
  scrape "$dir/metrics-before"
  start1=$(bench start --worker w1 --clients 1 --jobs $jobs1)
  echo "$start1"
  # Where the scheduler spent a start's time: means over the run above, from
  # its own metrics, as the difference of a scrape before and after it.
  scrape "$dir/metrics-after"
  breakdown=$(start_breakdown "$dir/metrics-before" "$dir/metrics-after")
  echo "$breakdown"
  # Back to back, each start shares the two cores with the end of the job
  # before it (its process scan, final record and report): spaced out, the
  # start's own latency.
  echo "== start, 1 client, 20 ms after each answer" >&2
  start1apart=$(bench start --worker w1 --clients 1 --jobs $apart --pause 20)
  echo "$start1apart"
  echo "== start, 16 clients, with the floor (local bash noop.sh, 16 at a time)" >&2
  start16=$(bench start --worker w1 --clients 16 --jobs $jobs16 --floor)
  echo "$start16"
  echo "== status of a finished job" >&2
  job=$("$ctl" -o json jobs --state succeeded | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["job_id"])')
  status=$(bench status --job "$job" --requests 5000)
  echo "$status"
  echo "== clusterctl run true.sh, $runs times, process start to exit" >&2
  run=$(run_times "$ctl" "$runs")
  echo "$run"
  echo "== follow ($mib MiB), 1 and 4 followers" >&2
  follow1=$(bench follow --worker w1 --mib $mib --followers 1 --replay --floor)
  echo "$follow1"
  follow4=$(bench follow --worker w1 --mib $mib --followers 4 --floor)
  echo "$follow4"
  floor_after=$(sync_floor)
  echo "$floor_after"
}
# Every figure of a round, one JSON object per line, per figure.
declare -A got
for round in $(seq 1 "$rounds"); do
  [ "$rounds" -gt 1 ] && echo "== round $round of $rounds" >&2
  one_round
  for name in start1 start1apart start16 status run follow1 follow4 floor_before floor_after breakdown; do
    got[$name]+="${!name}"$'\n'
  done
done
echo "== memory at rest, after the benches (idle right after start: see PERFORMANCE.md)" >&2
mem=$(for pid in "${pids[@]}"; do
  printf '%s %s\n' "$(tr '\0' ' ' </proc/"$pid"/cmdline | awk '{print $1}' | xargs basename)" \
    "$(awk '/VmRSS/{print $2}' /proc/"$pid"/status)"
done | python3 -c '
import json,sys
print(json.dumps({"mode":"memory","rss_kib":[{"process":p,"kib":int(k)} for p,k in (l.split() for l in sys.stdin)]}))')
echo "$mem"

python3 - "$rounds" "${got[start1]}" "${got[start16]}" "${got[status]}" "${got[run]}" "${got[follow1]}" \
  "${got[follow4]}" "${got[floor_before]}" "${got[floor_after]}" "${got[breakdown]}" "${got[start1apart]}" <<'PY' >&2
import json, statistics, sys
rounds = int(sys.argv[1])
s1, s16, st, run, f1, f4, fb, fa, bd, s1a = (
    [json.loads(l) for l in a.splitlines() if l.strip()] for a in sys.argv[2:])
def fig(values, fmt):
    """The median of the rounds, and their range when there are several."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mid = format(statistics.median(values), fmt)
    if len(values) == 1:
        return mid
    return f"{mid} ({format(min(values), fmt)}-{format(max(values), fmt)})"
def ms(runs, k): return [d["latency_ms"][k] for d in runs]
print()
print(f"| figure | {'this run' if rounds == 1 else f'median of {rounds} rounds (range)'} | target |")
print("|---|---|---|")
print(f"| start, 1 client: p50 / p99 | {fig(ms(s1,'p50'), '.2f')} / {fig(ms(s1,'p99'), '.2f')} ms | <= 1.2 / 3 ms |")
print(f"| start, 1 client | {fig([d['starts_per_second'] for d in s1], '.0f')}/s | |")
print(f"| start, 1 client, 20 ms after each answer: p50 / p99 | {fig(ms(s1a,'p50'), '.2f')} / {fig(ms(s1a,'p99'), '.2f')} ms | |")
print(f"| fdatasync of 4 KiB, before / after the benches: p50 | {fig([d['fdatasync_ms']['p50'] for d in fb], '.2f')} / {fig([d['fdatasync_ms']['p50'] for d in fa], '.2f')} ms | (the disk's floor) |")
means = ", ".join(f"{k} {fig([d['mean_ms'][k] for d in bd], '.3f')}" for k in bd[0]["mean_ms"])
print(f"| start, 1 client: scheduler means (ms) | {means} | |")
print(f"| start, 16 clients | {fig([d['starts_per_second'] for d in s16], '.0f')}/s (floor {fig([d['floor_per_second'] for d in s16], '.0f')}/s, {fig([d['share_of_floor'] * 100 for d in s16], '.0f')} %) | >= 75 % of the floor |")
print(f"| status: p50 / p99 | {fig([d['latency_ms']['p50'] for d in st], '.3f')} / {fig([d['latency_ms']['p99'] for d in st], '.3f')} ms | <= 0.15 / 0.3 ms |")
print(f"| clusterctl run true.sh: p50 | {fig([d['p50_ms'] for d in run], '.1f')} ms | <= 6 ms |")
def fol(runs):
    return (f"{fig([d['total_mib_per_second'] for d in runs], '.0f')} MiB/s "
            f"({fig([d['share_of_floor'] * 100 for d in runs], '.0f')} % of the floor)")
print(f"| follow, 1 follower | {fol(f1)}; floor: 1 local pipe {fig([d['floor_mib_per_second'] for d in f1], '.0f')} MiB/s | >= 600 MiB/s |")
print(f"| follow, 4 followers in all | {fol(f4)}; floor: 4 local pipes {fig([d['floor_mib_per_second'] for d in f4], '.0f')} MiB/s | >= 900 MiB/s |")
print(f"| replay of a finished log, 1 follower | {fol([d['replay'] for d in f1])} | >= 1 GiB/s |")
PY
