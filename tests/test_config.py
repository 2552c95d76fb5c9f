"""Config layers: defaults < YAML (with _base_) < --set, the saved config round-trips, bad keys are refused."""

from __future__ import annotations

import pytest

from cgpn.config import Config, load_config, save_config
from cgpn.errors import ConfigError


def test_defaults_are_the_paper_recipe():
    cfg = Config()
    assert (cfg.data.height, cfg.data.width) == (384, 128)  # Section 4.2
    assert (cfg.data.batch_size, cfg.data.num_instances) == (64, 8)  # P = K = 8
    s = cfg.solver
    assert (s.optimizer, s.lr, s.momentum, s.weight_decay, s.milestones, s.gamma, s.epochs) == (
        "sgd", 0.01, 0.9, 5e-4, [60, 80], 0.1, 240)
    assert cfg.loss.triplet_margin == 1.2
    assert (cfg.model.name, cfg.model.backbone, cfg.model.pooling, cfg.model.reduce_dim) == (
        "cgpn", "resnet50", "max", 256)
    assert cfg.test.flip and cfg.test.distance == "cosine" and not cfg.test.rerank


def test_precedence_and_base_inheritance(tmp_path):
    (tmp_path / "base.yaml").write_text("solver:\n  lr: 0.05\n  epochs: 10\nmodel:\n  backbone: resnet34\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\nsolver:\n  epochs: 20\n")
    cfg = load_config(tmp_path / "child.yaml", ["solver.epochs=30", "model.last_stride=[2, 1, 1]"])
    assert cfg.solver.lr == 0.05  # from the base file
    assert cfg.model.backbone == "resnet34"
    assert cfg.solver.epochs == 30  # --set wins over the file, which wins over its base
    assert cfg.model.last_stride == [2, 1, 1]
    assert cfg.solver.momentum == 0.9  # untouched default


def test_saved_config_reads_back_identically(tmp_path):
    cfg = load_config(None, ["model.pretrained=/weights/r50.pth", "solver.milestones=[3, 4]", "test.flip=false"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize(("override", "message"), [
    ("model.backbon=resnet18", "unknown config key 'model.backbon'; did you mean 'model.backbone'"),
    ("solver.lr=fast", "config key 'solver.lr' expects float or int, got 'fast'"),
    ("data.batch_size=1.5", "config key 'data.batch_size' expects int"),
    ("nosection.key=1", "unknown config key 'nosection'"),
    ("solver.lr", "not of the form section.key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("'", "'")):
        load_config(None, [override])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("solver: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize(("override", "message"), [
    ("data.batch_size=0", "config key 'data.batch_size' must be >= 1, got 0"),
    ("data.workers=-1", "config key 'data.workers' must be >= 0, got -1"),
    ("solver.lr=-0.1", "config key 'solver.lr' must be > 0, got -0.1"),
    ("solver.milestones=[60,0]", "config key 'solver.milestones[1]' must be >= 1, got 0"),
    ("loss.label_smoothing=1.5", "config key 'loss.label_smoothing' must be between 0 and 1, got 1.5"),
    ("loss.mse_reduction=Sum", "config key 'loss.mse_reduction' must be one of mean, sum, got 'Sum'"),
    ("test.distance=cos", "config key 'test.distance' must be one of cosine, euclidean, got 'cos'"),
    ("test.memory_mb=0", "config key 'test.memory_mb' must be > 0, got 0"),
])
def test_values_out_of_range_fail_when_the_config_is_read(override, message):
    """Not at the first use: a bad test.* value would otherwise surface at the first evaluation, hours in."""
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value) == message


def test_nesterov_needs_momentum():
    with pytest.raises(ConfigError, match=r"solver.nesterov=true needs solver.momentum > 0"):
        load_config(None, ["solver.nesterov=true", "solver.momentum=0"])
    assert load_config(None, ["solver.nesterov=true"]).solver.nesterov  # with the default momentum 0.9
