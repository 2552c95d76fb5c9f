"""fast-reid's ``triplet_loss`` as a test reference, loaded by file path (``fastreid.modeling`` imports
many optional packages); nothing here is part of cgpn."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

__all__ = ["fastreid_triplet_loss"]


def _load():
    spec = importlib.util.find_spec("fastreid")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("fastreid is not installed (pip install --no-deps fastreid==1.4.0)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "modeling" / "losses"
    package = types.ModuleType("_fastreid_losses")
    package.__path__ = [str(folder)]  # a bare package: its __init__ (and its imports) never run
    sys.modules.setdefault("_fastreid_losses", package)
    return importlib.import_module("_fastreid_losses.triplet_loss").triplet_loss


fastreid_triplet_loss = _load()
