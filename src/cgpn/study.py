"""A grid of settings x seeds, each trained and evaluated the same way: Table 2 of the paper in miniature.

A grid file (YAML) names a base config, the ``--set`` overrides every run shares, the seeds, the
occlusion rates and one row of overrides per setting::

    base: demo.yaml                       # relative to the grid file
    set: [data.dataset=cuhk03, data.root=../shared/data/cuhk03-np-pair1-dev/labeled, data.val_ids=50]
    seeds: [0, 1, 2]
    occlude: [0.1, 0.2, 0.3]
    rows:
      cgpn: []
      mgn: [model.name=mgn]

``run_study`` trains each (row, seed) into ``out/<row>/seed<k>`` (``engine.seed=k``; an interrupted run
is resumed, a finished one read from its ``study.json``, not retrained), evaluates the test split on the
run's result (``best.pt`` when ``data.val_ids`` selects it on the validation split, else ``last.pt``),
clean and with each occlusion rate hidden, and writes ``out/runs.csv`` (one line per run),
``out/table.md`` (mean ± std over seeds per row) and ``out/occlusion.png`` (a line per row). Before
training it prints an ETA for the whole grid: from finished runs of the same row on this machine (same CPU or
GPU, threads and torch), else from a few timed training steps of each row's network. Runs finished elsewhere (another machine, a lost folder) come in
through their ``runs.csv`` (``runs_from``): they count as finished and join the table.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from cgpn.config import Config, load_config
from cgpn.engine.precision import cpu_info, machine_description
from cgpn.errors import ConfigError, TrainingDivergedError
from cgpn.files import atomic_path, reading

__all__ = ["Grid", "RunRecord", "load_grid", "read_runs_csv", "run_study", "study_table"]

logger = logging.getLogger(__name__)

RECORD = "study.json"


@dataclass
class Grid:
    """A study: ``rows`` (name -> overrides) x ``seeds``, on ``base`` with ``overrides``, tested at ``occlude``."""

    base: Path | None
    overrides: list[str]
    seeds: list[int]
    occlude: list[float]
    rows: dict[str, list[str]]

    def config(self, row: str, seed: int, out: Path) -> Config:
        """The resolved config of one run: base file, shared overrides, the row's, then seed and folder."""
        return load_config(self.base, [*self.overrides, *self.rows[row], f"engine.seed={seed}",
                                       f"output_dir={out / row / f'seed{seed}'}"])


