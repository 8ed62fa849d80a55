#!/usr/bin/env python3
"""Write + fdatasync loops into one file, several ways, on the disk holding DIR: what a WAL
append pays for fdatasync depending on how its segment was created and how it is written
(docs/design/wal-preallocation.md; current figures: docs/BENCHMARKS.md, "Flush latency"). Each
write is one WAL record of one block (4,140 bytes: a 44-byte header and 4 KiB), back to back like
the WAL's records.

  append    a new empty file (each fdatasync also allocates blocks and grows the size)
  reserved  fallocate(FALLOC_FL_KEEP_SIZE) first: blocks allocated, size unchanged
  fallocate posix_fallocate first: size set, blocks unwritten
  overwrite the file written with zeros through the page cache and synced first
  direct    the file written with zeros by direct I/O (not in the page cache) and synced first:
            a record that starts a new page makes the kernel read that page before writing
  pages     as direct, but every write covers whole pages (the partial last page is rewritten
            and the end padded with zeros): vblock's preallocated WAL segments

    scripts/bench-fdatasync.py [DIR] [--count N] [--rounds R]
"""
import argparse
import ctypes
import mmap
import os
import time

FALLOC_FL_KEEP_SIZE = 1
libc = ctypes.CDLL(None, use_errno=True)


RECORD = 4096 + 44
PAGE = 4096


def zero_fill(path, size):
    """Writes `size` zero bytes to a new file with O_DIRECT and syncs it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        buf = memoryview(mmap.mmap(-1, 1 << 20))  # page-aligned, zeroed
        for off in range(0, size, 1 << 20):
            os.pwrite(fd, buf[: min(1 << 20, size - off)], off)
        os.fsync(fd)
    finally:
        os.close(fd)


def run(path, mode, count):
    size = (count * RECORD // PAGE + 2) * PAGE
    flags = os.O_RDWR | os.O_CREAT
    if mode in ("direct", "pages"):
        zero_fill(path, size)
    else:
        flags |= os.O_TRUNC
    fd = os.open(path, flags, 0o644)
    try:
        if mode == "overwrite":
            os.write(fd, b"\0" * size)
            os.fsync(fd)
        elif mode == "fallocate":
            os.posix_fallocate(fd, 0, size)
            os.fsync(fd)
        elif mode == "reserved":
            if libc.fallocate(fd, FALLOC_FL_KEEP_SIZE, ctypes.c_long(0), ctypes.c_long(size)) != 0:
                raise OSError(ctypes.get_errno(), "fallocate(KEEP_SIZE)")
            os.fsync(fd)
        record = b"x" * RECORD
        written = 0
        times = []
        for _ in range(count):
            t = time.perf_counter()
            if mode == "pages":
                page_at = written // PAGE * PAGE
                end = -(-(written + RECORD) // PAGE) * PAGE
                tail = b"x" * (written - page_at)
                os.pwrite(fd, tail + record + b"\0" * (end - written - RECORD), page_at)
            else:
                os.pwrite(fd, record, written)
            os.fdatasync(fd)
            times.append(time.perf_counter() - t)
            written += RECORD
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
    modes = ["append", "reserved", "fallocate", "overwrite", "direct", "pages"]
    results = {m: [] for m in modes}
    for _ in range(a.rounds):
        for m in modes:
            results[m].append(run(path, m, a.count))
    print(f"{'mode':<10} {'writes/s':>9} {'p50 us':>7} {'p99 us':>7}   ({a.count} x {RECORD}-byte write + fdatasync, {a.rounds} rounds, median)")
    for m in modes:
        r = sorted(results[m])[len(results[m]) // 2]
        print(f"{m:<10} {r[0]:>9.0f} {r[1] * 1e6:>7.0f} {r[2] * 1e6:>7.0f}")


if __name__ == "__main__":
    main()
