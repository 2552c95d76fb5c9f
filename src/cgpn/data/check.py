"""``cgpn check-data``: open and decode every image of a data set, and report what cannot be read.

Reading a data set never opens its images (so that 100k files scan in seconds); this check does,
with a thread pool (decoding releases the GIL), and lists every unreadable file with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tqdm import tqdm

from cgpn.data.datasets.base import ReidDataset, Sample
from cgpn.data.loader import DECODE_ERRORS, decode_rgb

__all__ = ["ImageCheck", "check_images", "decode_problem"]


def decode_problem(path: str) -> tuple[str | None, tuple[int, int]]:
    """(None, (width, height)) if ``path`` decodes fully, as training reads it, else (the reason, (0, 0))."""
    try:
        return None, decode_rgb(path).size
    except DECODE_ERRORS as err:
        return f"{type(err).__name__}: {err}", (0, 0)


@dataclass
class ImageCheck:
    """What ``check_images`` found: per subset, the images read and the bad files with their reason."""

    counts: dict[str, int] = field(default_factory=dict)
    bad: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    min_size: tuple[int, int] = (0, 0)  # smallest (width, height) seen
    max_size: tuple[int, int] = (0, 0)

    @property
    def num_bad(self) -> int:
        return sum(len(v) for v in self.bad.values())

    def report(self) -> str:
        """Lines for the terminal: a table per subset, then one line per bad file."""
        lines = ["  subset   | images |  bad", "  ---------+--------+-----"]
        lines += [f"  {s:<8} | {n:>6} | {len(self.bad.get(s, [])):>4}" for s, n in self.counts.items()]
        if sum(self.counts.values()) > self.num_bad:
            lines.append(f"image sizes (w x h): {self.min_size[0]}x{self.min_size[1]} .. "
                         f"{self.max_size[0]}x{self.max_size[1]}")
        for subset, items in self.bad.items():
            lines += [f"bad {subset} image: {path}: {reason}" for path, reason in items]
        lines.append(f"{self.num_bad} unreadable image(s)" if self.num_bad else "every image is readable")
        return "\n".join(lines)


def check_images(dataset: ReidDataset, workers: int = 4, progress: bool = True) -> ImageCheck:
    """Decode every image of ``dataset`` (train, query, gallery) and collect the failures."""
    subsets: dict[str, Sequence[Sample]] = {"train": dataset.train, "query": dataset.query,
                                            "gallery": dataset.gallery}
    jobs = [(name, s.path) for name, samples in subsets.items() for s in samples]
    result = ImageCheck(counts={n: len(s) for n, s in subsets.items()})
    sizes = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        outcomes = pool.map(decode_problem, (p for _, p in jobs))
        for (subset, path), (problem, size) in tqdm(zip(jobs, outcomes), total=len(jobs), desc="check-data",
                                                    unit="img", disable=not progress):
            if problem is None:
                sizes.append(size)
            else:
                result.bad.setdefault(subset, []).append((path, problem))
    if sizes:
        result.min_size = (min(w for w, _ in sizes), min(h for _, h in sizes))
        result.max_size = (max(w for w, _ in sizes), max(h for _, h in sizes))
    return result
