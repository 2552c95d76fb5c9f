"""Synthetic tracking sequences: the people of ``cgpn synth`` walking across one camera's scene.

Each person walks in from one side and out of the other, then comes back later (people leave and
re-enter); people on nearby rows cross and hide each other; pillars stand in front of everyone, and a
person passing one may stop behind it for seconds and walk on or turn back (an occlusion a constant-velocity
motion model cannot bridge); look-alike pairs share all but two attributes and meet head-on.
People are drawn by ``cgpn.data.datasets.synthetic.draw_person`` and seen through one of its cameras.

Folder (MOTChallenge's, with the two text files beside the frames)::

    img1/000001.jpg ...   the frames
    gt.txt                frame,id,left,top,width,height,1,1,visibility   (boxes with any pixel visible)
    det.txt               frame,-1,left,top,width,height,confidence,-1,-1,-1   (a simulated detector)
    seqinfo.ini           name, frame rate, length, size (as MOTChallenge tools read it)
    synth_video.json      settings, identities, look-alike pairs, event counts; marks the folder as ours

The detector sees a person whose visible fraction is at least ``min_visibility``, misses it with chance
``miss_rate``, and jitters its box edges; it also reports ``false_rate`` false boxes per frame on average.
The same settings write byte-identical files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from cgpn.data.datasets.synthetic import (
    HAIR,
    PALETTE,
    Pose,
    _camera,
    _Identity,
    _identity,
    apply_camera,
    draw_person,
)
from cgpn.errors import ConfigError
from cgpn.files import check_replaceable_folder, write_folder
from cgpn.track.mot import MotBoxes, write_mot

__all__ = ["MARKER", "PRESETS", "SyntheticVideoSpec", "generate_synthetic_video"]

logger = logging.getLogger(__name__)

MARKER = "synth_video.json"  # the sequence's spec, counts and identities, in every folder cgpn synth-video makes
COMMAND = "cgpn synth-video"
HORIZON, NEAR = 0.60, 0.98  # feet rows (fractions of the height) of the farthest and nearest walkers
LOOKALIKE_CHANGES = ("lower", "bag", "hair", "sleeves", "pattern")  # a look-alike differs in two of these


@dataclass
class SyntheticVideoSpec:
    """Settings of ``cgpn synth-video`` (flags of the same names, ``-`` for ``_``)."""

    frames: int = field(default=600, metadata={"help": "length of the sequence in frames"})
    width: int = field(default=640, metadata={"help": "frame width in pixels"})
    height: int = field(default=360, metadata={"help": "frame height in pixels (people are 28-50 %% of it)"})
    fps: int = field(default=25, metadata={"help": "frames per second (walking speed and pauses are in seconds)"})
    people: int = field(default=10, metadata={"help": "identities walking in the scene"})
    lookalike_pairs: int = field(default=3, metadata={"help": "pairs of identities that differ in two attributes"})
    pillars: int = field(default=2, metadata={"help": "pillars in front of everyone, to hide behind"})
    pause: float = field(default=0.5, metadata={"help": "chance that a person passing a pillar stops behind it"})
    miss_rate: float = field(default=0.05, metadata={"help": "chance that the detector misses a visible person"})
    false_rate: float = field(default=0.2, metadata={"help": "false detections per frame (mean)"})
    jitter: float = field(default=0.04, metadata={"help": "spread of detection box edges (fraction of the box)"})
    min_visibility: float = field(default=0.4, metadata={
        "help": "the detector sees a person with at least this fraction visible"})
    seed: int = field(default=0, metadata={"help": "the same seed writes the same files"})

    def validate(self) -> None:
        """A ConfigError naming the first setting out of range (checked before anything is written)."""
        limits = {"frames": (1, 100_000), "width": (64, 8192), "height": (64, 8192), "fps": (1, 240),
                  "people": (1, 1000), "lookalike_pairs": (0, 500), "pillars": (0, 20), "pause": (0.0, 1.0),
                  "miss_rate": (0.0, 1.0), "false_rate": (0.0, 100.0), "jitter": (0.0, 0.5),
                  "min_visibility": (0.0, 1.0)}
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), type(f.default)
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(
                    value, int)) or not math.isfinite(value)):
                raise ConfigError(f"--{f.name.replace('_', '-')} must be {'an integer' if kind is int else 'a number'}"
                                  f", got {value!r}")
            low, high = limits.get(f.name, (0, 2**63 - 1))
            if not low <= value <= high:
                raise ConfigError(f"--{f.name.replace('_', '-')} must be in [{low}, {high}], got {value}")
        if 2 * self.lookalike_pairs > self.people:
            raise ConfigError(f"--lookalike-pairs {self.lookalike_pairs} needs at least {2 * self.lookalike_pairs} "
                              f"people, got --people {self.people}")
        if self.pillars and self.pillars * _pillar_width(self.height) > self.width * 0.8:
            raise ConfigError(f"{self.pillars} pillars of {_pillar_width(self.height):.0f} px do not fit in a frame "
                              f"{self.width} px wide: use fewer --pillars or a wider frame")


PRESETS: dict[str, SyntheticVideoSpec] = {
    "benchmark": SyntheticVideoSpec(),
    "tiny": SyntheticVideoSpec(frames=120, width=320, height=192, fps=10, people=4, lookalike_pairs=1, pillars=1),
}


def _pillar_width(height: int) -> float:
    return 0.3 * height  # hides the widest, nearest person (about 0.26 x height with a bag)


def _person_height(feet: np.ndarray | float, height: int) -> np.ndarray | float:
    """Pixel height of a person whose feet are on row ``feet``: 28 % of the frame far away, 50 % near."""
    depth = (np.asarray(feet) / height - HORIZON) / (NEAR - HORIZON)
    return height * (0.28 + 0.22 * depth)


def _lookalike(ident: _Identity, rng: np.random.Generator) -> tuple[_Identity, list[str]]:
    """A copy of ``ident`` that differs in two visible attributes (named in the returned list)."""
    changes = sorted(rng.choice(LOOKALIKE_CHANGES, size=2, replace=False).tolist())

    def other(current: np.ndarray, table: np.ndarray) -> np.ndarray:
        choices = table[(table != current).any(axis=1)]
        return choices[rng.integers(len(choices))]

    new: dict[str, object] = {}
    for change in changes:
        if change == "lower":
            new["lower"] = other(ident.lower, PALETTE)
        elif change == "bag":
            kinds = [k for k in ("none", "backpack", "left", "right") if k != ident.bag]
            new["bag"], new["bag_color"] = kinds[rng.integers(len(kinds))], other(ident.bag_color, PALETTE)
        elif change == "hair":
            new["hair"] = other(ident.hair, HAIR)
        elif change == "sleeves":
            new["long_sleeves"] = not ident.long_sleeves
        else:
            patterns = [p for p in ("solid", "hstripes", "vstripes", "checker") if p != ident.pattern]
            new["pattern"] = patterns[rng.integers(len(patterns))]
    return dataclasses.replace(ident, **new), changes


@dataclass
class _Walk:
    """Per-frame state of one person: 0 off stage, 1 walking, 2 standing (behind a pillar); position and pose."""

    state: np.ndarray  # (T,) int8
    cx: np.ndarray  # (T,) centre column
    feet: np.ndarray  # (T,) row of the feet
    back: np.ndarray  # (T,) bool, seen from behind
    phase: np.ndarray  # (T,) gait phase (radians)
    visit: np.ndarray  # (T,) int, visit number (-1 off stage)


def _simulate(spec: SyntheticVideoSpec, pillars: list[float], rng: np.random.Generator,
              first: dict[str, float] | None) -> _Walk:
    """Walk one person through ``spec.frames`` frames (after a warm-up, so the scene starts populated).

    ``first`` scripts the first visit (start frame, side, row, speed; no pauses): look-alike pairs meet.
    """
    fps, w, h = spec.fps, spec.width, spec.height
    warm = int(6 * fps)  # frames walked before the first one written
    total = spec.frames + warm
    out = _Walk(np.zeros(total, np.int8), np.zeros(total), np.zeros(total), np.zeros(total, bool), np.zeros(total),
                np.full(total, -1))
    state, wait = 0, (max(0, warm + round(first["start"])) if first else int(rng.uniform(0, 6) * fps))
    cx = feet = vx = vy = phase = 0.0
    back, visit, paused_at, scripted = False, -1, set(), False

    def enter() -> None:
        nonlocal cx, feet, vx, vy, back, visit, paused_at, scripted, state
        scripted = first is not None and visit == -1
        side = first["side"] if scripted else (-1 if rng.random() < 0.5 else 1)  # -1: from the left
        feet = first["feet"] if scripted else rng.uniform(HORIZON + 0.02, NEAR - 0.02) * h
        ph = _person_height(feet, h)
        speed = (first["speed"] if scripted else rng.uniform(0.5, 0.9)) * ph / fps  # body heights per second
        cx = -0.35 * ph if side < 0 else w + 0.35 * ph
        vx = speed * -side
        target = np.clip(feet + rng.uniform(-0.08, 0.08) * h, (HORIZON + 0.01) * h, (NEAR - 0.01) * h)
        vy = 0.0 if scripted else (target - feet) * speed / (w + 0.7 * ph)
        back, visit, paused_at, state = bool(rng.random() < 0.5), visit + 1, set(), 1

    for t in range(total):
        if state == 0:
            if wait <= 0:
                enter()
            wait -= 1
        elif state == 2:
            wait -= 1
            if wait <= 0:
                state = 1
                if rng.random() < 0.3:
                    vx = -vx  # turns back behind the pillar
        else:
            ph = _person_height(feet, h)
            new_cx = cx + vx
            for i, pc in enumerate(pillars):
                if i not in paused_at and not scripted and (cx - pc) * (new_cx - pc) <= 0 and vx:
                    paused_at.add(i)
                    if rng.random() < spec.pause:
                        new_cx, state, wait = pc, 2, int(rng.uniform(2, 4) * fps)
                        break
            phase += math.pi * abs(new_cx - cx) / (0.4 * ph)
            cx, feet = new_cx, float(np.clip(feet + vy, HORIZON * h, NEAR * h))
            if (vx > 0 and cx - 0.35 * ph > w) or (vx < 0 and cx + 0.35 * ph < 0):
                state, wait = 0, int(rng.uniform(1, 4) * fps)
        out.state[t], out.cx[t], out.feet[t], out.back[t], out.phase[t] = state, cx, feet, back, phase
        out.visit[t] = visit if state else -1
    for name in ("state", "cx", "feet", "back", "phase", "visit"):
        setattr(out, name, getattr(out, name)[warm:])
    return out


def _background(spec: SyntheticVideoSpec, cam: dict[str, object], rng: np.random.Generator) -> np.ndarray:
    """The empty scene (H, W, 3) float: a wall in the camera's colours with doors and posters, a floor."""
    h, w = spec.height, spec.width
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    bg = cam["bg"]
    t = yy[..., None] / h
    img = (bg[0] * (1 - t) + bg[1] * t).astype(np.float32)
    horizon = (HORIZON - 0.04) * h
    img[yy > horizon] = bg[2] * (0.85 + 0.15 * ((yy[yy > horizon] - horizon) / (h - horizon)))[:, None]
    for _ in range(int(rng.integers(3, 7))):
        x0, bw, bh = rng.uniform(0, w), rng.uniform(0.04, 0.12) * w, rng.uniform(0.1, 0.35) * h
        y0 = horizon - bh - rng.uniform(0, 0.1) * h
        img[(yy > y0) & (yy < y0 + bh) & (xx > x0) & (xx < x0 + bw)] = PALETTE[rng.integers(len(PALETTE))] * 0.7 + 40
    return img


