"""A pickle that would run code: what a checkpoint must never be loaded from."""

from __future__ import annotations

import os
from pathlib import Path


class CodePayload:
    """Pickles to a call of ``os.system`` that would create ``sentinel``: loading it must never run it."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)
