"""extract -> index -> search against a brute-force NumPy search; feature files; the CLI's one-line errors."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _engine_tiny import cli_env
from cgpn.errors import ConfigError, IndexFileError
from cgpn.extractor import FeatureExtractor
from cgpn.retrieval import (
    FeatureFile,
    GalleryIndex,
    IndexSettings,
    load_features,
    parse_market_names,
    save_features,
)
from serve_helpers import cli, error_line, make_checkpoint, run_cli


@pytest.fixture
def cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path_factory.getbasetemp() / "onnx_cache"
    monkeypatch.setenv("CGPN_CACHE_DIR", str(folder))
    return folder


def _unit(rows: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_force(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ gallery.T
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, rows, axis=1), rows


def test_extract_index_search_equals_brute_force(tiny_synth: Path, checkpoint: Path, cache: Path,
                                                tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    feats, index = tmp_path / "gallery.npz", tmp_path / "gallery.faiss"
    extract = cli(capsys, "extract", "--checkpoint", str(checkpoint), "--images", str(tiny_synth / "bounding_box_test"),
                  "--out", str(feats), "--backend", "eager")
    assert extract.returncode == 0, extract.stderr
    build = cli(capsys, "index", "build", "--features", str(feats), "--out", str(index))
    assert build.returncode == 0, build.stderr
    search = cli(capsys, "search", "--index", str(index), "--query", str(tiny_synth / "query"), "--topk", "5", "--json",
                 "--backend", "eager")
    assert search.returncode == 0, search.stderr
    report = json.loads(search.stdout)

    gallery = np.load(feats)
    names = sorted(p.name for p in (tiny_synth / "bounding_box_test").glob("*.jpg"))
    assert [Path(p).name for p in gallery["paths"]] == names
    assert gallery["features"].shape == (len(names), 3072)
    assert gallery["pids"].tolist() == [int(n[:4]) for n in names]  # 0007_c2s1_... -> pid 7, camid 1
    assert gallery["camids"].tolist() == [int(n.split("_c")[1][0]) - 1 for n in names]

    queries = [r["query"] for r in report]
    assert [Path(q).name for q in queries] == sorted(p.name for p in (tiny_synth / "query").glob("*.jpg"))
    qf = FeatureExtractor(checkpoint, device="cpu", backend="eager")(queries).numpy()
    scores, rows = _brute_force(qf, gallery["features"], 5)
    for r, score_row, index_row in zip(report, scores, rows):
        assert [h["path"] for h in r["results"]] == [str(gallery["paths"][i]) for i in index_row]
        assert [h["pid"] for h in r["results"]] == gallery["pids"][index_row].tolist()
        np.testing.assert_allclose([h["score"] for h in r["results"]], score_row, atol=2e-5)


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_index_equals_brute_force(kind: str, tmp_path: Path) -> None:
    """Flat is exact; IVF visiting every list (nprobe = nlist) must be exact too. Scores are cosines: the
    index re-normalises gallery and query features of any length (here scaled by 0.2 to 5 per row)."""
    gallery, queries = _unit(300, 48, 0), _unit(20, 48, 1)
    scale = np.random.default_rng(2).uniform(0.2, 5, size=(320, 1)).astype(np.float32)
    data = FeatureFile([f"g{i}.jpg" for i in range(300)], gallery * scale[:300])
    GalleryIndex.build(data, IndexSettings(kind=kind, nlist=6, nprobe=6)).save(tmp_path / "g.faiss")
    index = GalleryIndex.load(tmp_path / "g.faiss")
    scores, rows = index.search(queries * scale[300:], topk=10)
    ref_scores, ref_rows = _brute_force(queries, gallery, 10)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    assert index.paths[rows[0, 0]] == f"g{ref_rows[0, 0]}.jpg"
    assert index.search(queries, topk=1000)[1].shape == (20, 300)  # topk capped at the gallery size


def test_mapped_vectors_are_searched_from_an_aligned_copy(tmp_path: Path) -> None:
    """FAISS's file puts an exact index's vectors at byte 45: mapped, no float is 4-byte aligned. The search
    reads a copy made once (the same values, the file still mapped read-only); a read index is not copied."""
    gallery = _unit(300, 48, 20)
    GalleryIndex.build(FeatureFile([f"g{i}.jpg" for i in range(300)], gallery)).save(tmp_path / "g.faiss")
    mapped, read = GalleryIndex.load(tmp_path / "g.faiss", mmap=True), GalleryIndex.load(tmp_path / "g.faiss")
    import faiss
    at = {name: faiss.rev_swig_ptr(i.index.get_xb(), 1).__array_interface__["data"][0]
          for name, i in (("mapped", mapped), ("read", read))}
    assert at["mapped"] % 4 != 0 and at["read"] % 4 == 0  # what the copy is for (the file layout's offset)
    vectors = mapped._vectors()
    assert vectors.data_ptr() % 64 == 0 and vectors.data_ptr() != at["mapped"]
    assert mapped._vectors() is vectors  # copied once
    np.testing.assert_array_equal(vectors.numpy(), faiss.rev_swig_ptr(mapped.index.get_xb(), 300 * 48).reshape(300, 48))
    np.testing.assert_allclose(vectors.numpy(), gallery / np.linalg.norm(gallery, axis=1, keepdims=True), atol=1e-6)
    assert read._vectors().data_ptr() == at["read"]  # aligned already: no copy
    np.testing.assert_array_equal(mapped.search(gallery[:5], 7)[1], read.search(gallery[:5], 7)[1])


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_search_over_allowed_rows_equals_brute_force_over_them(kind: str, tmp_path: Path) -> None:
    """A filter (e.g. cameras) picks the k nearest among the allowed rows, for the exact path (one matrix
    multiply) and the FAISS path (an ID selector) alike; fewer allowed rows than k leave -1 rows."""
    gallery, queries = _unit(300, 48, 14), _unit(20, 48, 15)
    GalleryIndex.build(FeatureFile([f"g{i}.jpg" for i in range(300)], gallery),
                       IndexSettings(kind=kind, nlist=6, nprobe=6)).save(tmp_path / "g.faiss")
    index = GalleryIndex.load(tmp_path / "g.faiss", mmap=True)
    allowed = np.random.default_rng(16).random(300) < 0.3
    scores, rows = index.search(queries, topk=10, allowed=allowed)
    kept = np.flatnonzero(allowed)
    ref_scores, ref_rows = _brute_force(queries, gallery[kept], 10)
    np.testing.assert_array_equal(rows, kept[ref_rows])
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    few = np.zeros(300, dtype=bool)
    few[[5, 7]] = True
    rows = index.search(queries[:2], topk=4, allowed=few)[1]
    assert sorted(rows[0, :2].tolist()) == [5, 7] and rows[:, 2:].tolist() == [[-1, -1], [-1, -1]]
    with pytest.raises(ConfigError, match="one bool per gallery row"):
        index.search(queries, topk=3, allowed=allowed[:10])


def test_ivfpq_finds_each_gallery_vector_itself(tmp_path: Path) -> None:
    gallery = _unit(256, 32, 2)
    index = GalleryIndex.build(FeatureFile([str(i) for i in range(256)], gallery),  # 4-bit codes: quick to train
                               IndexSettings(kind="ivfpq", nlist=2, nprobe=2, pq_m=8, pq_bits=4))
    rows = index.search(gallery[:100], topk=1)[1][:, 0]
    assert (rows == np.arange(100)).mean() >= 0.95
    with pytest.raises(ConfigError, match="--pq-m must divide"):
        GalleryIndex.build(FeatureFile(["a"] * 256, gallery), IndexSettings(kind="ivfpq", nlist=2, pq_m=7))
    with pytest.raises(ConfigError, match="--nlist"):
        GalleryIndex.build(FeatureFile(["a"] * 256, gallery), IndexSettings(kind="ivf", nlist=1000))


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_cli_builds_the_approximate_indexes_asked_for(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """README: cgpn index build --kind ivf / ivfpq. The file read back with faiss's own reader is that kind of
    index with the --nlist / --pq-m / --pq-bits given; --nprobe is what search uses. IVF visiting every list
    is exact; IVF-PQ finds (nearly) every gallery vector itself."""
    import faiss

    gallery = _unit(512, 32, 14)
    feats, out = tmp_path / "f.npz", tmp_path / "g.faiss"
    save_features(FeatureFile([f"g{i}.jpg" for i in range(512)], gallery), feats)
    extra = ["--pq-m", "8", "--pq-bits", "4"] if kind == "ivfpq" else []
    run = cli(capsys, "index", "build", "--features", str(feats), "--out", str(out), "--kind", kind,
              "--nlist", "8", "--nprobe", "8", *extra)
    assert run.returncode == 0, run.stderr
    assert f"indexed 512 features (32-d, {kind}, approximate inner product)" in run.stdout
    raw = faiss.read_index(str(out))
    assert isinstance(raw, faiss.IndexIVFPQ if kind == "ivfpq" else faiss.IndexIVFFlat)
    assert raw.nlist == 8 and raw.ntotal == 512 and raw.metric_type == faiss.METRIC_INNER_PRODUCT
    if kind == "ivfpq":
        assert (raw.pq.M, raw.pq.nbits) == (8, 4)
    index = GalleryIndex.load(out)
    assert faiss.extract_index_ivf(index.index).nprobe == 8
    if kind == "ivf":
        queries = _unit(20, 32, 15)
        np.testing.assert_array_equal(index.search(queries, topk=10)[1], _brute_force(queries, gallery, 10)[1])
    else:
        assert (index.search(gallery, topk=1)[1][:, 0] == np.arange(512)).mean() >= 0.95


@pytest.mark.parametrize("fmt", ["npz", "parquet"])
def test_feature_files_round_trip(fmt: str, tmp_path: Path) -> None:
    pytest.importorskip("pyarrow") if fmt == "parquet" else None
    paths = ["/x/0002_c1s1_000451_00.jpg", "/x/0007_c3s2_000100_01.jpg"]
    pids, camids = parse_market_names(paths)
    assert pids.tolist() == [2, 7] and camids.tolist() == [0, 2]
    data = FeatureFile(paths, _unit(2, 16, 3), pids, camids, "ckpt.pt")
    back = load_features(save_features(data, tmp_path / f"f.{fmt}", fmt))
    assert back.paths == paths and back.checkpoint == "ckpt.pt"
    np.testing.assert_array_equal(back.features, data.features)
    np.testing.assert_array_equal(back.pids, pids)
    np.testing.assert_array_equal(back.camids, camids)
    assert parse_market_names(["/x/query.jpg", *paths]) is None  # one name without ids: none kept
    plain = load_features(save_features(FeatureFile(["a.jpg"], _unit(1, 4, 4)), tmp_path / f"p.{fmt}", fmt))
    assert plain.pids is None and plain.camids is None


def test_index_of_another_dimension_is_refused(tmp_path: Path) -> None:
    GalleryIndex.build(FeatureFile(["a", "b"], _unit(2, 32, 5))).save(tmp_path / "g.faiss")
    with pytest.raises(IndexFileError, match="32-d features but the query features are 16-d"):
        GalleryIndex.load(tmp_path / "g.faiss").search(_unit(1, 16, 6))


# --- the CLI's errors: one line, exit status 2 -----------------------------------------------------------


def test_cli_errors_of_extract(tiny_synth: Path, checkpoint: Path, cache: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    line = error_line(cli(capsys, "extract", "--checkpoint", str(checkpoint), "--images", str(empty), "--out",
                          str(tmp_path / "f.npz")))
    assert "holds no image" in line and str(empty) in line

    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(next((tiny_synth / "query").glob("*.jpg")), folder / "0001_c1s1_000001_00.jpg")
    not_cgpn = tmp_path / "resnet.pt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, not_cgpn)
    line = error_line(cli(capsys, "extract", "--checkpoint", str(not_cgpn), "--images", str(folder), "--out",
                          str(tmp_path / "f.npz")))
    assert "is not a cgpn checkpoint" in line and "resnet.pt" in line

    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if pyarrow were not installed
    line = error_line(cli(capsys, "extract", "--checkpoint", str(checkpoint), "--images", str(folder), "--out",
                          str(tmp_path / "f.parquet")))
    assert "pyarrow is not installed" in line


def test_cli_undecodable_image_in_a_subprocess(tiny_synth: Path, checkpoint: Path, tmp_path: Path) -> None:
    """The real command line: exit status 2 and one line naming the file, no traceback."""
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(next((tiny_synth / "query").glob("*.jpg")), folder / "0001_c1s1_000001_00.jpg")
    (folder / "0001_c2s1_000002_00.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    line = error_line(run_cli("extract", "--checkpoint", str(checkpoint), "--images", str(folder), "--out",
                              str(tmp_path / "f.npz"), "--backend", "eager", cache=tmp_path / "cache"))
    assert line.startswith("cgpn extract: error: cannot read image") and "0001_c2s1_000002_00.jpg" in line


def test_cli_errors_of_index_and_search(tiny_synth: Path, checkpoint: Path, cache: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    feats = tmp_path / "f.npz"
    paths = sorted(str(p) for p in (tiny_synth / "bounding_box_test").glob("*.jpg"))
    save_features(FeatureFile(paths, _unit(len(paths), 3072, 7), checkpoint=str(checkpoint)), feats)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "faiss", None)  # as if faiss were not installed
        line = error_line(cli(capsys, "index", "build", "--features", str(feats), "--out", str(tmp_path / "g.faiss")))
    assert "faiss is not installed" in line

    # An index of 3072-d CGPN features searched with a CGPN-1 checkpoint (3 global features: 768-d).
    assert cli(capsys, "index", "build", "--features", str(feats), "--out", str(tmp_path / "g.faiss")).returncode == 0
    cgpn1 = make_checkpoint(tmp_path / "cgpn1.pt", name="cgpn1")
    line = error_line(cli(capsys, "search", "--index", str(tmp_path / "g.faiss"), "--query", paths[0],
                          "--checkpoint", str(cgpn1), "--backend", "eager"))
    assert "3072-d features but the query features are 768-d" in line

    line = error_line(cli(capsys, "search", "--index", str(tmp_path / "missing.faiss"), "--query", paths[0]))
    assert "missing.faiss" in line and "does not exist" in line


def test_index_settings_out_of_range_are_refused(tmp_path: Path) -> None:
    data = FeatureFile([f"{i}.jpg" for i in range(300)], _unit(300, 16, 8))
    with pytest.raises(ConfigError, match="--nprobe must be at least 1, got 0"):
        GalleryIndex.build(data, IndexSettings(kind="ivf", nlist=4, nprobe=0))
    with pytest.raises(ConfigError, match="--pq-bits must be between 1 and 16, got 0"):
        GalleryIndex.build(data, IndexSettings(kind="ivfpq", nlist=4, pq_m=4, pq_bits=0))


_KILLED_SAVE = """
import os, signal, sys
import faiss, numpy as np
from cgpn.retrieval import FeatureFile, GalleryIndex

