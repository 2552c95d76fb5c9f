"""Checkpoints: written atomically, read safely (``weights_only``), refused when they do not fit.

A checkpoint holds the model's state dict, the resolved config and the number of classes, so that
``load_model`` rebuilds the network from the file alone. Training state rides along for resuming:
optimizer, scheduler, grad scaler, position (epoch, batch inside it, global step), every RNG state
and the evaluations so far. In a run folder, ``Checkpointer`` keeps ``checkpoints/step_*.pt`` (the
newest ``keep_last``), ``last.pt`` (the newest) and ``best.pt`` (the best mAP) as hard links, so a
checkpoint is written once whatever its names.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cgpn.config import Config
from cgpn.errors import CheckpointError, ConfigError
from cgpn.files import atomic_path, load_torch_file, remove_abandoned
from cgpn.metrics.rank import RankResult
from cgpn.model import CGPN, build_model

__all__ = [
    "Checkpointer",
    "build_model_from_config",
    "capture_rng",
    "check_run_dir",
    "find_resume_checkpoint",
    "load_checkpoint",
    "load_model",
    "load_weights",
    "rank_result_from_state",
    "rank_result_state",
    "restore_rng",
    "save_checkpoint",
    "state_nbytes",
    "step_checkpoints",
    "stored_config",
]

logger = logging.getLogger(__name__)

FORMAT = "cgpn-checkpoint-v1"
EXPECTED = "a checkpoint written by cgpn train (e.g. runs/<name>/last.pt)"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, fsync, rename."""
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **state}, tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a cgpn checkpoint on the CPU (``torch.load(weights_only=True)``); any other file (missing, empty,
    truncated, a folder, an ONNX graph, a pickle carrying code...) is a CheckpointError saying what it is."""
    state = load_torch_file(path, "checkpoint", EXPECTED, CheckpointError)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not a cgpn checkpoint (no '{FORMAT}' marker; written by another "
                              f"tool?); pass {EXPECTED} instead")
    return state


def stored_config(state: dict[str, Any], path: str | Path) -> Config:
    """The config a checkpoint ``state`` (read from ``path``) was trained with. An ``output_dir`` left blank
    (cgpn once accepted that, and trained into the current folder) becomes the checkpoint's folder."""
    values = dict(state["config"])
    if not str(values.get("output_dir", "runs")).strip():
        values["output_dir"] = str(Path(path).parent)
    return Config.from_dict(values)


def build_model_from_config(cfg: Config, num_classes: int, pretrained: bool | str | None = None) -> CGPN:
    """The network ``cfg.model`` describes (``pretrained`` overrides ``cfg.model.pretrained``)."""
    m = cfg.model
    return build_model(m.name, num_classes, backbone=m.backbone,
                       pretrained=m.pretrained if pretrained is None else pretrained,
                       global_part=m.global_part, local_part=m.local_part, last_stride=m.last_stride,
                       pooling=m.pooling, reduce_dim=m.reduce_dim, triplet_on=m.triplet_on,
                       triplet_parts=m.triplet_parts)


def load_model(path: str | Path) -> tuple[CGPN, Config]:
    """Rebuild the network stored in a checkpoint, with its weights, and the config it was trained with."""
    state = load_checkpoint(path)
    try:
        cfg = stored_config(state, path)
        model = build_model_from_config(cfg, state["num_classes"], pretrained=False)
    except KeyError as err:
        raise CheckpointError(f"checkpoint '{path}' has no {err}; pass {EXPECTED} instead") from None
    except ConfigError as err:
        raise CheckpointError(f"checkpoint '{path}' holds settings this cgpn cannot use ({err})") from None
    load_weights(model, state["model"], source=str(path))
    return model, cfg


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str,
                 skip_classifiers: bool = False) -> None:
    """Load ``weights`` into ``model``, refusing (with the first bad keys) a state dict of another model."""
    own = model.state_dict()
    if skip_classifiers:
        weights = {k: v for k, v in weights.items() if ".classifier." not in k}
    missing = [k for k in own if k not in weights and not (skip_classifiers and ".classifier." in k)]
    unexpected = [k for k in weights if k not in own]
    shape = [k for k in weights if k in own and weights[k].shape != own[k].shape]
    if missing or unexpected or shape:
        detail = "; ".join(f"{label}: {', '.join(keys[:3])}" for label, keys in
                           (("missing", missing), ("unexpected", unexpected), ("other shape", shape)) if keys)
        raise CheckpointError(f"checkpoint '{source}' does not fit this model ({detail}); "
                              f"it was trained with another model.name, backbone or number of classes")
    model.load_state_dict(weights, strict=not skip_classifiers)


