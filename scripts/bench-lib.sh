# Sourced by the scripts that start throwaway clusters (bench.sh,
# side-by-side.sh, fuzz-api.sh); `root` is the checkout.

# A free loopback TCP port (the kernel's choice).
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Creating files on ext4 without a journal (this VM's root filesystem) is
# slower for minutes after thousands were deleted nearby: a new inode
# skips the free ones deleted in the last 60 s, or 360 s while their inode
# table block is dirty (which the new files' own inodes keep it), looking
# each one's block up. A bench deletes its jobs' files at its end, so a
# run started within those minutes starts fewer jobs per second
# (docs/PERFORMANCE.md, session 30). The
# scripts mark their deletion and warn the run that follows too soon.
deleted_mark="$root/target/.bench-deleted"
delete_marked() {
  rm -rf "$@"
  # Best effort: a mark that cannot be written fails no bench.
  { mkdir -p "$root/target" && date +%s >"$deleted_mark"; } 2>/dev/null || true
}
warn_recent_deletion() {
  local then ago
  then=$(cat "$deleted_mark" 2>/dev/null) || return 0
  case $then in '' | *[!0-9]*) return 0 ;; esac
  ago=$(($(date +%s) - then))
  if [ "$ago" -ge 0 ] && [ "$ago" -lt 360 ]; then
    echo "note: an earlier bench deleted its files ${ago} s ago; on ext4 without a journal, creating files (every start) stays slower for up to $((360 - ago)) s more, so this run's start figures may be low (docs/PERFORMANCE.md)" >&2
  fi
}

# CPU ticks (user + system, 10 ms each) process `$1` used so far; 0 once
# it is gone.
cpu_of() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }

# Checks a `--rounds`/ROUNDS value: every round starts thousands of jobs
# and streams a GiB, so 1 to 50.
check_rounds() {
  case ${1:-} in [1-9] | [1-4][0-9] | 50) ;; *) echo "rounds take 1 to 50" >&2; return 2 ;; esac
}

# Sets `bin` to the release daemons to measure and `ctl` to this
# checkout's release clusterctl (as scripts/release.sh builds it: static
# on Linux with glibc), building what is needed.
# JOBCLUSTER_BENCH_BIN=DIR measures the daemons in DIR instead (an earlier
# build, for a before/after in one sitting); the bench itself is always
# this checkout's clusterctl.
release_binaries() {
  if [ -n "${JOBCLUSTER_BENCH_BIN:-}" ]; then
    bin=$JOBCLUSTER_BENCH_BIN
    ctl=$("$root/scripts/release.sh" clusterctl | tail -1)
  else
    ctl=$("$root/scripts/release.sh" | tail -1)
    bin="$root/target/release"
  fi
}

# `clusterctl run --worker w1 true.sh` through the clusterctl `$1`, `$2`
# times, each timed from its process's start to its exit as a shell runs
# it; prints one JSON object: the runs' p50, min and max (ms). A run that
# fails stops the bench (its time would say nothing).
run_times() {
  local ctl=$1 runs=$2 t0 t1 spans=()
  for _ in $(seq 1 "$runs"); do
    t0=$EPOCHREALTIME
    "$ctl" run --worker w1 true.sh >/dev/null 2>&1 || {
      echo "clusterctl run --worker w1 true.sh failed" >&2
      return 1
    }
    t1=$EPOCHREALTIME
    spans+=("$t0 $t1")
  done
  printf '%s\n' "${spans[@]}" | python3 -c '
import json, sys
t = sorted((float(b) - float(a)) * 1000 for a, b in (l.split() for l in sys.stdin))
print(json.dumps({"mode": "run", "runs": len(t), "p50_ms": round(t[len(t) // 2], 2),
                  "min_ms": round(t[0], 2), "max_ms": round(t[-1], 2)}))'
}