where, calls = sys.argv[2], []
def dying(name, real):
    def call(*args):
        calls.append(name)
        if where == f"before {name} {calls.count(name)}":
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(*args)
        if where == f"after {name} {calls.count(name)}":
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return call
faiss.write_index = dying("write_index", faiss.write_index)
os.replace = dying("replace", os.replace)
x = np.eye(4, 8, dtype=np.float32)
GalleryIndex.build(FeatureFile([f"new{i}.jpg" for i in range(4)], x)).save(sys.argv[1])
print(calls)
"""


@pytest.mark.parametrize("kill", ["after write_index 1", "before replace 1", "before replace 2"])
def test_a_save_killed_anywhere_leaves_an_index_with_its_own_metadata(kill: str, tmp_path: Path) -> None:
    """Issue 13: a SIGKILL between the two renames of an index and its sidecar left the old index with the new
    sidecar. Killed after the index is written but before its metadata, before a rename, or between two
    renames (an implementation with one file never gets there and finishes), the index then loads with its
    own paths, old or new, and the next save removes the killed save's temporary."""
    path = tmp_path / "g.faiss"
    old_feats = _unit(3, 8, 9)
    GalleryIndex.build(FeatureFile(["a.jpg", "b.jpg", "c.jpg"], old_feats)).save(path)
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(path), kill], env=cli_env(), capture_output=True,
                          text=True, timeout=120)
    index = GalleryIndex.load(path)
    if proc.returncode == -signal.SIGKILL:
        assert index.paths == ["a.jpg", "b.jpg", "c.jpg"]
        np.testing.assert_array_equal(index.search(old_feats, 1)[1][:, 0], [0, 1, 2])  # its own vectors
    else:
        assert proc.returncode == 0 and kill == "before replace 2", proc.stderr[-2000:]
        assert proc.stdout.strip() == "['write_index', 'replace']"  # one file: one rename
        assert index.paths == [f"new{i}.jpg" for i in range(4)]
        np.testing.assert_array_equal(index.search(np.eye(4, 8, dtype=np.float32), 1)[1][:, 0], [0, 1, 2, 3])
    GalleryIndex.build(FeatureFile(["d.jpg", "e.jpg"], _unit(2, 8, 10))).save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.faiss"]
    assert GalleryIndex.load(path).paths == ["d.jpg", "e.jpg"]


