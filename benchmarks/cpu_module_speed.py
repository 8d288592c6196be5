"""CPU speed of the drop-in modules for one token (the report's figures).

    python benchmarks/cpu_module_speed.py
GGUFLinear 640x2048 Q4_K (a Gemma 3 270M attn_output) and the 262144x640 Q8_0 tied output head, random valid
blocks, float32 activations, through make_quantized_module + load_weights(strict=True) as the loader does.
"""
import sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import mlx.core as mx, mlx.nn as nn
from gguf_blocks import random_blocks
from applelm.ops import make_quantized_module
def t(f,n=10):
    mx.eval(f()); ts=[]
    for _ in range(n):
        t0=time.perf_counter(); mx.eval(f()); ts.append(time.perf_counter()-t0)
    ts.sort(); return ts[0]*1e3, ts[len(ts)//2]*1e3
lin=make_quantized_module(nn.Linear(2048,640,bias=False),{"mode":"gguf","ggml_type":"Q4_K"})
lin.load_weights([("weight",mx.array(random_blocks("Q4_K",640,2048)))],strict=True)
x=mx.random.normal((1,1,2048))
print("GGUFLinear 640x2048 Q4_K, 1 token: best %.2f ms, median %.2f ms"%t(lambda: lin(x)))
emb=make_quantized_module(nn.Embedding(262144,640),{"mode":"gguf","ggml_type":"Q8_0"})
emb.load_weights([("weight",mx.array(random_blocks("Q8_0",262144,640)))],strict=True)
h=mx.random.normal((1,1,640))
print("GGUFEmbedding.as_linear 262144x640 Q8_0 tied head, 1 token: best %.1f ms, median %.1f ms"%t(lambda: emb.as_linear(h),5))
print("GGUFEmbedding lookup of 8 ids: best %.3f ms"%t(lambda: emb(mx.array([[1,5,9,262143,0,7,7,100]])))[0])
