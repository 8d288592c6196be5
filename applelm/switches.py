"""Environment switches: the APPLELM_* variables that turn a feature off."""

from __future__ import annotations

import os


def switched_off(name: str) -> bool:
    """True when the environment variable `name` is 0, off, no or false (any case)."""
    return os.environ.get(name, "").lower() in ("0", "off", "no", "false")