def test_an_index_file_of_another_kind_or_damaged_is_one_line(tmp_path: Path) -> None:
    import faiss

    path = tmp_path / "g.faiss"
    GalleryIndex.build(FeatureFile(["a", "b"], _unit(2, 8, 11))).save(path)
    whole = path.read_bytes()
    (tmp_path / "cut.faiss").write_bytes(whole[:-5])
    with pytest.raises(IndexFileError, match=r"'.*cut.faiss' is not a cgpn index: it is a FAISS index; expected "):
        GalleryIndex.load(tmp_path / "cut.faiss")
    (tmp_path / "bad.faiss").write_bytes(whole[:4] + bytes(8) + whole[12:])  # the index's header zeroed
    with pytest.raises(IndexFileError, match=r"does not match its metadata|cannot read index '.*bad.faiss'"):
        GalleryIndex.load(tmp_path / "bad.faiss")
    faiss.write_index(faiss.IndexFlatIP(8), str(tmp_path / "old.faiss"))  # as an older cgpn wrote it
    (tmp_path / "old.faiss.json").write_text('{"format": "cgpn-index-v1"}')
    with pytest.raises(IndexFileError, match=r"was written by an older cgpn .*; rebuild it with cgpn index build"):
        GalleryIndex.load(tmp_path / "old.faiss")
    feats = save_features(FeatureFile(["a.jpg"], _unit(1, 8, 12)), tmp_path / "feats.npz")
    with pytest.raises(IndexFileError) as info:
        GalleryIndex.load(feats)
    assert str(info.value).endswith("is a features file, not an index; build an index from it with: cgpn index "
                                    f"build --features {feats} --out {tmp_path / 'feats.faiss'}")
    assert faiss.read_index(str(path)).ntotal == 2  # FAISS itself still reads the index part


