"""Shared pieces of the benchmarks: a deterministic Market-1501-size test set, peak-memory and timing helpers.

The test set has Market-1501's shape (3,368 queries, 15,913 gallery images: 13,115 of 751 identities plus
2,798 distractors with pid 0, 6 cameras, no junk). Features are synthetic: an identity centre plus a camera
shift plus per-image noise, tuned so that Rank-1 and mAP look like those of a trained network (a random
distance matrix would be unrealistically hard for re-ranking and trivially uninformative for ranking).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # fastreid_ref (fast-reid's evaluators as references), _memory

from _memory import reset_peak, status_bytes  # noqa: E402  (from tests/, on the path just above)

NUM_IDS, NUM_CAMS, NUM_QUERY, NUM_GALLERY_IDS, NUM_DISTRACTORS = 751, 6, 3368, 13115, 2798


@dataclass
class MarketCase:
    """Query and gallery features with identities and cameras (NumPy)."""

    qf: np.ndarray
    gf: np.ndarray
    q_pids: np.ndarray
    g_pids: np.ndarray
    q_camids: np.ndarray
    g_camids: np.ndarray


def market_case(dim: int = 2048, seed: int = 0, noise: float = 0.7, latent: int = 64) -> MarketCase:
    """A deterministic Market-1501-size case with ``dim``-d float32 features.

    Like a network's features, they vary in a few directions: identity centre + camera shift + noise in a
    ``latent``-d space, projected to ``dim`` dimensions, plus a little isotropic noise.
    """
    rng = np.random.default_rng(seed)
    cams_of = [rng.choice(NUM_CAMS, size=rng.integers(2, NUM_CAMS + 1), replace=False) for _ in range(NUM_IDS)]
    ids = np.arange(1, NUM_IDS + 1)
    g_pids = np.concatenate([ids.repeat(2), rng.choice(ids, NUM_GALLERY_IDS - 2 * NUM_IDS)])
    q_pids = np.concatenate([ids.repeat(4), rng.choice(ids, NUM_QUERY - 4 * NUM_IDS, replace=False)])
    g_cams = np.array([rng.choice(cams_of[p - 1]) for p in g_pids])
    q_cams = np.array([rng.choice(cams_of[p - 1]) for p in q_pids])
    g_pids = np.concatenate([g_pids, np.zeros(NUM_DISTRACTORS, dtype=np.int64)])
    g_cams = np.concatenate([g_cams, rng.integers(0, NUM_CAMS, NUM_DISTRACTORS)])
    centres = rng.standard_normal((NUM_IDS + 1, latent))
    shifts = 0.5 * rng.standard_normal((NUM_CAMS, latent))
    project = rng.standard_normal((latent, dim)) / np.sqrt(latent)

    def feats(pids: np.ndarray, cams: np.ndarray) -> np.ndarray:
        base = np.where((pids == 0)[:, None], rng.standard_normal((len(pids), latent)), centres[pids])
        x = (base + shifts[cams] + noise * rng.standard_normal((len(pids), latent))) @ project
        return (x + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)

    g_order = rng.permutation(len(g_pids))  # gallery in no particular order, like a folder listing
    g_pids, g_cams = g_pids[g_order], g_cams[g_order]
    return MarketCase(feats(q_pids, q_cams), feats(g_pids, g_cams), q_pids, g_pids, q_cams, g_cams)


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", help="cpu or cuda (cgpn runs there; fast-reid runs on the CPU)")
    p.add_argument("--dim", type=int, default=2048, help="feature size of the synthetic case")
    p.add_argument("--repeat", type=int, default=1, help="timed runs of each side (the best is reported)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "cgpn-bench"),
                   help="folder for fast-reid's compiled Cython evaluator")
    return p


def parse(p: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse the command line and apply ``--threads``."""
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Peak memory above the starting point inside the block, in bytes (``out["peak"]``): resident set of
    this process on the CPU (the kernel's high-water mark, reset on entry), allocated memory on a GPU."""
    out: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield out
        torch.cuda.synchronize(device)
        out["peak"] = torch.cuda.max_memory_allocated(device) - start
        return
    start = reset_peak()
    yield out
    out["peak"] = status_bytes("VmHWM") - start


def timed(fn, repeat: int, device: torch.device) -> tuple[float, object]:
    """(best wall time in seconds over ``repeat`` runs, last result)."""
    best, result = float("inf"), None
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best, result


def machine_line() -> str:
    """This machine as the benchmarks report it: CPU model, the flags that decide the fast paths (AVX2, AVX-512,
    AVX512-BF16, AMX), torch threads and version; the GPU name when there is one."""
    model, flags = "unknown CPU", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
    present = " ".join(f for f in wanted if f in flags) or "none of " + "/".join(wanted)
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{model}, flags {present}; torch {torch.__version__}, {torch.get_num_threads()} threads "
            f"(capability {torch.backends.cpu.get_cpu_capability()}){gpu}")
