#!/usr/bin/env bash
# Prints 1..N, one line at a time with a pause, then "done".
# Usage: count.sh [N=10] [PAUSE_SECONDS=1]
set -euo pipefail
n=${1:-10}
pause=${2:-1}
for ((i = 1; i <= n; i++)); do
  echo "$i"
  sleep "$pause"
done
echo done
