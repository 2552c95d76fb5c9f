"""Seconds to read a data set's file lists without opening images: a 100k-file Market layout and folder set.

    python benchmarks/scan_speed.py --files 100000

The files are empty (never decoded), so a reader that opened them would fail, not just be slow.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from cgpn.data.datasets import FolderDataset, Market1501
from cgpn.engine.precision import machine_description


def market_tree(root: Path, files: int, per_id: int = 20) -> None:
    """``files`` empty files, split 40 / 10 / 50 % over train / query / gallery, ``per_id`` per identity."""
    for sub, share in (("bounding_box_train", 0.4), ("query", 0.1), ("bounding_box_test", 0.5)):
        folder = root / "Market-1501" / sub
        folder.mkdir(parents=True)
        first = 1 if sub == "bounding_box_train" else 100_000
        for i in range(int(files * share)):
            (folder / f"{first + i // per_id:06d}_c{1 + i % 6}s1_{i:06d}_00.jpg").touch()


def folder_tree(root: Path, files: int, per_id: int = 20) -> None:
    for i in range(files):
        folder = root / f"{i // per_id:06d}"
        if i % per_id == 0:
            folder.mkdir(parents=True)
        (folder / f"{i // per_id:06d}_c{1 + i % 6}_{i:06d}.jpg").touch()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=100_000)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"machine: {machine_description()} (the scan itself is one Python thread, no torch)")
    with tempfile.TemporaryDirectory() as tmp:
        market_tree(Path(tmp) / "m", args.files)
        # query ids of this tree are in its gallery only by construction of the shares
        start = time.perf_counter()
        ds = Market1501(Path(tmp) / "m", verify_counts="ignore")
        total = len(ds.train) + len(ds.query) + len(ds.gallery)
        print(f"market1501 layout: {total} files in {time.perf_counter() - start:.2f} s")
        folder_tree(Path(tmp) / "f", args.files)
        start = time.perf_counter()
        ds = FolderDataset(Path(tmp) / "f")
        total = len(ds.train) + len(ds.query) + len(ds.gallery)
        print(f"folder set (made split): {total} files in {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