def test_feature_files_are_told_apart_by_content(tmp_path: Path) -> None:
    data = FeatureFile(["a.jpg", "b.jpg"], _unit(2, 4, 11), np.array([1, 2]), np.array([0, 1]))
    npz_named_parquet = save_features(data, tmp_path / "f.parquet", "npz")
    assert load_features(npz_named_parquet).paths == ["a.jpg", "b.jpg"]
    np.save(tmp_path / "x.npy", np.zeros((2, 4)))
    with pytest.raises(IndexFileError, match="is not a features file"):
        load_features(tmp_path / "x.npy")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(IndexFileError, match="not a cgpn features file"):
        load_features(tmp_path / "other.npz")
    with pytest.raises(IndexFileError, match="pids and camids come together"):
        FeatureFile(["a.jpg"], _unit(1, 4, 12), pids=np.array([1]))
    with pytest.raises(IndexFileError, match=r"one value per path \(2\)"):
        FeatureFile(["a.jpg", "b.jpg"], _unit(2, 4, 12), np.array([1]), np.array([0]))


def test_cli_search_checks_its_arguments_first(checkpoint: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    GalleryIndex.build(FeatureFile(["a", "b"], _unit(2, 3072, 13), checkpoint=str(checkpoint))).save(
        tmp_path / "g.faiss")
    line = error_line(cli(capsys, "search", "--index", str(tmp_path / "g.faiss"), "--query", str(tmp_path / "no.jpg")))
    assert "query" in line and "no.jpg" in line and "does not exist" in line
    line = error_line(cli(capsys, "search", "--index", str(tmp_path / "g.faiss"), "--query", str(tmp_path),
                          "--topk", "0"))
    assert "--topk must be at least 1, got 0" in line
