"""Qwen3 (dense): the Llama block with RMSNorm on each query and key head before RoPE, no biases."""

from __future__ import annotations

from dataclasses import dataclass

from . import llama
from .base import check_config_value


@dataclass
class ModelArgs(llama.ModelArgs):
    use_sliding_window: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_config_value("use_sliding_window", self.use_sliding_window, (False,))
        self.sliding_window = None


class Model(llama.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(
            args, lambda a: llama.Attention(a, qkv_bias=a.attention_bias, o_bias=a.attention_bias, qk_norm=True)
        )
