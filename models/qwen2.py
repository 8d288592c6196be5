"""Qwen2 / Qwen2.5: the Llama block with biases on the q, k and v projections (none on the output)."""

from __future__ import annotations

from dataclasses import dataclass

from . import llama
from .base import check_config_value


@dataclass
class ModelArgs(llama.ModelArgs):
    use_sliding_window: bool = False

    def __post_init__(self):
        super().__post_init__()
        # Qwen2 checkpoints carry a sliding_window value that only applies when this flag is set.
        check_config_value("use_sliding_window", self.use_sliding_window, (False,))
        self.sliding_window = None


class Model(llama.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args, lambda a: llama.Attention(a, qkv_bias=True, o_bias=False))