def capture_rng() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA random states, in types ``weights_only`` loading accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back the random states ``capture_rng`` took."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def rank_result_state(result: RankResult) -> dict[str, Any]:
    """A ``RankResult`` as tensors and plain numbers (storable in a ``weights_only`` checkpoint)."""
    state: dict[str, Any] = {}
    for f in dataclasses.fields(result):
        value = getattr(result, f.name)
        if isinstance(value, np.ndarray):
            state[f.name] = torch.from_numpy(np.ascontiguousarray(value))
        elif isinstance(value, np.generic):
            state[f.name] = value.item()
        else:
            state[f.name] = value
    return state


def rank_result_from_state(state: dict[str, Any]) -> RankResult:
    """The ``RankResult`` that ``rank_result_state`` stored."""
    return RankResult(**{k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in state.items()})


def state_nbytes(*states: dict[str, Any]) -> int:
    """Bytes of the tensors in (nested) state dicts: about what a checkpoint of them takes on disk."""
    def walk(x: Any) -> int:
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, dict):
            return sum(walk(v) for v in x.values())
        if isinstance(x, list | tuple):
            return sum(walk(v) for v in x)
        return 0
    return sum(walk(s) for s in states)


def check_run_dir(path: str | Path, needed_bytes: int) -> None:
    """Fail before training if ``path`` cannot be created or written, or has less than ``needed_bytes`` free."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-") as f:
            f.write(b"cgpn")
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise ConfigError(f"output_dir '{path}' is not writable ({err.strerror or err}); choose another folder "
                          f"with --set output_dir=DIR (e.g. runs/my_run)") from None
    free = shutil.disk_usage(path).free
    if free < needed_bytes:
        raise ConfigError(f"output_dir '{path}' has {free / 2**20:.0f} MiB free but the checkpoints of this run "
                          f"need about {needed_bytes / 2**20:.0f} MiB; free some space, lower engine.keep_last "
                          f"or choose another folder with --set output_dir=DIR")


def _link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` the same file as ``src`` atomically: a hard link (or copy) under a temporary name, renamed."""
    with atomic_path(dst) as tmp:
        try:
            tmp.unlink()
            os.link(src, tmp)
        except OSError:  # a file system without hard links
            shutil.copyfile(src, tmp)


def step_checkpoints(run_dir: str | Path) -> dict[int, Path]:
    """``checkpoints/step_*.pt`` of a run folder by step, in step order."""
    paths = sorted((Path(run_dir) / "checkpoints").glob("step_*.pt"))  # zero-padded: name order = step order
    return {int(p.stem[5:]): p for p in paths if p.stem[5:].isdigit()}  # not a user's step_best.pt


class Checkpointer:
    """Checkpoints of one run folder: ``checkpoints/step_*.pt`` (newest ``keep_last``), ``last.pt``, ``best.pt``.

    Example:
        >>> ckpt = Checkpointer("runs/demo", keep_last=2)  # doctest: +SKIP
        >>> path = ckpt.save({"model": model.state_dict(), ...}, step=120, best=True)  # doctest: +SKIP
    """

    def __init__(self, run_dir: str | Path, keep_last: int = 2) -> None:
        if keep_last < 1:
            raise ConfigError(f"engine.keep_last must be at least 1 (e.g. 2), got {keep_last}")
        self.run_dir, self.keep_last = Path(run_dir), keep_last
        self.last, self.best = self.run_dir / "last.pt", self.run_dir / "best.pt"

    def remove_partial_saves(self) -> list[Path]:
        """Delete the temporary files of saves a kill cut short (each as large as a checkpoint); a save another
        process is writing is left alone (``cgpn.files.remove_abandoned``)."""
        return sorted(remove_abandoned((self.run_dir / "checkpoints").glob(".step_*.tmp.pt")))

    def save(self, state: dict[str, Any], step: int, best: bool = False) -> Path:
        """Write ``state`` as ``checkpoints/step_{step}.pt``, point ``last.pt`` (and ``best.pt``) to it, prune."""
        path = self.run_dir / "checkpoints" / f"step_{step:08d}.pt"
        save_checkpoint(path, state)
        _link_or_copy(path, self.last)
        if best:
            _link_or_copy(path, self.best)
        for old in list(step_checkpoints(self.run_dir).values())[: -self.keep_last]:
            old.unlink()
        return path


def find_resume_checkpoint(spec: str, run_dir: str | Path) -> Path | None:
    """``--resume`` target: a path, or ``auto`` = the newest checkpoint of ``run_dir`` (``None`` if none yet)."""
    if spec != "auto":
        return Path(spec)
    steps = list(step_checkpoints(run_dir).values())
    if steps:
        return steps[-1]
    last = Path(run_dir) / "last.pt"
    return last if last.is_file() else None
