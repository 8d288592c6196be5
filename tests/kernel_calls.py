"""Which compiled CPU kernel the dispatcher calls, in either of its modes: MLX graph nodes (ops/host_call.py) or
eager ctypes calls. Tests parametrized over GRAPH_MODES run once per mode."""

import pytest

from applelm.ops import cpu_attention, cpu_native, host_call

# The eager functions and the graph entry points, by the product they compute.
EAGER = {"matmul_numpy": "matmul", "matmuls_numpy": "matmuls", "ffn_numpy": "ffn", "affine_numpy": "affine"}
ENTRIES = {"applelm_gguf_ffn_entry": "ffn", "applelm_affine_matmul_entry": "affine",
           "applelm_decode_attention_entry": "attention"}
MANY = "applelm_gguf_matmul_many_entry"  # "matmul" for one weight, "matmuls" for more

GRAPH_MODES = [pytest.param(True, id="graph", marks=pytest.mark.skipif(
    not cpu_native.graph_ready(), reason="ops/host_call.cpp does not build here")), pytest.param(False, id="eager")]


def record_calls(monkeypatch, graph: bool) -> list[str]:
    """Force `graph` mode and return the list each kernel call appends its product's name to."""
    monkeypatch.setattr(cpu_native, "graph_ready", lambda: graph)
    calls: list[str] = []
    if graph:
        names = {cpu_native._entry(lib, name): name for lib, name in [
            (cpu_native.load(), MANY), (cpu_native.load(), "applelm_gguf_ffn_entry"),
            (cpu_native.load_affine(), "applelm_affine_matmul_entry")]}
        if cpu_attention.available():
            names[cpu_attention.entry()] = "applelm_decode_attention_entry"
        real = host_call.call

        def call(fn, inputs, shapes, args, strided=()):
            name = names[fn]
            calls.append(("matmul" if args[2] == 1 else "matmuls") if name == MANY else ENTRIES[name])
            return real(fn, inputs, shapes, args, strided)

        monkeypatch.setattr(host_call, "call", call)
    else:
        for name, product in EAGER.items():
            real_fn = getattr(cpu_native, name)
            monkeypatch.setattr(cpu_native, name, lambda *a, _p=product, _f=real_fn, **kw: calls.append(_p)
                                or _f(*a, **kw))
    return calls
