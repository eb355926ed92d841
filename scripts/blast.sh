#!/usr/bin/env bash
# Writes N bytes of zeros to stdout: the job `clusterctl bench follow` follows.
# Usage: blast.sh N
set -euo pipefail
head -c "$1" /dev/zero
