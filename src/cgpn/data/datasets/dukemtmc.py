"""DukeMTMC-reID (Zheng et al., ICCV 2017): 702 training and 702 test identities, 8 cameras.

Layout: ``DukeMTMC-reID/{bounding_box_train,query,bounding_box_test}``; names like
``0001_c2_f0046182.jpg`` (pid, camera c1..c8, frame). There is no junk; the gallery holds 408
distractor identities besides the 702 test ids. Official counts: train 16,522 images / 702 ids;
query 2,228 / 702; gallery 17,661 / 1,110.
"""

from __future__ import annotations

from typing import ClassVar

from cgpn.data.datasets.base import MarketLayoutDataset

__all__ = ["DukeMTMC"]


class DukeMTMC(MarketLayoutDataset):
    """DukeMTMC-reID reader; ``root`` is the folder that holds ``DukeMTMC-reID`` (or that folder).

    Example:
        >>> ds = DukeMTMC("~/data")  # doctest: +SKIP
        >>> len(ds.query)
        2228
    """

    name = "dukemtmc"
    folder_names = ("DukeMTMC-reID", "dukemtmc-reid", "dukemtmc")  # torchreid: dukemtmc-reid/DukeMTMC-reID
    example_name = "0001_c2_f0046182.jpg"
    junk_pids = ()
    num_cameras = 8
    official: ClassVar[dict[str, tuple[int, int]]] = {"train": (702, 16522), "query": (702, 2228), "gallery": (1110, 17661)}
