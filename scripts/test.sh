#!/usr/bin/env bash
# The test command of the README: builds every binary and runs every test
# (unit tests and the integration tests that start the real daemons).
set -euo pipefail
cd "$(dirname "$0")/.."
# The PostgreSQL store's tests start a throwaway server from the machine's
# PostgreSQL (schedulerd/testing/postgres.rs): install it where missing.
if [ -z "${JOBCLUSTER_PG_BIN:-}" ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing PostgreSQL (Debian's postgresql package) for the store tests"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "PostgreSQL is missing: install Debian's postgresql package, or set JOBCLUSTER_PG_BIN to its bin directory" >&2
    exit 1
  fi
fi
cargo build --workspace --bins
cargo test --workspace
# The end-to-end suite again with every scheduler on PostgreSQL (a
# database of its own per cluster, on the throwaway server).
JOBCLUSTER_TEST_STORE=postgres cargo test -p jobcluster-clusterctl --test it
