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
from cgpn.files import atomic_path, reading

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
        if start_step > 0 and self.path.is_file():  # a row a kill tore is dropped here, not carried on
            rows = [r for r in _read_rows(self.path) if r["step"] <= start_step]
        with atomic_path(self.path) as tmp, tmp.open("w", newline="") as f:  # a kill here keeps the history
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows({**r, "value": f"{r['value']:.8g}"} for r in rows)
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


def _read_rows(path: Path) -> list[dict[str, int | str | float]]:
    """The rows of a metrics file, checked. A last row without its line end is what a kill during a write
    leaves: it is dropped. Any other row that does not parse is a ConfigError naming the file and line."""
    expected = f"a metrics file written by cgpn train (columns {','.join(FIELDS)})"
    with reading(path, "metrics file", expected) as p:
        lines = p.read_bytes().decode("utf-8").splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        logger.info("%s: dropped its last row, cut short by a kill: %r", path, lines.pop())
    header = next(csv.reader(lines[:1]), [])
    if tuple(header) != FIELDS:
        raise ConfigError(f"'{path}' is not {expected}; found columns {','.join(header) or 'none'}")
    rows = []
    for number, fields in enumerate(csv.reader(lines[1:]), start=2):
        try:
            step, epoch, tag, value = fields
            rows.append({"step": int(step), "epoch": int(epoch), "tag": tag, "value": float(value)})
        except ValueError:
            raise ConfigError(f"'{path}' line {number} is not a row of {','.join(FIELDS)}: {','.join(fields)!r} "
                              f"(damaged; delete that line)") from None
    return rows


def read_metrics(run_dir: str | Path) -> dict[str, list[tuple[int, int, float]]]:
    """``metrics.csv`` of a run folder as tag -> [(step, epoch, value)], in file order."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run folder '{run_dir}' {'is a file' if run_dir.exists() else 'does not exist'}: "
                          f"--curves expects a run folder written by cgpn train (e.g. runs/demo)")
    series: dict[str, list[tuple[int, int, float]]] = defaultdict(list)
    for row in _read_rows(run_dir / CSV_NAME):
        series[row["tag"]].append((row["step"], row["epoch"], row["value"]))
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
