#!/usr/bin/env bash
# Brings up a local cluster from nothing and runs a job on it:
# builds the binaries, creates a development PKI in .cluster/pki (git-ignored),
# starts schedulerd and two workerd (w1, w2) on loopback, lists the workers,
# then runs count.sh on w1 so its lines stream to this terminal.
#
#   scripts/quickstart.sh          # bring up (or reuse) the cluster and run a job
#   scripts/quickstart.sh down     # stop the cluster
#
# Ports: scheduler gRPC 127.0.0.1:50000, HTTPS API 127.0.0.1:3000,
# workers 127.0.0.1:30001 and 127.0.0.1:30002.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir="$root/.cluster"
bin="$root/target/debug"

# Where the workers' scripts are copied when the job user cannot read the
# checkout (see below); remembered so that `down` can remove the copy.
copy_record="$dir/scripts-copy"

down() {
  local stopped=0
  for pidfile in "$dir"/run/*.pid; do
    [ -e "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" && stopped=$((stopped + 1))
      # Wait for a clean exit (workers stop their jobs first).
      for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$pidfile"
  done
  if [ -f "$copy_record" ]; then
    copy=$(cat "$copy_record")
    case "$copy" in /tmp/jobcluster-scripts.*) rm -rf "$copy" ;; esac
    rm -f "$copy_record"
  fi
  echo "stopped $stopped process(es)" >&2
}

if [ "${1:-}" = "down" ]; then
  down
  exit 0
fi

echo "== building" >&2
(cd "$root" && cargo build --workspace --bins --quiet)

mkdir -p "$dir/run" "$dir/logs" "$dir/state"
ctl="$bin/clusterctl"
if [ ! -f "$dir/pki/ca.pem" ]; then
  echo "== creating a development PKI in $dir/pki" >&2
  "$ctl" pki init "$dir/pki" 2>/dev/null
  "$ctl" pki issue "$dir/pki" --role worker w1 2>/dev/null
  "$ctl" pki issue "$dir/pki" --role worker w2 2>/dev/null
fi

cat > "$dir/scheduler.toml" <<TOML
[grpc_server]
addr = "127.0.0.1:50000"
use_tls = true
crt_file = "pki/scheduler.pem"
key_file = "pki/scheduler-key.pem"
ca_file = "pki/ca.pem"

[http_server]
addr = "127.0.0.1:3000"

[store]
path = "state/scheduler.db"
TOML
write_worker_configs() { # scripts_dir
  local port=30001
  for w in w1 w2; do
    cat > "$dir/$w.toml" <<TOML
[grpc_server]
addr = "127.0.0.1:$port"
use_tls = true
crt_file = "pki/$w.pem"
key_file = "pki/$w-key.pem"
ca_file = "pki/ca.pem"

[scheduler]
addr = "127.0.0.1:50000"

[worker]
name = "$w"
scripts_dir = "$1"
state_dir = "state/$w"
labels = { zone = "local" }

[plugins.bash]
runner = "bash"
extensions = ["sh"]

[plugins.python]
runner = "python"
extensions = ["py"]
TOML
    port=$((port + 1))
  done
}

# Run as root, workerd runs jobs as nobody, who must be able to read
# scripts_dir. A checkout under a private home (/root is 0700) is out of
# its reach: then the sample scripts are copied to a directory it can read
# (refreshed at every start, removed by `down`), rather than running the
# jobs as root.
write_worker_configs "$root/scripts"
checked=$("$bin/workerd" --config "$dir/w1.toml" --check-config 2>&1 || true)
if [ "$(id -u)" -eq 0 ] && [[ $checked == *"cannot read scripts_dir"* ]]; then
  copy=$(cat "$copy_record" 2>/dev/null || true)
  if [ -z "$copy" ] || [ ! -d "$copy" ]; then
    copy=$(mktemp -d /tmp/jobcluster-scripts.XXXXXX)
    echo "$copy" >"$copy_record"
  fi
  chmod 0755 "$copy"
  cp "$root"/scripts/*.sh "$root"/scripts/*.py "$copy"/
  chmod -R a+rX "$copy"
  echo "== nobody cannot read $root/scripts: jobs run the copy in $copy" >&2
  write_worker_configs "$copy"
fi

start() { # name binary config
  local pidfile="$dir/run/$1.pid"
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "   $1 already running (pid $(cat "$pidfile"))" >&2
    return
  fi
  "$bin/$2" --config "$dir/$3" >>"$dir/logs/$1.log" 2>&1 &
  echo $! >"$pidfile"
  echo "   $1 started (pid $!, log .cluster/logs/$1.log)" >&2
}

echo "== starting schedulerd and two workers" >&2
start schedulerd schedulerd scheduler.toml
start w1 workerd w1.toml
start w2 workerd w2.toml

export CLUSTERCTL_SCHEDULER=https://127.0.0.1:3000
export CLUSTERCTL_CA="$dir/pki/ca.pem"
export CLUSTERCTL_CERT="$dir/pki/client.pem"
export CLUSTERCTL_KEY="$dir/pki/client-key.pem"

# Wait until both workers have registered.
for i in $(seq 1 100); do
  ready=$("$ctl" workers -o json 2>/dev/null | grep -o '"state": *"ready"' | wc -l || true)
  [ "$ready" -ge 2 ] && break
  if [ "$i" -eq 100 ]; then
    echo "the workers did not register in time; see .cluster/logs/" >&2
    down
    exit 1
  fi
  sleep 0.2
done

echo "== clusterctl workers" >&2
"$ctl" workers
echo "== clusterctl run --worker w1 count.sh -- 5 0.5" >&2
"$ctl" run --worker w1 count.sh -- 5 0.5

cat >&2 <<MSG

The cluster is still running. To use it from this shell:
  export CLUSTERCTL_SCHEDULER=$CLUSTERCTL_SCHEDULER
  export CLUSTERCTL_CA=$CLUSTERCTL_CA
  export CLUSTERCTL_CERT=$CLUSTERCTL_CERT
  export CLUSTERCTL_KEY=$CLUSTERCTL_KEY
  $ctl run --worker w2 count.py -- 3
Stop it with: scripts/quickstart.sh down
MSG
