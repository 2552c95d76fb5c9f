"""Training scalars: ``metrics.csv`` and TensorBoard events in the run folder, and the curves drawn from them.

``metrics.csv`` has one row per scalar: ``step,epoch,tag,value``. Tags (the same in TensorBoard):
``train/<term>`` (each loss term and ``train/total``, means over ``engine.log_period`` iterations),
``train/lr``, ``train/images_per_s``, and after each evaluation ``<split>/rank1``, ``<split>/mAP``,
``<split>/mINP`` (fractions in [0, 1]; step 0 is the untrained network), where ``<split>`` is ``val`` for
the periodic evaluations of a run with a validation split (``data.val_ids``) and ``test`` otherwise;
such a run adds one ``test/*`` row at its end.
"""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from pathlib import Path

from cgpn.errors import ConfigError
from cgpn.files import atomic_path

__all__ = ["MetricsWriter", "draw_curves", "read_metrics"]

logger = logging.getLogger(__name__)

CSV_NAME = "metrics.csv"
FIELDS = ("step", "epoch", "tag", "value")


class MetricsWriter:
    """Appends scalars to ``metrics.csv`` and, if enabled and installed, TensorBoard.

    On resume (``start_step`` > 0) rows written after that step by the interrupted run are dropped, and
    TensorBoard is told to purge them, so that the curves have no repeated stretch.
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, start_step: int = 0) -> None:
        self.path = Path(run_dir) / CSV_NAME
        rows = []
        if start_step > 0 and self.path.is_file():
            with self.path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
        with atomic_path(self.path) as tmp, tmp.open("w", newline="") as f:  # a kill here keeps the history
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        self._file = self.path.open("a", newline="")
        self._csv = csv.DictWriter(self._file, fieldnames=FIELDS)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning("engine.tensorboard: the tensorboard package is not installed (pip install "
                               "'cgpn[log]'); writing %s only", self.path)
            else:
                self._tb = SummaryWriter(str(self.path.parent / "tensorboard"),
                                         purge_step=start_step + 1 if start_step > 0 else None)

    def write(self, step: int, epoch: int, scalars: dict[str, float]) -> None:
        """Record ``scalars`` (tag -> value) at global ``step`` during ``epoch``."""
        for tag, value in scalars.items():
            self._csv.writerow({"step": step, "epoch": epoch, "tag": tag, "value": f"{value:.8g}"})
            if self._tb is not None:
                self._tb.add_scalar(tag, value, step)
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path) -> dict[str, list[tuple[int, int, float]]]:
    """``metrics.csv`` of a run folder as tag -> [(step, epoch, value)], in file order."""
    path = Path(run_dir) / CSV_NAME
    if not path.is_file():
        raise ConfigError(f"'{path}' does not exist: --curves expects a run folder written by cgpn train "
                          f"(e.g. runs/demo)")
    series: dict[str, list[tuple[int, int, float]]] = defaultdict(list)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != FIELDS:
            raise ConfigError(f"'{path}' is not a cgpn metrics file (expected columns {','.join(FIELDS)}, "
                              f"found {','.join(reader.fieldnames or [])})")
        for row in reader:
            series[row["tag"]].append((int(row["step"]), int(row["epoch"]), float(row["value"])))
    return dict(series)


def draw_curves(run_dir: str | Path, out: str | Path) -> Path:
    """Draw a run's loss terms, learning rate, speed and Rank-1 / mAP against the iteration as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: the caller's matplotlib backend stays as it is

    series = read_metrics(run_dir)
    losses = {t.split("/", 1)[1]: v for t, v in series.items()
              if t.startswith("train/") and t not in ("train/lr", "train/images_per_s") and any(p[2] for p in v)}
    fig = Figure(figsize=(18, 4))
    axes = fig.subplots(1, 4)
    evaluations = {f"{split} {name}": [(s, e, 100 * v) for s, e, v in series[f"{split}/{tag}"]]
                   for split in ("val", "test") for tag, name in (("rank1", "Rank-1"), ("mAP", "mAP"))
                   if f"{split}/{tag}" in series}
    panels = [(axes[0], "loss terms", losses, True),
              (axes[1], "learning rate", {"lr": series.get("train/lr", [])}, True),
              (axes[2], "images / s", {"train": series.get("train/images_per_s", [])}, False),
              (axes[3], "evaluation (%)", evaluations, False)]
    for ax, title, curves, log in panels:
        for name, points in curves.items():
            if points:
                ax.plot([p[0] for p in points], [p[2] for p in points], marker="o" if len(points) < 30 else None,
                        markersize=3, label=name)
        if log and any(p[2] > 0 for pts in curves.values() for p in pts):
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if any(curves.values()):
            ax.legend(fontsize=8)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=100)
    return out
