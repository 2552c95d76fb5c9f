"""Every setting of cgpn, with its default, in one place.

A run is configured in three layers, later ones winning: the defaults below, a YAML file (which may
inherit another through ``_base_``), then ``--set section.key=value`` overrides on the command line.
The resolved config is saved as ``config.yaml`` beside every run and embedded in its checkpoints.
Numbers in comments refer to the paper (arXiv 2010.07675) or to the points of ``docs/SPEC.md``.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cgpn.errors import ConfigError
from cgpn.files import atomic_path, reading

__all__ = [
    "CHOICES",
    "RANGES",
    "TRACK_APPEARANCES",
    "Config",
    "DataConfig",
    "EngineConfig",
    "LossConfig",
    "ModelConfig",
    "ServeSettings",
    "SolverConfig",
    "TestConfig",
    "TrackerSettings",
    "apply_overrides",
    "load_config",
    "save_config",
]


@dataclass
class ModelConfig:
    """The network. ``name`` picks a variant; ``None`` fields take that variant's value (SPEC, Table 2)."""

    name: str = "cgpn"  # cgpn | cgpn1 | cgpn2 | cgpn3 | cgpn4 | mgn
    backbone: str = "resnet50"  # resnet18 | resnet34 | resnet50 | resnet101 (torchvision)
    pretrained: bool | str = True  # ImageNet weights: true (torchvision download/cache), false, or a .pth path
    global_part: str | None = None  # supervised | unsupervised | pooled | none
    local_part: str | None = None  # coarse | fine | mgn | none: a row of model.cgpn.STRIPES
    last_stride: list[int] | None = None  # layer4 stride per branch (SPEC 1); cgpn: [1, 1, 1], mgn: [2, 1, 1]
    pooling: str = "max"  # max | avg, for every global and stripe pooling (SPEC 2)
    reduce_dim: int = 256  # size of each reduced feature (SPEC 3)
    triplet_on: str = "reduced"  # reduced (256-d) | pooled (before reduction) (SPEC 4)
    triplet_parts: str = "global"  # global (Section 3.3: the 3 globals) | all (locals too, as Section 3.2 reads)


@dataclass
class LossConfig:
    """Eq. 4: L = L_softmax + L_triplet + L_mse, each term with a weight of 1 in the paper."""

    triplet_margin: float = 1.2  # alpha in eq. 2
    label_smoothing: float = 0.0  # SPEC 6: plain cross-entropy
    mse_reduction: str = "mean"  # mean (nn.MSELoss) | sum (eq. 3 as written, per sample) (SPEC 5)
    mse_detach_target: bool = True  # f_gl are targets only (SPEC 5)
    ce_weight: float = 1.0  # eq. 4: L_softmax, weight 1
    triplet_weight: float = 1.0  # eq. 4: L_triplet, weight 1
    mse_weight: float = 1.0  # eq. 4: L_mse, weight 1


@dataclass
class DataConfig:
    """Where images come from and how batches are drawn."""

    dataset: str = "market1501"  # market1501 | dukemtmc | cuhk03 | msmt17 | folder | synthetic; a+b joins train sets
    root: str = "data"  # folder that holds the data set(s)
    height: int = 384  # Section 4.2: images resized to 384 x 128
    width: int = 128
    batch_size: int = 64  # P x K (paper: 8 x 8)
    num_instances: int = 8  # K images per identity
    epoch_mode: str = "identities"  # identities (every id once per epoch) | images (len(train) // batch) (SPEC 7)
    workers: int = 4  # data loader processes
    flip_prob: float = 0.5  # random horizontal flip, the paper's only augmentation
    random_erasing: float = 0.0  # probability; off in the paper recipe (SPEC 9)
    pad: int = 0  # pixels of padding before a random crop back to size; 0 = off
    color_jitter: bool = False  # brightness 0.2, contrast 0.15, saturation 0.1 (off in the paper recipe)
    test_batch_size: int = 128  # images per batch when extracting features (not in the paper)
    on_bad_image: str = "skip"  # a corrupt training image: skip (use another of that id, count it) | stop; eval always stops
    verify_counts: str = "warn"  # a copy whose sizes differ from the official release: warn | error | ignore
    cuhk03_labeled: bool = True  # CUHK03 boxes: labeled (the paper) or detected (false)
    cuhk03_cache: str = ""  # where images_{labeled,detected}/ extracted from cuhk-03.mat go; "" = as torchreid
    msmt17_train_val: bool = True  # MSMT17 train = list_train + list_val (official 32,621); false: list_train only
    folder_camera_regex: str = r"_c(\d+)"  # folder set: camera = first group, searched in the path inside the id folder
    folder_csv: str = ""  # folder set: CSV of path,pid,camid[,subset] rows instead of scanning (relative to root)
    folder_test_ids: float = 0.5  # folder set without a given split: fraction of identities used for testing
    folder_split_seed: int = 0  # folder set: seed of the made split (independent of engine.seed)
    # Model selection without the test set: training identities held out as a validation query/gallery,
    # a fraction (< 1) or a count (>= 1), chosen by a hash of their names; 0 = none. When set, periodic
    # evaluations and best.pt use it and the test split is evaluated once, at the end.
    val_ids: float = 0.0
    val_seed: int = 0  # seed of the validation split's hash (independent of engine.seed: seeds share it)


