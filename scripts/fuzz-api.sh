#!/usr/bin/env bash
# Fuzzes the scheduler's HTTP API against its own OpenAPI document with
# schemathesis: a throwaway cluster (a scheduler and one worker, with a PKI
# in a temporary directory, on free loopback ports) is started from the
# binaries already built, `schemathesis run` sends generated requests for
# every operation of GET /v1/openapi.json, and every answer must be no 5xx
# and match the document (status, content type, headers, body schema).
# Everything started here is stopped on exit.
#
#   scripts/fuzz-api.sh                # needs target/debug/{schedulerd,workerd,clusterctl}
#   FUZZ_SECONDS=60 scripts/fuzz-api.sh
#
# Environment: BIN (where the binaries are; default target/debug),
# SCHEMATHESIS (the command; default `schemathesis`), PYTHON (a python3
# with openapi-spec-validator, if any; default python3), FUZZ_SECONDS (time
# budget of the run; default 120), FUZZ_SEED (a seed, to repeat a run).
#
# The fuzzer really starts jobs: the worker's scripts_dir holds only
# true.sh (which exits at once; also as count.sh), it runs at most 4 jobs at a time, and the
# scheduler queues at most 100; jobs end with the cluster.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${BIN:-$root/target/debug}
schemathesis=${SCHEMATHESIS:-schemathesis}
seconds=${FUZZ_SECONDS:-120}

for b in schedulerd workerd clusterctl; do
  [ -x "$bin/$b" ] || { echo "fuzz-api: $bin/$b is missing: build first (cargo build --workspace --bins)" >&2; exit 1; }
done
command -v "$schemathesis" >/dev/null 2>&1 || { echo "fuzz-api: $schemathesis not found: pip install schemathesis" >&2; exit 1; }

dir=$(mktemp -d /tmp/jobcluster-fuzz.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    # Workers stop their jobs first; give them a bounded time.
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [ "${KEEP:-}" = 1 ]; then echo "fuzz-api: kept $dir" >&2; else rm -rf "$dir"; fi
}
trap cleanup EXIT

. "$root/scripts/bench-lib.sh"
grpc_port=$(free_port)
http_port=$(free_port)
worker_port=$(free_port)

"$bin/clusterctl" pki init "$dir/pki" >/dev/null 2>&1
"$bin/clusterctl" pki issue "$dir/pki" --role worker w1 >/dev/null 2>&1
mkdir -p "$dir/scripts" "$dir/state"
cp "$root/scripts/true.sh" "$dir/scripts/"
# The document's examples name count.sh; here it is true.sh too, so that
# the fuzzer's jobs run a real script and end at once whatever their args.
cp "$root/scripts/true.sh" "$dir/scripts/count.sh"
# A root workerd runs jobs as nobody, who must reach the script.
chmod 0755 "$dir" "$dir/scripts"
chmod 0644 "$dir/scripts/true.sh" "$dir/scripts/count.sh"

cat >"$dir/scheduler.toml" <<TOML
[grpc_server]
addr = "127.0.0.1:$grpc_port"
crt_file = "pki/scheduler.pem"
key_file = "pki/scheduler-key.pem"
ca_file = "pki/ca.pem"

[http_server]
addr = "127.0.0.1:$http_port"

[store]
path = "state/scheduler.db"

[scheduler]
max_queued = 100
TOML

cat >"$dir/w1.toml" <<TOML
[grpc_server]
addr = "127.0.0.1:$worker_port"
crt_file = "pki/w1.pem"
key_file = "pki/w1-key.pem"
ca_file = "pki/ca.pem"

[scheduler]
addr = "127.0.0.1:$grpc_port"

[worker]
name = "w1"
scripts_dir = "scripts"
state_dir = "state/w1"
labels = { zone = "fuzz" }
max_jobs = 4

[plugins.bash]
runner = "bash"
extensions = ["sh"]
stop_grace = "1s"
TOML

"$bin/schedulerd" --config "$dir/scheduler.toml" >"$dir/schedulerd.log" 2>&1 &
pids+=($!)
"$bin/workerd" --config "$dir/w1.toml" >"$dir/w1.log" 2>&1 &
pids+=($!)

export CLUSTERCTL_SCHEDULER="https://127.0.0.1:$http_port"
export CLUSTERCTL_CA="$dir/pki/ca.pem"
export CLUSTERCTL_CERT="$dir/pki/client.pem"
export CLUSTERCTL_KEY="$dir/pki/client-key.pem"
for i in $(seq 1 150); do
  if "$bin/clusterctl" -o json workers 2>/dev/null | grep -q '"state": *"ready"'; then
    break
  fi
  if [ "$i" -eq 150 ]; then
    echo "fuzz-api: the worker did not register within 30 s" >&2
    tail -n 20 "$dir/schedulerd.log" "$dir/w1.log" >&2
    exit 1
  fi
  sleep 0.2
done

# The document itself, checked by an OpenAPI validator of its own when
# one is installed (.ci/run installs openapi-spec-validator).
"${PYTHON:-python3}" - "$dir" "$http_port" <<'PY'
import json, ssl, sys, urllib.request
d, port = sys.argv[1], sys.argv[2]
ctx = ssl.create_default_context(cafile=f"{d}/pki/ca.pem")
ctx.load_cert_chain(f"{d}/pki/client.pem", f"{d}/pki/client-key.pem")
url = f"https://127.0.0.1:{port}/v1/openapi.json"
with urllib.request.urlopen(url, context=ctx, timeout=10) as reply:
    doc = json.load(reply)
try:
    from openapi_spec_validator import validate
except ImportError:
    print("fuzz-api: openapi-spec-validator is not installed: the document is not validated", file=sys.stderr)
    sys.exit(0)
validate(doc)
print(f"fuzz-api: the document is valid OpenAPI {doc['openapi']} ({len(doc['paths'])} paths)", file=sys.stderr)
PY

echo "== schemathesis against https://127.0.0.1:$http_port (up to $seconds s)" >&2
status=0
args=(
  run "https://127.0.0.1:$http_port/v1/openapi.json"
  --tls-verify "$dir/pki/ca.pem"
  --request-cert "$dir/pki/client.pem"
  --request-cert-key "$dir/pki/client-key.pem"
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance
  --max-time "$seconds"
  --request-timeout 20
  # One worker: with two, hypothesis's ast.parse in two threads at once
  # failed a CI run inside CPython 3.11 ("AST constructor recursion depth
  # mismatch", python/cpython#106905), a crash of the tool, not a finding.
  --workers 1
  --suppress-health-check all
)
[ -n "${FUZZ_SEED:-}" ] && args+=(--seed "$FUZZ_SEED")
# From the cluster's directory: schemathesis keeps a cache where it runs.
(cd "$dir" && "$schemathesis" "${args[@]}") || status=$?
if [ "$status" -ne 0 ]; then
  echo "fuzz-api: schemathesis found failures (exit $status); scheduler log:" >&2
  tail -n 40 "$dir/schedulerd.log" >&2
fi
exit "$status"
