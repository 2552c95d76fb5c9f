"""Data set readers, by name. Each returns train / query / gallery lists of ``Sample(path, pid, camid)``.

``build_dataset`` reads one set, or several training sets joined with ``+`` (``market1501+dukemtmc``:
identities kept apart, query and gallery of the first). Reader options are ``data.*`` settings.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cgpn.config import DataConfig
from cgpn.data.datasets.base import CombinedDataset, MarketLayoutDataset, ReidDataset, Sample
from cgpn.data.datasets.cuhk03 import CUHK03
from cgpn.data.datasets.dukemtmc import DukeMTMC
from cgpn.data.datasets.folder import FolderDataset
from cgpn.data.datasets.market1501 import Market1501
from cgpn.data.datasets.msmt17 import MSMT17
from cgpn.data.datasets.synthetic import SyntheticReid, generate_synthetic
from cgpn.errors import ConfigError

__all__ = ["CUHK03", "DATASETS", "MSMT17", "CombinedDataset", "DukeMTMC", "FolderDataset", "Market1501",
           "MarketLayoutDataset", "ReidDataset", "Sample", "SyntheticReid", "build_dataset", "dataset_from_config",
           "generate_synthetic"]

# name -> reader built from (root, data settings)
DATASETS: dict[str, Callable[[Path, DataConfig], ReidDataset]] = {
    "market1501": lambda root, c: Market1501(root, verify_counts=c.verify_counts),
    "dukemtmc": lambda root, c: DukeMTMC(root, verify_counts=c.verify_counts),
    "cuhk03": lambda root, c: CUHK03(root, labeled=c.cuhk03_labeled, cache_dir=c.cuhk03_cache or None,
                                     verify_counts=c.verify_counts),
    "msmt17": lambda root, c: MSMT17(root, train_val=c.msmt17_train_val, verify_counts=c.verify_counts),
    "folder": lambda root, c: FolderDataset(root, camera_regex=c.folder_camera_regex, csv=c.folder_csv,
                                            test_ids=c.folder_test_ids, split_seed=c.folder_split_seed),
    "synthetic": lambda root, c: SyntheticReid(root),
}


def build_dataset(name: str, root: str | Path, cfg: DataConfig | None = None) -> ReidDataset:
    """Read data set ``name`` (or ``a+b``) from ``root`` with the options of ``cfg`` (defaults if None).

    A ``DatasetError`` names what is wrong with the folder; an unknown name is a ``ConfigError``.
    """
    cfg = cfg or DataConfig()
    names = [n.strip() for n in name.split("+")]
    for n in names:
        if n not in DATASETS:
            raise ConfigError(f"unknown dataset '{n}' in data.dataset '{name}'; choose one of "
                              f"{', '.join(DATASETS)} (or join training sets with +, e.g. market1501+dukemtmc)")
    if len(set(names)) != len(names):
        raise ConfigError(f"data.dataset '{name}' names a data set twice (expected distinct names, "
                          f"e.g. market1501+dukemtmc)")
    parts = [DATASETS[n](Path(root).expanduser(), cfg) for n in names]
    return parts[0] if len(parts) == 1 else CombinedDataset(parts)


def dataset_from_config(data: DataConfig) -> ReidDataset:
    """The data set a config names, read with that config's reader options (what every command uses), with
    its validation split held out of the training set when ``data.val_ids`` is set."""
    dataset = build_dataset(data.dataset, data.root, data)
    if data.val_ids > 0:
        dataset.hold_out_validation(data.val_ids, data.val_seed)
    return dataset
