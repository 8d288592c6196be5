"""Direct I/O reader, read coalescing, strict size parsing."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

from applelm.errors import UserError
from applelm.flash.budget import GAP_PAGES, Geometry, ahead_buffer, parse_size
from applelm.flash.io import AlignedBuffer, DirectReader, measure_disk, page_runs, runs_cover, wait_all


@pytest.mark.parametrize("text,value", [("2GB", 2 * 10**9), ("512MB", 512 * 10**6), ("1.5GiB", 3 * 2**29),
                                        ("64kib", 65536), ("1000", 1000), (" 3 mb ", 3 * 10**6), (4096, 4096)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "GB", "2 G B", "-1GB", "1e9", "0", "0MB", "2XB", "nan", "1,5GB", True])
def test_parse_size_rejects(bad):
    with pytest.raises(UserError):
        parse_size(bad)


def test_page_runs_cover_each_request_and_coalesce_neighbours():
    starts = np.array([0, 3456, 3456 * 2, 3456 * 40, 3456 * 41, 3456 * 500], np.int64)
    runs, where = page_runs(starts, 2304)
    assert len(runs) == 3  # the close neighbours share reads
    offset = 0
    for file_off, n, at in runs:
        assert file_off % 4096 == 0 and n % 4096 == 0 and at == offset
        offset += n
    for s, w in zip(starts, where):  # each request's bytes sit inside its run
        run = next(r for r in runs if r[2] <= w < r[2] + r[1])
        assert run[0] + (w - run[2]) == s and w + 2304 <= run[2] + run[1]


@pytest.mark.parametrize("hidden,intermediate,n_parts", [(576, 1536, 3), (576, 1536, 2), (1024, 14336, 3),
                                                        (64, 256, 2), (2048, 64, 3)])
def test_a_lookahead_buffer_holds_the_reads_of_its_neurons_however_they_fall(hidden, intermediate, n_parts):
    """ahead_buffer's worst case bounds what page_runs packs for any ahead_neurons neurons of a layer:
    neurons spaced to straddle page edges and merge gaps, at both ends of the file, and random sets."""
    part = hidden * 2  # a 16-bit store
    g = Geometry(4, hidden, intermediate, 3 * part, part, 4, intermediate)
    neurons, size = ahead_buffer(g, n_parts)
    assert 0 < neurons <= intermediate and size % 4096 == 0
    rng = np.random.default_rng(0)
    n_bytes, bundle = n_parts * part, 3 * part
    spaced = [np.arange(0, intermediate, step)[:neurons] for step in range(1, 2 + (GAP_PAGES + 2) * 4096 // bundle)]
    sets = spaced + [np.arange(intermediate - neurons, intermediate)] + \
        [np.sort(rng.choice(intermediate, neurons, replace=False)) for _ in range(50)]
    for ids in sets:
        runs, where = page_runs(ids * bundle, n_bytes, gap_pages=GAP_PAGES)
        assert sum(n for _, n, _ in runs) <= size
        assert (where + n_bytes <= size).all()


def test_runs_cover_finds_every_request_inside_pages_read_and_only_those():
    """Against a byte-by-byte check: a request is covered when all its bytes are in one run, and its
    buffer offset then holds the same file bytes (the neighbours of what was read share its pages)."""
    bundle, length = 3456, 2304
    runs, _ = page_runs(np.array([3, 4, 9, 40]) * bundle, length)
    runs = np.array(runs, np.int64)
    file = np.arange(60 * bundle, dtype=np.int64)  # byte i of the file is i
    buf = np.concatenate([file[f: f + n] for f, n, _ in runs])
    starts = np.arange(60) * bundle
    covered, where = runs_cover(runs, starts, length)
    for s, c, w in zip(starts, covered, where):
        inside = any(f <= s and s + length <= f + n for f, n, _ in runs)
        assert c == inside
        if c:
            np.testing.assert_array_equal(buf[w: w + length], file[s: s + length])
    assert covered[[3, 4, 9, 40]].all() and covered.sum() > 4 and not covered[20]
    assert not runs_cover(np.zeros((0, 3), np.int64), starts, length)[0].any()


def test_reader_reads_exact_bytes_and_counts(tmp_path):
    path = tmp_path / "data.bin"
    data = np.random.default_rng(0).integers(0, 256, 5 * 4096 * 10, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    reader = DirectReader(threads=3, split=8192)
    buf = AlignedBuffer(len(data))
    wait_all(reader.read(str(path), 4096, 8 * 4096, buf))
    np.testing.assert_array_equal(buf.array[: 8 * 4096], data[4096: 9 * 4096])
    assert reader.bytes_read == 8 * 4096 and reader.n_reads == 4 and reader.busy_seconds() > 0
    reader.close()
    assert measure_disk(str(path), len(data), 4096, seconds=0.05, threads=2) > 0


@pytest.mark.parametrize("huge", [None, False])
def test_buffers_of_2mib_and_more_start_on_a_huge_page_boundary_and_read_exactly(tmp_path, monkeypatch, huge):
    """Big buffers ask for transparent huge pages (2 MiB-aligned start, so whole pages fit); the bytes
    read into them are the file's, at any offset; APPLELM_HUGE_PAGES=off keeps 4 KiB pages."""
    from applelm.flash.io import HUGE_PAGE

    monkeypatch.setenv("APPLELM_HUGE_PAGES", "on" if huge is None else "off")
    path = tmp_path / "big.bin"
    data = np.random.default_rng(1).integers(0, 256, 3 * HUGE_PAGE + 8192, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    buf = AlignedBuffer(len(data) - 4096)
    assert buf.n_bytes == len(data) - 4096 and buf.array.size == buf.n_bytes == len(buf.view)
    madvise = hasattr(__import__("mmap"), "MADV_HUGEPAGE")
    assert buf.huge == (huge is None and madvise)
    if buf.huge:
        assert buf.array.ctypes.data % HUGE_PAGE == 0
    reader = DirectReader(threads=2, split=HUGE_PAGE)
    wait_all(reader.read(str(path), 4096, buf.n_bytes - 4096, buf, at=4096))
    np.testing.assert_array_equal(buf.array[4096:], data[4096: buf.n_bytes])
    assert not buf.array[:4096].any()  # zero-filled where nothing was read
    reader.close()
    buf.close()
    assert not AlignedBuffer(HUGE_PAGE - 4096).huge  # smaller buffers keep 4 KiB pages


def test_slots_cut_one_buffer_into_aligned_disjoint_pieces():
    buf = AlignedBuffer(3 * 5 * 4096 + 100)
    slots = buf.slots(3)
    assert [s.n_bytes for s in slots] == [5 * 4096] * 3
    for i, s in enumerate(slots):
        assert s.array.ctypes.data % 4096 == 0 and len(s.view) == s.n_bytes
        s.array[:] = i + 1
    assert buf.array[0] == 1 and buf.array[5 * 4096] == 2 and buf.array[3 * 5 * 4096 - 1] == 3
    for s in slots:
        s.close()
    buf.close()


@pytest.mark.skipif(not os.path.isdir("/dev/shm") or not hasattr(os, "O_DIRECT"), reason="needs tmpfs /dev/shm")
def test_filesystem_without_direct_io_falls_back_with_a_warning():
    path = f"/dev/shm/applelm_flash_test_{os.getpid()}.bin"
    with open(path, "wb") as fh:
        fh.write(b"x" * 8192)
    try:
        reader = DirectReader(threads=1)
        buf = AlignedBuffer(8192)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            wait_all(reader.read(path, 0, 8192, buf))
        assert bytes(buf.array[:4]) == b"xxxx"
        if not reader.direct:  # tmpfs refuses O_DIRECT (some kernels accept it; then nothing to check)
            assert any("direct I/O" in str(w.message) or "direct read" in str(w.message) for w in caught)
        reader.close()
    finally:
        os.unlink(path)


@pytest.mark.parametrize("refuse", [False, True])
def test_macos_branch_sets_f_nocache(tmp_path, monkeypatch, refuse):
    """No Mac is reachable: run open_uncached's darwin branch with a stand-in fcntl module, checking that
    it asks for F_NOCACHE (48 in <sys/fcntl.h>) on the opened file, and reports a refusal as not direct."""
    import sys
    import types

    from applelm.flash import io

    path = tmp_path / "data.bin"
    path.write_bytes(b"y" * 4096)
    calls = []

    def fake_fcntl(fd, cmd, arg):
        calls.append((fd, cmd, arg))
        if refuse:
            raise OSError("not supported")
        return 0

    monkeypatch.setattr(io.sys, "platform", "darwin")
    monkeypatch.setitem(sys.modules, "fcntl", types.SimpleNamespace(fcntl=fake_fcntl))  # no F_NOCACHE name
    fd, direct = io.open_uncached(str(path))
    try:
        assert calls == [(fd, 48, 1)] and direct is (not refuse)
        assert os.pread(fd, 4, 0) == b"yyyy"
    finally:
        os.close(fd)
