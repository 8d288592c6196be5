"""Mixed-bit quantization recipes: most layers at a low width, the sensitive ones at a high width.

High width goes to the embeddings and output head (tied in small models: the same matrix), the whole first
and last transformer block, and v_proj/down_proj of the layers llama.cpp's Q4_K_M also favours (the first and
last eighth, and every third layer between). Low width everywhere else. Names follow mlx-lm's recipes
(mixed_2_6, mixed_3_4, mixed_3_6, mixed_4_6) plus mixed_4_8.
"""

from __future__ import annotations

import re
from typing import Callable, Union

import mlx.nn as nn

RECIPES = {"mixed_2_6": (2, 6), "mixed_3_4": (3, 4), "mixed_3_6": (3, 6), "mixed_4_6": (4, 6), "mixed_4_8": (4, 8)}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def sensitive_layer(index: int, n_layers: int) -> bool:
    """llama.cpp's `use_more_bits`: the first and last eighth of the blocks, and every third block between."""
    eighth = n_layers // 8
    return index < eighth or index >= 7 * n_layers // 8 or (index - eighth) % 3 == 2


def recipe_predicate(recipe: str, n_layers: int, group_size: int) -> Callable[[str, nn.Module], Union[bool, dict]]:
    """A `quantize_model` predicate for `recipe` (a key of RECIPES): returns each layer's own settings."""
    low, high = RECIPES[recipe]

    def predicate(path: str, module: nn.Module) -> dict:
        m = _LAYER.search(path)
        if m is None:  # embed_tokens, lm_head
            wide = True
        else:
            index = int(m.group(1))
            wide = index in (0, n_layers - 1) or (
                sensitive_layer(index, n_layers) and ("v_proj" in path or "down_proj" in path))
        return {"group_size": group_size, "bits": high if wide else low, "mode": "affine"}

    return predicate
