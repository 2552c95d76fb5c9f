"""FeatureExtractor: every input type, flip averaging against a hand-written reference, the CPU backends."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from _reference_pipeline import manual_input
from cgpn.engine.checkpoint import load_model
from cgpn.errors import CheckpointError, DatasetError, ImageError
from cgpn.extractor import FeatureExtractor, list_images
from serve_helpers import HEIGHT, WIDTH


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three RGB images of another size than the network's input (128 x 64), as PNG (lossless)."""
    folder = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        pixels = rng.integers(0, 256, size=(128, 64, 3), dtype=np.uint8)
        pixels[: 40 + 20 * i] //= 2  # images differ in structure, not only noise
        paths.append(folder / f"img{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def eager(checkpoint: Path) -> FeatureExtractor:
    """The reference path: fp32 PyTorch, flip-averaged."""
    return FeatureExtractor(checkpoint, device="cpu", backend="eager", batch_size=2)


def test_every_input_type_gives_the_same_features(eager: FeatureExtractor, images: list[Path]) -> None:
    extractor = eager
    arrays = [np.array(Image.open(p).convert("RGB")) for p in images]
    uint8 = [torch.from_numpy(a).permute(2, 0, 1) for a in arrays]
    inputs = {
        "str paths": [str(p) for p in images],
        "Path objects": list(images),
        "PIL images": [Image.open(p) for p in images],
        "HWC uint8 arrays": arrays,
        "(N, H, W, 3) array": np.stack(arrays),
        "CHW uint8 tensors": uint8,
        "CHW float tensors in [0, 1]": [t.float() / 255 for t in uint8],
        "float tensors off the 8-bit grid (rounded)": [(t.float() - 0.45).clamp(min=0) / 255 for t in uint8],
        "(N, 3, H, W) tensor": torch.stack(uint8),
    }
    reference = extractor(inputs["str paths"])
    assert reference.shape == (3, 3072)  # 12 features x 256 (paper, Section 3)
    torch.testing.assert_close(reference.norm(dim=1), torch.ones(3))
    for name, value in inputs.items():
        torch.testing.assert_close(extractor(value), reference, atol=1e-6, rtol=0, msg=name)
    torch.testing.assert_close(extractor(images[1]), reference[1:2], atol=1e-6, rtol=0)  # a single image


def test_flip_averaging_matches_a_manual_average(checkpoint: Path, eager: FeatureExtractor,
                                                 images: list[Path]) -> None:
    model, _ = load_model(checkpoint)
    model.eval()
    x = torch.stack([manual_input(p, HEIGHT, WIDTH) for p in images])
    with torch.no_grad():
        raw, mirrored = model(x), model(x.flip(3))
    flipped = eager(images)
    plain = FeatureExtractor(model, device="cpu", backend="eager", flip=False, config=eager.config)(images)
    torch.testing.assert_close(flipped, F.normalize((raw + mirrored) / 2, dim=1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(plain, F.normalize(raw, dim=1), atol=1e-5, rtol=1e-4)
    assert (flipped - plain).abs().max() > 1e-3  # the mirror does change the feature


@pytest.mark.parametrize("backend", ["onnx", "channels_last", "bf16", pytest.param("compile", marks=[
    pytest.mark.slow, pytest.mark.skipif(not shutil.which("g++") and not shutil.which("cc"),
                                         reason="torch.compile on the CPU needs a C++ compiler")])])
def test_fast_backends_agree_with_eager_fp32(checkpoint: Path, eager: FeatureExtractor, images: list[Path],
                                             backend: str) -> None:
    fast = FeatureExtractor(checkpoint, device="cpu", backend=backend)(images)
    cosine = (eager(images) * fast).sum(1)
    assert cosine.min() >= (0.999 if backend == "bf16" else 0.99999), cosine


def test_auto_on_cpu_is_onnxruntime_with_a_cached_graph(checkpoint: Path, images: list[Path],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("cgpn.runtime.cpu_has_native_bf16", lambda: False)  # an AVX2-only CPU, like CI's
    first = FeatureExtractor(checkpoint, device="cpu")
    assert first.backend == "onnx"
    cached = list(first.runtime.onnx_file.parent.glob("*.onnx"))
    assert len(cached) == 1

    def no_export(*args, **kwargs):
        raise AssertionError("the cached graph should have been used")

    monkeypatch.setattr("cgpn.runtime.export_onnx", no_export)
    second = FeatureExtractor(checkpoint, device="cpu")
    torch.testing.assert_close(second(images), first(images))


def test_auto_on_a_cpu_with_bf16_units_is_bf16(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the CPU has bf16 matrix units, auto takes bf16 autocast (features checked against eager fp32 in
    test_fast_backends_agree_with_eager_fp32)."""
    monkeypatch.setattr("cgpn.runtime.cpu_has_native_bf16", lambda: True)
    assert FeatureExtractor(checkpoint, device="cpu").backend == "bf16"
    monkeypatch.setattr("cgpn.runtime.cpu_has_native_bf16", lambda: False)
    assert FeatureExtractor(checkpoint, device="cpu").backend == "onnx"


def test_cache_keeps_each_variant_and_replaces_stale_graphs(checkpoint: Path, tmp_path: Path) -> None:
    """Graphs with and without flip of one checkpoint live side by side; rewriting the checkpoint file
    replaces only the graph of the variant that was asked for again."""
    ckpt = tmp_path / "model.pt"
    shutil.copyfile(checkpoint, ckpt)
    with_flip = FeatureExtractor(ckpt, device="cpu", backend="onnx").runtime.onnx_file
    without = FeatureExtractor(ckpt, device="cpu", backend="onnx", flip=False).runtime.onnx_file
    assert with_flip != without and with_flip.is_file() and without.is_file()
    os.utime(ckpt, ns=(ckpt.stat().st_atime_ns, ckpt.stat().st_mtime_ns + 10**9))  # as if written again
    fresh = FeatureExtractor(ckpt, device="cpu", backend="onnx").runtime.onnx_file
    assert fresh != with_flip and fresh.is_file() and not with_flip.exists() and without.is_file()


def test_a_checkpoint_replaced_while_loading_is_not_cached(checkpoint: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A run saving last.pt while an extractor loads it: the graph of the weights loaded must not be filed
    under the new file's state (later extractors would get the old weights)."""
    import cgpn.runtime

    ckpt = tmp_path / "last.pt"
    shutil.copyfile(checkpoint, ckpt)
    cache = tmp_path / "cache"
    monkeypatch.setenv("CGPN_CACHE_DIR", str(cache))
    real_load = cgpn.runtime.load_model

    def load_then_replaced(path):
        loaded = real_load(path)
        os.utime(ckpt, ns=(ckpt.stat().st_atime_ns, ckpt.stat().st_mtime_ns + 10**9))  # the run saves
        return loaded

    monkeypatch.setattr(cgpn.runtime, "load_model", load_then_replaced)
    extractor = FeatureExtractor(ckpt, device="cpu", backend="onnx")
    assert not list(cache.rglob("*.onnx"))
    eager = FeatureExtractor(checkpoint, device="cpu", backend="eager")
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    torch.testing.assert_close(extractor(image), eager(image), atol=1e-4, rtol=0)


def test_progress_bar_on_request(eager: FeatureExtractor, images: list[Path], capsys: pytest.CaptureFixture,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(eager, "progress", True)
    eager(images)
    assert "3/3" in capsys.readouterr().err
    monkeypatch.setattr(eager, "progress", None)  # default: no bar for a list that fits in one batch
    eager(images[:2])
    assert "features" not in capsys.readouterr().err


def test_user_errors(eager: FeatureExtractor, tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    extractor = eager
    with pytest.raises(ImageError, match=r"broken\.jpg"):
        extractor([bad])
    with pytest.raises(ImageError, match=r"\(H, W, 3\) uint8"):
        extractor(np.zeros((64, 32), np.uint8))
    with pytest.raises(ImageError, match=r"values in \[0, 1\], got \[255, 255\]"):  # 8-bit values as floats
        extractor(torch.full((3, 64, 32), 255.0))
    normalised = extractor.preprocess(np.full((64, 32, 3), 7, np.uint8))
    with pytest.raises(ImageError, match="pass unnormalised images"):
        extractor(normalised)
    not_cgpn = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, not_cgpn)
    with pytest.raises(CheckpointError, match="not a cgpn checkpoint"):
        FeatureExtractor(not_cgpn)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="holds no image"):
        list_images(empty)


def _chance(query, gallery) -> tuple[float, float]:
    """Rank-1 and mAP of random rankings (mean over 20 random distance matrices, fast-reid's evaluator)."""
    from _reference_pipeline import labels
    from fastreid_ref import load_rank

    (q_pids, q_cams), (g_pids, g_cams) = labels(query), labels(gallery)
    rng = np.random.default_rng(0)
    runs = [load_rank().eval_market1501(rng.random((len(q_pids), len(g_pids))), q_pids, g_pids, q_cams, g_cams, 1)
            for _ in range(20)]
    return float(np.mean([cmc[0] for cmc, _, _ in runs])), float(np.mean([np.mean(ap) for _, ap, _ in runs]))


def test_fast_backends_rank_the_cuhk03_mini_set_like_eager_fp32(mini_run) -> None:
    """README: the default CPU path ranks like eager fp32 on the real CUHK03 mini set, with a briefly trained
    network (Rank-1 and mAP well above chance). ONNX Runtime (the default on other CPUs): per-image cosine
    >= 0.99999 and the same top-10 list for every query. bf16 autocast (the default on CPUs with bf16 units):
    per-image cosine >= 0.999, distances within 1e-2, the same Rank-1 within one query, and top-10 lists
    that differ only in the order of near-ties (gallery images whose fp32 distances to the query differ by
    less than twice the largest distance change bf16 makes)."""
    from _reference_pipeline import fastreid_ranking
    from cgpn.config import DataConfig
    from cgpn.data.datasets import build_dataset
    from cgpn.engine.precision import cpu_has_native_bf16

    data = build_dataset("market1501", mini_run.root, DataConfig(verify_counts="ignore"))
    assert FeatureExtractor(mini_run.checkpoint, device="cpu").backend == ("bf16" if cpu_has_native_bf16() else "onnx")
    feats, dist, top10, rank1 = {}, {}, {}, {}
    for backend in ("eager", "onnx", "bf16"):
        extractor = FeatureExtractor(mini_run.checkpoint, device="cpu", backend=backend, batch_size=64)
        qf, gf = extractor([s.path for s in data.query]), extractor([s.path for s in data.gallery])
        feats[backend] = torch.cat([qf, gf])
        dist[backend] = torch.cdist(qf.double(), gf.double()).numpy()
        top10[backend] = np.argsort(dist[backend], axis=1, kind="stable")[:, :10]
        cmc, ap, _ = fastreid_ranking(qf, gf, data.query, data.gallery)
        rank1[backend] = cmc[0]
        if backend == "eager":
            chance_rank1, chance_map = _chance(data.query, data.gallery)
            summary = f"Rank-1 {cmc[0]:.3f} (chance {chance_rank1:.3f}), mAP {np.nanmean(ap):.3f} (chance {chance_map:.3f})"
            assert cmc[0] >= 3 * chance_rank1 and np.nanmean(ap) >= 2 * chance_map, summary

    cosine = {b: (feats["eager"] * feats[b]).sum(1) for b in ("onnx", "bf16")}
    assert cosine["onnx"].min() >= 0.99999, cosine["onnx"].min()
    np.testing.assert_array_equal(top10["onnx"], top10["eager"])
    assert rank1["onnx"] == rank1["eager"]

    assert cosine["bf16"].min() >= 0.999, cosine["bf16"].min()
    delta = np.abs(dist["bf16"] - dist["eager"]).max()
    assert delta <= 1e-2, delta
    d = dist["eager"]
    for q in range(len(d)):  # a pair ordered one way by bf16 and the other by fp32 is a near-tie in fp32
        items = np.union1d(top10["bf16"][q], top10["eager"][q])
        rank_b = {g: r for r, g in enumerate(np.argsort(dist["bf16"][q], kind="stable"))}
        rank_e = {g: r for r, g in enumerate(np.argsort(d[q], kind="stable"))}
        for i in items:
            for j in items:
                if rank_b[i] < rank_b[j] and rank_e[i] > rank_e[j]:
                    assert d[q, i] - d[q, j] <= 2 * delta, (q, i, j, d[q, i], d[q, j], delta)
    assert abs(rank1["bf16"] - rank1["eager"]) <= 1 / len(d) + 1e-9


def test_a_model_passed_in_is_left_as_it_was(checkpoint: Path, tmp_path: Path) -> None:
    """The extractor and the ONNX export work on their own copy / put back mode and device."""
    from cgpn.export import export_onnx

    model, cfg = load_model(checkpoint)
    model.train()
    conv = model.backbone.conv1.weight if hasattr(model, "backbone") else next(model.parameters())
    FeatureExtractor(model, device="cpu", backend="channels_last", config=cfg, progress=False)
    assert model.training and conv.is_contiguous()  # not switched to eval, nor to channels_last
    export_onnx(model, tmp_path / "m.onnx", HEIGHT, WIDTH)
    assert model.training and next(model.parameters()).device.type == "cpu"


@pytest.mark.parametrize("name, message", [
    ("gpu", "unknown device 'gpu'; use auto, cpu, cuda or cuda:N"),
    ("mps", "device 'mps' is not supported"),
    ("cuda:7", "device 'cuda:7' asked for, but this machine has"),
])
def test_device_names_are_checked(checkpoint: Path, name: str, message: str) -> None:
    from cgpn.errors import ConfigError

    if name == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    with pytest.raises(ConfigError, match=message):
        FeatureExtractor(checkpoint, device=name)
