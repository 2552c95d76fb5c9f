"""cgpn study on a tiny grid: every (setting, seed) trained and tested once, the table's means and spreads
recomputed here from the runs' own checkpoints, a finished grid read instead of retrained, the ETA's parts."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import yaml

import cgpn.study as study
from _engine_tiny import tiny_overrides
from cgpn.cli import main
from cgpn.data.datasets import dataset_from_config
from cgpn.engine.checkpoint import load_model
from cgpn.engine.evaluation import evaluate_model
from cgpn.engine.precision import machine_description
from cgpn.errors import ConfigError


@pytest.fixture(scope="module")
def grid_file(tiny_synth, tmp_path_factory):
    folder = tmp_path_factory.mktemp("grid")
    shared = [o for o in tiny_overrides(tiny_synth, folder / "unused", **{"data.val_ids": 2, "solver.epochs": 1})
              if not o.startswith("output_dir=")]
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump({"set": shared, "seeds": [0, 1], "occlude": [0.2],
                                    "rows": {"cgpn": [], "mgn": ["model.name=mgn"]}}))
    return path


@pytest.fixture(scope="module")
def finished(grid_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    grid = study.load_grid(grid_file)
    records = study.run_study(grid, out, report=lambda line: None)
    return grid, out, records


def test_every_run_is_tested_once_on_the_weights_validation_selected(finished):
    _grid, out, records = finished
    assert sorted((r.row, r.seed) for r in records) == [("cgpn", 0), ("cgpn", 1), ("mgn", 0), ("mgn", 1)]
    for r in records:
        run = out / r.row / f"seed{r.seed}"
        assert r.split == "val" and r.val_mAP is not None
        model, cfg = load_model(run / "best.pt")  # recomputed here from the run's own checkpoint
        assert cfg.engine.seed == r.seed and cfg.model.name == r.row
        test = evaluate_model(model, dataset_from_config(cfg.data), cfg, torch.device("cpu"), "test")
        assert r.rank1 == pytest.approx(test.rank(1), abs=1e-6) and r.mAP == pytest.approx(test.mAP, abs=1e-6)
        assert set(r.occluded) == {"0.2"}
        assert json.loads((run / "study.json").read_text())["mAP"] == pytest.approx(r.mAP)


def test_table_and_csv_hold_means_and_sample_spreads(finished):
    _grid, out, records = finished
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert [(r["setting"], r["seed"]) for r in rows] == [("cgpn", "0"), ("cgpn", "1"), ("mgn", "0"), ("mgn", "1")]
    table = (out / "table.md").read_text().splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[:5] == ["setting", "seeds", "Rank-1", "mAP", "mINP"]
    assert header[5:7] == ["Rank-1 20% hidden", "mAP 20% hidden"]
    for line in table[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        mine = [r for r in records if r.row == cells[0]]
        maps = [100 * r.mAP for r in mine]
        assert cells[1] == "2"
        assert cells[3] == f"{np.mean(maps):.1f} ± {np.std(maps, ddof=1):.1f}"
        hidden = [100 * r.occluded["0.2"][1] for r in mine]
        assert cells[6] == f"{np.mean(hidden):.1f} ± {np.std(hidden, ddof=1):.1f}"
    assert (out / "occlusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_picture_has_a_line_per_row_at_its_means_in_a_look_of_its_own(finished, tmp_path, monkeypatch):
    """Each row's Rank-1 line passes through its seeds' means (clean, then each hidden fraction), rows differ
    in look (colour, marker, line style: tab10 alone has 10 colours and table2.yaml has 11 rows), and the one
    legend sits beside the panels, not over their lines."""
    from matplotlib.figure import Figure

    grid, _out, records = finished
    drawn, save = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (drawn.append(fig), save(fig, *a, **k))[1])
    study.plot_study(grid, records, tmp_path / "occlusion.png")
    (fig,) = drawn
    rank1 = fig.axes[0]
    lines = {bars.get_label().split(" (n=")[0]: bars.lines[0] for bars in rank1.containers}  # errorbar's data lines
    assert sorted(lines) == ["cgpn", "mgn"]
    for row, line in lines.items():
        mine = [r for r in records if r.row == row]
        expected = [np.mean([100 * r.rank1 for r in mine])]
        expected += [np.mean([100 * r.occluded[f"{rate:g}"][0] for r in mine]) for rate in grid.occlude]
        assert np.allclose(line.get_ydata(), expected)
    assert len({(line.get_color(), line.get_marker(), line.get_linestyle()) for line in lines.values()}) == 2
    assert len(fig.legends) == 1 and rank1.get_legend() is None and fig.axes[1].get_legend() is None
    for count in (1, 10, 11, 40, 41, 160):
        assert len(set(study._line_styles(count))) == count


def test_a_finished_grid_is_read_not_retrained(finished, monkeypatch):
    grid, out, records = finished
    calls = []
    monkeypatch.setattr(study, "run_one", lambda *a: calls.append(a))
    again = study.run_study(grid, out, report=lambda line: None)
    assert calls == [] and sorted((r.row, r.seed, r.mAP) for r in again) == sorted((r.row, r.seed, r.mAP)
                                                                                   for r in records)


def test_half_done_grid_runs_only_what_is_missing(finished, tmp_path, monkeypatch):
    grid, out, records = finished
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "mgn" / "seed1" / "study.json").unlink()
    done = []

    def fake_run(g, row, seed, where):
        done.append((row, seed))
        return next(r for r in records if (r.row, r.seed) == (row, seed))

    monkeypatch.setattr(study, "run_one", fake_run)
    monkeypatch.setattr(study, "estimate_seconds", lambda *a, **k: {"mgn": 1.0})
    study.run_study(grid, copy, report=lambda line: None)
    assert done == [("mgn", 1)]


def test_eta_from_finished_runs_else_from_a_probe(finished, grid_file):
    grid, out, _records = finished
    todo = [("cgpn", 0), ("mgn", 0)]
    here = study._machine(grid.config("cgpn", 0, out))
    fake = [study.RunRecord("cgpn", s, "val", 1, 1, 0.5, 0.5, 0.5, 0.5, {"0.2": (0.1, 0.1)}, seconds=t, machine=m,
                            diverged=why)
            for s, t, m, why in ((0, 100.0, here, ""), (1, 300.0, here, ""),
                                 (2, 9000.0, "Other CPU, 2 cores, avx2 fma, 2 torch threads, bf16 emulated", ""),
                                 (3, 2.0, here, "loss term 'ce' is nan at epoch 1, iteration 5"))]
    one = study.estimate_seconds(grid, todo, fake, out, probe=lambda cfg: 1.0)
    two = study.estimate_seconds(grid, todo, fake, out, probe=lambda cfg: 2.0)
    assert one["cgpn"] == two["cgpn"] == 200.0  # the mean of that setting's runs finished on this machine
    assert two["mgn"] == pytest.approx(2 * one["mgn"])  # no finished run: in proportion to the timed step
    cfg = grid.config("mgn", 0, out)
    steps = -(-6 // (cfg.data.batch_size // cfg.data.num_instances))  # 6 training identities, P per batch
    assert one["mgn"] > steps * cfg.solver.epochs  # the training steps, plus the evaluations


def test_the_probe_and_the_machine_line_have_the_runs_threads(finished, monkeypatch):
    """A grid with ``engine.threads=1`` in a process of 2 threads: its ETA probe trains on 1 thread (and puts
    the 2 back) in the run's memory format, and its machine line, which records and the ETA's report carry,
    says 1."""
    import cgpn.engine.checkpoint
    import cgpn.losses

    grid, out, _records = finished
    cfg = grid.config("mgn", 0, out)
    assert cfg.engine.threads == 1
    seen = []

    class Spy(cgpn.losses.CGPNLoss):
        def forward(self, *args, **kwargs):
            seen.append(torch.get_num_threads())
            return super().forward(*args, **kwargs)

    monkeypatch.setattr(cgpn.losses, "CGPNLoss", Spy)
    formats = []
    build = cgpn.engine.checkpoint.build_model_from_config

    def spied_build(*args, **kwargs):
        model = build(*args, **kwargs)
        model.register_forward_pre_hook(lambda module, inputs: formats.append(
            (inputs[0].is_contiguous(memory_format=torch.channels_last), inputs[0].is_contiguous())))
        return model

    monkeypatch.setattr(cgpn.engine.checkpoint, "build_model_from_config", spied_build)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        study._step_seconds(cfg, steps=1)
        assert seen == [1, 1] and torch.get_num_threads() == 2
        assert cfg.engine.channels_last and formats == [(True, False)] * 2  # the trainer's NHWC batches
        cfg.engine.channels_last = False
        formats.clear()
        study._step_seconds(cfg, steps=1)
        assert formats == [(False, True)] * 2
        assert ", 1 torch thread, " in study._machine(cfg)
        assert ", 2 torch threads, " in machine_description("cpu", 2)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("load, warned", [(0.2, False), (1.4, False), (1.6, True), (2.9, True)])
def test_a_busy_cpu_is_named_before_the_eta_is_trusted(finished, monkeypatch, load, warned):
    """On 2 cores a run of 1 thread still has a core to itself up to a load average of about 1 (1.5 with
    the margin); above that, the ETA's line is followed by a note naming the load (read before the probes
    add their own)."""
    grid, out, _records = finished
    assert grid.config("mgn", 0, out).engine.threads == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU machine first (engine.device=auto)
    monkeypatch.setattr(study, "cpu_info", lambda: ("Some CPU", frozenset({"avx2"}), 2))
    monkeypatch.setattr(study.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(study, "_step_seconds", lambda cfg, steps=3: 0.5)
    lines = []
    study.run_study(grid, out / "elsewhere", dry_run=True, report=lines.append)
    assert lines[0].startswith("study: 2 settings x 2 seeds = 4 runs, 0 finished; ETA ")
    if warned:
        assert lines[1] == (f"note: load average {load:.1f} on 2 cores before the study starts: other work shares "
                            "the 1 the runs train on, so the timed steps, this ETA and the runs are slower than on "
                            "a quiet machine")
    else:
        assert lines == lines[:1]
    two_threads = grid.config("mgn", 0, out)
    two_threads.engine.threads = 2
    assert bool(study._busy_cpu_note(two_threads)) == (load > 0.5)  # 2 threads need both cores free
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine from here on
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    on_gpu = grid.config("mgn", 0, out)
    on_gpu.engine.device = "auto"
    assert study._busy_cpu_note(on_gpu) == ""  # a GPU run does not share the CPU's cores
    on_cpu = grid.config("mgn", 0, out)
    on_cpu.engine.device = "cpu"  # a grid kept on the CPU of a GPU machine shares its cores all the same
    assert bool(study._busy_cpu_note(on_cpu)) == warned
    assert study._machine(on_cpu) == machine_description("cpu", 1)  # the CPU's line, not the GPU's


def test_grid_mistakes_are_one_line(grid_file, tmp_path, capsys):
    with pytest.raises(ConfigError, match="has no row 'cgpn9'"):
        study.load_grid(grid_file, rows=["cgpn9"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"rows": {"x": ["model.nmae=mgn"]}}))
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.nmae'"):
        study.load_grid(bad)
    assert main(["-q", "study", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "grid file" in capsys.readouterr().err


def test_cli_dry_run_prints_the_plan(grid_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(study, "_step_seconds", lambda cfg, steps=3: 0.5)
    assert main(["-q", "study", str(grid_file), "--out", str(tmp_path / "o"), "--rows", "mgn", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("study: 1 settings x 2 seeds = 2 runs, 0 finished; ETA ")
    assert not (tmp_path / "o").exists()


def test_eta_of_other_seeds_comes_from_the_finished_seeds(finished, grid_file, monkeypatch):
    """``--seeds 1`` on a folder where seed 0 finished: the ETA is seed 0's time, no step is timed."""
    _grid, out, records = finished
    monkeypatch.setattr(study, "_step_seconds", lambda cfg: pytest.fail("timed a probe"))
    lines = []
    only_seed_1 = study.load_grid(grid_file, seeds=[1])
    for row in only_seed_1.rows:  # seed 1 not finished: its records set aside
        (out / row / "seed1" / "study.json").rename(out / row / "seed1" / "study.json.kept")
    try:
        study.run_study(only_seed_1, out, dry_run=True, report=lines.append)
    finally:
        for row in only_seed_1.rows:
            (out / row / "seed1" / "study.json.kept").rename(out / row / "seed1" / "study.json")
    seconds = {r.row: r.seconds for r in records if r.seed == 0}
    assert f"ETA {study._duration(sum(seconds.values()))}" in lines[0]
    assert all(f"{row} ~{study._duration(t)}" in lines[0] for row, t in seconds.items())


