"""Reads that go to the SSD, not to RAM: page cache bypassed, many reads in flight, aligned buffers.

- Linux: files open with O_DIRECT. macOS: F_NOCACHE set with fcntl (the Apple equivalent). A filesystem
  that refuses direct I/O (tmpfs, some network filesystems) gets a one-time warning and buffered reads.
- A thread pool issues os.preadv into page-aligned buffers from mmap.mmap(-1, n); big reads are split
  into `split` sized pieces so several are in flight at once (SSDs need queue depth to reach their speed).
- Every read is counted (bytes, busy intervals) so callers can report bytes per token and GB/s.
"""

from __future__ import annotations

import errno
import mmap
import os
import sys
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np

from ..errors import ModelFormatError
from ..switches import switched_off
from .layout import ALIGN, aligned

_F_NOCACHE = 48  # <sys/fcntl.h> on macOS; Python's fcntl module only names it on recent versions


HUGE_PAGE = 2 << 20  # transparent huge page size on x86-64 and arm64 Linux (4 KiB base pages)


class AlignedBuffer:
    """A page-aligned, zero-filled host buffer (private anonymous mmap), viewed as uint8 numpy.

    From 2 MiB up it starts on a 2 MiB boundary and its whole 2 MiB pieces are asked to be transparent
    huge pages (Linux, MADV_HUGEPAGE). A direct read into 4 KiB pages is cut into requests of at most
    max_segments pages (254 here, ~1 MiB); into huge pages, into requests of up to max_sectors_kb (4 MiB):
    on this VM 2.9-5.5 GB/s instead of 1.2-1.7, at a quarter to a half of the CPU time per GB
    (benchmarks/huge_pages.py).
    `huge_pages` None: on unless APPLELM_HUGE_PAGES=off."""

    def __init__(self, n_bytes: int, huge_pages: Optional[bool] = None):
        self.n_bytes = aligned(max(n_bytes, 1))
        if huge_pages is None:
            huge_pages = not switched_off("APPLELM_HUGE_PAGES")
        advice = getattr(mmap, "MADV_HUGEPAGE", None)
        huge = huge_pages and advice is not None and self.n_bytes >= HUGE_PAGE
        # The 2 MiB of slack are address space only: pages outside [start, start + n_bytes) are never touched.
        self._map = mmap.mmap(-1, self.n_bytes + (HUGE_PAGE if huge else 0),
                              flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        whole = np.frombuffer(self._map, dtype=np.uint8)
        start = (-whole.ctypes.data) % HUGE_PAGE if huge else 0
        self.huge = False
        if huge:
            try:
                self._map.madvise(advice, start, self.n_bytes // HUGE_PAGE * HUGE_PAGE)
                self.huge = True
            except OSError:  # a kernel without transparent huge pages: 4 KiB pages as before
                pass
        self.array = whole[start: start + self.n_bytes]
        self.view = memoryview(self._map)[start: start + self.n_bytes]
        del whole

    def slots(self, n: int) -> list["BufferSlot"]:
        """`n` equal page-aligned pieces of this buffer. A ring's slots cut from one buffer share its huge
        pages (reads may cross their boundaries) and leave at most one partly used 2 MiB piece in 4 KiB
        pages, where separate buffers would leave one each."""
        size = self.n_bytes // n // ALIGN * ALIGN
        return [BufferSlot(self.array[i * size: (i + 1) * size], self.view[i * size: (i + 1) * size], size)
                for i in range(n)]

    def close(self) -> None:
        self.view.release()
        self.array = None
        try:
            self._map.close()
        except BufferError:  # a numpy view is still alive somewhere; the GC frees it with that view
            pass


class BufferSlot:
    """A piece of an AlignedBuffer with the same `array`, `view` and `n_bytes` (its owner closes it)."""

    def __init__(self, array: np.ndarray, view: memoryview, n_bytes: int):
        self.array, self.view, self.n_bytes = array, view, n_bytes

    def close(self) -> None:
        self.view.release()
        self.array = None


def open_uncached(path: str) -> tuple[int, bool]:
    """Open `path` for reads that bypass the page cache. Returns (fd, direct): direct is False when the
    filesystem refused (the caller warns)."""
    try:
        if sys.platform.startswith("linux") and hasattr(os, "O_DIRECT"):
            try:
                return os.open(path, os.O_RDONLY | os.O_DIRECT), True
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                return os.open(path, os.O_RDONLY), False
        fd = os.open(path, os.O_RDONLY)
        if sys.platform == "darwin":
            import fcntl

            try:
                fcntl.fcntl(fd, getattr(fcntl, "F_NOCACHE", _F_NOCACHE), 1)
                return fd, True
            except OSError:
                return fd, False
        return fd, False
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot open: {e.strerror}") from None


class DirectReader:
    """Thread pool of uncached preadv calls with statistics.

    `read(path, offset, length, buffer, buffer_offset)` returns futures; offsets and lengths must be
    multiples of ALIGN (the layout guarantees it) when direct I/O is in use.
    """

    def __init__(self, threads: int = 4, split: int = 4 << 20):
        self.threads, self.split = threads, split
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="applelm-flash-io")
        self._fds: dict[str, tuple[int, bool]] = {}
        self._lock = threading.Lock()
        self.warned = False
        self.reset_stats()

    # -- statistics ---------------------------------------------------------------------------------------

    def reset_stats(self) -> None:
        with getattr(self, "_lock", threading.Lock()):
            self.bytes_read = 0
            self.n_reads = 0
            self._intervals: list[tuple[float, float]] = []

    def busy_seconds(self) -> float:
        """Wall time during which at least one read was in flight (union of read intervals)."""
        with self._lock:
            spans = sorted(self._intervals)
        total, end = 0.0, -1.0
        for a, b in spans:
            if a > end:
                total += b - a
                end = b
            elif b > end:
                total += b - end
                end = b
        return total

    @property
    def direct(self) -> bool:
        return all(d for _, d in self._fds.values())

    # -- reads --------------------------------------------------------------------------------------------

    def _fd(self, path: str) -> tuple[int, bool]:
        with self._lock:
            if path not in self._fds:
                fd, direct = open_uncached(path)
                if not direct and not self.warned:
                    self.warned = True
                    warnings.warn(f"direct I/O (O_DIRECT / F_NOCACHE) was refused for {path}; flash reads go "
                                  "through the page cache, so read speeds measure RAM, not the SSD", stacklevel=3)
                self._fds[path] = (fd, direct)
            return self._fds[path]

    def _reopen_buffered(self, path: str) -> int:
        with self._lock:
            fd, direct = self._fds[path]
            if direct:
                os.close(fd)
                fd = os.open(path, os.O_RDONLY)
                self._fds[path] = (fd, False)
                if not self.warned:
                    self.warned = True
                    warnings.warn(f"the filesystem rejected a direct read of {path}; falling back to buffered "
                                  "reads (page cache in use)", stacklevel=2)
            return fd

    def _pread(self, path: str, offset: int, view: memoryview) -> int:
        t0 = time.perf_counter()
        fd, _ = self._fd(path)
        done, n = 0, len(view)
        while done < n:
            try:
                got = os.preadv(fd, [view[done:]], offset + done)
            except OSError as e:
                if e.errno == errno.EINVAL and self._fds[path][1]:
                    fd = self._reopen_buffered(path)
                    continue
                raise ModelFormatError(f"{path}: read failed at byte {offset + done}: {e.strerror}") from None
            if got == 0:
                raise ModelFormatError(f"{path}: file ends at byte {offset + done}, expected {offset + n}; "
                                       "the flash layout is truncated")
            done += got
        t1 = time.perf_counter()
        with self._lock:
            self.bytes_read += n
            self.n_reads += 1
            self._intervals.append((t0, t1))
        return n

    def read(self, path: str, offset: int, length: int, buffer: AlignedBuffer, at: int = 0) -> list[Future]:
        """Queue a read of [offset, offset+length) into buffer[at:], split into pieces run in parallel."""
        futures = []
        pos = 0
        while pos < length:
            n = min(self.split, length - pos)
            futures.append(self._pool.submit(self._pread, path, offset + pos, buffer.view[at + pos: at + pos + n]))
            pos += n
        return futures

    def read_runs(self, path: str, runs: Sequence[tuple[int, int, int]], buffer: AlignedBuffer) -> list[Future]:
        """Queue several (file_offset, length, buffer_offset) reads of one file: split into at most
        `threads` tasks of similar size, each issuing its reads back to back (one task per small read
        would cost more in Python thread handoffs than the read itself)."""
        if not runs:
            return []
        sizes = np.fromiter((n for _, n, _ in runs), np.int64, len(runs))
        bounds = np.searchsorted(np.cumsum(sizes), np.linspace(0, sizes.sum(), self.threads + 1)[1:-1])
        groups = [g for g in np.split(np.arange(len(runs)), bounds) if len(g)]
        return [self._pool.submit(self._pread_many, path, [runs[i] for i in g], buffer) for g in groups]

    def _pread_many(self, path: str, runs, buffer: AlignedBuffer) -> int:
        total = 0
        for off, n, at in runs:
            pos = 0
            while pos < n:  # long runs in `split` pieces, as read() does
                k = min(self.split, n - pos)
                total += self._pread(path, off + pos, buffer.view[at + pos: at + pos + k])
                pos += k
        return total

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            for fd, _ in self._fds.values():
                os.close(fd)
            self._fds.clear()


def wait_all(futures: Sequence[Future]) -> None:
    for f in futures:
        f.result()


def page_runs(starts: np.ndarray, length: int, gap_pages: int = 1, align: int = ALIGN):
    """Coalesce reads of `length` bytes at each (sorted) byte offset in `starts` into aligned runs.

    Returns (runs, where): runs are (file_offset, n_bytes, buffer_offset) packed back to back in a
    buffer, and where[k] is the buffer offset of the bytes for starts[k]. Neighbours closer than
    `gap_pages` pages share one read: a slightly longer read costs less than another request. The runs
    are disjoint pieces of the file, so they never need more buffer than the file's size.
    """
    starts = np.asarray(starts, np.int64)
    if len(starts) == 0:
        return [], np.empty(0, np.int64)
    first = starts // align * align
    last = (starts + length + align - 1) // align * align  # non-decreasing: equal lengths, sorted starts
    new_run = np.empty(len(starts), bool)
    new_run[0] = True
    new_run[1:] = first[1:] > last[:-1] + gap_pages * align
    run_id = np.cumsum(new_run) - 1
    heads = np.flatnonzero(new_run)
    tails = np.append(heads[1:] - 1, len(starts) - 1)
    run_start, run_end = first[heads], last[tails]
    sizes = run_end - run_start
    buf = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    where = buf[run_id] + (starts - run_start[run_id])
    runs = list(zip(run_start.tolist(), sizes.tolist(), buf.tolist()))
    return runs, where


def runs_cover(runs: np.ndarray, starts: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Which reads of `length` bytes at `starts` lie wholly inside one of `runs` ((file_offset, n_bytes,
    buffer_offset) rows, disjoint, by file offset, as page_runs packs them), and where each covered one
    sits in their buffer: (covered mask, buffer offsets, meaningful where covered)."""
    starts = np.asarray(starts, np.int64)
    if len(runs) == 0:
        return np.zeros(len(starts), bool), np.zeros(len(starts), np.int64)
    i = np.maximum(np.searchsorted(runs[:, 0], starts, side="right") - 1, 0)
    covered = (runs[i, 0] <= starts) & (starts + length <= runs[i, 0] + runs[i, 1])
    return covered, runs[i, 2] + starts - runs[i, 0]


def measure_disk(path: str, size: int, block: int, seconds: float = 1.0, threads: int = 8,
                 sequential: bool = False, seed: int = 0, huge_pages: Optional[bool] = None) -> float:
    """Read speed (bytes/s) of `path` with direct I/O: `block`-sized reads, random or sequential, with
    `threads` in flight, for about `seconds`, into buffers like the runtime's (see AlignedBuffer for
    `huge_pages`). The reference the flash benchmark compares against."""
    reader = DirectReader(threads=threads, split=block)
    n_blocks = size // block
    rng = np.random.default_rng(seed)
    buffers = [AlignedBuffer(block, huge_pages) for _ in range(threads * 2)]
    t0 = time.perf_counter()
    done = 0
    pos = 0
    while time.perf_counter() - t0 < seconds:
        batch = []
        for b in buffers:
            if sequential:
                off, pos = pos * block, (pos + 1) % n_blocks
            else:
                off = int(rng.integers(0, n_blocks)) * block
            batch += reader.read(path, off, block, b)
        wait_all(batch)
        done += len(batch) * block
    elapsed = time.perf_counter() - t0
    reader.close()
    for b in buffers:
        b.close()
    return done / elapsed
