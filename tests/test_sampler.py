"""P x K sampler: batch structure, both epoch definitions (SPEC 7), determinism, distributed union."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from cgpn.data.sampler import PKSampler
from cgpn.errors import ConfigError


def _pids(counts: list[int]) -> list[int]:
    """pid i repeated counts[i] times, shuffled (dataset order must not matter)."""
    pids = [pid for pid, n in enumerate(counts) for _ in range(n)]
    return np.random.default_rng(123).permutation(pids).tolist()


MARKET_LIKE = _pids([2 + (i * 7) % 30 for i in range(751)])  # 751 ids, 2..31 images each


def _groups(batch: list[int], pids: list[int], k: int) -> list[list[int]]:
    return [batch[i:i + k] for i in range(0, len(batch), k)]


def test_pk_structure_identities_epoch() -> None:
    pids = MARKET_LIKE
    sampler = PKSampler(pids, batch_size=64, num_instances=8)
    batches = list(sampler)
    assert len(batches) == len(sampler) == math.ceil(751 / 8) == 94  # SPEC 7: Market, 94 iterations
    drawn = []
    for batch in batches:
        assert len(batch) == 64
        groups = _groups(batch, pids, 8)
        ids = [pids[g[0]] for g in groups]
        assert len(set(ids)) == 8  # P distinct identities
        for g, pid in zip(groups, ids):
            assert all(pids[i] == pid for i in g)  # K images of one identity
            if pids.count(pid) >= 8:
                assert len(set(g)) == 8  # without replacement when there are enough
        drawn += ids
    counts = Counter(drawn)
    assert set(counts) == set(range(751))  # every identity once ...
    assert sum(c == 2 for c in counts.values()) == 94 * 8 - 751 and max(counts.values()) <= 2  # ... the last group filled


def test_last_group_is_filled_with_other_identities() -> None:
    """20 identities in groups of P = 8: the third group takes 4 identities a second time, never one that is
    already in it (a batch is always P distinct identities)."""
    pids = _pids([3] * 20)
    for seed in range(50):
        batches = list(PKSampler(pids, batch_size=16, num_instances=2, seed=seed))
        ids = [[pids[g[0]] for g in _groups(b, pids, 2)] for b in batches]
        assert len(ids) == 3 and all(len(set(group)) == 8 for group in ids), (seed, ids)
        assert set().union(*map(set, ids)) == set(range(20))


def test_images_epoch_length() -> None:
    sampler = PKSampler(MARKET_LIKE, batch_size=64, num_instances=8, epoch_mode="images")
    assert len(sampler) == len(MARKET_LIKE) // 64
    for batch in sampler:
        ids = [MARKET_LIKE[g[0]] for g in _groups(batch, MARKET_LIKE, 8)]
        assert len(set(ids)) == 8


def test_few_images_sampled_with_replacement() -> None:
    """pid 0 (1 image) and pid 1 (3 images) fill their K = 4 slots with repeats, drawn from all their images;
    pid 2 (8) and pid 3 (20) never repeat one."""
    pids = _pids([1, 3, 8, 20])
    sampler = PKSampler(pids, batch_size=8, num_instances=4)
    seen = Counter()
    drawn = {pid: set() for pid in range(4)}
    for epoch in range(5):
        sampler.set_epoch(epoch)
        for batch in sampler:
            for g in _groups(batch, pids, 4):
                pid = pids[g[0]]
                assert len(g) == 4 and all(pids[i] == pid for i in g)
                seen[pid] += 1
                drawn[pid].update(g)
                if pid >= 2:
                    assert len(set(g)) == 4  # enough images: no repeat
    assert set(seen) == {0, 1, 2, 3}
    for pid in (0, 1):  # over the epochs, every image of a short identity is drawn
        assert drawn[pid] == {i for i, p in enumerate(pids) if p == pid}


def test_deterministic_from_seed_and_epoch() -> None:
    a = PKSampler(MARKET_LIKE, 64, 8, seed=5)
    b = PKSampler(MARKET_LIKE, 64, 8, seed=5)
    assert list(a) == list(b)
    a.set_epoch(1)
    b.set_epoch(1)
    epoch1 = list(a)
    assert epoch1 == list(b) and epoch1 != list(PKSampler(MARKET_LIKE, 64, 8, seed=5))
    assert list(PKSampler(MARKET_LIKE, 64, 8, seed=6)) != list(PKSampler(MARKET_LIKE, 64, 8, seed=5))
    a.set_epoch(0)
    assert list(a) == list(PKSampler(MARKET_LIKE, 64, 8, seed=5))  # going back gives the same epoch


@pytest.mark.parametrize("mode", ["identities", "images"])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_distributed_union_equals_single_process(mode: str, world: int) -> None:
    single = PKSampler(MARKET_LIKE, 64, 8, epoch_mode=mode, seed=2)
    single.set_epoch(3)
    whole = list(single)
    ranks = [PKSampler(MARKET_LIKE, 64, 8, epoch_mode=mode, seed=2, rank=r, world_size=world) for r in range(world)]
    per_rank = []
    for s in ranks:
        s.set_epoch(3)
        per_rank.append(list(s))
    # every rank runs the same number of iterations
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == len(ranks[0]) == math.ceil(len(whole) / world)
    # the union over ranks is the single-process epoch (plus the wrapped padding batches, taken from it)
    union = [tuple(b) for r in per_rank for b in r]
    assert set(union) == {tuple(b) for b in whole}
    assert len(union) - len(whole) == len(per_rank[0]) * world - len(whole) < world
    # at each step the ranks draw different identities (identities mode: one epoch = each id once)
    if mode == "identities":
        for step in range(len(per_rank[0]) - 1):
            ids = [{MARKET_LIKE[i] for i in per_rank[r][step]} for r in range(world)]
            assert sum(len(x) for x in ids) == len(set().union(*ids))


def test_resume_mid_epoch() -> None:
    sampler = PKSampler(MARKET_LIKE, 64, 8, seed=1)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, start_batch=10)
    assert list(sampler) == full[10:]


def test_bad_settings() -> None:
    with pytest.raises(ConfigError, match=r"data.batch_size \(60\) must be a multiple of data.num_instances \(8\)"):
        PKSampler(MARKET_LIKE, 60, 8)
    with pytest.raises(ConfigError, match="3 training identities cannot fill a batch of 8"):
        PKSampler([0, 1, 2], 64, 8)
    with pytest.raises(ConfigError, match=r"data\.epoch_mode"):
        PKSampler(MARKET_LIKE, 64, 8, epoch_mode="epochs")


@pytest.mark.parametrize("mode", ["identities", "images"])
def test_more_processes_than_batches_still_give_every_rank_its_batches(mode: str) -> None:
    """16 identities in batches of 8: 2 batches an epoch for 8 processes. Each process must still run
    len(sampler) = 1 batch, or the ones without a batch wait for the others' gradients forever."""
    pids = [i // 4 for i in range(64)]
    ranks = [PKSampler(pids, 32, 4, epoch_mode=mode, rank=r, world_size=8) for r in range(8)]
    assert [len(list(s)) for s in ranks] == [len(s) for s in ranks] == [1] * 8