def _pillars(spec: SyntheticVideoSpec, rng: np.random.Generator) -> tuple[list[float], list[np.ndarray]]:
    """Pillar centre columns, spread over the frame, and their colours."""
    w = spec.width
    centres = [w * (i + 1) / (spec.pillars + 1) + rng.uniform(-0.04, 0.04) * w for i in range(spec.pillars)]
    colours = [PALETTE[rng.integers(len(PALETTE))] * 0.8 + 30 for _ in range(spec.pillars)]
    return centres, colours


def _render_frame(t: int, spec: SyntheticVideoSpec, background: np.ndarray, walks: list[_Walk],
                  identities: list[_Identity], pillars: tuple[list[float], list[np.ndarray]],
                  cam: dict[str, object], rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[int, np.ndarray, float]]]:
    """Frame ``t`` (H, W, 3) uint8 and, for each person in it, (index, (x1, y1, x2, y2) box, visible fraction)."""
    h, w = spec.height, spec.width
    img = background.copy()
    owner = np.full((h, w), -1, dtype=np.int32)
    on_stage = [k for k, walk in enumerate(walks) if walk.state[t]]
    people = []
    for k in sorted(on_stage, key=lambda k: walks[k].feet[t]):  # far ones first: near ones hide them
        walk = walks[k]
        feet, cx = walk.feet[t], walk.cx[t]
        ph = float(_person_height(feet, h))
        x0, x1 = math.floor(cx - 0.32 * ph), math.ceil(cx + 0.32 * ph) + 1
        y0, y1 = math.floor(feet - ph) - 1, math.ceil(feet) + 1
        if x1 <= 0 or x0 >= w or y1 <= 0 or y0 >= h:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        walking = walk.state[t] == 1
        stride = 0.2 * ph * abs(math.sin(walk.phase[t])) if walking else 0.02 * ph
        swing = 0.12 * ph * math.sin(walk.phase[t]) if walking else 0.0
        canvas = np.zeros((*yy.shape, 3), dtype=np.float32)
        mask = draw_person(canvas, yy, xx, identities[k], Pose(feet - ph, ph, cx, bool(walk.back[t]), stride, swing))
        if not mask.any():
            continue
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        box = np.array([x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1, y0 + rows[-1] + 1], dtype=np.float64)
        inside = (slice(max(y0, 0) - y0, min(y1, h) - y0), slice(max(x0, 0) - x0, min(x1, w) - x0))
        frame_part = (slice(max(y0, 0), min(y1, h)), slice(max(x0, 0), min(x1, w)))
        seen = mask[inside]
        img[frame_part][seen] = canvas[inside][seen]
        owner[frame_part][seen] = k
        people.append((k, box, int(mask.sum())))
    for centre, colour in zip(*pillars):
        half = _pillar_width(h) / 2
        cols = slice(max(0, round(centre - half)), min(w, round(centre + half)))
        img[:, cols] = colour
        img[:, cols.start:cols.start + 3] = colour * 0.6  # shaded edges
        img[:, max(cols.stop - 3, 0):cols.stop] = colour * 0.6
        owner[:, cols] = -1
    visible = np.bincount(owner[owner >= 0], minlength=len(walks))
    out = apply_camera(img, cam, float(rng.uniform(-3, 3)), rng)
    boxes = []
    for k, box, area in people:
        box[[0, 2]], box[[1, 3]] = box[[0, 2]].clip(0, w), box[[1, 3]].clip(0, h)
        boxes.append((k, box, visible[k] / area))
    return out, boxes


