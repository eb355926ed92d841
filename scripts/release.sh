#!/usr/bin/env bash
# Builds the release binaries, and prints where clusterctl is (last line):
#
#   scripts/release.sh              # schedulerd, workerd and clusterctl
#   scripts/release.sh clusterctl   # clusterctl only
#
# schedulerd and workerd: target/release/. clusterctl: on a *-linux-gnu
# host, target/<host>/release/clusterctl, linked statically (glibc's
# static-pie); elsewhere target/release/clusterctl.
#
# Why static: CI runs clusterctl once per step, and each run starts a
# process. Without the dynamic loader (three libraries mapped and bound,
# and libgcc_s's CPU probe, which traps to the host on a VM) a start costs
# about 0.5 ms less on the development machine (docs/PERFORMANCE.md,
# "clusterctl linked statically"), and the one file runs on any Linux of
# its architecture. What it gives up: host names resolve through glibc's
# built-in `files` and `dns` sources only; NSS modules that /etc/nsswitch.conf
# names besides (`resolve`, `mdns`, `ldap`, ...) are not loaded.
#
# The daemons stay dynamic: they start once. Only an explicit --target
# keeps the static flag off the build's proc-macros and build scripts,
# which must stay dynamic (rust-lang/rust#78210), so clusterctl has its
# own output directory.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
case ${1:-all} in
  all) cargo build --release --workspace --bins --quiet ;;
  clusterctl) ;;
  *) echo "usage: scripts/release.sh [clusterctl]" >&2; exit 2 ;;
esac
host=$(rustc -vV | sed -n 's/^host: //p')
case $host in
  *-linux-gnu)
    RUSTFLAGS="-C target-feature=+crt-static" \
      cargo build --release --target "$host" -p jobcluster-clusterctl --bin clusterctl --quiet
    echo "$root/target/$host/release/clusterctl"
    ;;
  *)
    cargo build --release -p jobcluster-clusterctl --bin clusterctl --quiet
    echo "$root/target/release/clusterctl"
    ;;
esac
