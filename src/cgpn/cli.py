"""The ``cgpn`` command: argument parsing only; every verb calls the Python API.

A user mistake ends in one line on stderr and exit status 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

import numpy as np

from cgpn.config import Config, apply_overrides, load_config
from cgpn.errors import CgpnError, ConfigError

__all__ = ["main"]

logger = logging.getLogger("cgpn")


def _add_config_args(p: argparse.ArgumentParser, config: bool = True) -> None:
    if config:
        p.add_argument("--config", help="YAML config (e.g. configs/demo.yaml); defaults are the paper's recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set solver.lr=0.001 (repeatable; wins over the file)")
    p.add_argument("--dataset", help="shorthand for --set data.dataset=NAME")
    p.add_argument("--data-root", help="shorthand for --set data.root=DIR")


def _shorthands(args: argparse.Namespace) -> list[str]:
    extra = []
    if getattr(args, "dataset", None):
        extra.append(f"data.dataset={args.dataset}")
    if getattr(args, "data_root", None):
        extra.append(f"data.root={args.data_root}")
    if getattr(args, "rerank", False):
        extra.append("test.rerank=true")
    return extra + args.overrides


def _config(args: argparse.Namespace) -> Config:
    return load_config(getattr(args, "config", None), _shorthands(args))


def _model_and_config(args: argparse.Namespace):
    """The checkpoint's network and config, with command-line overrides applied to the config."""
    from cgpn.engine.checkpoint import load_model

    model, cfg = load_model(args.checkpoint)
    return model, apply_overrides(cfg, _shorthands(args))


# --- verbs -------------------------------------------------------------------------------------------


