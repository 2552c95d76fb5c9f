"""Identities held out by a hash, and one query per camera picked per held-out identity.

The folder reader's made test split and the validation split of ``data.val_ids`` follow the same
rules: an identity is held out when a hash of (seed, its name) is among the lowest, so adding
identities to a set never moves another one (for a fraction; a count keeps the lowest hashes), and
each held-out identity gives one query image per camera as long as a gallery image from another
camera remains for every query.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

import numpy as np

from cgpn.errors import DatasetError

__all__ = ["held_out", "identity_hash", "pick_queries"]

T = TypeVar("T")


def identity_hash(seed: int, name: str) -> int:
    """A 32-bit hash of an identity's name under ``seed`` (CRC-32: stable across runs and machines)."""
    return zlib.crc32(f"{seed}/{name}".encode())


def held_out(names: Sequence[str], amount: float, seed: int, what: str = "test") -> list[str]:
    """The identities of ``names`` to hold out, in hash order.

    Args:
        names: distinct identity names (at least 2).
        amount: a fraction in (0, 1): the identities whose hash falls below that fraction of the hash
            range; or a whole count >= 1: the ``amount`` identities of lowest hash. At least one identity
            is held out and at least one is kept.
        seed: seed of the hash.
        what: what the held-out identities are for (in the error message).
    """
    if len(names) < 2:
        raise DatasetError(f"a {what} split needs at least 2 identities (one to train on, one to hold out), "
                           f"found {len(names)}: {', '.join(names) or 'none'}")
    ordered = sorted(names, key=lambda n: (identity_hash(seed, n), n))
    count = sum(identity_hash(seed, n) < amount * 2 ** 32 for n in names) if amount < 1 else int(amount)
    return ordered[:min(len(names) - 1, max(1, count))]


def pick_queries(images: Sequence[T], camera: Callable[[T], Hashable], rng: np.random.Generator,
                 camera_order: Callable[[Any], Any] | None = None) -> tuple[list[T], list[T]]:
    """(queries, gallery) of one identity's images: at most one query per camera, in a random camera
    order, each kept only if every query still has a gallery image from another camera."""
    remaining = sorted(images)
    cams = sorted({camera(im) for im in remaining}, key=camera_order)
    queries: list[T] = []
    for cam in (cams[i] for i in rng.permutation(len(cams))):
        own = [im for im in remaining if camera(im) == cam]
        pick = own[rng.integers(len(own))]
        rest = [im for im in remaining if im != pick]
        if all(any(camera(g) != camera(q) for g in rest) for q in (*queries, pick)):
            queries.append(pick)
            remaining = rest
    return queries, remaining
