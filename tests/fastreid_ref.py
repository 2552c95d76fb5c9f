"""fast-reid's evaluators as test references, loaded from the installed ``fastreid`` package by file path.

``fastreid.evaluation/__init__`` pulls in heavy dependencies (sklearn, faiss, ...), so its ``rank.py`` and
``rerank.py`` are imported as plain files, and its Cython ``rank_cy.pyx`` is compiled on the fly (cython +
setuptools + gcc) into a cache folder keyed by the source and the interpreter. Used by tests and
benchmarks only; nothing here is part of cgpn.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np

__all__ = ["build_rank_cy", "fastreid_file", "load_rank", "load_rerank"]

_SETUP = """\
import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

setup(name="rank_cy", script_args=["build_ext", "--inplace"], ext_modules=cythonize(
    [Extension("rank_cy", ["rank_cy.pyx"], include_dirs=[np.get_include()])], quiet=True))
"""


def fastreid_file(relpath: str) -> Path:
    """Path of a file inside the installed fastreid package (without importing the package)."""
    spec = importlib.util.find_spec("fastreid")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("fastreid is not installed (pip install --no-deps fastreid==1.4.0)")
    return Path(next(iter(spec.submodule_search_locations))) / relpath


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_rank() -> ModuleType:
    """fastreid/evaluation/rank.py (its Python ``eval_market1501``)."""
    with warnings.catch_warnings():  # it warns that its Cython module is not importable this way
        warnings.simplefilter("ignore")
        return _load("fastreid_rank_ref", fastreid_file("evaluation/rank.py"))


def load_rerank() -> ModuleType:
    """fastreid/evaluation/rerank.py (``re_ranking``)."""
    return _load("fastreid_rerank_ref", fastreid_file("evaluation/rerank.py"))


def build_rank_cy(cache_root: Path) -> ModuleType:
    """fastreid's ``rank_cy`` extension (``evaluate_cy``), compiled once into ``cache_root``."""
    pyx = fastreid_file("evaluation/rank_cylib/rank_cy.pyx").read_bytes()
    key = hashlib.sha256(pyx + sys.version.encode() + np.__version__.encode()).hexdigest()[:16]
    folder = Path(cache_root) / f"rank_cy-{key}"
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    so = folder / f"rank_cy{suffix}"
    if not so.exists():  # build beside, then rename: parallel test workers never see a half-built folder
        work = Path(cache_root) / f"rank_cy-{key}.{os.getpid()}"
        work.mkdir(parents=True, exist_ok=True)
        (work / "rank_cy.pyx").write_bytes(pyx)
        (work / "setup.py").write_text(_SETUP)
        proc = subprocess.run([sys.executable, "setup.py"], cwd=work, capture_output=True, text=True)
        if proc.returncode != 0 or not (work / so.name).exists():
            raise RuntimeError(f"compiling fastreid's rank_cy.pyx failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        try:
            work.rename(folder)
        except OSError:  # another worker finished first
            shutil.rmtree(work, ignore_errors=True)
    return _load("rank_cy", so)