def _same_runs(mine, theirs):
    """Records equal to the two decimals of a percentage that runs.csv keeps."""
    assert sorted((r.row, r.seed) for r in mine) == sorted((r.row, r.seed) for r in theirs)
    for r in mine:
        t = next(x for x in theirs if (x.row, x.seed) == (r.row, r.seed))
        assert (r.split, r.epochs, r.result_epoch, r.machine) == (t.split, t.epochs, t.result_epoch, t.machine)
        for a, b in ((r.rank1, t.rank1), (r.mAP, t.mAP), (r.mINP, t.mINP), (r.val_mAP, t.val_mAP),
                     *zip(r.occluded["0.2"], t.occluded["0.2"])):
            assert a == pytest.approx(b, abs=5e-5)


def test_runs_from_another_folder_count_as_finished(finished, tmp_path, monkeypatch):
    """A grid whose folder is lost resumes from its runs.csv: nothing retrained, the same table."""
    grid, out, records = finished
    monkeypatch.setattr(study, "run_one", lambda *a: pytest.fail("retrained a run of --runs-from"))
    monkeypatch.setattr(study, "_step_seconds", lambda cfg, steps=3: pytest.fail("timed a probe"))
    again = study.run_study(grid, tmp_path / "new", runs_from=out / "runs.csv", report=lambda line: None)
    _same_runs(again, records)
    rows = list(csv.DictReader((tmp_path / "new" / "runs.csv").open()))
    assert [(r["setting"], r["seed"]) for r in rows] == [("cgpn", "0"), ("cgpn", "1"), ("mgn", "0"), ("mgn", "1")]
    assert (tmp_path / "new" / "table.md").read_text().splitlines()[0] == (out / "table.md").read_text().splitlines()[0]


