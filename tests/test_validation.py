"""Model selection without the test set (data.val_ids): the held-out identities, computed by hand from the
hash; periodic evaluations and best.pt on the validation split; the test split evaluated once, on best.pt."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from torch import nn

from _engine_tiny import tiny_overrides
from cgpn.cli import main
from cgpn.config import load_config
from cgpn.data.datasets import dataset_from_config
from cgpn.data.datasets.base import ReidDataset, Sample
from cgpn.engine.checkpoint import load_model
from cgpn.engine.evaluation import evaluate_model
from cgpn.engine.events import read_metrics
from cgpn.engine.hooks import FinalTest
from cgpn.engine.trainer import train
from cgpn.errors import ConfigError, DatasetError


def _by_hand(names: list[str], amount: float, seed: int) -> set[str]:
    """The identities a hash split holds out, computed here from zlib.crc32 (not cgpn's helper)."""
    h = {n: zlib.crc32(f"{seed}/{n}".encode()) for n in names}
    ordered = sorted(names, key=lambda n: (h[n], n))
    count = sum(h[n] < amount * 2**32 for n in names) if amount < 1 else int(amount)
    return set(ordered[:min(len(names) - 1, max(1, count))])


def _toy(num_ids: int, cams: int = 2, per_cam: int = 3, first_pid: int = 100) -> ReidDataset:
    train = [Sample(f"t/{pid}_{c}_{i}.jpg", pid, c) for pid in range(first_pid, first_pid + num_ids)
             for c in range(cams) for i in range(per_cam)]
    return ReidDataset(train, [Sample("q.jpg", 1, 0)], [Sample("g.jpg", 1, 1)])


@pytest.mark.parametrize(("amount", "seed"), [(0.25, 0), (0.25, 3), (0.5, 1), (5, 0), (1, 7)])
def test_held_out_identities_are_the_lowest_hashes(amount, seed):
    ds = _toy(20)
    before = {s.path: s for s in ds.train}
    ds.hold_out_validation(amount, seed)
    held = {s.path.split("/")[1].split("_")[0] for s in ds.val_query + ds.val_gallery}
    assert held == _by_hand([str(p) for p in range(100, 120)], amount, seed)
    # training keeps the others, relabelled 0..N-1; no image is in both
    kept_pids = {s.path.split("/")[1].split("_")[0] for s in ds.train}
    assert kept_pids == {str(p) for p in range(100, 120)} - held
    assert sorted({s.pid for s in ds.train}) == list(range(20 - len(held)))
    assert not {s.path for s in ds.train} & {s.path for s in ds.val_query + ds.val_gallery}
    assert len(ds.train) + len(ds.val_query) + len(ds.val_gallery) == len(before)
    # one query per camera per identity, each with a gallery image of its identity from another camera
    assert len(ds.val_query) == 2 * len(held)
    for q in ds.val_query:
        assert any(g.pid == q.pid and g.camid != q.camid for g in ds.val_gallery)


def test_adding_identities_does_not_move_the_held_out_ones():
    small, large = _toy(30), _toy(45)  # the same 30 identities, then 15 more
    small.hold_out_validation(0.2, 0)
    large.hold_out_validation(0.2, 0)
    names = lambda ds: {s.path.split("/")[1].split("_")[0] for s in ds.val_query + ds.val_gallery}  # noqa: E731
    assert names(large) & {str(p) for p in range(100, 130)} == names(small)


def test_identities_seen_by_one_camera_cannot_make_a_validation_query():
    with pytest.raises(DatasetError, match="has images from two cameras"):
        _toy(10, cams=1).hold_out_validation(0.3, 0)


def test_val_ids_must_be_a_fraction_or_a_whole_count(tiny_synth):
    with pytest.raises(ConfigError, match=r"data\.val_ids"):
        load_config(None, ["data.val_ids=2.5"])
    with pytest.raises(ConfigError, match=r"data\.val_ids"):
        load_config(None, ["data.val_ids=-1"])
    cfg = load_config(None, ["data.dataset=synthetic", f"data.root={tiny_synth}"])
    with pytest.raises(ConfigError, match="no validation split"):
        dataset_from_config(cfg.data).split("val")


def test_a_run_with_a_validation_split_selects_and_reports_honestly(tiny_synth, tmp_path):
    cfg = load_config(None, tiny_overrides(tiny_synth, tmp_path / "run", **{
        "data.val_ids": 2, "solver.epochs": 3, "solver.milestones": "[2]", "engine.eval_period": 1}))
    dataset = dataset_from_config(cfg.data)
    assert dataset.num_train_pids == 6 and len({s.pid for s in dataset.val_gallery}) == 2
    result = train(cfg)
    assert result.split == "val" and set(result.evaluations) == {1, 2, 3}
    # every periodic figure is the validation split's: recompute the last from last.pt's weights
    model, saved = load_model(result.checkpoint)
    val = evaluate_model(model, dataset, saved, torch.device("cpu"), "val")
    assert val.mAP == pytest.approx(result.evaluations[3].mAP, abs=1e-6)
    # best.pt is the epoch of the highest validation mAP (first one on ties)
    maps = {e: r.mAP for e, r in result.evaluations.items()}
    best_epoch = max(maps, key=lambda e: (maps[e], -e))
    assert result.test_epoch == best_epoch
    best_model, _ = load_model(result.best_checkpoint)
    test = evaluate_model(best_model, dataset, saved, torch.device("cpu"), "test")
    assert result.test.mAP == pytest.approx(test.mAP, abs=1e-6)
    assert result.test.rank(1) == pytest.approx(test.rank(1), abs=1e-6)
    series = read_metrics(tmp_path / "run")
    assert [e for _, e, _ in series["val/mAP"]] == [1, 2, 3]
    assert series["test/mAP"] == [(series["test/mAP"][0][0], best_epoch, pytest.approx(test.mAP, abs=1e-6))]


class _Holder:
    """What FinalTest reads of a trainer."""

    def __init__(self, model: nn.Module, epoch: int, best: int) -> None:
        self.model, self.epoch, self.max_epochs, self.best = model, epoch, epoch, (best, 0.5)
        self.failed_evaluation, self.metrics, self.test_result, self.device = None, None, None, torch.device("cpu")


@pytest.mark.parametrize("best_epoch", [3, 5])
def test_final_test_uses_the_best_epochs_weights(best_epoch):
    from cgpn.engine.distributed import DistEnv

    current = nn.Linear(1, 1, bias=False)
    nn.init.constant_(current.weight, 5.0)
    seen = []

    def evaluate(net: nn.Module):
        seen.append(float(net.weight.detach()))
        return type("R", (), {"summary": lambda self: "ok", "rank": lambda self, k: 0.0, "mAP": 0.0, "mINP": 0.0})()

    hook = FinalTest(evaluate, lambda: {"weight": torch.full((1, 1), 3.0)}, DistEnv())
    hook.trainer = _Holder(current, epoch=5, best=best_epoch)
    hook.after_epoch()
    assert seen == [5.0 if best_epoch == 5 else 3.0]
    assert float(current.weight.detach()) == 5.0  # the training model is untouched
    assert hook.trainer.test_result[0] == best_epoch


def test_cli_says_which_split_each_figure_comes_from(tiny_synth, tmp_path, capsys):
    run = tmp_path / "run"
    args = [a for o in tiny_overrides(tiny_synth, run, **{"data.val_ids": 2, "solver.epochs": 1})
            for a in ("--set", o)]
    assert main(["-q", "train", *args]) == 0
    out = capsys.readouterr().out
    assert "trained (epoch 1), validation split: Rank-1" in out
    assert "test split, evaluated once, best.pt (epoch 1): Rank-1" in out
    assert main(["-q", "eval", "--checkpoint", str(run / "last.pt"), "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("validation split of synthetic (4 query, ")
    assert main(["-q", "eval", "--checkpoint", str(run / "last.pt")]) == 0
    assert capsys.readouterr().out.startswith("test split of synthetic (")


def test_a_missing_data_root_is_reported_before_an_existing_run(tmp_path, capsys):
    """After `make demo`, runs/demo holds a run: a wrong data root is still the error a user hears about."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "last.pt").write_bytes(b"not read")
    code = main(["-q", "train", "--config", "configs/demo.yaml", "--set", f"output_dir={run}",
                 "--set", f"data.root={tmp_path / 'missing'}"])
    err = capsys.readouterr().err
    assert code == 2 and "data root" in err and "does not exist" in err and "already holds a run" not in err


def test_validation_pids_follow_the_training_labels_before_the_split():
    ds = _toy(6, first_pid=10)
    ds.hold_out_validation(2, 0)
    held = sorted(_by_hand([str(p) for p in range(10, 16)], 2, 0))
    assert sorted({s.pid for s in ds.val_gallery}) == [int(n) - 10 for n in held]
    assert np.array_equal(sorted({s.pid for s in ds.val_query}), sorted({s.pid for s in ds.val_gallery}))
