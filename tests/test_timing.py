"""Where training time goes (engine.timing): phases timed against known sleeps, and the per-epoch log line
of a real tiny run attributing a slow loader's time to data loading."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch

from _engine_tiny import tiny_overrides
from cgpn import load_config, train
from cgpn.engine import trainer as trainer_module
from cgpn.engine.timing import PhaseClock, format_shares


def test_phases_add_up_the_time_of_their_blocks() -> None:
    clock = PhaseClock(torch.device("cpu"))
    with clock.phase("forward"):
        time.sleep(0.05)
    with clock.phase("forward"):
        time.sleep(0.05)
    items = list(clock.timed("data", (time.sleep(0.03) or i for i in range(3))))  # 3 x 30 ms to produce
    seconds = clock.take()
    assert items == [0, 1, 2]
    assert 0.1 <= seconds["forward"] < 0.3 and 0.09 <= seconds["data"] < 0.3
    assert clock.take() == {}  # started again


def test_shares_in_the_printed_order() -> None:
    assert format_shares({"optimizer": 1.0, "data": 1.0, "forward": 2.0}) == "data 25 %, forward 50 %, optimizer 25 %"
    assert format_shares({"forward": 1.0, "other": 0.004}) == "forward 100 %"  # under 0.5 %: left out
    assert format_shares({}) == "no time recorded"


class _SlowLoader:
    """A training loader that takes ``delay`` seconds more for each batch."""

    def __init__(self, loader, delay: float) -> None:
        self.loader, self.delay, self.batch_sampler, self.dataset = loader, delay, loader.batch_sampler, loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            time.sleep(self.delay)
            yield batch


def test_each_epoch_logs_where_its_time_went(tiny_synth: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    delay, loaders = 0.4, []
    build = trainer_module.build_train_loader
    monkeypatch.setattr(trainer_module, "build_train_loader",
                        lambda *a, **k: loaders.append(_SlowLoader(build(*a, **k), delay)) or loaders[-1])
    cfg = load_config(None, tiny_overrides(tiny_synth, tmp_path / "run", **{
        "engine.eval_period": 2, "engine.eval_at_start": "false", "engine.precision": "fp32"}))
    with caplog.at_level("INFO", logger="cgpn"):
        train(cfg)
    lines = [m for m in (re.search(r"epoch (\d)/2 time: (.*) of ([\d.]+) s", r.getMessage()) for r in caplog.records)
             if m]
    assert [int(m.group(1)) for m in lines] == [1, 2]
    iterations = len(loaders[0])
    for m in lines:
        shares = {name: int(p) for name, p in re.findall(r"(\w+) (\d+) %", m.group(2))}
        total = float(m.group(3))
        assert 97 <= sum(shares.values()) <= 103  # rounded shares of one total
        assert {"data", "forward", "backward", "optimizer", "checkpoint"} <= set(shares)
        assert shares["data"] / 100 * total >= 0.95 * iterations * delay - 0.05  # the slow loader's sleeps
    assert "evaluation" not in dict(re.findall(r"(\w+) (\d+) %", lines[0].group(2)))  # eval_period 2: epoch 2 only
    assert "evaluation" in dict(re.findall(r"(\w+) (\d+) %", lines[1].group(2)))
