"""Flash paging: run models larger than a memory budget by streaming FFN weights from the SSD.

    python -m applelm.flash prepare MODEL OUT [--bits 16|8|4] [--train-predictors] [--calibration FILE]
    python -m applelm.generate --model OUT --memory-budget 1GB [--sparsity 0.5]

    from applelm import load
    model, tokenizer = load(OUT, memory_budget="1GB")   # model.flash.report(): bytes read per token, ...

Paging lives in the loader: each layer's `mlp` is swapped for a FlashMLP (paged_mlp.py); model files
are unchanged. See docs/flash.md for the design, the file format and measured numbers.
"""

from .budget import format_size, parse_size
from .layout import is_flash_layout, read_layout

__all__ = ["prepare", "parse_size", "format_size", "is_flash_layout", "read_layout", "load_flash_model"]


def prepare(*args, **kwargs):
    """Write a flash layout; see applelm.flash.prepare.prepare."""
    from .prepare import prepare as _prepare

    return _prepare(*args, **kwargs)


def load_flash_model(*args, **kwargs):
    """(model, config, layout) of a flash layout; see applelm.flash.loader.load_flash_model."""
    from .loader import load_flash_model as _load

    return _load(*args, **kwargs)
