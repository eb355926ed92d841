#!/usr/bin/env bash
# Prints a line to stdout and one to stderr, then exits with CODE (default 3).
echo "about to fail"
echo "failing on purpose" >&2
exit "${1:-3}"
