#!/usr/bin/env bash
# Writes the manual pages of clusterctl (section 1, one page per
# subcommand too), schedulerd and workerd (section 8), generated from their
# clap definitions, to DIR (default: target/man, which git ignores).
#   scripts/man.sh [DIR]
#   man -l target/man/clusterctl.1
#   MANPATH=target/man: man clusterctl-run     (after moving pages into man1/, man8/)
# Installing: copy DIR/*.1 to /usr/local/share/man/man1/ and DIR/*.8 to
# /usr/local/share/man/man8/.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-target/man}
cargo build --quiet --bins
bin=target/debug
rm -rf "$dir"
mkdir -p "$dir"
"$bin/clusterctl" generate-man "$dir"
"$bin/schedulerd" --generate-man "$dir"
"$bin/workerd" --generate-man "$dir"
echo "manual pages in $dir: $(ls "$dir" | wc -l) files" >&2
