#!/usr/bin/env bash
# Compares two builds on this machine with both clusters up at once, one
# measurement of each in turn, so that the machine's drift (a shared VM's
# figures move by a fifth within minutes) falls on both alike:
#
#   scripts/ab.sh DIR_A DIR_B [ROUNDS]    # default 5 rounds
#
# Each DIR holds a release schedulerd, workerd and clusterctl (each build
# is measured through its own clusterctl). Each cluster is the one
# `scripts/bench.sh --serve` starts. Per round and build: a start's p50
# spaced 20 ms apart (100 starts) and back to back (200), starts per second
# with 16 clients (600), `clusterctl run true.sh` (median of 30, as
# bench.sh times it), and one
# replay of a 256 MiB log through `clusterctl logs` with the CPU it cost
# the scheduler and the worker (ticks of 10 ms, /proc/PID/stat). Prints a
# line per round and build, then the medians. Nothing is kept.
set -euo pipefail
# A failure inside a round's $(...) stops the comparison too.
shopt -s inherit_errexit
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/scripts/bench-lib.sh"
[ $# -ge 2 ] && [ $# -le 3 ] || { echo "usage: scripts/ab.sh DIR_A DIR_B [ROUNDS]" >&2; exit 2; }
rounds=${3:-5}
check_rounds "$rounds" || exit 2
for d in "$1" "$2"; do
  for f in schedulerd workerd clusterctl; do
    [ -x "$d/$f" ] || { echo "$d/$f: not an executable" >&2; exit 2; }
  done
done
warn_recent_deletion
# Absolute: bench.sh runs the daemons from its own directory.
a=$(cd "$1" && pwd) b=$(cd "$2" && pwd)

tmp=$(mktemp -d /tmp/jobcluster-ab.XXXXXX)
serving=()
cleanup() {
  for pid in "${serving[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for pid in "${serving[@]}"; do
    # 30 s for a cluster to stop, then it is killed.
    for _ in $(seq 1 300); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
  rm -rf "$tmp"
}
trap cleanup EXIT

# Starts a cluster of `$1`'s daemons; `$2` names its files in $tmp.
serve() {
  JOBCLUSTER_BENCH_BIN=$1 setsid "$root/scripts/bench.sh" --serve >"$tmp/$2.log" 2>&1 &
  local pid=$!
  serving+=("$pid")
  for _ in $(seq 1 600); do
    if grep -q '^# schedulerd' "$tmp/$2.log" 2>/dev/null; then
      # setsid made it a process group of its own (the group stopped at
      # the end), as it does when this script runs without job control.
      [ "$(ps -o pgid= -p "$pid" | tr -d ' ')" = "$pid" ] || {
        echo "the cluster of $1 is not a process group of its own" >&2
        exit 1
      }
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  echo "the cluster of $1 did not come up; see:" >&2
  cat "$tmp/$2.log" >&2
  exit 1
}
serve "$a" a
serve "$b" b

# One round of every figure against the cluster named `$2`, through `$1`'s
# clusterctl; one JSON object.
round() {
  local dir=$1 name=$2 env sched worker job
  env=$(grep -m1 '^export CLUSTERCTL_' "$tmp/$name.log")
  eval "$env"
  # bench.sh --serve: "# schedulerd, workerd w1, workerd w2: PIDS; interrupt to stop"
  read -r sched worker _ < <(sed -n 's/^# schedulerd[^:]*: \([0-9 ]*\);.*/\1/p' "$tmp/$name.log" | head -1)
  case "$sched:$worker" in
    :* | *: | *[!0-9:]*) echo "ab: no pids in $tmp/$name.log's '# schedulerd' line" >&2; exit 1 ;;
  esac
  local ctl="$dir/clusterctl"
  job=$(cat "$tmp/$name.job" 2>/dev/null || true)
  if [ -z "$job" ]; then
    # A bench that fails exits non-zero with its JSON (`first_error`) on
    # standard output: said, then the comparison stops.
    job=$("$ctl" -o json bench follow --worker w1 --mib 256 --followers 1 2>/dev/null) ||
      { echo "$name: bench follow failed: $job" >&2; exit 1; }
    job=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["job_id"])' <<<"$job")
    echo "$job" >"$tmp/$name.job"
  fi
  local spaced back c16 run s0 w0 s1 w1 t0 t1
  starts() {
    local out
    out=$("$ctl" -o json bench start --worker w1 "$@" 2>/dev/null) ||
      { echo "$name: bench start $* failed: $out" >&2; return 1; }
    echo "$out"
  }
  spaced=$(starts --clients 1 --jobs 100 --pause 20)
  back=$(starts --clients 1 --jobs 200)
  c16=$(starts --clients 16 --jobs 600)
  run=$(run_times "$ctl" 30 | python3 -c 'import json,sys; print(json.load(sys.stdin)["p50_ms"])')
  local bytes
  # cpu_of reads 0 for a process gone: a daemon that died is said, not
  # measured as idle.
  for pid in "$sched" "$worker"; do
    [ -e "/proc/$pid/stat" ] || { echo "$name: process $pid is gone" >&2; exit 1; }
  done
  s0=$(cpu_of "$sched"); w0=$(cpu_of "$worker"); t0=$EPOCHREALTIME
  bytes=$("$ctl" logs "$job" | wc -c)
  t1=$EPOCHREALTIME; s1=$(cpu_of "$sched"); w1=$(cpu_of "$worker")
  [ "$bytes" -eq $((256 << 20)) ] || { echo "the replay gave $bytes bytes, not 256 MiB" >&2; exit 1; }
  python3 - "$spaced" "$back" "$c16" "$run" "$t0" "$t1" "$((s1 - s0))" "$((w1 - w0))" <<'PY'
import json, sys
spaced, back, c16 = (json.loads(x) for x in sys.argv[1:4])
print(json.dumps({
    "spaced_p50_ms": spaced["latency_ms"]["p50"],
    "back_to_back_p50_ms": back["latency_ms"]["p50"],
    "clients16_per_s": c16["starts_per_second"],
    "run_true_ms": round(float(sys.argv[4]), 2),
    "replay_mib_per_s": round(256 / (float(sys.argv[6]) - float(sys.argv[5])), 1),
    "replay_scheduler_ticks": int(sys.argv[7]),
    "replay_worker_ticks": int(sys.argv[8]),
}))
PY
}

for r in $(seq 1 "$rounds"); do
  # A, B in odd rounds and B, A in even ones: neither always goes first.
  order="a b"
  [ $((r % 2)) -eq 0 ] && order="b a"
  for name in $order; do
    if [ $name = a ]; then dir=$a; else dir=$b; fi
    line=$(round "$dir" $name)
    echo "$line" >>"$tmp/$name.rounds"
    echo "round $r $name ($dir): $line"
  done
done
python3 - "$tmp/a.rounds" "$tmp/b.rounds" "$a" "$b" <<'PY'
import json, statistics, sys
a, b = ([json.loads(l) for l in open(p)] for p in sys.argv[1:3])
print()
print(f"| median of {len(a)} rounds | A: {sys.argv[3]} | B: {sys.argv[4]} |")
print("|---|---|---|")
for key in a[0]:
    ma, mb = (statistics.median(r[key] for r in runs) for runs in (a, b))
    print(f"| {key} | {ma:g} | {mb:g} |")
PY
