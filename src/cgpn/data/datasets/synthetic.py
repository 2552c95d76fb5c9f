"""A procedural person re-ID data set in Market-1501's exact layout, deterministic from a seed.

An identity is a fixed appearance: skin and hair, an upper garment (colour, pattern, sleeves), a lower
garment (trousers, shorts or skirt), shoes, an optional bag, a build. Each image of it varies by camera
(colour cast, brightness, blur, noise, background) and by pose, scale, shift and crop; on top, the
paper's problem: occluders over part of the body and truncated boxes (Section 1, Fig. 1). Colours are
drawn from a small palette, so identities share most attributes and a network must learn their
combination; the camera effects keep raw colour statistics from matching across cameras.

Files: ``{pid:04d}_c{cam}s1_{frame:06d}_00.jpg`` in ``bounding_box_train/``, ``query/`` and
``bounding_box_test/``; the settings are saved in ``synthetic.json`` beside them.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from tqdm import tqdm

from cgpn.data.datasets.base import MarketLayoutDataset
from cgpn.errors import ConfigError
from cgpn.files import write_folder

__all__ = ["PRESETS", "SyntheticReid", "SyntheticSpec", "generate_synthetic"]

logger = logging.getLogger(__name__)

# A small shared palette (RGB): identities differ by combinations, not by unique colours.
PALETTE = np.array([
    [20, 20, 25], [235, 235, 230], [200, 30, 35], [30, 60, 170], [40, 140, 60], [230, 200, 40],
    [120, 120, 125], [110, 70, 40], [240, 130, 30], [130, 40, 140], [90, 170, 220], [230, 150, 180],
], dtype=np.float32)
SKIN = np.array([[245, 205, 175], [225, 175, 135], [185, 130, 90], [120, 80, 55]], dtype=np.float32)
HAIR = np.array([[20, 15, 10], [90, 55, 30], [200, 170, 110], [130, 130, 130]], dtype=np.float32)
PATTERNS = ("solid", "hstripes", "vstripes", "checker", "split")


@dataclass
class SyntheticSpec:
    """Settings of ``cgpn synth`` (flags of the same names, ``-`` for ``_``); ``range`` is (lowest, highest or
    None), checked by ``validate`` before anything is written."""

    train_ids: int = field(default=64, metadata={"help": "identities in bounding_box_train", "range": (1, None)})
    test_ids: int = field(default=50, metadata={"help": "identities in query + bounding_box_test", "range": (1, None)})
    images_per_id: int = field(default=10, metadata={  # two queries and at least one gallery image per test id
        "help": "images of each identity, spread over the cameras", "range": (3, None)})
    cameras: int = field(default=4, metadata={  # a query needs its match in another camera
        "help": "cameras (colour cast, brightness, blur, background)", "range": (2, None)})
    height: int = field(default=128, metadata={  # the drawing's clutter needs height / 3 >= 5 pixels
        "help": "image height in pixels (Market-1501: 128)", "range": (16, None)})
    width: int = field(default=64, metadata={  # and width / 2 >= 4
        "help": "image width in pixels (Market-1501: 64)", "range": (8, None)})
    occlusion: float = field(default=0.2, metadata={
        "help": "fraction of images with an occluder over the body", "range": (0, 1)})
    truncation: float = field(default=0.15, metadata={
        "help": "fraction of images with the top or bottom of the body cut off", "range": (0, 1)})
    distractors: int = field(default=0, metadata={
        "help": "extra gallery images of pid 0000 (Market's distractors)", "range": (0, None)})
    seed: int = field(default=0, metadata={"help": "the same seed writes the same images", "range": (0, None)})

    def validate(self) -> SyntheticSpec:
        """``self`` if every value is within its range, else a ConfigError naming the first flag that is not."""
        for f in fields(self):
            low, high = f.metadata["range"]
            value = getattr(self, f.name)
            if value < low or (high is not None and value > high):
                bound = f"at least {low}" if high is None else f"between {low} and {high}"
                raise ConfigError(f"--{f.name.replace('_', '-')} must be {bound}, got {value}")
        if self.images_per_id == 3 and self.cameras < 3:
            raise ConfigError("with --images-per-id 3 a test identity has one gallery image, which must come from "
                              "a third camera for both queries to have a match: use --cameras >= 3 or "
                              "--images-per-id >= 4")
        return self


PRESETS: dict[str, SyntheticSpec] = {
    "demo": SyntheticSpec(),
    "tiny": SyntheticSpec(train_ids=8, test_ids=6, images_per_id=6, cameras=3, seed=0),
}


@dataclass
class _Identity:
    skin: np.ndarray
    hair: np.ndarray
    long_hair: bool
    upper: np.ndarray
    upper2: np.ndarray
    pattern: str
    period: int
    long_sleeves: bool
    lower: np.ndarray
    lower_kind: str  # trousers | shorts | skirt
    shoes: np.ndarray
    bag: str  # none | backpack | left | right
    bag_color: np.ndarray
    width: float  # build
    leg_ratio: float


def _identity(rng: np.random.Generator) -> _Identity:
    pick = lambda table: table[rng.integers(len(table))]  # noqa: E731
    upper = rng.choice(len(PALETTE), size=2, replace=False)
    return _Identity(
        skin=pick(SKIN), hair=pick(HAIR), long_hair=bool(rng.random() < 0.35),
        upper=PALETTE[upper[0]], upper2=PALETTE[upper[1]], pattern=PATTERNS[rng.integers(len(PATTERNS))],
        period=int(rng.integers(3, 7)), long_sleeves=bool(rng.random() < 0.6),
        lower=pick(PALETTE), lower_kind=("trousers", "trousers", "shorts", "skirt")[rng.integers(4)],
        shoes=pick(PALETTE[[0, 1, 6, 7, 2]]),
        bag=("none", "none", "backpack", "left", "right")[rng.integers(5)], bag_color=pick(PALETTE),
        width=float(rng.uniform(0.85, 1.15)), leg_ratio=float(rng.uniform(0.95, 1.05)),
    )


def _camera(rng: np.random.Generator) -> dict[str, object]:
    """Fixed properties of one camera: colour cast, exposure, blur, noise, background colours."""
    return {
        "gain": rng.uniform(0.7, 1.3, size=3).astype(np.float32),
        "offset": float(rng.uniform(-25, 25)),
        "gamma": float(rng.uniform(0.75, 1.3)),
        "blur": float(rng.uniform(0.0, 1.2)),
        "noise": float(rng.uniform(2, 9)),
        "bg": [PALETTE[i] * 0.6 + 60 for i in rng.choice(len(PALETTE), size=3, replace=False)],
    }


def _texture(ident: _Identity, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """(N, 3) colour of the upper garment's pattern at pixels (yy, xx) (person-relative rows)."""
    p = ident.period
    if ident.pattern == "hstripes":
        sel = (yy // p) % 2 == 0
    elif ident.pattern == "vstripes":
        sel = (xx // p) % 2 == 0
    elif ident.pattern == "checker":
        sel = ((yy // p) + (xx // p)) % 2 == 0
    elif ident.pattern == "split":
        sel = xx < xx.mean()
    else:
        sel = np.ones_like(yy, dtype=bool)
    return np.where(sel[:, None], ident.upper, ident.upper2)


@functools.lru_cache(maxsize=4)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy.flags.writeable = xx.flags.writeable = False
    return yy, xx


@dataclass
class Pose:
    """Where and how a person stands in an image: the rows ``top`` to ``top + height``, centre column ``cx``,
    seen from behind or not, legs spread by ``stride`` and arms swung by ``swing`` pixels."""

    top: float
    height: float
    cx: float
    back: bool
    stride: float
    swing: float


def draw_person(img: np.ndarray, yy: np.ndarray, xx: np.ndarray, ident: _Identity, pose: Pose) -> np.ndarray:
    """Paint ``ident`` in ``pose`` over ``img`` (H, W, 3) float, whose pixel rows and columns are ``yy``,
    ``xx`` (H, W) (an image's own grid, or a window of a larger frame); returns the (H, W) mask painted."""
    top, ph, cx, back, stride, swing = pose.top, pose.height, pose.cx, pose.back, pose.stride, pose.swing
    bw = ph * 0.22 * ident.width  # torso width
    y = lambda f: top + f * ph  # noqa: E731  height fraction -> row
    drawn = np.zeros(yy.shape, dtype=bool)

    def paint(mask: np.ndarray, color: np.ndarray) -> None:
        img[mask] = color
        drawn[mask] = True

    hip, knee_end = y(0.52), y(0.93 * ident.leg_ratio if ident.leg_ratio < 1 else 0.93)
    # Legs: two slanted bars from the hip to the feet.
    for side in (-1, 1):
        frac = np.clip((yy - hip) / max(knee_end - hip, 1), 0, 1)
        lx = cx + side * bw * 0.22 + side * frac * stride / 2
        leg = (yy >= hip) & (yy < knee_end) & (np.abs(xx - lx) < bw * 0.2)
        paint(leg, ident.skin)
        cover_end = {"trousers": knee_end, "shorts": y(0.68), "skirt": y(0.62)}[ident.lower_kind]
        paint(leg & (yy < cover_end), ident.lower)
        shoe = (yy >= knee_end) & (yy < y(1.0)) & (np.abs(xx - lx - side * 1.0) < bw * 0.24)
        paint(shoe, ident.shoes)
    if ident.lower_kind == "skirt":
        frac = np.clip((yy - hip) / (y(0.65) - hip), 0, 1)
        paint((yy >= hip) & (yy < y(0.65)) & (np.abs(xx - cx) < bw * (0.5 + 0.25 * frac)), ident.lower)
    else:
        paint((yy >= hip) & (yy < y(0.58)) & (np.abs(xx - cx) < bw * 0.45), ident.lower)
    # Arms, then torso with its pattern.
    for side in (-1, 1):
        frac = np.clip((yy - y(0.17)) / (y(0.5) - y(0.17)), 0, 1)
        ax = cx + side * bw * 0.62 + side * frac * swing * (1 if side > 0 else -1) * 0.5
        arm = (yy >= y(0.17)) & (yy < y(0.5)) & (np.abs(xx - ax) < bw * 0.14)
        paint(arm, ident.skin)
        sleeve_end = y(0.47) if ident.long_sleeves else y(0.28)
        paint(arm & (yy < sleeve_end), ident.upper)
    torso = (yy >= y(0.16)) & (yy < hip + 1) & (np.abs(xx - cx) < bw * 0.5)
    img[torso] = _texture(ident, yy[torso] - top, xx[torso])
    drawn |= torso
    # Bag: a backpack is seen from behind; a hand bag hangs at one side.
    if ident.bag == "backpack" and back:
        paint((yy >= y(0.2)) & (yy < y(0.45)) & (np.abs(xx - cx) < bw * 0.38), ident.bag_color)
    elif ident.bag == "backpack":
        paint((yy >= y(0.17)) & (yy < y(0.42)) & (np.abs(np.abs(xx - cx) - bw * 0.3) < 1.2), ident.bag_color)
    elif ident.bag in ("left", "right"):
        side = -1 if ident.bag == "left" else 1
        bx = cx + side * bw * 0.8
        paint((yy >= y(0.4)) & (yy < y(0.56)) & (np.abs(xx - bx) < bw * 0.22), ident.bag_color)
    # Head: skin face (front) or hair (back), hair on top; long hair falls to the shoulders.
    hy, hr = y(0.08), ph * 0.075
    head = ((xx - cx) / (hr * 0.85)) ** 2 + ((yy - hy) / hr) ** 2 < 1
    paint(head, ident.hair if back else ident.skin)
    paint(head & (yy < hy - hr * 0.3), ident.hair)
    if ident.long_hair:
        paint((yy >= hy) & (yy < y(0.25)) & (np.abs(xx - cx) < hr * 0.95) & (back | (np.abs(xx - cx) > hr * 0.55)),
              ident.hair)
    return drawn


def apply_camera(img: np.ndarray, cam: dict[str, object], brightness: float, rng: np.random.Generator) -> np.ndarray:
    """``img`` (H, W, 3) float as ``cam`` sees it: colour cast, exposure (+ ``brightness``), gamma, blur and
    sensor noise drawn from ``rng``; returns (H, W, 3) uint8."""
    img = img * cam["gain"] + cam["offset"] + brightness
    img = 255.0 * (np.clip(img, 0, 255) / 255.0) ** cam["gamma"]
    out = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    if cam["blur"] > 0.2:
        out = out.filter(ImageFilter.GaussianBlur(cam["blur"]))
    noisy = np.asarray(out, dtype=np.float32) + rng.normal(0, cam["noise"], size=img.shape)
    return noisy.clip(0, 255).astype(np.uint8)


def _render(ident: _Identity, cam: dict[str, object], spec: SyntheticSpec, rng: np.random.Generator) -> np.ndarray:
    """One (H, W, 3) uint8 image of ``ident`` seen by ``cam`` in a random pose."""
    h, w = spec.height, spec.width
    yy, xx = _grid(h, w)
    # Background: camera colours as a vertical gradient with a floor, plus per-image clutter.
    bg = cam["bg"]
    t = yy[..., None] / h
    img = (bg[0] * (1 - t) + bg[1] * t).astype(np.float32)
    floor = rng.uniform(0.7, 0.9) * h
    img[yy > floor] = bg[2]
    for _ in range(rng.integers(1, 4)):
        y0, x0 = rng.uniform(0, h), rng.uniform(-w / 2, w)
        clutter = (yy > y0) & (yy < y0 + rng.uniform(5, h / 3)) & (xx > x0) & (xx < x0 + rng.uniform(4, w / 2))
        img[clutter] = PALETTE[rng.integers(len(PALETTE))] * 0.7 + 40

    # Person geometry in pixels: scale, shift, pose.
    ph = h * rng.uniform(0.78, 0.97)
    top = rng.uniform(0.01, 0.99) * (h - ph)
    cx = w / 2 + rng.uniform(-0.12, 0.12) * w
    back = rng.random() < 0.5  # seen from behind
    stride = rng.uniform(0.0, 0.22) * ph  # leg spread
    swing = rng.uniform(-0.12, 0.12) * ph
    draw_person(img, yy, xx, ident, Pose(top, ph, cx, back, stride, swing))

    # The paper's problem: occluders and truncated boxes.
    if rng.random() < spec.occlusion:
        _occlude(img, yy, xx, top, ph, rng)
    if rng.random() < spec.truncation:
        keep = rng.uniform(0.55, 0.8)
        rows = slice(0, int(h * keep)) if rng.random() < 0.7 else slice(int(h * (1 - keep)), h)
        img = np.asarray(Image.fromarray(img[rows].clip(0, 255).astype(np.uint8)).resize((w, h), Image.BILINEAR),
                         dtype=np.float32)
    return apply_camera(img, cam, rng.uniform(-15, 15), rng)


def _occlude(img: np.ndarray, yy: np.ndarray, xx: np.ndarray, top: float, ph: float, rng: np.random.Generator) -> None:
    """Paint an occluder (a noisy block of one colour) over a quarter to a half of the body's height, in place:
    over the legs or anywhere along the body (the person spans ``top`` to ``top + ph``)."""
    w = img.shape[1]
    oh = rng.uniform(0.25, 0.5) * ph
    oy = rng.choice([top + ph - oh + rng.uniform(0, 0.1) * ph, rng.uniform(top, top + ph - oh)])
    ox, ow = rng.uniform(-0.2 * w, 0.5 * w), rng.uniform(0.5, 1.0) * w
    occ = (yy >= oy) & (yy < oy + oh) & (xx >= ox) & (xx < ox + ow)
    img[occ] = PALETTE[rng.integers(len(PALETTE))] * 0.8 + rng.normal(0, 12, size=(int(occ.sum()), 1))


def _cross_camera_gallery(query: np.ndarray, gallery: np.ndarray, cameras: int) -> np.ndarray:
    """The gallery's cameras, changed only where needed (no random draw, so other identities' images stay
    the same) so that each query has a gallery image of its identity from another camera: the protocol
    drops same-camera matches, and a query without any would be skipped by the evaluation."""
    gallery = gallery.copy()
    if len(gallery) == 1:
        if gallery[0] in query:
            gallery[0] = min(set(range(cameras)) - set(query.tolist()))
        return gallery
    for i, q in enumerate(query):
        if (gallery == q).all():
            gallery[i] = query[1 - i]
    return gallery


def generate_synthetic(out: str | Path, spec: SyntheticSpec | None = None, progress: bool = True) -> dict[str, int]:
    """Write the data set described by ``spec`` as the folder ``out``; returns the image count per folder.

    The same spec always gives byte-identical files. Every test identity is seen by at least two
    cameras; its query holds one image from each of two cameras, its gallery the rest. Every value is
    checked first; the set is written into a temporary folder beside ``out``, which then replaces ``out``
    (``cgpn.files.write_folder``): an existing ``out`` is replaced only if ``cgpn synth`` wrote it.
    """
    spec = (spec or SyntheticSpec()).validate()
    with write_folder(out, "cgpn synth") as tmp:
        counts = _write(tmp, spec, progress)
    logger.debug("wrote %s images to %s", sum(counts.values()), out)
    return counts


def _write(out: Path, spec: SyntheticSpec, progress: bool) -> dict[str, int]:
    """Write the images and ``synthetic.json`` of ``spec`` into the empty folder ``out``."""
    dirs = {name: out / name for name in ("bounding_box_train", "query", "bounding_box_test")}
    for d in dirs.values():
        d.mkdir()
    rng = np.random.default_rng(spec.seed)
    cameras = [_camera(rng) for _ in range(spec.cameras)]
    n_ids = spec.train_ids + spec.test_ids
    identities = [_identity(rng) for _ in range(n_ids)]
    jobs: list[tuple[str, int, int, int | None]] = []  # (folder, pid, camera, identity index)
    for index in range(n_ids):
        pid = index + 1
        cams = np.concatenate([rng.permutation(spec.cameras)[:2],
                               rng.integers(0, spec.cameras, size=spec.images_per_id - 2)])
        if index < spec.train_ids:
            jobs += [("bounding_box_train", pid, int(c), index) for c in cams]
        else:
            jobs += [("query", pid, int(cams[0]), index), ("query", pid, int(cams[1]), index)]
            jobs += [("bounding_box_test", pid, int(c), index)
                     for c in _cross_camera_gallery(cams[:2], cams[2:], spec.cameras)]
    jobs += [("bounding_box_test", 0, int(rng.integers(spec.cameras)), None) for _ in range(spec.distractors)]

    counts = dict.fromkeys(dirs, 0)
    for frame, (folder, pid, cam, index) in enumerate(tqdm(jobs, desc="synth", unit="img", disable=not progress)):
        image_rng = np.random.default_rng([spec.seed, frame])
        ident = identities[index] if index is not None else _identity(image_rng)
        pixels = _render(ident, cameras[cam], spec, image_rng)
        Image.fromarray(pixels).save(dirs[folder] / f"{pid:04d}_c{cam + 1}s1_{frame:06d}_00.jpg", quality=92)
        counts[folder] += 1
    (out / "synthetic.json").write_text(json.dumps(asdict(spec), indent=2))
    return counts


class SyntheticReid(MarketLayoutDataset):
    """Reader of a folder written by ``generate_synthetic`` (``root`` is that folder)."""

    name = "synthetic"
