"""One place that turns a network into a batched function: normalised images (B, 3, H, W) in, L2-normalised
float32 features (B, D) out, on a device and backend, with the preprocessing its source fixes (input size,
mean / std, flip averaging). ``FeatureExtractor`` (files and arrays), ``TrackerEmbedder`` (boxes in video
frames) and the search server stand on it.

A source is a checkpoint written by ``cgpn train``, an ONNX file written by ``cgpn export`` (its metadata
gives size, normalisation and flip), or a network in memory. Backends: ``eager`` (fp32 PyTorch),
``channels_last``, ``bf16`` (autocast), ``compile`` (torch.compile) and ``onnx`` (ONNX Runtime, CUDA
execution provider on a CUDA device when the build has it). ``auto`` takes on the CPU bf16 where the CPU has
bf16 matrix units (not for images so narrow that a strided convolution makes a 1-pixel-wide output, where
the CPU's bf16 convolutions are wrong: ``cgpn.engine.precision``), else ONNX Runtime when installed, else
channels_last; on a GPU eager (benchmarks/infer_speed.py). The ONNX graph of a checkpoint is cached on disk (``$CGPN_CACHE_DIR`` or ``~/.cache/cgpn``):
only the first use of a checkpoint pays for the export, and an entry that cannot be loaded is exported again.

Example:
    >>> runtime = Runtime("runs/demo/last.pt", device="cpu")
    >>> runtime(torch.zeros(2, 3, *runtime.input_shape)).shape      # (2, 3072), rows of unit length
    torch.Size([2, 3072])
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from cgpn import __version__
from cgpn.config import EXTRACTOR_BACKENDS, ONNX_OPSET, Config
from cgpn.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from cgpn.engine.checkpoint import load_model
from cgpn.engine.inference import Embedder, resolve_device
from cgpn.engine.precision import cpu_has_native_bf16, narrow_strided_convs
from cgpn.errors import CheckpointError, ConfigError, DependencyError, ImageError
from cgpn.export import export_onnx, import_onnxruntime

__all__ = ["Runtime", "cache_dir", "onnx_session", "resolve_backend"]

logger = logging.getLogger(__name__)

# onnxruntime's errors for a file it cannot load (they derive from Exception only)
_LOAD_ERRORS = ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoModel", "NoSuchFile")


def cache_dir() -> Path:
    """Where exported graphs are kept: ``$CGPN_CACHE_DIR``, else ``$XDG_CACHE_HOME/cgpn`` or ``~/.cache/cgpn``."""
    if os.environ.get("CGPN_CACHE_DIR"):
        return Path(os.environ["CGPN_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cgpn"


def onnx_session(model_file: str | Path | bytes, threads: int = 0, device: str | torch.device = "cpu"):
    """An onnxruntime session with every graph optimisation on, on the CPU, or on CUDA for a CUDA ``device``
    when this onnxruntime build has it."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads > 0:
        options.intra_op_num_threads = threads
    wanted = ("CUDAExecutionProvider", "CPUExecutionProvider") if torch.device(device).type == "cuda" else ()
    providers = [p for p in wanted if p in ort.get_available_providers()] or ["CPUExecutionProvider"]
    return ort.InferenceSession(model_file if isinstance(model_file, bytes) else str(model_file), options,
                                providers=providers)


def _load_errors() -> tuple[type[Exception], ...]:
    state = import_onnxruntime().capi.onnxruntime_pybind11_state
    return tuple(getattr(state, name) for name in _LOAD_ERRORS if hasattr(state, name))


def resolve_backend(backend: str, device: torch.device, bf16_unsafe: bool = False) -> str:
    """The backend ``auto`` (or another of ``EXTRACTOR_BACKENDS``, returned as given) stands for on ``device``;
    ``bf16_unsafe``: the network makes outputs where the CPU's bf16 convolutions are wrong (``narrow_strided_convs``)."""
    if backend != "auto":
        return backend
    if device.type != "cpu":
        return "eager"
    if cpu_has_native_bf16() and not bf16_unsafe:  # bf16 matrix units (AMX / AVX512-BF16): as training's auto
        return "bf16"
    try:
        import_onnxruntime()
    except DependencyError:
        logger.info("onnxruntime is not installed: using channels_last PyTorch on the CPU "
                    "(pip install onnxruntime for the faster default)")
        return "channels_last"
    return "onnx"


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _file_state(path: Path) -> str:
    """Size and modification time of a file: what changes when a run saves a new checkpoint over it."""
    stat = path.stat()
    return f"{stat.st_size}|{stat.st_mtime_ns}"


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


