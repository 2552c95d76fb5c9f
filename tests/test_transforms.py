"""Transforms (resize, flip, ImageNet normalisation, optional erasing / pad+crop / jitter) and the loaders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cgpn.config import DataConfig
from cgpn.data.datasets import build_dataset
from cgpn.data.loader import build_test_loader, build_train_loader
from cgpn.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms

# ImageNet statistics as published with torchvision's pretrained models
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def _image(w: int = 20, h: int = 50, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _by_hand(img: Image.Image, h: int, w: int) -> np.ndarray:
    """PIL bilinear resize, then (x / 255 - mean) / std, as (3, h, w)."""
    x = np.asarray(img.resize((w, h), Image.BILINEAR), dtype=np.float64) / 255.0
    return ((x - MEAN) / STD).transpose(2, 0, 1)


def test_test_transform_is_resize_and_imagenet_normalisation() -> None:
    assert np.allclose(IMAGENET_MEAN, MEAN) and np.allclose(IMAGENET_STD, STD)
    img = _image()
    out = build_transforms(DataConfig(height=384, width=128), train=False)(img)
    assert out.shape == (3, 384, 128) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), _by_hand(img, 384, 128), atol=1e-5)
    flat = Image.new("RGB", (10, 30), (255, 0, 128))
    out = build_transforms(DataConfig(height=8, width=4), train=False)(flat)
    expected = (np.array([255, 0, 128]) / 255 - MEAN) / STD
    np.testing.assert_allclose(out[:, 3, 2].numpy(), expected, atol=1e-5)


def test_flip_is_a_mirror_and_the_paper_recipe_has_nothing_else() -> None:
    img = _image()
    plain = build_transforms(DataConfig(height=32, width=16), train=False)(img)
    flipped = build_transforms(DataConfig(height=32, width=16, flip_prob=1.0), train=True)(img)
    torch.testing.assert_close(flipped, plain.flip(-1))
    unflipped = build_transforms(DataConfig(height=32, width=16, flip_prob=0.0), train=True)(img)
    torch.testing.assert_close(unflipped, plain)
    torch.manual_seed(0)
    default = build_transforms(DataConfig(height=32, width=16), train=True)
    outs = [default(img) for _ in range(40)]
    n_flipped = sum(torch.equal(o, plain.flip(-1)) for o in outs)
    assert all(torch.equal(o, plain) or torch.equal(o, plain.flip(-1)) for o in outs)  # flip only (SPEC 9)
    assert 8 <= n_flipped <= 32  # p = 0.5


def test_random_erasing_setting() -> None:
    img = _image()
    plain = build_transforms(DataConfig(height=64, width=32), train=False)(img)
    erase = build_transforms(DataConfig(height=64, width=32, flip_prob=0.0, random_erasing=1.0), train=True)
    torch.manual_seed(1)
    out = erase(img)
    changed = (out != plain).any(0)
    assert changed.any() and not changed.all()
    rows, cols = changed.nonzero(as_tuple=True)  # one rectangle
    box = changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert box.float().mean() > 0.95


def test_pad_and_crop_setting() -> None:
    img = _image(16, 32)
    plain = build_transforms(DataConfig(height=32, width=16), train=False)(img)
    crop = build_transforms(DataConfig(height=32, width=16, flip_prob=0.0, pad=4), train=True)
    torch.manual_seed(3)
    outs = [crop(img) for _ in range(10)]
    assert all(o.shape == (3, 32, 16) for o in outs)
    zero = torch.tensor((0 - MEAN) / STD, dtype=torch.float32)[:, None]  # black padding, normalised
    for out in outs:  # each is the padded image (zeros at the border) shifted by at most 4 pixels
        found = False
        for dy in range(-4, 5):
            for dx in range(-4, 5):
                shifted = zero[:, :, None].expand(3, 32, 16).clone()
                ys, xs = slice(max(0, dy), 32 + min(0, dy)), slice(max(0, dx), 16 + min(0, dx))
                yt, xt = slice(max(0, -dy), 32 + min(0, -dy)), slice(max(0, -dx), 16 + min(0, -dx))
                shifted[:, ys, xs] = plain[:, yt, xt]
                found |= torch.allclose(out, shifted, atol=1e-5)
        assert found
    assert any(not torch.allclose(o, plain) for o in outs)


def test_color_jitter_setting() -> None:
    names = [type(t).__name__ for t in build_transforms(DataConfig(color_jitter=True), train=True).transforms]
    assert "ColorJitter" in names
    assert "ColorJitter" not in [type(t).__name__ for t in build_transforms(DataConfig(), train=True).transforms]
    assert "ColorJitter" not in [type(t).__name__ for t in build_transforms(DataConfig(color_jitter=True),
                                                                             train=False).transforms]


def test_loaders_on_tiny_synthetic(tiny_synth: Path) -> None:
    ds = build_dataset("synthetic", tiny_synth)
    cfg = DataConfig(height=32, width=16, batch_size=8, num_instances=2, workers=2, test_batch_size=10)
    loader = build_train_loader(ds.train, cfg, seed=0)
    assert not loader.pin_memory or torch.cuda.is_available()
    assert loader.num_workers == 2
    batches = list(loader)
    assert len(batches) == len(loader) == 2  # 8 identities / P = 4
    for images, pids, camids, idx in batches:
        assert images.shape == (8, 3, 32, 16)
        assert pids.tolist() == [ds.train[i].pid for i in idx.tolist()]
        assert len(set(pids.tolist())) == 4 and all(c == 2 for c in np.bincount(pids.numpy()) if c)
        assert camids.tolist() == [ds.train[i].camid for i in idx.tolist()]
    test = build_test_loader(ds.gallery, cfg)
    idx = torch.cat([b[3] for b in test])
    assert idx.tolist() == list(range(len(ds.gallery)))  # in order


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_pinned_memory_with_a_gpu(tiny_synth: Path) -> None:
    ds = build_dataset("synthetic", tiny_synth)
    loader = build_train_loader(ds.train, DataConfig(height=32, width=16, batch_size=8, num_instances=2, workers=1))
    images = next(iter(loader))[0]
    assert loader.pin_memory and images.is_pinned()
