"""k-reciprocal re-ranking at Market-1501 size: cgpn's ``rerank`` against fast-reid's ``re_ranking``.

    PYTHONPATH=src .venv/bin/python benchmarks/rerank_speed.py [--device cuda] [--dim 2048]

Builds the deterministic Market-size case (benchmarks/common.py). fast-reid side, from features: the
three Euclidean distance matrices its ``re_ranking`` takes (q-g, q-q, g-g; computed with torch as its
``compute_euclidean_distance`` does, plus the square root ``re_ranking`` expects), then ``re_ranking``
(fastreid/evaluation/rerank.py, loaded from the installed package). cgpn side: ``rerank(qf, gf)`` on
``--device``. Both use k1=20, k2=6, lambda=0.3 on L2-normalised features. Checks the re-ranked matrices
agree (max abs difference 1e-5; Rank-1 and mAP of both to 1e-4) and prints one line: times, ratio, peak
memory (resident set above the start on the CPU, allocated memory on a GPU). Needs about 10 GB free RAM
for fast-reid's dense matrices; ``--skip-peer`` times cgpn alone.
"""

from __future__ import annotations

import gc

import numpy as np
import torch
from common import base_parser, market_case, parse, peak_memory, timed

from cgpn.metrics.rank import evaluate, pairwise_distance
from cgpn.metrics.rerank import rerank
from fastreid_ref import load_rerank


def run_cgpn(q: torch.Tensor, g: torch.Tensor, device: torch.device, repeat: int):
    """(best time, re-ranked distances as NumPy, peak memory) of cgpn's rerank on ``device``."""
    q, g = q.to(device), g.to(device)
    with peak_memory(device) as mem:
        t, out = timed(lambda: rerank(q, g, k1=20, k2=6, lambda_value=0.3), repeat, device)
    return t, out.cpu().numpy(), mem


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--skip-peer", action="store_true", help="time cgpn only (no 10 GB dense reference)")
    args = parse(p)
    device = torch.device(args.device)
    case = market_case(dim=args.dim)
    labels = (case.q_pids, case.g_pids, case.q_camids, case.g_camids)
    q, g = torch.from_numpy(case.qf), torch.from_numpy(case.gf)
    t_cgpn, ours, mem = run_cgpn(q, g, device, args.repeat)
    r = evaluate(ours, *labels)
    line = (f"rerank {len(q)}x{len(g)} dim {args.dim} ({args.device}, {torch.get_num_threads()} CPU threads): "
            f"cgpn {t_cgpn:.2f} s, peak {mem['peak'] / 2**20:.0f} MB ({'GPU' if device.type == 'cuda' else 'RSS'}); "
            f"Rank-1 {100 * r.rank(1):.2f} mAP {100 * r.mAP:.2f}")
    if args.skip_peer:
        print(line)
        return
    re_ranking = load_rerank().re_ranking
    gc.collect()

    def peer() -> np.ndarray:
        dists = [pairwise_distance(a, b).numpy() for a, b in ((q, g), (q, q), (g, g))]
        return re_ranking(*dists, k1=20, k2=6, lambda_value=0.3)

    with peak_memory(torch.device("cpu")) as peer_mem:
        t_peer, theirs = timed(peer, 1, torch.device("cpu"))
    rp = evaluate(theirs, *labels)
    diff = float(np.abs(ours - theirs).max())
    agree = diff <= 1e-5 and abs(r.rank(1) - rp.rank(1)) <= 1e-4 and abs(r.mAP - rp.mAP) <= 1e-4
    print(f"{line}; fastreid {t_peer:.2f} s, peak {peer_mem['peak'] / 2**20:.0f} MB (RSS); ratio "
          f"{t_peer / t_cgpn:.1f}x; max abs diff {diff:.1e}, Rank-1 {100 * rp.rank(1):.2f} mAP {100 * rp.mAP:.2f}"
          f"{'' if agree else '  MISMATCH'}")
    if not agree:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