class Runtime:
    """A network as a function from normalised images (B, 3, H, W) to L2-normalised features (B, D).

    Args:
        source: a checkpoint written by ``cgpn train`` (path), an ONNX file written by ``cgpn export``
            (path ending in ``.onnx``), or a network in memory.
        device: ``auto`` (CUDA if present, else CPU), ``cpu``, ``cuda``, ``cuda:N``.
        backend: ``auto``, ``eager``, ``channels_last``, ``bf16``, ``compile`` or ``onnx`` (see the module
            docstring); an ONNX file runs on ``onnx`` only.
        flip: average each feature with that of the mirrored image (Section 4.2); ``None``: the source's own
            setting (a checkpoint's ``test.flip``, an ONNX file's graph).
        config: settings of a network passed in memory (input size, ``test.flip``); defaults to ``Config()``.

    Attributes:
        input_shape: (height, width) the network takes; ``mean`` / ``std``: per-channel normalisation of RGB
            values in [0, 1]; ``feature_dim``: D; ``config``: the source's settings; ``model``: the network
            (None for an ONNX file); ``onnx_file``: the graph onnxruntime runs (None if in memory).
    """

    def __init__(self, source: str | Path | nn.Module, device: str = "auto", backend: str = "auto",
                 flip: bool | None = None, config: Config | None = None) -> None:
        if backend not in EXTRACTOR_BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(EXTRACTOR_BACKENDS)}, got {backend!r}")
        self.device = resolve_device(device)
        self.checkpoint: Path | None = None
        self.model: nn.Module | None = None
        self.onnx_file: Path | None = None
        self.mean, self.std = tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)
        session = None
        if isinstance(source, nn.Module):  # a copy: the caller's model keeps its device and mode
            self.model, self.config = copy.deepcopy(source).eval(), config or Config()
            self.flip = self.config.test.flip if flip is None else flip
        elif Path(source).suffix.lower() == ".onnx":
            self.checkpoint = self.onnx_file = Path(source)
            if backend not in ("auto", "onnx"):
                raise ConfigError(f"'{source}' is an ONNX file: it runs on backend onnx (or auto), not {backend}; "
                                  f"pass the checkpoint it was exported from for the PyTorch backends")
            session = self._user_graph(flip)
        else:
            self.checkpoint = Path(source)
            # read before loading, so that a file replaced while it loads (a run saving) is noticed
            self._file_state = _file_state(self.checkpoint) if self.checkpoint.is_file() else ""
            self.model, self.config = load_model(self.checkpoint)
            self.model.eval()
            self.flip = self.config.test.flip if flip is None else flip
        self.input_shape: tuple[int, int] = (self.config.data.height, self.config.data.width)
        self.backend = "onnx" if session is not None else resolve_backend(backend, self.device, self._bf16_unsafe(backend))
        self._run = self._onnx_runner(session) if self.backend == "onnx" else self._torch_runner()
        dim = getattr(self.model, "feature_dim", None)  # a CGPN knows it; another network is asked with a forward
        self.feature_dim = int(dim if dim is not None else self._run(torch.zeros(1, 3, *self.input_shape)).shape[1])
        logger.info("runtime: %s on %s, %d-d features, %dx%d input%s", self.backend, self.device, self.feature_dim,
                    *self.input_shape, ", flip-averaged" if self.flip else "")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Features (B, D) float32 on the CPU, rows of unit length, of normalised images (B, 3, H, W) on any
        device (H, W = ``input_shape``)."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, *self.input_shape):
            raise ImageError(f"expected normalised images (B, 3, {self.input_shape[0]}, {self.input_shape[1]}), "
                             f"got shape {tuple(images.shape)}; resize them to the network's input size")
        if not len(images):
            return torch.empty(0, self.feature_dim)
        return self._run(images.float())

    def _bf16_unsafe(self, backend: str) -> bool:
        """Whether CPU bf16 would run a strided convolution to a one-pixel-wide output (wrong there on some
        CPUs: ``cgpn.engine.precision``); an explicit ``bf16`` is then refused."""
        if self.model is None or self.device.type != "cpu" or not (backend == "bf16" or cpu_has_native_bf16()):
            return False
        convs = narrow_strided_convs(self.model, *self.input_shape)
        if convs and backend == "bf16":
            raise ConfigError(f"backend bf16: at {self.input_shape[0]} x {self.input_shape[1]} the strided convolution "
                              f"{convs[0]} makes a 1-pixel-wide output, where the CPU's bf16 convolutions are unreliable; "
                              f"use another backend (auto takes an fp32 one here)")
        if convs:
            logger.info("backend auto: not bf16 (the strided convolution %s makes a 1-pixel-wide output)", convs[0])
        return bool(convs)

    # --- runners -------------------------------------------------------------------------------------

    def _torch_runner(self) -> Callable[[torch.Tensor], torch.Tensor]:
        embedder = Embedder(self.model, flip=self.flip).to(self.device).eval()
        memory_format = torch.channels_last if self.backend in ("channels_last", "bf16") else torch.preserve_format
        if memory_format is torch.channels_last:
            embedder = embedder.to(memory_format=torch.channels_last)
        run: nn.Module | Callable = torch.compile(embedder, dynamic=False) if self.backend == "compile" else embedder
        autocast = self.backend == "bf16"

        @torch.inference_mode()
        def runner(x: torch.Tensor) -> torch.Tensor:
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=memory_format)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
                return run(x).float().cpu()

        return runner

    def _onnx_runner(self, session=None) -> Callable[[torch.Tensor], torch.Tensor]:
        session = session or self._checkpoint_session()
        return lambda x: torch.from_numpy(session.run(["features"], {"images": x.detach().cpu().numpy()})[0])

    # --- ONNX: a file given by the user, or a checkpoint's graph in the cache ----------------------------

    def _user_graph(self, flip: bool | None):
        """Session of an ONNX file written by ``cgpn export``; size, normalisation, flip and config from its
        metadata (``cgpn.export.write_metadata``)."""
        path = self.onnx_file
        if not path.is_file():
            raise CheckpointError(f"ONNX file '{path}' does not exist (expected a file written by cgpn export)")
        try:
            session = onnx_session(path, device=self.device)
        except _load_errors() as err:
            raise CheckpointError(f"cannot load ONNX file '{path}': {_first_line(err)}") from None
        meta = session.get_modelmeta().custom_metadata_map
        try:
            height, width = int(meta["cgpn.height"]), int(meta["cgpn.width"])
            self.mean = tuple(float(v) for v in json.loads(meta["cgpn.mean"]))
            self.std = tuple(float(v) for v in json.loads(meta["cgpn.std"]))
            self.flip = {"true": True, "false": False}[meta["cgpn.flip"]]
            cfg = Config.from_dict(json.loads(meta["cgpn.config"]))
            if len(self.mean) != 3 or len(self.std) != 3:
                raise ValueError("mean / std need 3 values")
        except (KeyError, ValueError, TypeError, ConfigError) as err:
            missing = f"no {err}" if isinstance(err, KeyError) else _first_line(err)
            raise CheckpointError(f"ONNX file '{path}' carries no valid cgpn metadata ({missing}); export the "
                                  f"checkpoint with: cgpn export --checkpoint C --onnx {path.name} "
                                  f"(with the onnx package installed)") from None
        if flip is not None and flip != self.flip:
            raise ConfigError(f"ONNX file '{path}' was exported {'with' if self.flip else 'without'} flip averaging "
                              f"and cannot change it; leave flip unset, or export again"
                              f"{'' if flip else ' with --no-flip'}")
        self.config = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, height=height, width=width))
        graph = session.get_inputs()[0].shape[2:]
        if [d for d in graph if isinstance(d, int)] and list(graph) != [height, width]:
            raise CheckpointError(f"ONNX file '{path}' takes {graph[0]}x{graph[1]} images but its metadata says "
                                  f"{height}x{width}; export it again with cgpn export")
        return session

    def _checkpoint_session(self):
        """Session of this network's graph: from the cache (exported into it on first use; an entry that cannot
        be loaded is replaced), or exported in memory for a network passed in or a checkpoint changed since."""
        if self.checkpoint is None:
            return onnx_session(self._onnx_bytes(), device=self.device)
        if _file_state(self.checkpoint) != self._file_state:  # replaced since it was loaded (a run saving)
            logger.info("%s changed after it was loaded; exporting in memory, not caching", self.checkpoint)
            return onnx_session(self._onnx_bytes(), device=self.device)
        h, w = self.input_shape
        # <variant>-<file state>.onnx: graphs of other variants (size, flip) of the same checkpoint stay; a
        # variant's graph of an earlier state of the checkpoint file is replaced
        variant = _short_hash(f"{h}x{w}|flip={self.flip}|opset={ONNX_OPSET}|{torch.__version__}|{__version__}")
        folder = cache_dir() / "onnx" / _short_hash(str(self.checkpoint.resolve()))
        target = folder / f"{variant}-{_short_hash(self._file_state)}.onnx"
        if target.is_file():
            try:
                session = onnx_session(target, device=self.device)
                self.onnx_file = target
                return session
            except _load_errors() as err:  # a torn or damaged entry: it would fail every later run
                logger.warning("cached ONNX graph %s cannot be loaded (%s); removing it and exporting again",
                               target, _first_line(err))
                target.unlink(missing_ok=True)
        logger.info("exporting %s to ONNX for onnxruntime (once per checkpoint; cached in %s)", self.checkpoint,
                    folder)
        try:
            export_onnx(self.model, target, h, w, flip=self.flip)  # written whole, then renamed: no torn files
        except OSError as err:
            logger.warning("cannot cache the ONNX graph in %s (%s); exporting in memory", folder, err)
            return onnx_session(self._onnx_bytes(), device=self.device)
        for old in folder.glob(f"{variant}-*.onnx"):  # this variant for earlier states of the file
            if old != target:
                old.unlink(missing_ok=True)
        self.onnx_file = target
        return onnx_session(target, device=self.device)

    def _onnx_bytes(self) -> bytes:
        buffer = io.BytesIO()
        export_onnx(self.model, buffer, *self.input_shape, flip=self.flip)
        return buffer.getvalue()

    def __repr__(self) -> str:
        source = self.checkpoint or type(self.model).__name__
        return f"Runtime({source}, backend={self.backend}, device={self.device}, flip={self.flip})"