def cmd_synth(args: argparse.Namespace) -> int:
    from cgpn.data.datasets.synthetic import PRESETS, generate_synthetic

    if args.preset not in PRESETS:
        raise ConfigError(f"unknown preset '{args.preset}'; choose one of {', '.join(PRESETS)}")
    spec = dataclasses.replace(PRESETS[args.preset], **{
        f.name: getattr(args, f.name) for f in dataclasses.fields(PRESETS[args.preset])
        if getattr(args, f.name) is not None})
    counts = generate_synthetic(args.out, spec)
    print(f"wrote {sum(counts.values())} images to {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from cgpn.engine.trainer import train

    cfg = _config(args)
    result = train(cfg, resume=args.resume, finetune=args.finetune)
    if result.rank != 0:  # under torchrun, rank 0 reports
        return 0
    if 0 in result.evaluations:
        print(f"untrained: {result.evaluations[0].summary()}")
    last = max(result.evaluations) if result.evaluations else None
    if last:
        print(f"trained (epoch {last}): {result.evaluations[last].summary()}")
    print(f"checkpoint: {result.checkpoint}")
    if result.best_checkpoint:
        print(f"best (mAP): {result.best_checkpoint}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from cgpn.data.datasets import build_dataset
    from cgpn.engine.checkpoint import build_model_from_config
    from cgpn.engine.evaluation import evaluate_model
    from cgpn.engine.inference import resolve_device

    if args.checkpoint:
        model, cfg = _model_and_config(args)
        dataset = build_dataset(cfg.data.dataset, cfg.data.root, cfg.data)
    else:  # the untrained network of a config: what training starts from
        cfg = _config(args)
        dataset = build_dataset(cfg.data.dataset, cfg.data.root, cfg.data)
        model = build_model_from_config(cfg, dataset.num_train_pids)
    device = resolve_device(cfg.engine.device)
    result = evaluate_model(model.to(device), dataset, cfg, device)
    print(result.summary())
    return 0


def _pick_queries(spec: str, result, query, n: int, seed: int) -> list[int]:
    valid = np.flatnonzero(result.first_match >= 0)
    if spec == "random":
        return sorted(np.random.default_rng(seed).choice(valid, size=min(n, len(valid)), replace=False).tolist())
    if spec in ("worst", "best"):
        order = valid[np.argsort(result.ap[valid], kind="stable")]
        return (order if spec == "worst" else order[::-1])[:n].tolist()
    try:
        pids = [int(p) for p in spec.split(",")]
    except ValueError:
        raise ConfigError(f"--queries must be random, worst, best or comma-separated pids, got '{spec}'") from None
    picked = [i for i, s in enumerate(query) if s.pid in pids]
    if not picked:
        raise ConfigError(f"no query image has pid {', '.join(map(str, pids))}")
    return picked[:n]


def cmd_show(args: argparse.Namespace) -> int:
    if args.curves:
        from cgpn.engine.events import draw_curves

        print(f"training curves of {args.curves}: {draw_curves(args.curves, args.out)}")
        return 0
    if not args.checkpoint:
        raise ConfigError("cgpn show needs --checkpoint FILE (ranked lists) or --curves RUN_DIR (training curves)")
    from cgpn.data.datasets import build_dataset
    from cgpn.engine.evaluation import test_features
    from cgpn.engine.inference import resolve_device
    from cgpn.metrics.rank import evaluate
    from cgpn.viz import draw_ranked_lists

    model, cfg = _model_and_config(args)
    dataset = build_dataset(cfg.data.dataset, cfg.data.root, cfg.data)
    device = resolve_device(cfg.engine.device)
    t = test_features(model.to(device), dataset, cfg, device)
    result = evaluate(t.distmat, t.q_pids, t.g_pids, t.q_camids, t.g_camids, max_rank=cfg.test.max_rank)
    rows = _pick_queries(args.queries, result, dataset.query, args.num_queries, cfg.engine.seed)
    out = draw_ranked_lists(t.distmat.numpy(), dataset.query, dataset.gallery, rows, args.out, topk=args.topk)
    print(result.summary())
    print(f"ranked lists of {len(rows)} queries (top {args.topk}; green = same identity, red = other): {out}")
    return 0


def cmd_check_data(args: argparse.Namespace) -> int:
    from cgpn.data.check import check_images
    from cgpn.data.datasets import build_dataset

    cfg = _config(args)
    dataset = build_dataset(cfg.data.dataset, cfg.data.root, cfg.data)
    result = check_images(dataset, workers=max(1, cfg.data.workers), progress=not args.quiet)
    print(result.report())
    return 1 if result.num_bad else 0


# --- parser ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cgpn", description="Person re-identification with CGPN: "
                                     "train, evaluate and use the network of Mao et al.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    from cgpn.data.datasets.synthetic import SyntheticSpec

    p = verbs.add_parser("synth", help="write the procedural synthetic data set (Market-1501 layout)")
    p.add_argument("--out", required=True, help="folder to write (bounding_box_train/, query/, ...)")
    p.add_argument("--preset", default="demo", help="starting settings: demo (default) or tiny")
    for f in dataclasses.fields(SyntheticSpec):
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=type(f.default), default=None,
                       help=f"(preset value if omitted; demo: {f.default})")
    p.set_defaults(func=cmd_synth)

    p = verbs.add_parser("train", help="train a model (the paper's recipe unless the config says otherwise); "
                         "several GPUs or machines: torchrun --nproc_per_node N -m cgpn train ...")
    _add_config_args(p)
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", metavar="PATH|auto",
                       help="continue a run from a checkpoint, or auto: the newest in output_dir (if any)")
    start.add_argument("--finetune", metavar="PATH",
                       help="start from a checkpoint's weights except the identity classifiers (new data set)")
    p.set_defaults(func=cmd_train)

    p = verbs.add_parser("eval", help="CMC / mAP / mINP of a checkpoint (or of an untrained config)")
    p.add_argument("--checkpoint", help="a checkpoint written by cgpn train; without it, the untrained network")
    p.add_argument("--rerank", action="store_true",
                   help="k-reciprocal re-ranking (Zhong et al. 2017); shorthand for --set test.rerank=true")
    _add_config_args(p)
    p.set_defaults(func=cmd_eval)

    p = verbs.add_parser("show", help="draw ranked lists (query + top-k, green/red frames) or a run's training "
                         "curves as a PNG")
    p.add_argument("--checkpoint", help="a checkpoint written by cgpn train (ranked lists)")
    p.add_argument("--curves", metavar="RUN_DIR", help="draw the loss, lr, speed and Rank-1/mAP curves of a run "
                   "folder (its metrics.csv) instead")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--queries", default="random", help="random | worst | best | comma-separated pids")
    p.add_argument("--num-queries", type=int, default=8)
    p.add_argument("--topk", type=int, default=10)
    _add_config_args(p, config=False)
    p.set_defaults(func=cmd_show)

    p = verbs.add_parser("check-data", help="open every image of a data set and report unreadable files "
                         "(exit 1 if any, 2 if the data set itself is wrong)")
    _add_config_args(p)
    p.set_defaults(func=cmd_check_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    try:
        return args.func(args)
    except CgpnError as err:
        if args.debug:
            raise
        print(f"cgpn {args.verb}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"cgpn {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
