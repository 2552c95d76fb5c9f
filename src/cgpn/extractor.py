"""Features out of images with a trained model: files, PIL images, NumPy arrays or tensors in, L2-normalised
test features (3072-d for CGPN, Section 4.2) out, with the checkpoint's own preprocessing.

On the CPU the default path (``backend="auto"``) is the fastest one whose features match eager fp32
PyTorch (cosine >= 0.999, same Rank-1; benchmarks/infer_speed.py). On CPUs with bf16 matrix units (AMX,
AVX512-BF16) that is bf16 autocast + channels_last, as for training. On other CPUs it is ONNX Runtime:
1.30x eager fp32 for CGPN-ResNet-50 at 384 x 128 on a 2-core AVX2 CPU, where eager already runs at 73 % of
the CPU's fp32 matrix-multiply rate (channels_last 1.23x; torch.compile 1.34x but 7-42 s to compile in
every process; bf16 autocast 0.14x, emulated). The exported graph of a checkpoint is cached on disk
(``$CGPN_CACHE_DIR`` or ``~/.cache/cgpn``), so only the first use of a checkpoint pays for the export.

Example:
    >>> extractor = FeatureExtractor("runs/demo/last.pt")
    >>> feats = extractor(["a.jpg", "b.jpg"])          # (2, 3072), rows of unit length
    >>> float(feats[0] @ feats[1])                      # cosine similarity
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from cgpn import __version__
from cgpn.config import EXTRACTOR_BACKENDS, ONNX_OPSET, Config
from cgpn.data.datasets.base import IMAGE_SUFFIXES
from cgpn.data.loader import read_image, to_rgb
from cgpn.data.transforms import build_transforms
from cgpn.engine.checkpoint import load_model
from cgpn.engine.inference import Embedder, resolve_device
from cgpn.engine.precision import cpu_has_native_bf16
from cgpn.errors import ConfigError, DatasetError, DependencyError, ImageError
from cgpn.export import export_onnx, import_onnxruntime, onnx_session

__all__ = ["FeatureExtractor", "ImageInput", "cache_dir", "list_images", "to_pil"]

logger = logging.getLogger(__name__)

ImageInput = str | Path | Image.Image | np.ndarray | torch.Tensor


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _file_state(path: Path) -> str:
    """Size and modification time of a file: what changes when a run saves a new checkpoint over it."""
    stat = path.stat()
    return f"{stat.st_size}|{stat.st_mtime_ns}"


def cache_dir() -> Path:
    """Where exported graphs are kept: ``$CGPN_CACHE_DIR``, else ``$XDG_CACHE_HOME/cgpn`` or ``~/.cache/cgpn``."""
    if os.environ.get("CGPN_CACHE_DIR"):
        return Path(os.environ["CGPN_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cgpn"


def list_images(folder: str | Path) -> list[Path]:
    """Every image file under ``folder`` (recursively), sorted; a DatasetError if there is none."""
    folder = Path(folder)
    if not folder.is_dir():
        found = "is a file, not a folder" if folder.exists() else "does not exist"
        raise DatasetError(f"image folder '{folder}' {found} (expected a folder of .jpg/.png files)")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise DatasetError(f"image folder '{folder}' holds no image (expected files ending in "
                           f"{', '.join(IMAGE_SUFFIXES)}, e.g. 0002_c1s1_000451_00.jpg)")
    return paths


def to_pil(item: ImageInput) -> Image.Image:
    """One image as an RGB PIL image.

    Args:
        item: a file path; a PIL image; a NumPy array (H, W, 3) uint8 RGB; or a tensor (3, H, W), uint8 or
            float in [0, 1] (float values are rounded to 8 bits, as an image file would hold them).
    """
    if isinstance(item, (str, Path)):
        return read_image(str(item))
    if isinstance(item, Image.Image):
        try:
            return to_rgb(item)
        except ValueError as err:
            raise ImageError(f"cannot use this PIL image: {err}") from None
    if isinstance(item, torch.Tensor):
        if item.ndim != 3 or item.shape[0] != 3:
            raise ImageError(f"an image tensor must be (3, H, W), got shape {tuple(item.shape)}")
        if item.dtype.is_floating_point:
            low, high = float(item.min()), float(item.max())
            if low < -1e-3 or high > 1 + 1e-3:  # 0-255 values, or an already normalised tensor
                raise ImageError(f"a float image tensor must hold values in [0, 1], got [{low:.3g}, {high:.3g}] "
                                 f"(divide 8-bit values by 255; pass unnormalised images)")
            item = (item.detach().float().cpu() * 255).round().clamp(0, 255).to(torch.uint8)
        elif item.dtype != torch.uint8:
            raise ImageError(f"an image tensor must be uint8 or float in [0, 1], got {item.dtype}")
        item = item.cpu().permute(1, 2, 0).numpy()
    if isinstance(item, np.ndarray):
        if item.ndim != 3 or item.shape[2] != 3 or item.dtype != np.uint8:
            raise ImageError(f"an image array must be (H, W, 3) uint8 RGB, got shape {item.shape} {item.dtype}")
        return Image.fromarray(np.ascontiguousarray(item), mode="RGB")
    raise ImageError(f"cannot use {type(item).__name__} as an image (expected a path, PIL image, "
                     f"(H, W, 3) uint8 array or (3, H, W) tensor)")


def _as_list(inputs: ImageInput | Iterable[ImageInput]) -> list[ImageInput]:
    """A single image, a batch (N, H, W, 3) array / (N, 3, H, W) tensor, or an iterable -> a list of images."""
    if isinstance(inputs, (str, Path, Image.Image)):
        return [inputs]
    if isinstance(inputs, (np.ndarray, torch.Tensor)):
        return list(inputs) if inputs.ndim == 4 else [inputs]
    return list(inputs)


class FeatureExtractor:
    """A trained network as a function from images to L2-normalised test features.

    Args:
        checkpoint_or_model: a checkpoint written by ``cgpn train`` (path), or a network in memory.
        device: ``auto`` (CUDA if present, else CPU), ``cpu``, ``cuda``, ``cuda:N``.
        batch_size: images per forward pass (each also runs mirrored when ``flip``).
        flip: average each feature with that of the mirrored image (Section 4.2).
        backend: ``auto`` (CPU: ``bf16`` with bf16 matrix units, else ``onnx`` when onnxruntime is
            installed, else ``channels_last``; GPU: ``eager``), ``eager`` (fp32 PyTorch),
            ``channels_last``, ``bf16`` (autocast), ``compile`` (torch.compile) or ``onnx`` (ONNX Runtime).
        config: preprocessing for a network passed in memory (a checkpoint brings its own); defaults
            to ``Config()``, i.e. 384 x 128 with ImageNet normalisation.
        progress: a progress bar; ``None`` shows one for lists longer than a batch on a terminal.

    Example:
        >>> extractor = FeatureExtractor("runs/demo/last.pt", batch_size=32)
        >>> extractor(np.zeros((128, 64, 3), np.uint8)).shape
        torch.Size([1, 3072])
    """

    def __init__(self, checkpoint_or_model: str | Path | nn.Module, device: str = "auto", batch_size: int = 32,
                 flip: bool = True, backend: str = "auto", config: Config | None = None,
                 progress: bool | None = None) -> None:
        if backend not in EXTRACTOR_BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(EXTRACTOR_BACKENDS)}, got {backend!r}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        self.checkpoint: Path | None = None
        if isinstance(checkpoint_or_model, nn.Module):  # a copy: the caller's model keeps its device and mode
            model, cfg = copy.deepcopy(checkpoint_or_model), config or Config()
        else:
            self.checkpoint = Path(checkpoint_or_model)
            # read before loading, so that a file replaced while it loads (a run saving) is noticed
            self._file_state = _file_state(self.checkpoint) if self.checkpoint.is_file() else ""
            model, cfg = load_model(self.checkpoint)
        self.config: Config = cfg
        self.device = resolve_device(device)
        self.batch_size, self.flip, self.progress = batch_size, flip, progress
        self.transform = build_transforms(cfg.data, train=False)
        self.model = model.eval()
        self.backend = self._resolve_backend(backend)
        self._run = self._build_runner()
        dim = getattr(model, "feature_dim", None)  # a CGPN knows it; another network is asked with a forward
        self.feature_dim = int(dim if dim is not None else
                               self._run(torch.zeros(1, 3, cfg.data.height, cfg.data.width)).shape[1])
        logger.info("feature extractor: %s on %s, %d-d features, %dx%d input%s", self.backend, self.device,
                    self.feature_dim, cfg.data.height, cfg.data.width, ", flip-averaged" if flip else "")

    def _resolve_backend(self, backend: str) -> str:
        if backend != "auto":
            return backend
        if self.device.type != "cpu":
            return "eager"
        if cpu_has_native_bf16():  # bf16 matrix units (AMX / AVX512-BF16): as training's engine.precision=auto
            return "bf16"
        try:
            import_onnxruntime()
        except DependencyError:
            logger.info("onnxruntime is not installed: using channels_last PyTorch on the CPU "
                        "(pip install onnxruntime for the faster default)")
            return "channels_last"
        return "onnx"

    def _build_runner(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """A function (B, 3, H, W) normalised images -> (B, D) L2-normalised features on the CPU."""
        if self.backend == "onnx":
            session = onnx_session(self._onnx_graph(), device=self.device)
            return lambda x: torch.from_numpy(session.run(["features"], {"images": x.numpy()})[0])
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

    def _onnx_graph(self) -> bytes | Path:
        """The exported graph: a cached file for a checkpoint, bytes in memory for a network passed in."""
        h, w = self.config.data.height, self.config.data.width
        if self.checkpoint is None:
            return self._onnx_bytes()
        if _file_state(self.checkpoint) != self._file_state:  # replaced since it was loaded (a run saving)
            logger.info("%s changed after it was loaded; exporting in memory, not caching", self.checkpoint)
            return self._onnx_bytes()
        # <variant>-<file state>.onnx: graphs of other variants (size, flip) of the same checkpoint stay; a
        # variant's graph of an earlier state of the checkpoint file is replaced
        variant = _short_hash(f"{h}x{w}|flip={self.flip}|opset={ONNX_OPSET}|{torch.__version__}|{__version__}")
        folder = cache_dir() / "onnx" / _short_hash(str(self.checkpoint.resolve()))
        target = folder / f"{variant}-{_short_hash(self._file_state)}.onnx"
        if target.is_file():
            return target
        logger.info("exporting %s to ONNX for onnxruntime (once per checkpoint; cached in %s)", self.checkpoint,
                    folder)
        try:
            export_onnx(self.model, target, h, w, flip=self.flip)  # written whole, then renamed: no torn files
        except OSError as err:
            logger.warning("cannot cache the ONNX graph in %s (%s); exporting in memory", folder, err)
            return self._onnx_bytes()
        for old in folder.glob(f"{variant}-*.onnx"):  # this variant for earlier states of the file
            if old != target:
                old.unlink(missing_ok=True)
        return target

    def _onnx_bytes(self) -> bytes:
        buffer = io.BytesIO()
        export_onnx(self.model, buffer, self.config.data.height, self.config.data.width, flip=self.flip)
        return buffer.getvalue()

    def preprocess(self, item: ImageInput) -> torch.Tensor:
        """One image -> the normalised (3, height, width) tensor the network takes."""
        return self.transform(to_pil(item))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Features (B, D) of a preprocessed batch (B, 3, height, width), L2-normalised, on the CPU."""
        return self._run(images.float().cpu() if self.backend == "onnx" else images.float())

    def __call__(self, inputs: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """Features (N, D) of one image or a list of images (paths, PIL, arrays, tensors; see ``to_pil``)."""
        items = _as_list(inputs)
        out = torch.empty(len(items), self.feature_dim)
        if self.progress is None:  # tqdm's None: a bar only when stderr is a terminal
            disable = None if len(items) > self.batch_size else True
        else:
            disable = not self.progress
        with tqdm(total=len(items), desc="features", unit="img", disable=disable) as bar:
            for start in range(0, len(items), self.batch_size):
                chunk = items[start:start + self.batch_size]
                out[start:start + len(chunk)] = self.features(torch.stack([self.preprocess(x) for x in chunk]))
                bar.update(len(chunk))
        return out

    def __repr__(self) -> str:
        source = self.checkpoint or type(self.model).__name__
        return (f"FeatureExtractor({source}, backend={self.backend}, device={self.device}, "
                f"batch_size={self.batch_size}, flip={self.flip})")