def load_grid(path: str | Path, rows: Sequence[str] | None = None, seeds: Sequence[int] | None = None) -> Grid:
    """Read a grid file, keeping only ``rows`` / ``seeds`` when given; every run's config is checked now."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid file '{path}' does not exist (expected a YAML file with base, set, seeds, "
                          f"occlude and rows; see cgpn.study)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"grid file '{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"grid file '{path}' must hold a mapping (base, set, seeds, occlude, rows)")
    unknown = sorted(set(data) - {"base", "set", "seeds", "occlude", "rows"})
    if unknown:
        raise ConfigError(f"grid file '{path}': unknown key '{unknown[0]}' (expected base, set, seeds, occlude, rows)")

    def strings(value: Any, what: str) -> list[str]:
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
            raise ConfigError(f"grid file '{path}': {what} must be a list of section.key=value strings, "
                              f"got {value!r}")
        return list(value)

    table = data.get("rows")
    if not isinstance(table, dict) or not table:
        raise ConfigError(f"grid file '{path}': rows must map each setting's name to its overrides, e.g. "
                          f"rows: {{cgpn: [], mgn: [model.name=mgn]}}")
    all_seeds = data.get("seeds", [0])
    if not isinstance(all_seeds, list) or not all_seeds or not all(isinstance(s, int) for s in all_seeds):
        raise ConfigError(f"grid file '{path}': seeds must be a list of integers, got {all_seeds!r}")
    rates = data.get("occlude", [])
    if not isinstance(rates, list) or not all(isinstance(r, int | float) and 0 < r < 1 for r in rates):
        raise ConfigError(f"grid file '{path}': occlude must be a list of fractions in (0, 1), got {rates!r}")
    for pick, known, what in ((rows, table, "row"), (seeds, all_seeds, "seed")):
        missing = [x for x in pick or [] if x not in known]
        if missing:
            raise ConfigError(f"grid file '{path}' has no {what} {missing[0]!r} (it has "
                              f"{', '.join(map(str, known))})")
    base = data.get("base")
    grid = Grid(base=(path.parent / base) if base else None, overrides=strings(data.get("set"), "set"),
                seeds=[s for s in all_seeds if seeds is None or s in seeds],
                occlude=sorted(float(r) for r in rates),
                rows={name: strings(v, f"row '{name}'") for name, v in table.items() if rows is None or name in rows})
    for name in grid.rows:  # a typo in row 9 fails now, not after 8 runs
        grid.config(name, grid.seeds[0], Path("."))
    return grid


@dataclass
class RunRecord:
    """One finished run: its test-split figures (clean and per occlusion rate) and what it cost."""

    row: str
    seed: int
    split: str  # where best.pt was selected: val | test
    epochs: int
    result_epoch: int  # epoch of the weights tested
    val_mAP: float | None  # the selecting validation mAP (None without a validation split)
    rank1: float
    mAP: float
    mINP: float
    occluded: dict[str, tuple[float, float]] = field(default_factory=dict)  # rate -> (Rank-1, mAP)
    seconds: float = 0.0  # wall time of this run's training and evaluation in the process that finished it
    machine: str = ""
    diverged: str = ""  # why training stopped on a non-finite loss (its figures are NaN); "" for a run that finished

    @classmethod
    def of_diverged(cls, row: str, seed: int, epochs: int, occlude: Sequence[float], why: str, seconds: float,
                    machine: str) -> RunRecord:
        """The record of a run whose loss went non-finite: a result of the grid (that setting does not train with
        this recipe), kept so that a resumed study does not train it again."""
        nan = math.nan
        return cls(row=row, seed=seed, split="", epochs=epochs, result_epoch=0, val_mAP=None, rank1=nan, mAP=nan,
                   mINP=nan, occluded={f"{r:g}": (nan, nan) for r in occlude}, seconds=seconds, machine=machine,
                   diverged=why)


def _device(cfg: Config) -> torch.device:
    """The device a run of ``cfg`` trains on (``engine.device``: a grid set to ``cpu`` stays there on a GPU machine)."""
    from cgpn.engine.inference import resolve_device

    return resolve_device(cfg.engine.device)


def _machine(cfg: Config) -> str:
    """The machine line of a run of ``cfg``: its device, with the torch threads the run trains with."""
    return machine_description(_device(cfg), cfg.engine.threads or None)


def _busy_cpu_note(cfg: Config) -> str:
    """A line when other work holds the cores a CPU run needs (load average over cores less its threads):
    the ETA's timed steps and the runs themselves then take longer than on a quiet machine. The load
    average counts the whole system, so it is set against the system's cores (those of the machine line)."""
    if _device(cfg).type != "cpu" or not hasattr(os, "getloadavg"):
        return ""
    cores = cpu_info()[2] or os.cpu_count() or 1
    threads, load = min(cfg.engine.threads or torch.get_num_threads(), cores), os.getloadavg()[0]
    if load <= cores - threads + 0.5:
        return ""
    return (f"note: load average {load:.1f} on {cores} cores before the study starts: other work shares the "
            f"{threads} the runs train on, so the timed steps, this ETA and the runs are slower than on a quiet machine")


def _same_machine(a: str, b: str) -> bool:
    """Whether two machine lines name the same device, flags, threads and torch (the load average aside)."""
    return a.split(", load average")[0] == b.split(", load average")[0]


