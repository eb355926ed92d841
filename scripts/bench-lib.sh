# Sourced by the scripts that start throwaway clusters (bench.sh,
# side-by-side.sh, fuzz-api.sh); `root` is the checkout.

# A free loopback TCP port (the kernel's choice).
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Sets `bin` to the release daemons to measure and `ctl` to this
# checkout's release clusterctl, building what is needed.
# JOBCLUSTER_BENCH_BIN=DIR measures the daemons in DIR instead (an earlier
# build, for a before/after in one sitting); the bench itself is always
# this checkout's clusterctl.
release_binaries() {
  if [ -n "${JOBCLUSTER_BENCH_BIN:-}" ]; then
    bin=$JOBCLUSTER_BENCH_BIN
    (cd "$root" && cargo build --release -p jobcluster-clusterctl --bin clusterctl --quiet)
  else
    (cd "$root" && cargo build --release --workspace --bins --quiet)
    bin="$root/target/release"
  fi
  ctl="$root/target/release/clusterctl"
}