@dataclass
class SolverConfig:
    """Section 4.2: SGD, momentum 0.9, weight decay 5e-4, lr 1e-2 decayed x0.1 at epochs 60 and 80, 240 epochs."""

    optimizer: str = "sgd"  # sgd | adam
    lr: float = 0.01  # Section 4.2: 1e-2
    momentum: float = 0.9  # Section 4.2
    weight_decay: float = 5e-4  # Section 4.2
    nesterov: bool = False  # plain SGD (Section 4.2 names no Nesterov momentum)
    milestones: list[int] = field(default_factory=lambda: [60, 80])  # Section 4.2: lr 1e-3 at 60, 1e-4 at 80
    gamma: float = 0.1  # the decay at each milestone (Section 4.2)
    epochs: int = 240  # Section 4.2; what an epoch is: data.epoch_mode (SPEC 7)
    warmup_epochs: int = 0  # linear warm-up; 0 in the paper (SPEC 9)


@dataclass
class TestConfig:
    """How features are extracted and ranked at test time."""

    flip: bool = True  # average features of the image and its mirror (Section 4.2)
    distance: str = "cosine"  # cosine (L2-normalised Euclidean, SPEC 8) | euclidean (raw)
    max_rank: int = 50  # length of the CMC curve (the paper reports Rank-1; 50 as fast-reid and torchreid)
    ap_mode: str = "standard"  # standard (non-interpolated AP, SPEC) | market (official Market-1501 trapezoid AP)
    memory_mb: float = 512  # working memory of the blockwise ranking / re-ranking (beyond features and output)
    rerank: bool = False  # k-reciprocal re-ranking (Zhong et al. 2017); off in the paper
    rerank_k1: int = 20  # k1: size of the reciprocal neighbourhoods
    rerank_k2: int = 6  # k2: neighbours averaged in the query expansion
    rerank_lambda: float = 0.3  # weight of the original distance beside the Jaccard distance


@dataclass
class EngineConfig:
    """The training loop around the model: hardware, precision, distribution, checkpoints and logs.

    ``precision: auto`` picks per device: bf16 autocast on GPUs that have bf16 (Ampere and later), fp16
    with a gradient scaler on older GPUs, bf16 on CPUs with native bf16 (AVX512-BF16 / AMX) and fp32 on
    other CPUs, where bf16 is emulated and many times slower (measured 25x on an AVX2 EPYC).
    """

    device: str = "auto"  # auto | cpu | cuda | cuda:N; under torchrun auto/cuda = the process's LOCAL_RANK GPU
    seed: int = 0  # every random number of a run (weights, batches, flips); not the paper's: it names none
    deterministic: bool = False  # deterministic kernels; on the CPU a resumed run ends bit-identical
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (fp16: GPUs only, with a GradScaler); see above
    channels_last: bool = True  # NHWC memory format (faster convolutions on GPUs and on the CPU)
    compile: bool = False  # torch.compile the training model (minutes of compile time; long GPU runs)
    sync_bn: bool = False  # SyncBatchNorm across processes under torchrun (GPUs only)
    triplet_scope: str = "rank"  # rank (each process's own P x K batch) | global (features of all processes)
    dist_backend: str = "auto"  # auto (nccl on GPUs, gloo on the CPU) | nccl | gloo
    eval_period: int = 0  # evaluate every N epochs (0: only at the end); the best mAP is kept as best.pt
    eval_at_start: bool = False  # evaluate the untrained network first (shows what training adds)
    log_period: int = 10  # iterations between scalars in metrics.csv / TensorBoard (and log lines without a bar)
    checkpoint_period: int = 1  # epochs between checkpoints
    checkpoint_steps: int = 0  # also a checkpoint every N iterations inside an epoch (0: off)
    keep_last: int = 2  # numbered checkpoints kept in checkpoints/ (last.pt is the newest, best.pt the best)
    progress: bool = True  # a progress bar per epoch when stderr is a terminal
    tensorboard: bool = True  # TensorBoard scalars beside metrics.csv (needs the tensorboard package)
    threads: int = 0  # torch CPU threads; 0 = PyTorch's default