def run_one(grid: Grid, row: str, seed: int, out: Path) -> RunRecord:
    """Train (or resume) and evaluate one run; its ``study.json`` is written last, so a kill leaves it to redo."""
    from cgpn.data.datasets import dataset_from_config
    from cgpn.engine.checkpoint import load_model
    from cgpn.engine.robustness import evaluate_occlusion
    from cgpn.engine.trainer import train

    cfg = grid.config(row, seed, out)
    start = time.perf_counter()
    try:
        result = train(cfg, resume="auto")
    except TrainingDivergedError as err:
        logger.warning("%s, seed %d diverged: %s", row, seed, err.what)
        record = RunRecord.of_diverged(row, seed, cfg.solver.epochs, grid.occlude, err.what,
                                       time.perf_counter() - start, _machine(cfg))
        return _saved(record, Path(cfg.output_dir))
    tested = result.best_checkpoint if result.split == "val" and result.best_checkpoint else result.checkpoint
    model, saved = load_model(tested)
    device = _device(saved)
    dataset = dataset_from_config(saved.data)
    with torch.inference_mode():
        results = evaluate_occlusion(model.to(device).eval(), dataset, saved, device, grid.occlude, "test")
    clean = results[0.0]
    best = result.evaluations.get(result.test_epoch) if result.split == "val" else None
    record = RunRecord(row=row, seed=seed, split=result.split, epochs=cfg.solver.epochs,
                       result_epoch=int(result.test_epoch or cfg.solver.epochs),
                       val_mAP=float(best.mAP) if best is not None else None, rank1=float(clean.rank(1)),
                       mAP=float(clean.mAP), mINP=float(clean.mINP),
                       occluded={f"{r:g}": (float(v.rank(1)), float(v.mAP)) for r, v in results.items() if r > 0},
                       seconds=time.perf_counter() - start, machine=_machine(cfg))
    return _saved(record, Path(cfg.output_dir))


def _saved(record: RunRecord, folder: Path) -> RunRecord:
    with atomic_path(folder / RECORD) as tmp:
        tmp.write_text(json.dumps(asdict(record), indent=1))
    return record


def read_record(grid: Grid, row: str, seed: int, out: Path) -> RunRecord | None:
    """The record of a finished run, or None (not finished, or finished under other settings)."""
    path = out / row / f"seed{seed}" / RECORD
    if not path.is_file():
        return None
    try:
        record = RunRecord(**json.loads(path.read_text()))
    except (ValueError, TypeError) as err:
        logger.warning("%s is unreadable (%s); evaluating that run again", path, err)
        return None
    if sorted(record.occluded) != sorted(f"{r:g}" for r in grid.occlude):
        logger.warning("%s holds other occlusion rates; evaluating that run again", path)
        return None
    return record


