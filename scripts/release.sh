#!/usr/bin/env bash
# Builds the release binaries, and prints where clusterctl is (last line):
#
#   scripts/release.sh              # schedulerd, workerd and clusterctl
#   scripts/release.sh clusterctl   # clusterctl only
#
# schedulerd and workerd: target/release/. clusterctl: on a *-linux-gnu
# host, target/<host>/release/clusterctl (x86_64-unknown-linux-gnu here),
# linked statically (glibc's static-pie); elsewhere target/release/.
#
# Why static: CI runs clusterctl once per step, and each run starts a
# process. Without the dynamic loader (three libraries mapped and bound,
# and libgcc_s's CPU probe, which traps to the host on a VM) a start costs
# 0.3-0.6 ms less on the development machine (docs/PERFORMANCE.md,
# "clusterctl linked statically"). What it gives up: glibc still loads
# the NSS modules /etc/nsswitch.conf names besides its built-in `files`
# and `dns` (`resolve`, `mdns`, `ldap`, ...) with dlopen, and those must
# come from the glibc version it was built with: build it on the
# distribution it runs on.
#
# The daemons stay dynamic: they start once. Only an explicit --target
# keeps the static flag off the build's proc-macros and build scripts,
# which must stay dynamic (rust-lang/rust#78210), so clusterctl has its
# own output directory.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
target_dir=${CARGO_TARGET_DIR:-$root/target}
case ${1:-all} in
  # The whole workspace, as the tests build it, so the daemons get the
  # same dependency features as always; it also leaves a dynamic
  # target/release/clusterctl, which is not the one to install.
  all) cargo build --release --workspace --bins --quiet ;;
  clusterctl) ;;
  *) echo "usage: scripts/release.sh [clusterctl]" >&2; exit 2 ;;
esac
host=$(rustc -vV | sed -n 's/^host: //p')
case $host in
  *-linux-gnu)
    RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
      cargo build --release --target "$host" -p jobcluster-clusterctl --bin clusterctl --quiet
    echo "$target_dir/$host/release/clusterctl"
    ;;
  *)
    cargo build --release -p jobcluster-clusterctl --bin clusterctl --quiet
    echo "$target_dir/release/clusterctl"
    ;;
esac