def test_runs_from_fills_the_gaps_and_local_runs_win(finished, grid_file, tmp_path, monkeypatch, capsys):
    grid, out, records = finished
    lines = (out / "runs.csv").read_text().splitlines()
    header = next(csv.reader([lines[0]]))
    edited = [lines[0]]
    for line in lines[1:]:
        cells = dict(zip(header, next(csv.reader([line]))))
        if cells["setting"] == "cgpn":  # a different Rank-1 for the runs the folder below also has
            cells["Rank-1"] = "99.5"
        edited.append(",".join(f'"{v}"' if "," in v else v for v in cells.values()))
    foreign = tmp_path / "foreign.csv"
    foreign.write_text("\n".join(edited) + "\n")
    import shutil

    local = tmp_path / "local"
    shutil.copytree(out / "cgpn", local / "cgpn")  # cgpn finished here, mgn only in the CSV
    monkeypatch.setattr(study, "run_one", lambda *a: pytest.fail("retrained a finished run"))
    merged = study.run_study(grid, local, runs_from=foreign, report=lambda line: None)
    _same_runs([r for r in merged if r.row == "cgpn"], [r for r in records if r.row == "cgpn"])
    _same_runs([r for r in merged if r.row == "mgn"], [r for r in records if r.row == "mgn"])
    # lines of settings the grid does not hold are skipped, not an error
    only_mgn = study.load_grid(grid_file, rows=["mgn"], seeds=[1])
    assert [(r.row, r.seed) for r in study.read_runs_csv(foreign, only_mgn)] == [("mgn", 1)]
    # the CLI: a dry run trains nothing, writes the table of the finished runs, says so
    assert main(["-q", "study", str(grid_file), "--out", str(tmp_path / "dry"), "--runs-from", str(foreign),
                 "--rows", "mgn", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("study: 1 settings x 2 seeds = 2 runs, 2 finished; ETA 0 min 00 s")
    assert "2 finished runs; table:" in printed
    table = (tmp_path / "dry" / "table.md").read_text().splitlines()
    mgn = [100 * r.rank1 for r in records if r.row == "mgn"]
    assert table[2].startswith(f"| mgn | 2 | {np.mean(mgn):.1f} ± {np.std(mgn, ddof=1):.1f} |")


def test_runs_from_mistakes_are_one_line(finished, grid_file, tmp_path, capsys):
    grid, out, _records = finished
    with pytest.raises(ConfigError, match="does not exist"):
        study.read_runs_csv(tmp_path / "none.csv", grid)
    header = (out / "runs.csv").read_bytes().split(b"\n")[0]
    for name, content, message in (("empty.csv", b"", "is empty"),
                                   ("binary.csv", bytes(range(128, 256)) * 20, "cannot read --runs-from"),
                                   ("cut.csv", header + b'\ncgpn,0,val,1,1,5,"x', "cannot read --runs-from")):
        (tmp_path / name).write_bytes(content)  # zero bytes, not text, a quote the end of the file cut short
        with pytest.raises(ConfigError, match=message):
            study.read_runs_csv(tmp_path / name, grid)
    with pytest.raises(ConfigError, match=r"is the runs\.csv this study writes"):  # nothing rewritten, lost
        study.run_study(grid, out, runs_from=out / "runs.csv", dry_run=True, report=lambda line: None)
    other = tmp_path / "grid2.yaml"
    data = yaml.safe_load(grid_file.read_text())
    other.write_text(yaml.safe_dump({**data, "occlude": [0.1, 0.3]}))
    with pytest.raises(ConfigError, match=r"has the columns .*mAP 20% hidden.*this grid's runs.csv has .*"
                                          r"mAP 10% hidden"):
        study.read_runs_csv(out / "runs.csv", study.load_grid(other))
    broken = tmp_path / "broken.csv"
    text = (out / "runs.csv").read_text().splitlines()
    broken.write_text("\n".join([text[0], text[1].replace(",val,", ",val,x", 1), *text[2:]]) + "\n")
    with pytest.raises(ConfigError, match="line 2 is not a run"):
        study.read_runs_csv(broken, grid)
    short = tmp_path / "short.csv"
    short.write_text("\n".join([text[0], "cgpn,0,val"]) + "\n")
    with pytest.raises(ConfigError, match=r"line 2 is not a run \(3 values for"):
        study.read_runs_csv(short, grid)
    assert main(["-q", "study", str(grid_file), "--out", str(tmp_path / "o"), "--runs-from", str(broken),
                 "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "line 2 is not a run" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("grid_name, runs_name, at_least", [("table2", "study_runs", 7), ("table2_256", "study256_runs", 6)])
def test_the_projects_own_runs_csvs_read_back_into_their_grids(grid_name, runs_name, at_least):
    """docs/study_runs.csv and docs/study256_runs.csv (the study's finished runs, kept in the repository) are
    what --runs-from takes for their grids: every line a run of the grid, trained for its row's schedule."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    grid = study.load_grid(root / "configs" / "studies" / f"{grid_name}.yaml")
    runs_file = root / "docs" / f"{runs_name}.csv"
    records = study.read_runs_csv(runs_file, grid)
    assert len(records) == len(runs_file.read_text().splitlines()) - 1 >= at_least  # every line is a run of the grid
    assert len({(r.row, r.seed) for r in records}) == len(records)
    finished = [r for r in records if not r.diverged]
    assert all(r.split == "val" and 0 < r.rank1 <= 1 and r.machine for r in finished)
    # each run trained for its own row's schedule (table2's cgpn_long: 48 epochs; the rest: the grid's 20)
    assert all(r.epochs == grid.config(r.row, r.seed, Path("unused")).solver.epochs for r in finished)
    assert {r.epochs for r in finished if r.row == "cgpn_long"} <= {48}
    assert {r.epochs for r in finished if r.row != "cgpn_long"} == {20}
    assert all(np.isnan(r.rank1) and "loss term" in r.diverged for r in records if r.diverged)


def test_a_run_that_diverges_is_a_result_not_a_crash(grid_file, finished, tmp_path, monkeypatch):
    """A setting whose loss goes non-finite is recorded as diverged (not retrained on resume, apart in the
    table, a line of runs.csv that reads back) and the grid goes on."""
    grid, _out, records = finished
    data = yaml.safe_load(grid_file.read_text())
    boom_file = tmp_path / "boom.yaml"
    boom_file.write_text(yaml.safe_dump({**data, "seeds": [0], "rows": {"boom": ["solver.lr=1e30"]}}))
    boom = study.load_grid(boom_file)
    lines = []
    [record] = study.run_study(boom, tmp_path / "b", report=lines.append)
    assert record.diverged.startswith("loss term '") and " at epoch 1, iteration " in record.diverged
    assert np.isnan([record.rank1, record.mAP, record.mINP, *record.occluded["0.2"]]).all()
    assert lines[-1].startswith(f"[1/1] boom, seed 0: diverged, {record.diverged} (")
    monkeypatch.setattr(study, "run_one", lambda *a: pytest.fail("trained a diverged run again"))
    [again] = study.run_study(boom, tmp_path / "b", report=lambda line: None)
    assert again.diverged == record.diverged
    table = (tmp_path / "b" / "table.md").read_text().splitlines()
    assert table[2].startswith("| boom | 0 + 1 diverged | diverged | diverged |")
    [line] = list(csv.DictReader((tmp_path / "b" / "runs.csv").open()))
    assert line["diverged"] == record.diverged and line["Rank-1"] == line["mAP"] == "" and line["val_mAP"] == ""
    [back] = study.read_runs_csv(tmp_path / "b" / "runs.csv", boom)
    assert (back.row, back.seed, back.diverged) == ("boom", 0, record.diverged) and np.isnan(back.mAP)
    # beside finished seeds: the mean and spread are theirs alone, the diverged seed is counted apart
    mixed = [*records, study.RunRecord.of_diverged("cgpn", 2, 1, grid.occlude, "loss term 'ce' is nan", 1.0, "")]
    row = next(x for x in study.study_table(grid, mixed).splitlines() if x.startswith("| cgpn |"))
    maps = [100 * r.mAP for r in records if r.row == "cgpn"]
    assert row.startswith("| cgpn | 2 + 1 diverged | ") and f"| {np.mean(maps):.1f} ± {np.std(maps, ddof=1):.1f} |" in row


def test_runs_csv_written_before_the_diverged_column_still_reads(finished, tmp_path):
    grid, out, records = finished
    rows = list(csv.reader((out / "runs.csv").open()))
    assert rows[0][-1] == "diverged"
    old = tmp_path / "old.csv"
    old.write_text("".join(",".join(f'"{v}"' if "," in v else v for v in r[:-1]) + "\n" for r in rows))
    _same_runs(study.read_runs_csv(old, grid), records)


def test_the_larger_scale_grid_is_table2s_cgpn_and_mgn_at_256_by_128():
    """configs/studies/table2_256.yaml changes one thing against table2.yaml: the input size (4x the pixels)."""
    from pathlib import Path

    studies = Path(__file__).resolve().parents[1] / "configs" / "studies"
    small, large = study.load_grid(studies / "table2.yaml"), study.load_grid(studies / "table2_256.yaml")
    assert list(large.rows) == ["cgpn", "mgn"] and (large.seeds, large.occlude) == (small.seeds, small.occlude)
    for row in large.rows:
        a = small.config(row, 0, Path("unused")).to_dict()
        b = large.config(row, 0, Path("unused")).to_dict()
        assert (b["data"]["height"], b["data"]["width"]) == (256, 128) == (2 * a["data"]["height"], 2 * a["data"]["width"])
        a["data"].update(height=256, width=128)
        assert a == b
