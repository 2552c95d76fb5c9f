"""The training engine in one process: run folder contents, scalars, checkpoints, failures, settings."""

from __future__ import annotations

import csv
import os
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from _engine_tiny import model_state, tiny_overrides
from cgpn.cli import main
from cgpn.config import Config, load_config
from cgpn.data.datasets.synthetic import PRESETS, generate_synthetic
from cgpn.engine.trainer import train
from cgpn.errors import CgpnError, ConfigError, TrainingDivergedError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TAGS = {"train/ce", "train/triplet", "train/mse", "train/total", "train/lr", "train/images_per_s",
        "test/rank1", "test/mAP", "test/mINP"}


def _torch_globals() -> tuple:
    return (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
            torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark)


@pytest.fixture(autouse=True)
def _torch_globals_unchanged():
    """A run changes process-wide torch settings (threads, deterministic kernels, TF32) and puts them back."""
    before = _torch_globals()
    yield
    assert _torch_globals() == before


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory):
    """2 epochs x 4 iterations (batch 12) with evaluations before, after epoch 1 and after epoch 2.

    Trained once per test session: under pytest-xdist the first worker trains, the others wait on a file
    lock and rebuild the result from the run's last.pt.
    """
    from filelock import FileLock

    from cgpn.data.datasets.synthetic import PRESETS, generate_synthetic
    from cgpn.engine.checkpoint import rank_result_from_state
    from cgpn.engine.trainer import TrainResult

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the session's folder, common to all its workers
    out, data = shared / "engine_tiny_run", shared / "engine_tiny_data"  # one data folder: configs agree
    cfg = load_config(None, tiny_overrides(data, out, **{
        "data.batch_size": 12, "engine.eval_period": 1, "engine.eval_at_start": "true",
        "engine.tensorboard": "true", "engine.checkpoint_steps": 1, "engine.keep_last": 3}))
    with FileLock(str(shared / "engine_tiny_run.lock")):
        if not (data / "done").is_file():
            generate_synthetic(data, PRESETS["tiny"], progress=False)
            (data / "done").touch()
        if (out / "done").is_file():
            state = torch.load(out / "last.pt", weights_only=True)
            result = TrainResult(out / "last.pt", state["epoch_losses"],
                                 {e: rank_result_from_state(r) for e, r in state["evaluations"].items()},
                                 out / "best.pt")
        else:
            result = train(cfg)
            (out / "done").touch()
    return namedtuple("TinyRun", "out cfg result")(out, cfg, result)