@dataclass
class Config:
    """A whole run. ``output_dir`` receives config.yaml, checkpoints and logs."""

    output_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    test: TestConfig = field(default_factory=TestConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        cfg = cls()
        _merge(cfg, values, prefix="")
        return cfg.validate()

    def validate(self) -> Config:
        """``self`` if every setting is one of its ``CHOICES`` and within its ``RANGES``, else a ConfigError
        naming the first that is not: before any work, not at the first use (e.g. the first evaluation)."""
        for key, choices in CHOICES.items():
            value = self._get(key)
            if value not in choices:
                raise ConfigError(f"config key '{key}' must be one of {', '.join(choices)}, got {value!r}")
        for key, (low, high, strict) in RANGES.items():
            value = self._get(key)
            for i, v in enumerate(value if isinstance(value, list) else [value]):
                if (v <= low if strict else v < low) or (high is not None and v > high):
                    where = f"{key}[{i}]" if isinstance(value, list) else key
                    bound = (f"{'>' if strict else '>='} {low:g}" if high is None
                             else f"between {low:g} and {high:g}")
                    raise ConfigError(f"config key '{where}' must be {bound}, got {v:g}")
        if self.data.val_ids >= 1 and self.data.val_ids != int(self.data.val_ids):
            raise ConfigError(f"config key 'data.val_ids' must be a fraction below 1 or a whole count of "
                              f"identities, got {self.data.val_ids:g}")
        if not self.output_dir.strip():  # "" would put the run's files in the current folder
            raise ConfigError("config key 'output_dir' must name a folder for the run (e.g. runs/my_run), got "
                              f"{self.output_dir!r}")
        if self.solver.optimizer == "sgd" and self.solver.nesterov and self.solver.momentum == 0:
            raise ConfigError("solver.nesterov=true needs solver.momentum > 0 (Nesterov momentum without momentum)")
        return self

    def _get(self, key: str) -> Any:
        section, name = key.split(".")
        return getattr(getattr(self, section), name)


# Settings that take one of a few names (the modules that use them import these).
CHOICES: dict[str, tuple[str, ...]] = {
    "model.pooling": ("max", "avg"),
    "model.triplet_on": ("reduced", "pooled"),
    "model.triplet_parts": ("global", "all"),
    "loss.mse_reduction": ("mean", "sum"),
    "data.epoch_mode": ("identities", "images"),
    "data.on_bad_image": ("skip", "stop"),
    "data.verify_counts": ("warn", "error", "ignore"),
    "solver.optimizer": ("sgd", "adam"),
    "test.distance": ("cosine", "euclidean"),
    "test.ap_mode": ("standard", "market"),
    "engine.precision": ("auto", "fp32", "bf16", "fp16"),
    "engine.triplet_scope": ("rank", "global"),
    "engine.dist_backend": ("auto", "nccl", "gloo"),
}

# Numeric settings: (lowest, highest or None, lowest excluded). A list setting applies it to every item.
RANGES: dict[str, tuple[float, float | None, bool]] = {
    "model.reduce_dim": (1, None, False),
    "loss.triplet_margin": (0, None, False),
    "loss.label_smoothing": (0, 1, False),
    "loss.ce_weight": (0, None, False),
    "loss.triplet_weight": (0, None, False),
    "loss.mse_weight": (0, None, False),
    "data.height": (1, None, False),
    "data.width": (1, None, False),
    "data.batch_size": (1, None, False),
    "data.num_instances": (1, None, False),
    "data.workers": (0, None, False),
    "data.flip_prob": (0, 1, False),
    "data.random_erasing": (0, 1, False),
    "data.pad": (0, None, False),
    "data.test_batch_size": (1, None, False),
    "data.folder_test_ids": (0, 1, False),
    "data.val_ids": (0, None, False),
    "solver.lr": (0, None, True),
    "solver.momentum": (0, 1, False),
    "solver.weight_decay": (0, None, False),
    "solver.milestones": (1, None, False),
    "solver.gamma": (0, None, True),
    "solver.epochs": (0, None, False),  # 0: no training (e.g. train(cfg, finetune=...) to load weights)
    "solver.warmup_epochs": (0, None, False),
    "test.max_rank": (1, None, False),
    "test.memory_mb": (0, None, True),
    "test.rerank_k1": (1, None, False),
    "test.rerank_k2": (1, None, False),
    "test.rerank_lambda": (0, 1, False),
    "engine.eval_period": (0, None, False),
    "engine.log_period": (1, None, False),
    "engine.checkpoint_period": (0, None, False),
    "engine.checkpoint_steps": (0, None, False),
    "engine.keep_last": (1, None, False),
    "engine.threads": (0, None, False),
}


# --- serving: the flags of cgpn extract / index build / search / export (not part of a run's config) ---

EXTRACTOR_BACKENDS = ("auto", "eager", "channels_last", "bf16", "compile", "onnx")  # FeatureExtractor(backend=)
ONNX_OPSET = 17  # ONNX opset of exported graphs (onnxruntime >= 1.14 runs it)
ONNX_OPSETS = range(10, 21)  # opsets the export accepts: flip needs 10; torch's TorchScript exporter stops at 20
INDEX_KINDS = ("flat", "ivf", "ivfpq")
FIRST_PASSES = ("auto", "int8", "bf16", "off")


@dataclass
class IndexSettings:
    """How a gallery index is built and searched (``cgpn index build`` flags of the same names)."""

    kind: str = "flat"  # flat (exact) | ivf | ivfpq (approximate, for millions of images)
    nlist: int = 1024  # ivf*: number of inverted lists (k-means cells); FAISS advises >= 39 x nlist images
    nprobe: int = 16  # ivf*: lists visited per query (more: slower, closer to exact)
    pq_m: int = 64  # ivfpq: sub-vectors per feature (must divide the feature size; 3072 / 64 = 48 dims each)
    pq_bits: int = 8  # ivfpq: bits per sub-vector code
    first_pass: str = "auto"  # flat: int8 | bf16 | off | auto (where it pays: GalleryIndex.first_pass)


@dataclass
class ServeSettings:
    """What ``cgpn serve`` listens on and accepts (its flags of the same names, from each field's help)."""

    host: str = field(default="127.0.0.1", metadata={
        "help": "address to listen on; the default is this machine only (the server has no authentication)"})
    port: int = field(default=8000, metadata={"help": "TCP port (0: any free port, printed at start)"})
    max_upload_mb: float = field(default=10.0, metadata={
        "help": "largest request body (an uploaded image) in MiB; larger ones are refused with 413"})
    max_pixels: int = field(default=25_000_000, metadata={
        "help": "largest width x height of an uploaded image, read from its header before decoding (413 above)"})
    max_topk: int = field(default=1000, metadata={"help": "most results one search may ask for"})
    per_page: int = field(default=24, metadata={"help": "results per page of the search page"})
    max_batch: int = field(default=64, metadata={
        "help": "most concurrent queries searched (or images embedded) together as one batch"})
    uploads_kept: int = field(default=256, metadata={
        "help": "uploaded queries the page remembers for its result pages (the oldest are dropped)"})


TRACK_APPEARANCES = ("cgpn", "histogram", "none")  # cgpn track --appearance: what tells people apart


@dataclass
class TrackerSettings:
    """deep-sort-realtime's ``DeepSort`` parameters (``cgpn track`` flags of the same names); defaults are its own."""

    max_age: int = 30  # frames a track lives on without a detection (DeepSORT paper: A_max = 30)
    n_init: int = 3  # detections in a row before a track is confirmed (tracks are written from then on)
    max_iou_distance: float = 0.7  # IoU stage: a new or just-missed track and a box match only if 1 - IoU <= this
    max_cosine_distance: float = 0.2  # appearance stage: a track and a box match only if their cosine distance <= this
    nn_budget: int | None = None  # appearance features kept per track (None: every one since it was confirmed)

    def validate(self) -> None:
        """A ConfigError naming the first value out of range."""
        checks = {"max_age": self.max_age >= 1, "n_init": self.n_init >= 1,
                  "max_iou_distance": 0 < self.max_iou_distance <= 1,
                  "max_cosine_distance": 0 <= self.max_cosine_distance <= 2,
                  "nn_budget": self.nn_budget is None or self.nn_budget >= 1}
        ranges = {"max_age": ">= 1", "n_init": ">= 1", "max_iou_distance": "in (0, 1]",
                  "max_cosine_distance": "in [0, 2]", "nn_budget": ">= 1 (or unset: no limit)"}
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"--{name.replace('_', '-')} must be {ranges[name]}, got {getattr(self, name)}")


