#!/usr/bin/env python3
"""The benchmarks' data sets (vm-tests/bench/compare.sh in the VM, scripts/bench-host.sh on
the host), deterministic and incompressible.

    dataset.py make ROOT N       N small files (100 B - 8 KiB of random bytes, seed 42),
                                 20 per directory, 10 directories per top-level directory
    dataset.py change ROOT SEED  1% of the files get their first 4 KiB rewritten
"""
import os
import random
import sys


def make(root, n):
    rng = random.Random(42)
    for i in range(n):
        d = os.path.join(root, "d%03d" % (i // 200), "s%02d" % (i // 20 % 10))
        if i % 20 == 0:
            os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "f%06d.bin" % i), "wb") as f:
            f.write(rng.randbytes(rng.randint(100, 8 << 10)))


def change(root, seed):
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)
    rng = random.Random(seed)
    for p in rng.sample(files, max(1, len(files) // 100)):
        with open(p, "r+b") as f:
            f.write(rng.randbytes(min(4096, os.path.getsize(p))))


if __name__ == "__main__":
    verb, root, num = sys.argv[1], sys.argv[2], int(sys.argv[3])
    {"make": make, "change": change}[verb](root, num)
