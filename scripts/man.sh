#!/usr/bin/env bash
# Writes the manual pages generated from the binaries' clap definitions:
# clusterctl and each of its subcommands in section 1 (DIR/man1), schedulerd
# and workerd in section 8 (DIR/man8). DIR defaults to target/man, which git
# ignores.
#   scripts/man.sh [DIR]
#   man -M target/man clusterctl        # or: man -l target/man/man1/clusterctl-run.1
# To install: cp DIR/man1/* /usr/local/share/man/man1/ and
# cp DIR/man8/* /usr/local/share/man/man8/ (then mandb).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-target/man}
cargo build --quiet --bins
bin=target/debug
mkdir -p "$dir/man1" "$dir/man8"
# Pages of subcommands that no longer exist must not linger.
rm -f "$dir"/man1/*.1 "$dir"/man8/*.8
"$bin/clusterctl" generate-man "$dir/man1"
"$bin/schedulerd" --generate-man "$dir/man8"
"$bin/workerd" --generate-man "$dir/man8"
echo "man: $(ls "$dir/man1" "$dir/man8" | grep -c '\.[18]$') pages in $dir (read one with: man -M $dir clusterctl)" >&2
