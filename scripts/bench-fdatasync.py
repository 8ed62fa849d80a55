#!/usr/bin/env python3
"""4 KiB write + fdatasync loops into one file, four ways, on the disk holding DIR: what a WAL
append pays for fdatasync depending on how its segment was created (docs/BENCHMARKS.md, "WAL
preallocation").

  append    a new empty file (each fdatasync also allocates blocks)
  reserved  fallocate(FALLOC_FL_KEEP_SIZE) first: blocks allocated, size unchanged (vblock's WAL)
  fallocate posix_fallocate first: size set, blocks unwritten
  overwrite the file written with zeros and synced first (a recycled segment, or fio's raw file)

    scripts/bench-fdatasync.py [DIR] [--count N] [--rounds R]
"""
import argparse
import ctypes
import os
import time

FALLOC_FL_KEEP_SIZE = 1
libc = ctypes.CDLL(None, use_errno=True)


def run(path, mode, count):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        size = count * 4096
        if mode == "overwrite":
            os.write(fd, b"\0" * size)
            os.fsync(fd)
            os.lseek(fd, 0, os.SEEK_SET)
        elif mode == "fallocate":
            os.posix_fallocate(fd, 0, size)
            os.fsync(fd)
        elif mode == "reserved":
            if libc.fallocate(fd, FALLOC_FL_KEEP_SIZE, ctypes.c_long(0), ctypes.c_long(size)) != 0:
                raise OSError(ctypes.get_errno(), "fallocate(KEEP_SIZE)")
            os.fsync(fd)
        block = b"x" * 4096
        times = []
        for _ in range(count):
            t = time.perf_counter()
            os.write(fd, block)
            os.fdatasync(fd)
            times.append(time.perf_counter() - t)
    finally:
        os.close(fd)
        os.unlink(path)
    times.sort()
    return count / sum(times), times[len(times) // 2], times[len(times) * 99 // 100]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", nargs="?", default="target")
    ap.add_argument("--count", type=int, default=3000, help="writes per run")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each mode, interleaved")
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    path = os.path.join(a.dir, "bench-fdatasync.tmp")
    modes = ["append", "reserved", "fallocate", "overwrite"]
    results = {m: [] for m in modes}
    for _ in range(a.rounds):
        for m in modes:
            results[m].append(run(path, m, a.count))
    print(f"{'mode':<10} {'writes/s':>9} {'p50 us':>7} {'p99 us':>7}   ({a.count} x 4 KiB write + fdatasync, {a.rounds} rounds, median)")
    for m in modes:
        r = sorted(results[m])[len(results[m]) // 2]
        print(f"{m:<10} {r[0]:>9.0f} {r[1] * 1e6:>7.0f} {r[2] * 1e6:>7.0f}")


if __name__ == "__main__":
    main()