def _csv(run: Path) -> dict[str, list[tuple[int, int, float]]]:
    series: dict[str, list[tuple[int, int, float]]] = {}
    with (run / "metrics.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            series.setdefault(row["tag"], []).append((int(row["step"]), int(row["epoch"]), float(row["value"])))
    return series


def test_run_folder_and_result(tiny_run) -> None:
    out, cfg, result = tiny_run
    assert sorted(result.evaluations) == [0, 1, 2]  # untrained, then every epoch
    assert len(result.epoch_losses) == 2 and set(result.epoch_losses[0]) == {"ce", "triplet", "mse", "total"}
    assert result.checkpoint == out / "last.pt" and load_config(out / "config.yaml").to_dict() == cfg.to_dict()
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert steps == ["step_00000006.pt", "step_00000007.pt", "step_00000008.pt"]  # engine.keep_last = 3
    last = torch.load(out / "last.pt", weights_only=True)
    assert (last["epoch"], last["batch"], last["step"]) == (2, 0, 8)
    assert Config.from_dict(last["config"]).to_dict() == cfg.to_dict() and last["num_classes"] == 8
    best_epoch = max((1, 2), key=lambda e: result.evaluations[e].mAP)
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["step"] == 4 * best_epoch and result.best_checkpoint == out / "best.pt"
    assert best["best"] == [best_epoch, pytest.approx(result.evaluations[best_epoch].mAP)]


def test_csv_and_tensorboard_scalars(tiny_run) -> None:
    """metrics.csv and TensorBoard (read back with TensorBoard's own reader) hold the same scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, result = tiny_run
    series = _csv(out)
    assert set(series) == TAGS
    assert [s for s, _, _ in series["train/total"]] == list(range(1, 9))  # engine.log_period = 1
    assert [v for _, e, v in series["train/lr"]] == [0.01] * 4 + [pytest.approx(0.001)] * 4  # milestone [1]
    assert [(s, e) for s, e, _ in series["test/mAP"]] == [(0, 0), (4, 1), (8, 2)]
    for epoch in (0, 1, 2):
        assert series["test/rank1"][epoch][2] == pytest.approx(result.evaluations[epoch].rank(1))
    # the epoch's mean of train/total is what TrainResult reports
    assert sum(v for _, e, v in series["train/total"] if e == 2) / 4 == pytest.approx(result.epoch_losses[1]["total"])

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == TAGS
    for tag in TAGS - {"train/images_per_s"}:
        tb = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert tb == [(s, pytest.approx(v, rel=1e-6)) for s, _, v in series[tag]]


def test_show_curves_draws_png(tiny_run, tmp_path: Path, capsys: pytest.CaptureFixture,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """README: `cgpn show --curves RUN` draws loss, lr, speed and Rank-1 / mAP: each panel's lines are the
    series of metrics.csv (read here with the csv module), evaluations in percent."""
    from matplotlib.figure import Figure

    drawn = []
    savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (drawn.append(fig), savefig(fig, *a, **k))[1])
    out = tmp_path / "curves.png"
    assert main(["show", "--curves", str(tiny_run.out), "--out", str(out)]) == 0
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > 1000
    (fig,) = drawn
    assert [ax.get_title() for ax in fig.axes] == ["loss terms", "learning rate", "images / s", "evaluation (%)"]
    series = _csv(tiny_run.out)
    expected = [{t.split("/")[1]: series[t] for t in ("train/ce", "train/triplet", "train/mse", "train/total")},
                {"lr": series["train/lr"]}, {"train": series["train/images_per_s"]},
                {f"test {name}": [(s, e, 100 * v) for s, e, v in series[f"test/{tag}"]]
                 for tag, name in (("rank1", "Rank-1"), ("mAP", "mAP"))}]
    for ax, curves in zip(fig.axes, expected):
        lines = {line.get_label(): line.get_xydata().tolist() for line in ax.get_lines()}
        assert lines.keys() == curves.keys(), ax.get_title()
        for name, points in curves.items():
            np.testing.assert_allclose(lines[name], [(s, v) for s, _, v in points], rtol=1e-6, err_msg=name)
    assert main(["show", "--curves", str(tmp_path), "--out", str(out)]) == 2  # a folder without metrics.csv
    assert "metrics.csv" in capsys.readouterr().err


def test_resume_of_a_finished_run_restores_its_record(tiny_run, tmp_path: Path) -> None:
    """--resume auto of a finished run trains nothing; its evaluations and losses are the ones metrics.csv
    recorded while the run trained."""
    run = tmp_path / "copy"
    shutil.copytree(tiny_run.out, run)
    cfg = load_config(run / "config.yaml", [f"output_dir={run}"])
    again = train(cfg, resume="auto")
    series = _csv(tiny_run.out)
    assert sorted(again.evaluations) == [0, 1, 2]
    for e in (0, 1, 2):
        assert again.evaluations[e].mAP == pytest.approx(series["test/mAP"][e][2], rel=1e-6)
        assert again.evaluations[e].rank(1) == pytest.approx(series["test/rank1"][e][2], rel=1e-6)
    for e in (1, 2):
        totals = [v for _, epoch, v in series["train/total"] if epoch == e]
        assert again.epoch_losses[e - 1]["total"] == pytest.approx(sum(totals) / 4, rel=1e-6)
    assert _csv(run) == series  # rows up to the resumed step are kept as they were


def test_a_folder_holds_one_run(tiny_run) -> None:
    """A fresh start in a run's folder, or a resume behind checkpoints that exist, is refused: pruning and
    --resume auto go by step number, so the other files would take this run's place. Nothing is written."""
    before = sorted(p.name for p in (tiny_run.out / "checkpoints").iterdir())
    cfg = load_config(tiny_run.out / "config.yaml")
    with pytest.raises(ConfigError, match=r"already holds a run \(step_00000008.pt\); continue it with --resume auto"):
        train(cfg)
    with pytest.raises(ConfigError, match=r"after the one resumed \(step 6\): step_00000007.pt, step_00000008.pt"):
        train(cfg, resume=str(tiny_run.out / "checkpoints" / "step_00000006.pt"))
    assert sorted(p.name for p in (tiny_run.out / "checkpoints").iterdir()) == before


@pytest.fixture(scope="module")
def five_ids(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("five_ids")
    generate_synthetic(out, PRESETS["tiny"].__class__(**{**PRESETS["tiny"].__dict__, "train_ids": 5}), progress=False)
    return out


@pytest.mark.parametrize("change", ["backbone", "classes"])
def test_resume_with_another_model_is_one_line(tiny_run, five_ids: Path, tmp_path: Path, change: str,
                                               capsys: pytest.CaptureFixture) -> None:
    """Another architecture, or another class count (5 identities instead of 8): exit 2, one line."""
    root = five_ids if change == "classes" else tiny_run.cfg.data.root
    sets = tiny_overrides(root, tmp_path / "run", **({"model.backbone": "resnet34"} if change == "backbone" else {}))
    code = main(["train", *(a for s in sets for a in ("--set", s)), "--resume", str(tiny_run.out / "last.pt")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "does not fit this model" in err and "last.pt" in err
    assert ("other shape: heads.g1.classifier.weight" in err) if change == "classes" else ("missing" in err)
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_finetune_loads_all_but_the_classifiers(tiny_run, five_ids: Path, tmp_path: Path) -> None:
    cfg = load_config(None, tiny_overrides(five_ids, tmp_path / "ft", **{"solver.epochs": 0}))
    model = train(cfg, finetune=str(tiny_run.out / "last.pt")).model
    source = model_state(tiny_run.out / "last.pt")
    mine = model.state_dict()
    classifiers = [k for k in mine if ".classifier." in k]
    assert classifiers and all(mine[k].shape[0] == 5 for k in classifiers)
    assert all(torch.equal(mine[k], source[k]) for k in mine if k not in classifiers)
    with pytest.raises(ConfigError, match="exclude each other"):
        train(cfg, resume="auto", finetune=str(tiny_run.out / "last.pt"))


def test_nan_loss_stops_naming_step_and_term(tiny_synth: Path, tmp_path: Path) -> None:
    """lr 1e4 blows the weights up: the run stops at the first non-finite loss term, before that update,
    and the last checkpoint (one per iteration here) holds finite weights."""
    cfg = load_config(None, tiny_overrides(tiny_synth, tmp_path / "run", **{"solver.lr": "1e4",
                                                                           "engine.checkpoint_steps": 1}))
    with pytest.raises(TrainingDivergedError, match=r"loss term '\w+' is (nan|inf|-inf) at epoch 1, iteration (\d+) "
                                                    r"\(step \d+\); stopped before that update") as info:
        train(cfg)
    step = int(str(info.value).split("(step ")[1].split(")")[0])
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert last["step"] == step - 1 and f"step_{step - 1:08d}.pt" in str(info.value)
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_unwritable_or_full_run_folder_fails_before_training(tiny_synth: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    sets = tiny_overrides(tiny_synth, blocker / "run")
    assert main(["train", *(a for s in sets for a in ("--set", s))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not writable" in err and str(blocker / "run") in err

    import cgpn.engine.checkpoint as ckpt

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: usage(10 * 2**20, 9 * 2**20, 2**20))
    run = tmp_path / "full"
    with pytest.raises(ConfigError, match=r"has 1 MiB free but the checkpoints of this run need about \d+ MiB"):
        train(load_config(None, tiny_overrides(tiny_synth, run)))
    assert not (run / "metrics.csv").exists() and not (run / "checkpoints").exists()


def test_config_precedence_defaults_yaml_set(tmp_path: Path) -> None:
    """defaults < base YAML < YAML < --set, for engine and solver keys alike."""
    (tmp_path / "base.yaml").write_text("solver:\n  lr: 0.05\n  epochs: 5\nengine:\n  precision: bf16\n")
    (tmp_path / "run.yaml").write_text("_base_: base.yaml\nsolver:\n  epochs: 7\nengine:\n  keep_last: 4\n")
    cfg = load_config(tmp_path / "run.yaml", ["solver.epochs=9", "engine.precision=fp32", "solver.lr=1e-3"])
    assert (cfg.solver.lr, cfg.solver.epochs, cfg.solver.momentum) == (0.001, 9, 0.9)
    assert (cfg.engine.precision, cfg.engine.keep_last, cfg.engine.channels_last) == ("fp32", 4, True)
    cfg = load_config(tmp_path / "run.yaml")
    assert (cfg.solver.lr, cfg.solver.epochs, cfg.engine.precision) == (0.05, 7, "bf16")
    with pytest.raises(ConfigError, match=r"engine\.keep_lsat.*keep_last"):
        load_config(None, ["engine.keep_lsat=3"])


PAPER = {"model.backbone": "resnet50", "model.pretrained": True, "data.height": 384, "data.width": 128,
         "data.batch_size": 64, "data.num_instances": 8, "solver.optimizer": "sgd", "solver.lr": 0.01,
         "solver.momentum": 0.9, "solver.weight_decay": 5e-4, "solver.milestones": [60, 80], "solver.gamma": 0.1,
         "solver.epochs": 240, "data.flip_prob": 0.5, "data.random_erasing": 0.0, "test.flip": True,
         "loss.triplet_margin": 1.2}  # Section 4.2 of the paper / SPEC.md


@pytest.mark.parametrize("name, model", [
    ("market1501", "cgpn"), ("dukemtmc", "cgpn"), ("cuhk03_labeled", "cgpn"), ("cuhk03_detected", "cgpn"),
    ("cgpn1", "cgpn1"), ("cgpn2", "cgpn2"), ("cgpn3", "cgpn3"), ("cgpn4", "cgpn4"), ("mgn", "mgn")])
def test_paper_recipes(name: str, model: str) -> None:
    cfg = load_config(CONFIGS / f"{name}.yaml").to_dict()
    for key, value in {**PAPER, "model.name": model}.items():
        section, field = key.split(".")
        assert cfg[section][field] == value, key
    if name.startswith("cuhk03"):
        assert cfg["data"]["cuhk03_labeled"] is (name == "cuhk03_labeled")


def test_every_config_loads_and_demo_keeps_its_values() -> None:
    from cgpn.study import load_grid

    for path in CONFIGS.glob("*.yaml"):
        load_config(path)
    for path in CONFIGS.glob("studies/*.yaml"):  # cgpn study grids: load_grid resolves every run's config
        assert load_grid(path).rows
    demo = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    cfg = load_config(CONFIGS / "demo.yaml").to_dict()
    for section, values in demo.items():
        if isinstance(values, dict):
            assert all(cfg[section][k] == v for k, v in values.items()), section


def test_bad_engine_settings(tiny_synth: Path, tmp_path: Path) -> None:
    for key, value, match in [("engine.precision", "fp8", "'engine.precision' must be one of auto, fp32, bf16, fp16"),
                              ("engine.precision", "fp16", "needs a CUDA GPU"),
                              ("engine.triplet_scope", "world", "'engine.triplet_scope' must be one of rank, global"),
                              ("engine.keep_last", 0, "'engine.keep_last' must be >= 1, got 0")]:
        with pytest.raises(CgpnError, match=match):
            train(load_config(None, tiny_overrides(tiny_synth, tmp_path / "x", **{key: value})))


def test_precision_auto_follows_the_cpu_flags() -> None:
    """auto on the CPU: bf16 only where /proc/cpuinfo lists native bf16 (avx512_bf16 or amx_bf16)."""
    from cgpn.engine.precision import resolve_precision

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo")
    flags = set(cpuinfo.read_text().split())
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    p = resolve_precision("auto", torch.device("cpu"))
    assert p.name == ("bf16" if native else "fp32") and not p.scaled
    assert resolve_precision("bf16", torch.device("cpu")).dtype == torch.bfloat16


@pytest.mark.parametrize("native", [True, False])
def test_precision_auto_on_each_kind_of_cpu(native: bool, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """README: engine.precision=auto resolves to bf16 autocast where the CPU has native bf16 (AVX512-BF16 / AMX)
    and to fp32 where it does not (AVX2 only), whatever this machine is (the CPU probe is replaced); fp16 is
    refused on the CPU, and bf16 asked for without native units is warned of."""
    import cgpn.engine.precision as precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    auto = precision.resolve_precision("auto", cpu)
    assert auto.name == ("bf16" if native else "fp32") and not auto.scaled
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        precision.resolve_precision("fp16", cpu)
    caplog.clear()
    with caplog.at_level("WARNING", logger=precision.logger.name):
        assert precision.resolve_precision("bf16", cpu).dtype == torch.bfloat16
    assert ("slower than fp32" in caplog.text) is not native


def test_training_batches_depend_only_on_seed_epoch_and_batch(tiny_synth: Path) -> None:
    """Same images and the same random flips/erasing with 0 or 2 worker processes, and when an epoch
    is started in the middle (resume); another epoch draws other batches."""
    from cgpn.data.datasets import build_dataset
    from cgpn.data.loader import build_train_loader

    train_set = build_dataset("synthetic", tiny_synth).train
    cfg = load_config(None, ["data.height=32", "data.width=16", "data.batch_size=8", "data.num_instances=2",
                             "data.epoch_mode=images", "data.random_erasing=0.5"]).data

    def epoch(workers: int, index: int, start: int = 0) -> list[torch.Tensor]:
        cfg.workers = workers
        loader = build_train_loader(train_set, cfg, seed=3)
        loader.batch_sampler.set_epoch(index, start)
        return [images for images, *_ in loader]

    ref = epoch(0, 1)
    assert len(ref) == 6
    for other in (epoch(2, 1), [*ref[:2], *epoch(0, 1, start=2)]):
        assert len(other) == 6 and all(torch.equal(a, b) for a, b in zip(ref, other))
    assert not torch.equal(ref[0], epoch(0, 2)[0])
    flipped = [torch.equal(img, img.flip(2)) for batch in ref for img in batch]
    assert not any(flipped)  # (sanity: the synthetic images are not mirror-symmetric)


def test_a_failed_evaluation_keeps_the_epochs_checkpoint(tiny_synth: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A corrupt test image found at the first evaluation after hours of training: the epoch's weights are
    saved before the error stops the run, and the signal handlers of the run are taken down."""
    import signal

    import cgpn.engine.trainer as trainer_module
    from cgpn.errors import ImageError

    def broken_evaluation(*args, **kwargs):
        raise ImageError("cannot read image 'query/0001_c1s1_000001_00.jpg': image file is truncated")

    monkeypatch.setattr(trainer_module, "evaluate_model", broken_evaluation)
    handler = signal.getsignal(signal.SIGINT)
    run = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(tiny_synth, run, **{"engine.eval_period": 1,
                                                               "engine.checkpoint_period": 5}))
    with pytest.raises(ImageError, match="truncated"):
        train(cfg)
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and last["batch"] == 0  # epoch 1 done and saved, though not a checkpoint epoch
    assert signal.getsignal(signal.SIGINT) is handler

    at_start = load_config(None, tiny_overrides(tiny_synth, tmp_path / "start", **{"engine.eval_at_start": "true"}))
    with pytest.raises(ImageError, match="truncated"):
        train(at_start)
    assert signal.getsignal(signal.SIGINT) is handler  # also when the evaluation before training fails
    assert not (tmp_path / "start" / "last.pt").exists()


def test_resume_takes_the_new_solver_settings(tiny_synth: Path, tmp_path: Path) -> None:
    """Resumed with solver.lr 0.02 instead of 0.01: the second epoch runs at 0.02 x gamma (milestone 1), not at
    the checkpoint's 0.001; the momentum buffers still come from the checkpoint."""
    run = tmp_path / "run"
    train(load_config(None, tiny_overrides(tiny_synth, run, **{"solver.epochs": 1, "solver.lr": 0.01})))
    train(load_config(None, tiny_overrides(tiny_synth, run, **{"solver.lr": 0.02})), resume="auto")
    with (run / "metrics.csv").open() as f:
        lrs = {(int(r["epoch"]), float(r["value"])) for r in csv.DictReader(f) if r["tag"] == "train/lr"}
    assert {lr for e, lr in lrs if e == 1} == {0.01}  # metrics.csv counts epochs from 1
    assert {round(lr, 12) for e, lr in lrs if e == 2} == {0.002}


def test_resume_from_a_path_takes_that_runs_settings(tiny_run, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """cgpn train --resume runs/x/last.pt (no --config): the run's own settings, not the defaults'."""
    run = tmp_path / "copy"
    shutil.copytree(tiny_run.out, run)
    code = main(["-q", "train", "--resume", str(run / "last.pt"), "--set", f"output_dir={run}"])
    out = capsys.readouterr().out
    assert code == 0 and f"checkpoint: {run / 'last.pt'}" in out  # trained nothing more: it was finished


def test_checkpoint_folder_with_a_users_file_and_a_cut_short_save(tmp_path: Path) -> None:
    from cgpn.engine.checkpoint import Checkpointer, step_checkpoints

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in ("step_00000002.pt", "step_best.pt", ".step_00000003.tmp.pt"):
        (folder / name).write_bytes(b"x")
    assert step_checkpoints(tmp_path) == {2: folder / "step_00000002.pt"}  # step_best.pt is not a step
    assert Checkpointer(tmp_path).remove_partial_saves() == [folder / ".step_00000003.tmp.pt"]
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000002.pt", "step_best.pt"]


def test_schedule_warm_up_then_steps_by_hand() -> None:
    """lr 0.03, 3 warm-up epochs, x0.1 at epoch 5: 0.01, 0.02, 0.03, 0.03, 0.03, 0.003, 0.003."""
    from cgpn.engine.trainer import build_optimizer, build_scheduler

    cfg = load_config(None, ["solver.lr=0.03", "solver.warmup_epochs=3", "solver.milestones=[5]",
                             "solver.gamma=0.1"])
    optimizer = build_optimizer(torch.nn.Linear(2, 2), cfg)
    scheduler = build_scheduler(optimizer, cfg)
    lrs = []
    for _ in range(7):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # as in training: an epoch of steps, then the scheduler
        scheduler.step()
    assert lrs == pytest.approx([0.01, 0.02, 0.03, 0.03, 0.03, 0.003, 0.003])


def test_cpu_bf16_is_not_used_where_a_strided_conv_makes_a_one_pixel_wide_output(tiny_synth: Path, tmp_path: Path,
                                                                                   caplog: pytest.LogCaptureFixture):
    """A stride-2 3 x 3 convolution (padding 1) makes ceil(w / 2) columns of w, as do the stem and the max
    pool: 16 pixels become 8, 4, 2, then 1 after layer3's first block, in the trunk every model shares, and
    MGN's stride-2 global branch makes 1 of it again in layer4; 17 become 9, 5, 3, 2 and only MGN's layer4
    then makes 1 (so does it from 32 pixels); 33 become 3 after layer3, 2 after layer4. There, CPU bf16
    convolutions are unreliable (NaN weight gradients on AVX512-BF16, wrong outputs on AMX)."""
    from cgpn.engine.precision import narrow_strided_convs
    from cgpn.model import build_model

    mgn = build_model("mgn", 5, backbone="resnet18", pretrained=False)
    cgpn = build_model("cgpn", 5, backbone="resnet18", pretrained=False)
    assert narrow_strided_convs(mgn, 32, 16) == ["trunk.layer3.0.conv1", "branches.0.layer4.0.conv1"]
    assert narrow_strided_convs(mgn, 32, 17) == narrow_strided_convs(mgn, 64, 32) == ["branches.0.layer4.0.conv1"]
    assert narrow_strided_convs(mgn, 64, 33) == narrow_strided_convs(cgpn, 32, 17) == []
    assert narrow_strided_convs(cgpn, 32, 16) == ["trunk.layer3.0.conv1"]
    assert mgn.training  # left as it was

    with pytest.raises(ConfigError, match=r"engine.precision=bf16: at data.width=16 .*trunk.layer3.0.conv1"):
        train(load_config(None, tiny_overrides(tiny_synth, tmp_path / "bf16", **{
            "model.name": "mgn", "engine.precision": "bf16", "solver.epochs": 1})))
    assert not (tmp_path / "bf16" / "config.yaml").exists()  # refused before the run folder is written
    if resolve_precision_auto_is_bf16():
        with caplog.at_level("INFO", logger="cgpn"):
            train(load_config(None, tiny_overrides(tiny_synth, tmp_path / "auto", **{
                "model.name": "mgn", "solver.epochs": 1})))
        assert "engine.precision=auto: fp32, not bf16" in caplog.text


def resolve_precision_auto_is_bf16() -> bool:
    from cgpn.engine.precision import resolve_precision

    return resolve_precision("auto", torch.device("cpu")).name == "bf16"
