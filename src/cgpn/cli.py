"""The ``cgpn`` command: argument parsing only; every verb calls the Python API.

A user mistake ends in one line on stderr and exit status 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
from pathlib import Path

import numpy as np

from cgpn.config import Config, apply_overrides, load_config
from cgpn.errors import CgpnError, ConfigError, DatasetError, OnnxCheckError
from cgpn.files import atomic_path, check_output_file

__all__ = ["main"]

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")  # what cgpn show can write

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


def _preset_spec(presets: dict, args: argparse.Namespace):
    """The preset named by ``--preset``, with the flags given on the command line in place of its values."""
    if args.preset not in presets:
        raise ConfigError(f"unknown preset '{args.preset}'; choose one of {', '.join(presets)}")
    return dataclasses.replace(presets[args.preset], **{
        f.name: getattr(args, f.name) for f in dataclasses.fields(presets[args.preset])
        if getattr(args, f.name) is not None})


def cmd_synth(args: argparse.Namespace) -> int:
    from cgpn.data.datasets.synthetic import PRESETS, generate_synthetic

    spec = _preset_spec(PRESETS, args)
    counts = generate_synthetic(args.out, spec, progress=not args.quiet)
    print(f"wrote {sum(counts.values())} images to {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    if args.resume and args.resume != "auto" and not args.config:  # the run's own settings, then --set
        from cgpn.engine.checkpoint import load_checkpoint, stored_config

        cfg = apply_overrides(stored_config(load_checkpoint(args.resume), args.resume), _shorthands(args))
        cfg.validate()
    else:
        cfg = _config(args)  # a mistake in the settings shows before torch loads
    saved = Path(cfg.output_dir) / "config.yaml"
    if args.config and saved.is_file() and os.path.samefile(args.config, saved):
        from cgpn.engine.checkpoint import find_resume_checkpoint

        if find_resume_checkpoint("auto", cfg.output_dir) is None:  # not a run's own saved config: a user's file
            raise ConfigError(f"--config '{args.config}' is where the run in output_dir '{cfg.output_dir}' saves its "
                              f"resolved settings (config.yaml): training would replace your file; move it, or "
                              f"choose another folder with --set output_dir=DIR")
    from cgpn.engine.evaluation import SPLIT_NAMES
    from cgpn.engine.trainer import train

    result = train(cfg, resume=args.resume, finetune=args.finetune)
    if result.rank != 0:  # under torchrun, rank 0 reports
        return 0
    where = SPLIT_NAMES[result.split]
    if 0 in result.evaluations:
        print(f"untrained, {where}: {result.evaluations[0].summary()}")
    last = max(result.evaluations) if result.evaluations else None
    if last:
        print(f"trained (epoch {last}), {where}: {result.evaluations[last].summary()}")
    print(f"checkpoint: {result.checkpoint}" if result.checkpoint.is_file() else
          "no checkpoint: nothing was trained (solver.epochs=0)")
    if result.split == "val":
        if result.best_checkpoint:
            print(f"best (validation mAP): {result.best_checkpoint}")
        if result.test is not None:
            print(f"test split, evaluated once, best.pt (epoch {result.test_epoch}): {result.test.summary()}")
    elif result.best_checkpoint:
        print(f"best.pt: {result.best_checkpoint} was selected on the test split (optimistic; last.pt is the "
              f"result; set data.val_ids to select on held-out training identities)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.checkpoint and args.config:
        raise ConfigError("--config applies to an untrained network only; a checkpoint brings its own config "
                          "(change it with --set KEY=VALUE, --dataset, --data-root)")
    cfg = None if args.checkpoint else _config(args)
    if args.plot and not args.occlude:
        raise ConfigError("--plot draws the results of --occlude RATES; add --occlude (e.g. --occlude 0.1,0.2,0.3)")
    if args.plot:
        _check_picture(args.plot, "--plot")

    from cgpn.data.datasets import dataset_from_config
    from cgpn.data.occlusion import parse_rates
    from cgpn.engine.checkpoint import build_model_from_config
    from cgpn.engine.evaluation import SPLIT_NAMES, evaluate_model
    from cgpn.engine.inference import resolve_device
    from cgpn.engine.robustness import evaluate_occlusion, occlusion_table
    from cgpn.viz import plot_occlusion

    rates = parse_rates(args.occlude) if args.occlude else []
    if args.checkpoint:
        model, cfg = _model_and_config(args)
    dataset = dataset_from_config(cfg.data)
    if not args.checkpoint:  # the untrained network of a config: what training starts from
        model = build_model_from_config(cfg, dataset.num_train_pids)
    device = resolve_device(cfg.engine.device)
    query, gallery = dataset.split(args.split)
    where = (f"{SPLIT_NAMES[args.split]} of {cfg.data.dataset} ({len(query)} query, {len(gallery)} gallery "
             f"images)")
    if not rates:
        print(f"{where}: {evaluate_model(model.to(device), dataset, cfg, device, args.split).summary()}")
        return 0
    plot = Path(args.plot) if args.plot else (Path(args.checkpoint).parent if args.checkpoint
                                             else Path(cfg.output_dir)) / "occlusion.png"
    check_output_file(plot, "--plot", {"--checkpoint": args.checkpoint, "--config": args.config,
                                       "an image of the data set": _images(dataset)})  # before the evaluations
    results = evaluate_occlusion(model.to(device), dataset, cfg, device, rates, args.split)
    print(f"{where}, clean queries: {results[0.0].summary()}")
    print(f"query images occluded (a rectangle anywhere in the box, or a top/bottom cut), seed {cfg.engine.seed}:")
    print(occlusion_table(results))
    print(f"plot: {plot_occlusion(results, plot, title=args.checkpoint or cfg.model.name)}")
    return 0


def _images(dataset) -> list[str]:
    """Every image path of a data set: inputs an output must not overwrite."""
    return [s.path for s in (*dataset.train, *dataset.query, *dataset.gallery, *dataset.val_query,
                             *dataset.val_gallery)]


def _parse_queries(spec: str) -> str | list[int]:
    """``--queries``: random, worst, best, or a list of pids."""
    if spec in ("random", "worst", "best"):
        return spec
    try:
        return [int(p) for p in spec.split(",")]
    except ValueError:
        raise ConfigError(f"--queries must be random, worst, best or comma-separated pids, got '{spec}'") from None


def _pick_queries(spec: str | list[int], result, query, n: int, seed: int) -> list[int]:
    """Rows of the picture: query indices picked by ``spec`` (``_parse_queries``) among those with a match."""
    if isinstance(spec, list):
        return _queries_of(spec, query)[:n]
    valid = np.flatnonzero(result.first_match >= 0)
    if not len(valid):
        raise DatasetError("no query has a true match in the gallery (same identity, another camera): "
                           "nothing to draw")
    if spec == "random":
        return sorted(np.random.default_rng(seed).choice(valid, size=min(n, len(valid)), replace=False).tolist())
    order = valid[np.argsort(result.ap[valid], kind="stable")]
    return (order if spec == "worst" else order[::-1])[:n].tolist()


def _queries_of(pids: list[int], query) -> list[int]:
    picked = [i for i, s in enumerate(query) if s.pid in pids]
    if not picked:
        raise ConfigError(f"no query image has pid {', '.join(map(str, pids))}")
    return picked


def cmd_show(args: argparse.Namespace) -> int:
    if args.curves:
        from cgpn.engine.events import draw_curves

        _check_picture(args.out)
        print(f"training curves of {args.curves}: {draw_curves(args.curves, args.out)}")
        return 0
    if not args.checkpoint:
        raise ConfigError("cgpn show needs --checkpoint FILE (ranked lists) or --curves RUN_DIR (training curves)")
    _check_picture(args.out)
    _at_least_one(("--topk", args.topk), ("--num-queries", args.num_queries))
    queries = _parse_queries(args.queries)
    from cgpn.data.datasets import dataset_from_config
    from cgpn.engine.evaluation import rank_test_features, ranking_distances, test_features
    from cgpn.engine.inference import resolve_device
    from cgpn.viz import draw_ranked_lists

    model, cfg = _model_and_config(args)
    dataset = dataset_from_config(cfg.data)
    check_output_file(args.out, "--out", {"--checkpoint": args.checkpoint, "an image of the data set": _images(dataset)})
    if isinstance(queries, list):
        _queries_of(queries, dataset.query)  # before the features
    device = resolve_device(cfg.engine.device)
    t = test_features(model.to(device), dataset, cfg, device)
    distmat = ranking_distances(t, cfg)  # the lists drawn are the ones scored (re-ranked with --rerank)
    result = rank_test_features(t, cfg, distmat)
    rows = _pick_queries(queries, result, dataset.query, args.num_queries, cfg.engine.seed)
    out = draw_ranked_lists(distmat.numpy(), dataset.query, dataset.gallery, rows, args.out, topk=args.topk,
                            ap=result.ap, title=f"{args.checkpoint} on {cfg.data.dataset}: {result.summary()}")
    print(result.summary())
    print(f"ranked lists of {len(rows)} queries (top {args.topk}; green = same identity, red = other): {out}")
    return 0


def _at_least_one(*flags: tuple[str, int]) -> None:
    """A ConfigError naming the first (flag, value) below 1."""
    for flag, value in flags:
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")


def _check_picture(out: str, flag: str = "--out") -> None:
    """A ConfigError, before any work, unless ``out`` names a picture file cgpn can write."""
    if Path(out).suffix.lower() not in PICTURE_SUFFIXES:
        raise ConfigError(f"{flag} must name a picture file ending in {', '.join(PICTURE_SUFFIXES)}, got '{out}'")
    check_output_file(out, flag)


def cmd_study(args: argparse.Namespace) -> int:
    from cgpn.study import load_grid, run_study

    def ints(text: str) -> list[int]:
        try:
            return [int(x) for x in text.split(",")]
        except ValueError:
            raise ConfigError(f"--seeds must be comma-separated integers, got '{text}'") from None

    grid = load_grid(args.grid, rows=args.rows.split(",") if args.rows else None,
                     seeds=ints(args.seeds) if args.seeds else None)
    records = run_study(grid, args.out, dry_run=args.dry_run, runs_from=args.runs_from)
    if records:
        diverged = sum(bool(r.diverged) for r in records)
        print(f"{len(records)} finished runs{f' ({diverged} diverged)' if diverged else ''}; table: {Path(args.out) / 'table.md'}, per run: {Path(args.out) / 'runs.csv'}, "
              f"picture: {Path(args.out) / 'occlusion.png'}")
    return 0


def cmd_check_data(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from cgpn.data.check import check_images
    from cgpn.data.datasets import dataset_from_config

    dataset = dataset_from_config(cfg.data)
    result = check_images(dataset, workers=max(1, cfg.data.workers), progress=not args.quiet)
    print(result.report())
    return 1 if result.num_bad else 0


def _extractor(args: argparse.Namespace, checkpoint: str):
    from cgpn.extractor import FeatureExtractor

    return FeatureExtractor(checkpoint, device=args.device, batch_size=args.batch_size,
                            flip=False if args.no_flip else None, backend=args.backend)


def cmd_extract(args: argparse.Namespace) -> int:
    from cgpn.extractor import list_images
    from cgpn.retrieval.features import FeatureFile, parse_market_names, save_features

    fmt = args.format or ("parquet" if Path(args.out).suffix == ".parquet" else "npz")
    if fmt == "parquet":
        from cgpn.retrieval.features import import_pyarrow

        import_pyarrow()  # before minutes of extraction
    paths = [str(p.resolve()) for p in list_images(args.images)]
    check_output_file(args.out, "--out", {"--checkpoint": args.checkpoint, "an image of --images": paths})
    extractor = _extractor(args, args.checkpoint)
    feats = extractor(paths).numpy()
    ids = parse_market_names(paths)
    data = FeatureFile(paths, feats, *(ids or (None, None)), checkpoint=str(Path(args.checkpoint).resolve()))
    out = save_features(data, args.out, fmt)
    print(f"wrote {len(paths)} features ({data.dim}-d, L2-normalised, {extractor.backend}) to {out}"
          + ("; pid/camid parsed from the names" if ids else "; names carry no pid/camid"))
    return 0


def cmd_index_build(args: argparse.Namespace) -> int:
    from cgpn.retrieval import GalleryIndex, IndexSettings, load_features

    check_output_file(args.out, "--out", {"--features": args.features})
    data = load_features(args.features)
    if args.checkpoint:
        data.checkpoint = args.checkpoint
    settings = IndexSettings(kind=args.kind, nlist=args.nlist, nprobe=args.nprobe, pq_m=args.pq_m,
                             pq_bits=args.pq_bits, first_pass=args.first_pass)
    index = GalleryIndex.build(data, settings)
    out = index.save(args.out)
    exact = "exact" if settings.kind == "flat" else "approximate"
    print(f"indexed {len(index)} features ({index.dim}-d, {settings.kind}, {exact} inner product) in {out}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    import json

    from cgpn.extractor import list_images
    from cgpn.retrieval import GalleryIndex

    _at_least_one(("--topk", args.topk))
    query = Path(args.query)
    if not query.exists():
        raise DatasetError(f"query '{query}' does not exist (expected an image file or a folder of images)")
    index = GalleryIndex.load(args.index)
    checkpoint = index.query_checkpoint(args.checkpoint)
    paths = [str(p) for p in list_images(query)] if query.is_dir() else [str(query)]
    if args.gpu and not index.to_gpu():
        logger.warning("--gpu: this faiss build has no GPU support or sees no GPU; searching on the CPU")
    extractor = _extractor(args, checkpoint)
    index.check_dim(extractor.feature_dim)  # before embedding a folder of queries
    feats = extractor(paths).numpy()
    scores, rows = index.search(feats, args.topk)
    report = []
    for path, score_row, index_row in zip(paths, scores, rows):
        hits = []
        for rank, (score, i) in enumerate(((s, i) for s, i in zip(score_row, index_row) if i >= 0), start=1):
            hit = {"rank": rank, "score": round(float(score), 6), "path": index.paths[i]}
            if index.pids is not None:
                hit.update(pid=int(index.pids[i]), camid=int(index.camids[i]))
            hits.append(hit)
        report.append({"query": path, "results": hits})
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    for item in report:
        print(f"query {item['query']}")
        for hit in item["results"]:
            ids = f"  id {hit['pid']:>5} cam {hit['camid'] + 1}" if "pid" in hit else ""
            print(f"  {hit['rank']:>3}  {hit['score']:.4f}{ids}  {hit['path']}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from cgpn.config import ServeSettings

    settings = ServeSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeSettings)})
    from cgpn.serve import SearchService, check_settings, create_app, listen, serve

    check_settings(settings)
    sock = listen(settings.host, settings.port)  # a port in use is reported before the network loads
    try:
        service = SearchService.open(args.index, args.checkpoint, args.queries, settings, device=args.device,
                                     backend=args.backend, batch_size=args.batch_size,
                                     flip=False if args.no_flip else None)
        host, port = sock.getsockname()[:2]
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        print(f"serving {len(service.index):,} gallery images at {url} (JSON API: {url}/docs); Ctrl-C stops",
              flush=True)
        serve(create_app(service), sock, log_level="warning" if args.quiet else "info")
    finally:
        sock.close()
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from cgpn.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from cgpn.engine.checkpoint import load_model
    from cgpn.export import check_onnx, check_opset, export_onnx, import_onnxruntime, write_metadata

    check_output_file(args.onnx, "--onnx", {"--checkpoint": args.checkpoint})
    check_opset(args.opset)
    _at_least_one(("--check-batch", args.check_batch))
    import_onnxruntime()  # the check needs it: fail before the export
    model, cfg = load_model(args.checkpoint)
    h, w = cfg.data.height, cfg.data.width
    flip = not args.no_flip
    with atomic_path(args.onnx) as tmp:  # the file appears only once its check has passed
        export_onnx(model, tmp, h, w, flip=flip, opset=args.opset)
        write_metadata(tmp, cfg, flip=flip)
        check = check_onnx(tmp, model, h, w, batch_size=args.check_batch, flip=flip)
        print(f"check: {check.summary()}")
        if not check.passed:
            raise OnnxCheckError(f"'{args.onnx}' not written: onnxruntime's features differ from PyTorch's by up to "
                                 f"{check.max_abs_diff:.2e} (limit {check.tolerance:.0e}); run with --debug and "
                                 f"report it with your torch and onnxruntime versions")
    print(f"wrote {args.onnx}: ONNX opset {args.opset}; input 'images' (batch, 3, {h}, {w}) float32, RGB scaled to "
          f"[0, 1] then normalised with mean {list(IMAGENET_MEAN)} / std {list(IMAGENET_STD)}; output 'features' "
          f"(batch, {model.feature_dim}) L2-normalised{', averaged with the mirrored image' if flip else ''}; "
          f"batch axis dynamic")
    return 0


def cmd_synth_video(args: argparse.Namespace) -> int:
    from cgpn.track.synth_video import PRESETS, generate_synthetic_video

    c = generate_synthetic_video(args.out, _preset_spec(PRESETS, args), progress=not args.quiet)
    print(f"wrote {c['frames']} frames to {Path(args.out) / 'img1'}, {c['gt_boxes']} boxes to gt.txt and "
          f"{c['detections']} detections to det.txt; {c['crossings']} crossings ({c['lookalike_crossings']} of "
          f"look-alikes), {c['long_occlusions']} occlusions over a second, {c['reentries']} re-entries")
    return 0


def _check_outputs(outputs: dict[str, str | None], inputs: dict[str, str | None]) -> None:
    """A ConfigError, before any work, if an output path is one of the inputs or another output, is a folder,
    or lies where nothing can be written."""
    import os

    seen: dict[Path, str] = {Path(v).resolve(): k for k, v in inputs.items() if v}
    for flag, value in outputs.items():
        if not value:
            continue
        path = Path(value).resolve()
        if path in seen:
            raise ConfigError(f"{flag} '{value}' is also {seen[path]}: writing it would destroy that; "
                              "pass another file name")
        if path.is_dir():
            raise ConfigError(f"{flag} '{value}' is a folder: pass a file name")
        ancestor = path.parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise ConfigError(f"{flag} '{value}': cannot write in '{ancestor}' (no permission): pass another place")
        seen[path] = flag


def _tracker_settings(args: argparse.Namespace):
    from cgpn.config import TrackerSettings

    settings = TrackerSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrackerSettings)})
    settings.validate()
    return settings


def cmd_track(args: argparse.Namespace) -> int:
    import contextlib

    from tqdm import tqdm

    settings = _tracker_settings(args)
    if args.appearance == "cgpn" and not args.checkpoint:
        raise ConfigError("--appearance cgpn (the default) needs --checkpoint FILE (written by cgpn train, or an "
                          "ONNX file by cgpn export); without a network: --appearance histogram or none")
    if args.appearance != "cgpn" and args.checkpoint:
        raise ConfigError(f"--checkpoint is used only with --appearance cgpn, not {args.appearance}")
    if args.video and Path(args.video).suffix.lower() not in (".mp4", ".gif"):
        raise ConfigError(f"--video must name an .mp4 or .gif file, got '{args.video}'")
    _check_outputs({"--out": args.out, "--video": args.video},
                   {"--frames": args.frames, "--detections": args.detections, "--checkpoint": args.checkpoint})
    from cgpn.track.appearance import ColorHistogramEmbedder
    from cgpn.track.mot import MotBoxes, read_mot, write_mot
    from cgpn.track.tracker import DeepSortTracker, track_frames
    from cgpn.track.video import FrameSource, draw_tracks, video_writer

    detections = read_mot(args.detections, "detections")
    frames = FrameSource(args.frames)
    if frames.num_frames is not None and detections.num_frames > frames.num_frames:
        raise DatasetError(f"{args.detections} has detections for frame {detections.num_frames} but "
                           f"{args.frames} holds {frames.num_frames} frames (are they of another sequence?)")
    if args.appearance == "cgpn":
        from cgpn.track.embedder import TrackerEmbedder

        embedder = TrackerEmbedder(args.checkpoint, device=args.device, backend=args.backend,
                                   batch_size=args.batch_size, bgr=False, flip=False if args.no_flip else None)
    else:
        embedder = ColorHistogramEmbedder(bgr=False) if args.appearance == "histogram" else None
    tracker = DeepSortTracker(embedder, settings)
    per_frame = []
    with video_writer(args.video, frames.fps) if args.video else contextlib.nullcontext() as write:
        for t, image, rows in tqdm(track_frames(frames, detections, tracker), total=frames.num_frames,
                                   desc="track", unit="frame", disable=args.quiet):
            per_frame.append((np.full(len(rows), t), rows))
            if write:
                write(draw_tracks(image, rows[:, 0].astype(int), rows[:, 1:5]))
    frame_numbers = np.concatenate([f for f, _ in per_frame])
    rows = np.concatenate([r for _, r in per_frame])
    tracks = MotBoxes.from_rows(frame_numbers, rows[:, 0], rows[:, 1:5], rows[:, 5])
    write_mot(args.out, tracks, "tracks")
    print(f"{len(np.unique(tracks.ids))} tracks, {len(tracks)} boxes in {len(per_frame)} frames "
          f"({args.appearance} appearance): {args.out}" + (f"; video: {args.video}" if args.video else ""))
    return 0


def cmd_track_eval(args: argparse.Namespace) -> int:
    import json

    from cgpn.track.metrics import evaluate_tracking
    from cgpn.track.mot import read_mot

    result = evaluate_tracking(read_mot(args.gt, "ground truth"), read_mot(args.tracks, "tracks"), iou=args.iou)
    print(json.dumps(result.to_dict(), indent=1) if args.json else result.summary())
    return 0


# --- parser ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cgpn", description="Person re-identification with CGPN: "
                                     "train, evaluate and use the network of Mao et al.")
    # --debug / -q go before or after the verb; a verb's copy has no default, so it never hides the first
    common = argparse.ArgumentParser(add_help=False)
    for p in (parser, common):
        default = False if p is parser else argparse.SUPPRESS
        p.add_argument("--debug", action="store_true", default=default, help="show tracebacks")
        p.add_argument("-q", "--quiet", action="store_true", default=default, help="only warnings and results")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    from cgpn.config import FIRST_PASSES, INDEX_KINDS, ONNX_OPSET, IndexSettings, ServeSettings
    from cgpn.data.datasets.synthetic import SyntheticSpec

    p = verbs.add_parser("synth", parents=[common],
                         help="write the procedural synthetic data set (Market-1501 layout)")
    _add_generator_args(p, SyntheticSpec, ("demo", "tiny"), "bounding_box_train/, query/, ...")
    p.set_defaults(func=cmd_synth)

    p = verbs.add_parser("train", parents=[common],
                         help="train a model (the paper's recipe unless the config says otherwise); "
                         "several GPUs or machines: torchrun --nproc_per_node N -m cgpn train ...")
    _add_config_args(p)
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", metavar="PATH|auto",
                       help="continue a run from a checkpoint (with its settings unless --config is given), or auto: "
                       "the newest in output_dir (if any)")
    start.add_argument("--finetune", metavar="PATH",
                       help="start from a checkpoint's weights except the identity classifiers (new data set)")
    p.set_defaults(func=cmd_train)

    p = verbs.add_parser("eval", parents=[common],
                         help="CMC / mAP / mINP of a checkpoint (or of an untrained config)")
    p.add_argument("--checkpoint", help="a checkpoint written by cgpn train; without it, the untrained network")
    p.add_argument("--split", choices=["test", "val"], default="test",
                   help="test (default) or val: the validation split held out of the training identities "
                   "(data.val_ids; the checkpoint's own setting)")
    _add_rerank_arg(p)
    p.add_argument("--occlude", metavar="RATES", help="also evaluate with that fraction of each query image hidden "
                   "(comma-separated, e.g. 0.1,0.2,0.3,0.4): a table and a plot")
    p.add_argument("--plot", help="PNG for --occlude (default: occlusion.png beside the checkpoint, or in output_dir)")
    _add_config_args(p)
    p.set_defaults(func=cmd_eval)

    p = verbs.add_parser("show", parents=[common],
                         help="draw ranked lists (query + top-k, green/red frames) or a run's training "
                         "curves as a PNG")
    p.add_argument("--checkpoint", help="a checkpoint written by cgpn train (ranked lists)")
    p.add_argument("--curves", metavar="RUN_DIR", help="draw the loss, lr, speed and Rank-1/mAP curves of a run "
                   "folder (its metrics.csv) instead")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--queries", default="random", help="random | worst | best | comma-separated pids")
    p.add_argument("--num-queries", type=int, default=8, help="rows of the picture (default 8)")
    p.add_argument("--topk", type=int, default=10, help="gallery images per row (default 10)")
    _add_rerank_arg(p)
    _add_config_args(p, config=False)
    p.set_defaults(func=cmd_show)

    p = verbs.add_parser("study", parents=[common],
                         help="train and evaluate a grid of settings x seeds (Table 2 style: mean and std, clean "
                         "and occluded); resumes a half-done grid")
    p.add_argument("grid", help="grid file (YAML: base, set, seeds, occlude, rows; e.g. configs/studies/table2.yaml)")
    p.add_argument("--out", required=True, help="folder of the runs, runs.csv, table.md and occlusion.png")
    p.add_argument("--rows", help="only these settings (comma-separated names of the grid's rows)")
    p.add_argument("--seeds", help="only these seeds (comma-separated)")
    p.add_argument("--runs-from", metavar="CSV", help="the runs.csv of an earlier study (another machine, a lost "
                   "folder): its runs of this grid count as finished and join the table")
    p.add_argument("--dry-run", action="store_true", help="print the plan and its ETA and write the table of the "
                   "runs finished so far; train nothing")
    p.set_defaults(func=cmd_study)

    p = verbs.add_parser("check-data", parents=[common],
                         help="open every image of a data set and report unreadable files "
                         "(exit 1 if any, 2 if the data set itself is wrong)")
    _add_config_args(p)
    p.set_defaults(func=cmd_check_data)

    p = verbs.add_parser("extract", parents=[common],
                         help="features of every image under a folder -> .npz (or .parquet)")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by cgpn train")
    p.add_argument("--images", required=True, help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="file to write, e.g. feats.npz")
    p.add_argument("--format", choices=["npz", "parquet"], help="npz (default; parquet if --out ends in .parquet)")
    _add_extractor_args(p)
    p.set_defaults(func=cmd_extract)

    p = verbs.add_parser("index", parents=[common], help="gallery index over extracted features (FAISS)")
    index_verbs = p.add_subparsers(dest="index_verb", metavar="ACTION", required=True)
    p = index_verbs.add_parser("build", parents=[common], help="index a features file for cgpn search")
    p.add_argument("--features", required=True, help="a features file written by cgpn extract (.npz / .parquet)")
    p.add_argument("--out", required=True, help="index file to write, e.g. gallery.faiss")
    defaults = IndexSettings()
    p.add_argument("--kind", choices=list(INDEX_KINDS), default=defaults.kind,
                   help="flat: exact (default); ivf / ivfpq: approximate, for galleries of millions")
    p.add_argument("--nlist", type=int, default=defaults.nlist, help="ivf*: inverted lists (about sqrt(N) to 4 sqrt(N))")
    p.add_argument("--nprobe", type=int, default=defaults.nprobe, help="ivf*: lists visited per query")
    p.add_argument("--pq-m", type=int, default=defaults.pq_m, help="ivfpq: sub-vectors per feature (divides D)")
    p.add_argument("--pq-bits", type=int, default=defaults.pq_bits, help="ivfpq: bits per sub-vector code")
    p.add_argument("--first-pass", choices=list(FIRST_PASSES), default=defaults.first_pass,
                   help="flat: find each query's top k from int8 (or bf16) scores with a proven error bound, then "
                   "score those rows in fp32 (the same results; a quarter (half) of the memory read, 1 (2) bytes per "
                   "value more memory); auto: int8 on CPUs with VNNI / AMX, else bf16 on CPUs with native bf16 (for "
                   "1-2 queries where it is emulated), for galleries of 16M+ values; cgpn serve times them and "
                   "takes the fastest per batch size")
    p.add_argument("--checkpoint", help="record this checkpoint for search (default: the one in the features file)")
    p.set_defaults(func=cmd_index_build)

    p = verbs.add_parser("search", parents=[common],
                         help="nearest gallery images of a query image (or of every image in a folder)")
    p.add_argument("--index", required=True, help="an index written by cgpn index build")
    p.add_argument("--query", required=True, help="an image file or a folder of images")
    p.add_argument("--topk", type=int, default=10, help="results per query (default 10)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--checkpoint", help="embed the queries with this checkpoint (default: the index's)")
    p.add_argument("--gpu", action="store_true", help="search on the GPUs when faiss has GPU support")
    _add_extractor_args(p)
    p.set_defaults(func=cmd_search)

    p = verbs.add_parser("serve", parents=[common],
                         help="a gallery-search web page and JSON API over an index (on 127.0.0.1 unless --host)")
    p.add_argument("--index", required=True, help="an index written by cgpn index build (opened read-only)")
    p.add_argument("--checkpoint", help="embed image queries with this checkpoint, or an ONNX file written by cgpn "
                   "export (default: the index's checkpoint)")
    p.add_argument("--queries", metavar="DIR", help="a folder of query images to offer on the page")
    for f in dataclasses.fields(ServeSettings):
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=type(f.default), default=f.default,
                       help=f"{f.metadata['help']} (default: {f.default})")
    _add_extractor_args(p)
    p.set_defaults(func=cmd_serve)

    p = verbs.add_parser("export", parents=[common],
                         help="write the model as ONNX and check it with onnxruntime against PyTorch")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by cgpn train")
    p.add_argument("--onnx", required=True, help="file to write, e.g. model.onnx")
    p.add_argument("--opset", type=int, default=ONNX_OPSET, help=f"ONNX opset (default {ONNX_OPSET})")
    p.add_argument("--no-flip", action="store_true", help="leave flip averaging out of the graph")
    p.add_argument("--check-batch", type=int, default=4, help="size of the random batch of the check")
    p.set_defaults(func=cmd_export)

    from cgpn.config import TRACK_APPEARANCES, TrackerSettings
    from cgpn.track.synth_video import SyntheticVideoSpec

    p = verbs.add_parser("synth-video", parents=[common],
                         help="write a synthetic tracking sequence: frames, gt.txt, det.txt (MOTChallenge format)")
    _add_generator_args(p, SyntheticVideoSpec, ("benchmark", "tiny"), "img1/, gt.txt, det.txt, seqinfo.ini")
    p.set_defaults(func=cmd_synth_video)

    p = verbs.add_parser("track", parents=[common],
                         help="track people over a sequence: DeepSORT (deep-sort-realtime) on MOT detections, "
                         "with cgpn features for appearance; writes MOT-format tracks")
    p.add_argument("--frames", required=True, help="folder of frames (MOT img1/: 000001.jpg...) or a video file")
    p.add_argument("--detections", required=True,
                   help="MOT det.txt: frame,-1,left,top,width,height,confidence (frames from 1)")
    p.add_argument("--checkpoint", help="a checkpoint written by cgpn train or an ONNX file by cgpn export")
    p.add_argument("--out", required=True, help="MOT tracks file to write: frame,id,left,top,width,height,conf,...")
    p.add_argument("--video", help="also draw the tracks into this .mp4 or .gif")
    p.add_argument("--appearance", choices=list(TRACK_APPEARANCES), default="cgpn",
                   help="cgpn (default: features of --checkpoint) | histogram (colour histograms) | none "
                   "(motion and IoU only)")
    d = TrackerSettings()
    p.add_argument("--max-age", type=int, default=d.max_age,
                   help=f"frames a track lives on without a detection (default {d.max_age})")
    p.add_argument("--n-init", type=int, default=d.n_init,
                   help=f"detections in a row before a track is confirmed and written (default {d.n_init})")
    p.add_argument("--max-iou-distance", type=float, default=d.max_iou_distance,
                   help=f"IoU stage: match only if 1 - IoU <= this (default {d.max_iou_distance})")
    p.add_argument("--max-cosine-distance", type=float, default=d.max_cosine_distance,
                   help=f"appearance stage: match only if the cosine distance <= this (default {d.max_cosine_distance})")
    p.add_argument("--nn-budget", type=int, default=d.nn_budget,
                   help="appearance features kept per track (default: all since it was confirmed)")
    _add_extractor_args(p)
    p.set_defaults(func=cmd_track)

    p = verbs.add_parser("track-eval", parents=[common],
                         help="IDF1, ID switches, MOTA (py-motmetrics) and HOTA, AssA (TrackEval) of MOT tracks")
    p.add_argument("--gt", required=True, help="MOT gt.txt: frame,id,left,top,width,height,flag,class,visibility")
    p.add_argument("--tracks", required=True, help="MOT tracks file (as cgpn track writes)")
    p.add_argument("--iou", type=float, default=0.5, help="IoU at which a box matches (py-motmetrics; default 0.5)")
    p.add_argument("--json", action="store_true", help="print every figure as JSON")
    p.set_defaults(func=cmd_track_eval)
    return parser


def _add_generator_args(p: argparse.ArgumentParser, spec_type: type, presets: tuple[str, ...], writes: str) -> None:
    """--out, --preset (the first of ``presets`` by default, whose values are ``spec_type``'s defaults) and a
    flag per field of the generator's settings; unset flags keep the preset's value."""
    p.add_argument("--out", required=True, help=f"folder to write ({writes})")
    p.add_argument("--preset", default=presets[0],
                   help=f"starting settings: {presets[0]} (default) or {', '.join(presets[1:])}")
    for f in dataclasses.fields(spec_type):
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=type(f.default), default=None,
                       help=f"{f.metadata['help']} (default: the preset's; {presets[0]}: {f.default})")


def _add_rerank_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rerank", action="store_true",
                   help="k-reciprocal re-ranking (Zhong et al. 2017); shorthand for --set test.rerank=true")


def _add_extractor_args(p: argparse.ArgumentParser) -> None:
    from cgpn.config import EXTRACTOR_BACKENDS

    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--backend", choices=list(EXTRACTOR_BACKENDS), default="auto",
                   help="auto (CPU: bf16 with AMX/AVX512-BF16, else onnxruntime; GPU: eager) | eager | "
                   "channels_last | bf16 | compile | onnx")
    p.add_argument("--no-flip", action="store_true", help="skip averaging with the mirrored image")


def error_line(err: BaseException) -> str:
    """The one-line message of ``err``, also when a DataLoader worker raised it: torch re-raises those with
    the worker's traceback in the message, and only its last line is the error."""
    text = str(err)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        match = re.match(r"^[\w.]+: (.*)$", last)
        text = match.group(1) if match else last
    return text


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # cgpn's own messages at INFO; other libraries' (faiss, onnx...) only from WARNING up
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logger.setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        return args.func(args)
    except CgpnError as err:
        if args.debug:
            raise
        print(f"cgpn {args.verb}: error: {error_line(err)}", file=sys.stderr)
        return err.exit_code
    except OSError as err:  # an output path that is a folder, unwritable, on a full disk...
        if args.debug:
            raise
        where = f": '{err.filename}'" if err.filename else ""
        print(f"cgpn {args.verb}: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cgpn {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
