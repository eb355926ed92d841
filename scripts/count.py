#!/usr/bin/env python3
"""Prints 1..N, one line at a time with a pause, then "done".

Usage: count.py [N=10] [PAUSE_SECONDS=1]
"""
import sys
import time

n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
pause = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
for i in range(1, n + 1):
    print(i)
    time.sleep(pause)
print("done")