def _field_types(obj: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(obj))


def _allowed(tp: Any) -> tuple[type, ...]:
    """Runtime types a value may have for annotation ``tp`` (``int`` is accepted where ``float`` is)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return tuple(t for arg in typing.get_args(tp) for t in _allowed(arg))
    if origin is list:
        return (list,)
    if tp is float:
        return (float, int)
    if tp is type(None):
        return (type(None),)
    return (tp,)


def _list_item_type(tp: Any) -> Any:
    """The item type of the ``list[...]`` inside annotation ``tp`` (``Any`` if there is none)."""
    if typing.get_origin(tp) is list:
        return (typing.get_args(tp) or (Any,))[0]
    for arg in typing.get_args(tp):
        if typing.get_origin(arg) is list:
            return (typing.get_args(arg) or (Any,))[0]
    return Any


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _check_value(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` if it fits annotation ``tp`` (ints widened to float), else raise ConfigError."""
    allowed = _allowed(tp)
    if float in allowed and str not in allowed and isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
        names = " or ".join(sorted({"null" if t is type(None) else t.__name__ for t in allowed}))
        raise ConfigError(f"config key '{key}' expects {names}, got {value!r} ({type(value).__name__})")
    if tp is float:
        return float(value)
    if isinstance(value, list):
        item_tp = _list_item_type(tp)
        if item_tp is not Any:
            return [_check_value(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    return value


def _unknown_key(key: str, known: list[str]) -> ConfigError:
    section = key.rsplit(".", 1)[0] + "." if "." in key else ""
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = (f"; did you mean '{section}{close[0]}'?" if close
            else f"; known keys{f' of {section[:-1]}' if section else ''}: {', '.join(sorted(known))}")
    return ConfigError(f"unknown config key '{key}'{hint}")


def _merge(obj: Any, values: dict[str, Any], prefix: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {values!r}")
    hints = _field_types(obj)
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in hints:
            raise _unknown_key(full, list(hints))
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, prefix=f"{full}.")
        else:
            setattr(obj, key, _check_value(full, value, hints[key]))


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config, resolving ``_base_: other.yaml`` (relative to the file) recursively."""
    with reading(path, "config file", "a YAML file such as configs/demo.yaml") as p:
        text = p.read_text()
    if path.resolve() in seen:
        raise ConfigError(f"config file '{path}' inherits itself through _base_")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections, got {type(data).__name__}")
    base = data.pop("_base_", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"config file '{path}': _base_ must name another YAML file (e.g. _base_: market1501.yaml), "
                          f"got {base!r}")
    merged = _read_yaml((path.parent / base), (*seen, path.resolve()))
    _deep_update(merged, data)
    return merged


def _deep_update(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _deep_update(dst[key], value)
        else:
            dst[key] = value


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings (values parsed as YAML: ``1e-3``, ``[60, 80]``, ``false``)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form section.key=value (e.g. solver.lr=0.001)")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        _merge(cfg, nested, prefix="")
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then ``overrides``."""
    cfg = Config()
    if path is not None:
        _merge(cfg, _read_yaml(Path(path)), prefix="")
    return apply_overrides(cfg, overrides or []).validate()


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (what ``load_config`` reads back to the same values)."""
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