def _detect(spec: SyntheticVideoSpec, t: int, people: list[tuple[int, np.ndarray, float]],
            rng: np.random.Generator) -> list[tuple[np.ndarray, float]]:
    """The simulated detector on frame ``t``: jittered boxes of visible people and false boxes, shuffled."""
    h, w = spec.height, spec.width
    found = []
    for _, box, vis in people:
        if vis < spec.min_visibility or rng.random() < spec.miss_rate:
            continue
        bw, bh = box[2] - box[0], box[3] - box[1]
        noisy = box + rng.normal(0, spec.jitter, size=4) * [bw, bh, bw, bh]
        noisy[[0, 2]], noisy[[1, 3]] = noisy[[0, 2]].clip(0, w), noisy[[1, 3]].clip(0, h)
        if noisy[2] - noisy[0] >= 2 and noisy[3] - noisy[1] >= 2:
            found.append((noisy, float(np.clip(0.55 + 0.4 * vis + rng.normal(0, 0.05), 0.05, 1.0))))
    for _ in range(int(rng.poisson(spec.false_rate))):
        feet = rng.uniform(HORIZON, NEAR) * h
        ph = float(_person_height(feet, h)) * rng.uniform(0.6, 1.1)
        cx = rng.uniform(0, w)
        box = np.array([cx - 0.18 * ph, feet - ph, cx + 0.18 * ph, feet])
        box[[0, 2]], box[[1, 3]] = box[[0, 2]].clip(0, w), box[[1, 3]].clip(0, h)
        found.append((box, float(rng.uniform(0.3, 0.6))))
    return [found[i] for i in rng.permutation(len(found))]


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of every run of true values in the 1-D bool array ``flags``."""
    edges = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _events(spec: SyntheticVideoSpec, walks: list[_Walk], seen: list[dict[int, tuple[np.ndarray, float]]],
            pairs: list[tuple[int, int]]) -> dict[str, int]:
    """How often each hard case happens (people counted from 0 here, from 1 in the files)."""
    n, frames = len(walks), spec.frames
    vis = np.zeros((n, frames))
    for t, people in enumerate(seen):
        for k, (_, v) in people.items():
            vis[k, t] = v
    reentries = sum(max(0, len({int(walk.visit[t]) for t in np.flatnonzero(vis[k] > 0)}) - 1)
                    for k, walk in enumerate(walks))
    long_occlusions = 0
    for k, walk in enumerate(walks):  # in the frame but hidden (by a pillar, by others) for over a second
        half = 0.3 * _person_height(walk.feet, spec.height)
        in_view = (walk.state > 0) & (walk.cx + half > 0) & (walk.cx - half < spec.width)
        long_occlusions += sum(stop - start > spec.fps for start, stop in _runs(in_view & (vis[k] < spec.min_visibility)))
    overlap = {}
    for t, people in enumerate(seen):
        keys = sorted(people)
        for i, a in enumerate(keys):
            for b in keys[i + 1:]:
                if _iou(people[a][0], people[b][0]) >= 0.3:
                    overlap.setdefault((a, b), np.zeros(frames, bool))[t] = True
    crossings = {pair: len(_runs(flags)) for pair, flags in overlap.items()}
    return {"reentries": reentries, "long_occlusions": long_occlusions, "crossings": sum(crossings.values()),
            "lookalike_crossings": sum(crossings.get(tuple(sorted(p)), 0) for p in pairs)}


def generate_synthetic_video(out: str | Path, spec: SyntheticVideoSpec | None = None,
                             progress: bool = True) -> dict[str, int]:
    """Write the sequence described by ``spec`` into the folder ``out``; returns counts (frames, boxes, events).

    ``out`` is written as a temporary folder beside it and swapped in whole (``cgpn.files.write_folder``); an
    existing ``out`` is replaced only if this function wrote it or it is empty.
    """
    spec = spec or SyntheticVideoSpec()
    spec.validate()
    check_replaceable_folder(out, COMMAND)  # before minutes of rendering
    rng = np.random.default_rng(spec.seed)
    cam = _camera(rng)
    background = _background(spec, cam, rng)
    pillars = _pillars(spec, rng)
    identities, changes = [], {}
    for k in range(spec.people):
        if k % 2 == 1 and k // 2 < spec.lookalike_pairs:
            twin, changes[k] = _lookalike(identities[k - 1], rng)
            identities.append(twin)
        else:
            identities.append(_identity(rng))
    pairs = [(2 * i, 2 * i + 1) for i in range(spec.lookalike_pairs)]
    scripts: dict[int, dict[str, float]] = {}
    for a, b in pairs:  # walk towards each other on nearly the same row, to meet in view (not behind a pillar)
        feet, speed = rng.uniform(HORIZON + 0.1, NEAR - 0.05) * spec.height, rng.uniform(0.5, 0.9)
        ph = float(_person_height(feet, spec.height))
        meet_t, meet_x = rng.uniform(0.2, 0.5) * spec.frames, rng.uniform(0.3, 0.7) * spec.width
        for _ in range(20):
            if all(abs(meet_x - c) > _pillar_width(spec.height) / 2 + 0.3 * ph for c in pillars[0]):
                break
            meet_x = rng.uniform(0.15, 0.85) * spec.width
        step = speed * ph / spec.fps
        scripts[a] = {"side": -1, "feet": feet, "speed": speed, "start": meet_t - (meet_x + 0.35 * ph) / step}
        scripts[b] = {"side": 1, "feet": feet + 0.02 * spec.height, "speed": speed,
                      "start": meet_t - (spec.width + 0.35 * ph - meet_x) / step}
    walks = [_simulate(spec, pillars[0], np.random.default_rng([spec.seed, 1, k]), scripts.get(k))
             for k in range(spec.people)]

    gt_rows, det_rows, seen = [], [], []
    with write_folder(out, COMMAND) as tmp:
        (tmp / "img1").mkdir()
        for t in tqdm(range(spec.frames), desc="synth-video", unit="frame", disable=not progress):
            frame_rng = np.random.default_rng([spec.seed, 2, t])
            pixels, people = _render_frame(t, spec, background, walks, identities, pillars, cam, frame_rng)
            Image.fromarray(pixels).save(tmp / "img1" / f"{t + 1:06d}.jpg", quality=90)
            people = [(k, box, vis) for k, box, vis in people if vis > 0]
            seen.append({k: (box, vis) for k, box, vis in people})
            gt_rows += [(t + 1, k + 1, box, vis) for k, box, vis in people]
            det_rows += [(t + 1, box, conf) for box, conf in _detect(spec, t, people, np.random.default_rng(
                [spec.seed, 3, t]))]
        gt = MotBoxes.from_rows([r[0] for r in gt_rows], [r[1] for r in gt_rows],
                                [np.r_[r[2][:2], r[2][2:] - r[2][:2]] for r in gt_rows],
                                np.ones(len(gt_rows)), np.ones(len(gt_rows)), [r[3] for r in gt_rows])
        det = MotBoxes.from_rows([r[0] for r in det_rows], np.full(len(det_rows), -1),
                                 [np.r_[r[1][:2], r[1][2:] - r[1][:2]] for r in det_rows], [r[2] for r in det_rows])
        write_mot(tmp / "gt.txt", gt, "ground truth")
        write_mot(tmp / "det.txt", det, "detections")
        (tmp / "seqinfo.ini").write_text(
            f"[Sequence]\nname={Path(out).name}\nimDir=img1\nframeRate={spec.fps}\nseqLength={spec.frames}\n"
            f"imWidth={spec.width}\nimHeight={spec.height}\nimExt=.jpg\n")
        events = _events(spec, walks, seen, pairs)
        counts = {"frames": spec.frames, "gt_boxes": len(gt), "detections": len(det), **events}
        (tmp / MARKER).write_text(json.dumps({
            "generator": COMMAND, "spec": asdict(spec), "counts": counts,
            "lookalike_pairs": [{"ids": [a + 1, b + 1], "differ_in": changes[b]} for a, b in pairs],
            "identities": {str(k + 1): _describe(ident) for k, ident in enumerate(identities)},
        }, indent=1))
    logger.debug("wrote %s frames to %s", spec.frames, out)
    return counts


def _describe(ident: _Identity) -> dict[str, object]:
    """An identity's attributes as JSON values (colours as RGB lists)."""
    return {k: (v.astype(int).tolist() if isinstance(v, np.ndarray) else v) for k, v in asdict(ident).items()}
