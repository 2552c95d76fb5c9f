"""Market-1501 (Zheng et al., ICCV 2015): 751 training and 750 test identities, 6 cameras.

Layout: ``Market-1501-v15.09.15/{bounding_box_train,query,bounding_box_test}``; names like
``0002_c1s1_000451_00.jpg``; the ``gt_bbox/``, ``gt_query/`` and other extras are ignored. Official
counts: train 12,936 images / 751 ids; query 3,368 / 750; gallery 15,913 with the pid-0000
distractors (751 ids), 19,732 before the pid -1 junk is dropped.
"""

from __future__ import annotations

from typing import ClassVar

from cgpn.data.datasets.base import MarketLayoutDataset

__all__ = ["Market1501"]


class Market1501(MarketLayoutDataset):
    """Market-1501 reader; ``root`` is the folder that holds ``Market-1501-v15.09.15`` (or that folder).

    Example:
        >>> ds = Market1501("~/data")  # doctest: +SKIP
        >>> ds.num_train_pids
        751
    """

    name = "market1501"
    folder_names = ("Market-1501-v15.09.15", "Market-1501", "market1501")
    num_cameras = 6
    official: ClassVar[dict[str, tuple[int, int]]] = {"train": (751, 12936), "query": (750, 3368), "gallery": (751, 15913)}