def _step_seconds(cfg: Config, steps: int = 3) -> float:
    """Seconds of one training step of ``cfg``'s network on a random batch (after one untimed step), with
    the torch threads, precision and memory format the run will have (``engine.threads``, ``precision``,
    ``channels_last``), so that it times the step the run will take."""
    from cgpn.engine.checkpoint import build_model_from_config
    from cgpn.engine.precision import resolve_precision
    from cgpn.engine.trainer import build_optimizer, memory_format
    from cgpn.losses import CGPNLoss

    device = _device(cfg)
    precision = resolve_precision(cfg.engine.precision, device)
    d = cfg.data
    model = build_model_from_config(cfg, num_classes=max(2, d.batch_size // d.num_instances), pretrained=False)
    layout = memory_format(cfg.engine.channels_last)
    model = model.to(device, memory_format=layout).train()
    optimizer, criterion = build_optimizer(model, cfg), CGPNLoss(cfg.loss)
    images = torch.randn(d.batch_size, 3, d.height, d.width, device=device).to(memory_format=layout)
    pids = torch.arange(d.batch_size, device=device) // d.num_instances
    timings, threads = [], torch.get_num_threads()
    if cfg.engine.threads > 0:
        torch.set_num_threads(cfg.engine.threads)
    try:
        for _ in range(steps + 1):
            begin = time.perf_counter()
            with precision.autocast():
                output = model(images)
            loss, _ = criterion(output, pids)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            timings.append(time.perf_counter() - begin)
    finally:
        torch.set_num_threads(threads)
    return float(np.median(timings[1:]))


def estimate_seconds(grid: Grid, todo: list[tuple[str, int]], done: list[RunRecord], out: Path,
                     probe: Callable[[Config], float] | None = None) -> dict[str, float]:
    """Seconds one run of each row still to do takes: the mean of its finished runs on this machine (the
    same machine line, threads included: a run's time on another CPU says little here), else a timed probe
    (training steps x steps per run, plus the evaluations at a third of a step per image and view)."""
    from cgpn.data.datasets import dataset_from_config
    from cgpn.data.sampler import PKSampler

    probe = probe or _step_seconds
    estimates: dict[str, float] = {}
    for row in dict.fromkeys(r for r, _ in todo):
        cfg = grid.config(row, todo[0][1], out)
        here = _machine(cfg)
        times = [r.seconds for r in done
                 if r.row == row and r.seconds > 0 and not r.diverged and _same_machine(r.machine, here)]
        if times:
            estimates[row] = float(np.mean(times))
            continue
        dataset = dataset_from_config(cfg.data)
        steps = len(PKSampler([s.pid for s in dataset.train], cfg.data.batch_size, cfg.data.num_instances,
                              cfg.data.epoch_mode))
        step = probe(cfg)
        evals = (1 + len(grid.occlude)) * len(dataset.query) + len(dataset.gallery)
        evals += (len(dataset.val_query) + len(dataset.val_gallery)) * _evaluations(cfg)
        views = 2 if cfg.test.flip else 1
        estimates[row] = step * steps * cfg.solver.epochs + step / cfg.data.batch_size / 3 * evals * views
    return estimates


def _evaluations(cfg: Config) -> int:
    """How many periodic evaluations a run makes."""
    e = cfg.engine
    periodic = cfg.solver.epochs // e.eval_period if e.eval_period else 1
    return periodic + int(e.eval_at_start)


def _duration(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


def run_study(grid: Grid, out: str | Path, dry_run: bool = False, runs_from: str | Path | None = None,
              report: Callable[[str], None] = print) -> list[RunRecord]:
    """Run (or resume) every run of ``grid`` under ``out``, seed by seed, and write the table, CSV and picture.

    Runs go seed-major (every row's seed 0, then every row's seed 1...), so that a grid stopped half-way
    still compares every row. ``runs_from`` (a ``runs.csv`` of an earlier study) adds runs finished
    elsewhere; a run finished under ``out`` wins over its line there. ``dry_run`` trains nothing: it prints
    the plan and ETA and writes the outputs of the runs finished so far, if any.
    """
    out = Path(out)
    plan = [(row, seed) for seed in grid.seeds for row in grid.rows]
    done = [r for r in (read_record(grid, row, seed, out) for row, seed in plan) if r is not None]
    if runs_from is not None:
        if Path(runs_from).resolve() == (out / "runs.csv").resolve():  # it would be rewritten with this grid's runs only
            raise ConfigError(f"--runs-from '{runs_from}' is the runs.csv this study writes; copy it out of --out first")
        have = {(r.row, r.seed) for r in done}
        done += [r for r in read_runs_csv(runs_from, grid) if (r.row, r.seed) in plan and (r.row, r.seed) not in have]
    finished = {(r.row, r.seed) for r in done}
    todo = [key for key in plan if key not in finished]
    timed = done + _other_seeds_finished(grid, out, plan)  # a row's time does not depend on its seed
    first = grid.config(*plan[0], out)
    busy = _busy_cpu_note(first) if todo else ""  # read before the probes load the CPU
    estimates = estimate_seconds(grid, todo, timed, out) if todo else {}
    report(f"study: {len(grid.rows)} settings x {len(grid.seeds)} seeds = {len(plan)} runs, {len(done)} finished; "
           f"ETA {_duration(sum(estimates[r] for r, _ in todo))} on {_machine(first)} "
           f"({', '.join(f'{row} ~{_duration(s)}' for row, s in estimates.items()) or 'nothing to run'})")
    if busy:
        report(busy)
    if dry_run:
        if done:
            write_outputs(grid, done, out)
        return done
    for i, (row, seed) in enumerate(todo, start=1):
        report(f"[{i}/{len(todo)}] {row}, seed {seed} -> {out / row / f'seed{seed}'}")
        record = run_one(grid, row, seed, out)
        done.append(record)
        timed.append(record)
        estimates[row] = float(np.mean([r.seconds for r in timed
                                        if r.row == row and not r.diverged and _same_machine(r.machine, record.machine)]
                                       or [record.seconds]))
        left = sum(estimates[r] for r, _ in todo[i:])
        outcome = f"diverged, {record.diverged}" if record.diverged else \
            f"Rank-1 {100 * record.rank1:.1f}  mAP {100 * record.mAP:.1f}"
        report(f"[{i}/{len(todo)}] {row}, seed {seed}: {outcome} ({_duration(record.seconds)}); ETA {_duration(left)}")
        write_outputs(grid, done, out)
    if not todo and done:
        write_outputs(grid, done, out)
    return done


def _other_seeds_finished(grid: Grid, out: Path, plan: list[tuple[str, int]]) -> list[RunRecord]:
    """Finished runs under ``out`` of the grid's rows with seeds left out of ``plan`` (``--seeds``)."""
    found = []
    for row in grid.rows:
        for folder in sorted((out / row).glob("seed*")):
            seed = folder.name.removeprefix("seed")
            if seed.isdigit() and (row, int(seed)) not in plan:
                found.append(read_record(grid, row, int(seed), out))
    return [r for r in found if r is not None]


def _columns(grid: Grid) -> list[tuple[str, Callable[[RunRecord], float | None]]]:
    """Per-run figures, in %: Table 2's columns (Rank-1, mAP), mINP, then Rank-1 / mAP per occlusion rate."""
    cols: list[tuple[str, Callable[[RunRecord], float | None]]] = [
        ("Rank-1", lambda r: 100 * r.rank1), ("mAP", lambda r: 100 * r.mAP), ("mINP", lambda r: 100 * r.mINP)]
    for rate in grid.occlude:
        key = f"{rate:g}"
        cols += [(f"Rank-1 {100 * rate:g}% hidden", lambda r, k=key: 100 * r.occluded[k][0]),
                 (f"mAP {100 * rate:g}% hidden", lambda r, k=key: 100 * r.occluded[k][1])]
    return cols


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _mean_std_cell(values: list[float]) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.1f} ± {std:.1f}" if len(values) > 1 else f"{mean:.1f}"


def study_table(grid: Grid, records: list[RunRecord]) -> str:
    """A Markdown table: one line per row, mean ± std over its finished seeds for every column (runs that
    diverged are counted apart, in the seeds column; a row of only such runs reads "diverged")."""
    cols = _columns(grid)
    lines = ["| setting | seeds | " + " | ".join(name for name, _ in cols) + " | time per run |",
             "|---|---|" + "---|" * len(cols) + "---|"]
    for row in grid.rows:
        every = [r for r in records if r.row == row]
        if not every:
            lines.append(f"| {row} | 0 | " + " | ".join("" for _ in cols) + " | |")
            continue
        runs = sorted((r for r in every if not r.diverged), key=lambda r: r.seed)
        seeds = f"{len(runs)}" + (f" + {len(every) - len(runs)} diverged" if len(runs) < len(every) else "")
        cells = [_mean_std_cell([get(r) for r in runs]) for _, get in cols] if runs else ["diverged"] * len(cols)
        minutes = np.mean([r.seconds for r in every]) / 60
        lines.append(f"| {row} | {seeds} | " + " | ".join(cells) + f" | {minutes:.0f} min |")
    return "\n".join(lines)


def write_outputs(grid: Grid, records: list[RunRecord], out: Path) -> None:
    """``runs.csv``, ``table.md`` and ``occlusion.png`` of the records so far (each written whole)."""
    cols = _columns(grid)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(_csv_header(grid))
    for r in sorted(records, key=lambda r: (list(grid.rows).index(r.row) if r.row in grid.rows else 1e9, r.seed)):
        figures = ["" if r.diverged else _short(get(r)) for _, get in cols]
        writer.writerow([r.row, r.seed, r.split, r.epochs, r.result_epoch,
                         "" if r.val_mAP is None else _short(100 * r.val_mAP), *figures, f"{r.seconds:.0f}", r.machine,
                         r.diverged])
    with atomic_path(out / "runs.csv") as tmp:
        tmp.write_text(buffer.getvalue())
    with atomic_path(out / "table.md") as tmp:
        tmp.write_text(study_table(grid, records) + "\n")
    plot_study(grid, records, out / "occlusion.png")


def _short(value: float) -> str:
    """At most two decimals and no trailing zeros (43.30 -> '43.3'): a figure known to 0.1 reads as such."""
    return f"{round(value, 2):g}"


def _csv_header(grid: Grid) -> list[str]:
    return ["setting", "seed", "split", "epochs", "result_epoch", "val_mAP", *(n for n, _ in _columns(grid)),
            "seconds", "machine", "diverged"]


def read_runs_csv(path: str | Path, grid: Grid) -> list[RunRecord]:
    """The runs of a ``runs.csv`` (as ``write_outputs`` writes it) that belong to ``grid``'s rows and seeds.

    Its columns must be this grid's (the same occlusion rates; the last, ``diverged``, may be missing: files
    written before it existed); lines of other settings or seeds are skipped.
    """
    with reading(path, "--runs-from", "the runs.csv of an earlier cgpn study") as path, path.open(newline="") as f:
        reader = csv.reader(f, strict=True)  # an unclosed quote (a file cut short) is an error, not a shorter field
        header = next(reader, [])
        if header not in (_csv_header(grid), _csv_header(grid)[:-1]):
            raise ConfigError(f"--runs-from: '{path}' has the columns {', '.join(header) or '(none)'}; this grid's "
                              f"runs.csv has {', '.join(_csv_header(grid))}")
        records = []
        for line, values in enumerate(reader, start=2):
            cells = dict(zip(header, values))
            try:
                if len(values) != len(header):
                    raise ValueError(f"{len(values)} values for {len(header)} columns")
                if cells["setting"] not in grid.rows or int(cells["seed"]) not in grid.seeds:
                    continue
                if cells.get("diverged"):
                    records.append(RunRecord.of_diverged(
                        cells["setting"], int(cells["seed"]), int(cells["epochs"]), grid.occlude, cells["diverged"],
                        float(cells["seconds"]), cells["machine"]))
                    continue
                # _columns' order: Rank-1, mAP, mINP, then Rank-1 and mAP of each occlusion rate
                pct = [float(cells[name]) / 100 for name, _ in _columns(grid)]
                records.append(RunRecord(
                    row=cells["setting"], seed=int(cells["seed"]), split=cells["split"], epochs=int(cells["epochs"]),
                    result_epoch=int(cells["result_epoch"]),
                    val_mAP=float(cells["val_mAP"]) / 100 if cells["val_mAP"] else None,
                    rank1=pct[0], mAP=pct[1], mINP=pct[2],
                    occluded={f"{r:g}": (pct[3 + 2 * i], pct[4 + 2 * i]) for i, r in enumerate(grid.occlude)},
                    seconds=float(cells["seconds"]), machine=cells["machine"]))
            except ValueError as err:
                raise ConfigError(f"--runs-from: '{path}' line {line} is not a run ({err})") from None
    return records


_MARKERS, _DASHES = "osD^vPX*", ("-", "--", ":", "-.")


def _line_styles(count: int) -> list[tuple[str, str, str]]:
    """``count`` (colour, marker, line style) looks, no two alike up to 160 rows: tab10's colours and eight
    markers cycle together (distinct for 40 rows, lcm(10, 8)), the line style changes every 40."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    palette = [to_hex(c) for c in colormaps["tab10"].colors]
    return [(palette[i % 10], _MARKERS[i % 8], _DASHES[i // 40 % 4]) for i in range(count)]


def plot_study(grid: Grid, records: list[RunRecord], path: Path) -> Path:
    """Rank-1 and mAP against the hidden fraction of the query, a line per setting (mean, ± std bars), one
    legend beside both panels. A row keeps its line style whichever other rows have runs."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend stays as it is

    rates = [0.0, *grid.occlude]
    fig = Figure(figsize=(12, 4), dpi=110, layout="constrained")
    axes = fig.subplots(1, 2)
    for row, (color, marker, dashes) in zip(grid.rows, _line_styles(len(grid.rows))):
        runs = [r for r in records if r.row == row and not r.diverged]
        if not runs:
            continue
        for ax, index, attr in ((axes[0], 0, "rank1"), (axes[1], 1, "mAP")):
            stats = [_mean_std([100 * (getattr(r, attr) if rate == 0 else r.occluded[f"{rate:g}"][index])
                                for r in runs]) for rate in rates]
            ax.errorbar([100 * x for x in rates], [m for m, _ in stats], yerr=[s for _, s in stats],
                        color=color, marker=marker, linestyle=dashes, capsize=3, label=f"{row} (n={len(runs)})")
    for ax, title in zip(axes, ("Rank-1 (%)", "mAP (%)")):
        ax.set_xlabel("query area hidden (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:  # no line where every run diverged
        fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    return path

