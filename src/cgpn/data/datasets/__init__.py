"""Data set readers, by name. Each returns train / query / gallery lists of ``Sample(path, pid, camid)``."""

from __future__ import annotations

from pathlib import Path

from cgpn.data.datasets.base import MarketLayoutDataset, ReidDataset, Sample
from cgpn.data.datasets.market1501 import Market1501
from cgpn.data.datasets.synthetic import SyntheticReid, generate_synthetic
from cgpn.errors import ConfigError

__all__ = ["DATASETS", "Market1501", "MarketLayoutDataset", "ReidDataset", "Sample", "SyntheticReid",
           "build_dataset", "generate_synthetic"]

DATASETS: dict[str, type[ReidDataset]] = {
    "market1501": Market1501,
    "synthetic": SyntheticReid,
}


def build_dataset(name: str, root: str | Path) -> ReidDataset:
    """Read data set ``name`` from ``root`` (a ``DatasetError`` names what is wrong with the folder)."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)} (data.dataset)")
    return DATASETS[name](root)
