"""Load on ``cgpn serve`` over loopback: 1, 4 and 32 concurrent clients, 20 s each, then it stops.

The gallery is 100,000 synthetic 3072-d unit features in an exact (flat) index; the server runs as
``cgpn serve`` in a subprocess, the clients are asyncio tasks of this process (HTTP/1.1 keep-alive over
asyncio streams, requests built beforehand, as wrk does: they take 1-2 % of a core). Each phase sends
feature queries (JSON, a 3072-d vector as numbers, or as base64 of its float32 bytes: ``feature-b64``) or
image queries (a JPEG upload, embedded by the network, then searched) for 20 s and reports requests/s, p50 / p99 latency, errors, and the mean number of
queries per index search (concurrent queries are searched together as one batch).

An exact search costs 2 N D FLOPs per query, so the CPU's matrix-multiply rate bounds the queries/s; the
script prints that bound (fp32 sgemm measured here, with the server's thread count), the ratio of the
feature-query throughput to it, FAISS's own exact search (IndexFlatIP) on the same file as a peer, cgpn's
search of 32 queries in this process (what the server's batches run, without HTTP), the same server with
batching off (``--max-batch 1``), and the time one pass over the gallery takes at this machine's memory
read rate (the least latency any exact fp32 search can have), and the time of a search of 1, 4 and 32
queries with an fp32 pass and with the int8 and bf16 first passes (a quarter and half of the bytes read, the
same results: ``cgpn.retrieval.exact``; the server takes for each batch size the fastest, timed at its start).

    python benchmarks/serve_load.py                                    # untrained CGPN-R18 at 128 x 64 (the demo's)
    python benchmarks/serve_load.py --checkpoint runs/demo/last.pt --seconds 20 --clients 1,4,32

Goals (issue 12, 2 CPU cores, exact index): no errors; feature queries at 32 clients >= 70 % of the bound;
p99 < 50 ms at 4 clients. The load generator shares the CPU with the server: its own CPU time is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from infer_speed import matmul_gflops  # noqa: E402  (beside this script)

from cgpn.config import IndexSettings  # noqa: E402
from cgpn.engine.precision import machine_description  # noqa: E402
from cgpn.retrieval import GalleryIndex  # noqa: E402
from cgpn.retrieval.index import import_faiss  # noqa: E402
from serve_helpers import make_checkpoint  # noqa: E402  (from tests/, on the path just above)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gallery", type=int, default=100_000, help="gallery size N")
    p.add_argument("--dim", type=int, default=3072, help="feature size D (CGPN: 3072)")
    p.add_argument("--clients", default="1,4,32", help="concurrent clients per phase")
    p.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--checkpoint", help="network for image queries (default: an untrained CGPN-R18 at 128 x 64)")
    p.add_argument("--backend", default="auto", help="FeatureExtractor backend of the server")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="the server's CPU threads")
    p.add_argument("--skip-unbatched", action="store_true", help="leave out the --max-batch 1 comparison")
    p.add_argument("--workdir", help="where to write the gallery (default: a temporary folder)")
    return p.parse_args()


# --- the machine and its bounds --------------------------------------------------------------------------


def read_gbps(x: torch.Tensor, repeats: int = 3) -> float:
    """Rate (GB/s) at which a pass over ``x`` reads it (a sum): what bounds one query's search."""
    x.sum()
    start = time.perf_counter()
    for _ in range(repeats):
        x.sum()
    return x.numel() * x.element_size() * repeats / (time.perf_counter() - start) / 1e9


# --- the gallery -----------------------------------------------------------------------------------------


def write_gallery(folder: Path, n: int, d: int, checkpoint: str) -> Path:
    """An exact index of ``n`` random unit ``d``-d features, added in chunks (one copy in memory)."""
    faiss = import_faiss()
    index = faiss.IndexFlatIP(d)
    rng = np.random.default_rng(0)
    for start in range(0, n, 10_000):
        x = rng.standard_normal((min(10_000, n - start), d), dtype=np.float32)
        index.add(x / np.linalg.norm(x, axis=1, keepdims=True))
    paths = [f"/synthetic/{i:06d}_c{1 + i % 6}s1_{i:06d}_00.jpg" for i in range(n)]  # never read: no thumbnails
    ids = np.arange(n, dtype=np.int64)
    out = GalleryIndex(index, paths, ids // 4, ids % 6, checkpoint, IndexSettings()).save(folder / "gallery.faiss")
    del index
    return out


def query_image(height: int = 256, width: int = 128) -> bytes:
    """A JPEG of a person-shaped picture from the synthetic generator's drawing code (a real decode)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (200, 205, 210))
    draw = ImageDraw.Draw(img)
    draw.ellipse((44, 10, 84, 54), fill=(230, 190, 160))
    draw.rectangle((34, 56, 94, 150), fill=(40, 60, 150))
    draw.rectangle((40, 150, 88, 246), fill=(50, 50, 50))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90)
    return out.getvalue()


# --- the server ------------------------------------------------------------------------------------------


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    lines: list[str] = field(default_factory=list)

    def memory(self) -> dict[str, int]:
        """VmHWM (peak resident), VmRSS, RssAnon (its own allocations) and RssFile (mapped files), bytes."""
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return {k: int(re.search(rf"{k}:\s*(\d+)", text).group(1)) * 1024 for k in ("VmHWM", "VmRSS", "RssAnon",
                                                                                      "RssFile")}

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_server(index: Path, checkpoint: str, backend: str, threads: int, *extra: str) -> Server:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "cgpn", "-q", "serve", "--index", str(index), "--checkpoint", checkpoint, "--port",
           "0", "--backend", backend, "--max-topk", "1000", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    server = Server(proc, "")
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            server.lines.append(line.rstrip())
            match = re.search(r"at (http://[\d.]+:\d+) ", line)
            if match:
                server.url = match.group(1)
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(600) or not server.url:
        proc.kill()
        raise SystemExit("cgpn serve did not start:\n" + "\n".join(server.lines[-20:]))
    return server


# --- the clients -----------------------------------------------------------------------------------------


@dataclass
class Phase:
    kind: str
    clients: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    searches: int = 0
    batches: int = 0
    search_seconds: float = 0.0  # the server's time in index searches
    client_cpu: float = 0.0

    def row(self) -> str:
        lat = np.array(self.latencies) * 1e3 if self.latencies else np.array([np.nan])
        mean_batch = self.searches / self.batches if self.batches else float("nan")
        per_search = 1e3 * self.search_seconds / self.batches if self.batches else float("nan")
        return (f"| {self.kind} | {self.clients} | {len(self.latencies):,} | {len(self.latencies) / self.seconds:.1f} "
                f"| {np.percentile(lat, 50):.1f} | {np.percentile(lat, 99):.1f} | {self.errors} | {mean_batch:.1f} "
                f"| {per_search:.0f} ms, {100 * self.search_seconds / self.seconds:.0f} % | "
                f"{100 * self.client_cpu / self.seconds:.0f} % |")

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds


def http_requests(url: str, kind: str, bodies: list[bytes], image: bytes, topk: int) -> list[bytes]:
    """Whole HTTP/1.1 POST /api/search requests, built once: feature queries (JSON) or an image upload."""
    host = urlsplit(url).netloc.encode()
    if kind == "image":
        boundary = b"cgpn-load-test"
        body = (b"--%b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.jpg\"\r\n"
                b"Content-Type: image/jpeg\r\n\r\n%b\r\n--%b\r\nContent-Disposition: form-data; name=\"topk\"\r\n\r\n"
                b"%d\r\n--%b--\r\n" % (boundary, image, boundary, topk, boundary))
        typed = [(b"multipart/form-data; boundary=" + boundary, body)]
    else:
        typed = [(b"application/json", body) for body in bodies]
    return [b"POST /api/search HTTP/1.1\r\nHost: %b\r\nContent-Type: %b\r\nContent-Length: %d\r\n\r\n%b"
            % (host, content_type, len(body), body) for content_type, body in typed]


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bytes]:
    """Send one request on a kept-alive connection; (status, body) of the answer (Content-Length framed)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in lines if line.lower().startswith(b"content-length:")), None)
    if length is None:
        raise ConnectionError(f"an answer without Content-Length: {lines[0][:80]!r}")
    return int(lines[0].split()[1]), await reader.readexactly(length)


async def run_phase(url: str, kind: str, clients: int, seconds: float, bodies: list[bytes], image: bytes,
                    topk: int) -> Phase:
    """``clients`` connections, each sending the next request as soon as the last is answered, for ``seconds``.

    The clients speak HTTP/1.1 over asyncio streams with requests built beforehand (as wrk does), so the load
    generator takes little of the CPU it shares with the server (httpx took 0.45 of a core at 100 req/s).
    """
    phase = Phase(kind, clients, seconds)
    requests = http_requests(url, kind, bodies, image, topk)
    before = await _health(url)
    parts = urlsplit(url)
    deadline = time.perf_counter() + seconds
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)

    async def worker(w: int) -> None:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        i = w
        try:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                try:
                    status, body = await _exchange(reader, writer, requests[i % len(requests)])
                    ok, detail = status == 200, f"{status} {body[:200].decode(errors='replace')}"
                except (OSError, asyncio.IncompleteReadError, ValueError) as err:
                    ok, detail = False, f"{type(err).__name__}: {err}"
                    writer.close()
                    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
                if ok:
                    phase.latencies.append(time.perf_counter() - start)
                else:
                    phase.errors += 1
                    phase.first_error = phase.first_error or detail
                i += clients
        finally:
            writer.close()

    await asyncio.gather(*(worker(w) for w in range(clients)))
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    after = await _health(url)
    phase.client_cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    phase.searches = after["searches"] - before["searches"]
    phase.batches = after["search_batches"] - before["search_batches"]
    phase.search_seconds = after["search_seconds"] - before["search_seconds"]
    return phase


def feature_bodies(d: int, topk: int, count: int = 64, packed: bool = False) -> list[bytes]:
    """Pre-serialised JSON feature queries (random unit vectors): the client spends no time building them.
    ``packed``: as ``feature_base64`` (base64 of the float32 bytes) instead of numbers."""
    import base64
    import json

    rng = np.random.default_rng(1)
    x = rng.standard_normal((count, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    if packed:
        return [json.dumps({"feature_base64": base64.b64encode(row.astype("<f4").tobytes()).decode(),
                            "topk": topk}).encode() for row in x]
    return [json.dumps({"feature": [round(float(v), 7) for v in row], "topk": topk}).encode() for row in x]


# --- main --------------------------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    n, d = args.gallery, args.dim
    print(f"machine: {machine_description()}; faiss {import_faiss().__version__}")
    print(f"load average at start: {os.getloadavg()[0]:.2f} (other jobs share this machine)")
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        checkpoint = args.checkpoint or str(make_checkpoint(Path(tmp) / "cgpn_r18.pt", num_classes=751, height=128,
                                                            width=64))  # the demo's network, untrained
        start = time.perf_counter()
        index_path = write_gallery(Path(tmp), n, d, checkpoint)
        print(f"gallery: {n:,} x {d} fp32 unit vectors, exact (flat) index of {index_path.stat().st_size / 1e9:.2f} GB "
              f"written in {time.perf_counter() - start:.0f} s")

        # bounds and the peer, measured before the server starts (nothing else of ours runs)
        faiss = import_faiss()
        mapped = faiss.read_index(str(index_path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
        vectors = torch.from_numpy(faiss.rev_swig_ptr(mapped.get_xb(), n * d)).view(n, d)
        torch.set_num_threads(args.threads)
        rate = matmul_gflops()
        bound = rate * 1e9 / (2 * n * d)
        gbps = read_gbps(vectors)
        faiss.omp_set_num_threads(args.threads)
        queries = np.random.default_rng(2).standard_normal((32, d)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        mapped.search(queries, args.topk)
        t0 = time.perf_counter()
        mapped.search(queries, args.topk)
        faiss_qps = 32 / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for q in queries[:4]:
            mapped.search(q[None], args.topk)
        faiss_one = 4 / (time.perf_counter() - t0)
        gallery = GalleryIndex.load(index_path, mmap=True)  # cgpn's own exact search, without the server
        gallery.search(queries, args.topk)
        t0 = time.perf_counter()
        gallery.search(queries, args.topk)
        kernel_qps = 32 / (time.perf_counter() - t0)
        few = {}  # ms per search of 1, 4 and 32 queries: fp32 pass, int8 and bf16 first passes
        for first_pass in ("off", "int8", "bf16"):
            gallery.settings.first_pass = first_pass
            for count in (1, 4, 32):
                gallery.search(queries[:count], args.topk)
                t0 = time.perf_counter()
                for _ in range(3):
                    gallery.search(queries[:count], args.topk)
                few[first_pass, count] = (time.perf_counter() - t0) / 3 * 1e3
        gallery.settings.first_pass = "auto"
        gallery.prepare(32)  # as the server does: the fastest search of each batch size, timed
        auto = {count: (chosen.name if (chosen := gallery.first_pass(count)) else "fp32") for count in (1, 4, 32)}
        del vectors, mapped, gallery
        print(f"bound: fp32 sgemm {rate:.0f} GFLOP/s ({args.threads} threads) / 2 N D = {2 * n * d / 1e9:.3f} GFLOP "
              f"per query -> {bound:.1f} queries/s")
        print(f"memory read rate {gbps:.1f} GB/s -> one pass over the {n * d * 4 / 1e9:.2f} GB gallery takes "
              f"{n * d * 4 / gbps / 1e6:.0f} ms: the least latency of an exact fp32 search here")
        print(f"peer: FAISS IndexFlatIP.search on the same file: {faiss_qps:.1f} queries/s for 32 at once, "
              f"{faiss_one:.1f} queries/s one at a time")
        print(f"cgpn GalleryIndex.search in this process (no server), 32 at once: {kernel_qps:.1f} queries/s = "
              f"{100 * kernel_qps / bound:.0f} % of the bound")
        print("  ms per search of 1 / 4 / 32 queries at once: " + "; ".join(
            f"{name} {few[key, 1]:.0f} / {few[key, 4]:.0f} / {few[key, 32]:.0f}"
            for key, name in (("off", "fp32 pass"), ("int8", "int8 first pass"), ("bf16", "bf16 first pass")))
            + f" (the server's auto: {' / '.join(auto.values())})")

        image = query_image()
        bodies = {"feature": feature_bodies(d, args.topk), "feature-b64": feature_bodies(d, args.topk, packed=True)}
        server = start_server(index_path, checkpoint, args.backend, args.threads)
        print(f"server: {server.lines[-1]}")
        health = asyncio.run(_health(server.url))
        model = health["model"]
        by_batch = ", ".join(f"{count}: {name or 'fp32'}" for count, name in health["first_pass_by_batch"].items())
        search = f"exact; first pass by queries per search (timed at start) {by_batch}"
        print(f"search: {search}, {args.threads} threads; image queries: "
              f"{model['name']} at {model['input_size'][0]} x {model['input_size'][1]}, flip-averaged, backend "
              f"{model['backend']} on {model['device']}")
        phases: list[Phase] = []
        try:
            asyncio.run(run_phase(server.url, "feature", 4, 2.0, bodies["feature"], image, args.topk))  # warm-up
            asyncio.run(run_phase(server.url, "image", 4, 2.0, [], image, args.topk))
            for kind in ("feature", "feature-b64", "image"):
                for c in clients:
                    phases.append(asyncio.run(run_phase(server.url, kind, c, args.seconds, bodies.get(kind, []),
                                                        image, args.topk)))
                    print(f"  {kind} x {c}: {phases[-1].rate:.1f} req/s", flush=True)
                if kind == "feature-b64":  # this machine's speed drifts by a third within minutes: measured again
                    rate_after = matmul_gflops()
            memory = server.memory()
        finally:
            server.stop()
        unbatched = None
        if not args.skip_unbatched:
            server = start_server(index_path, checkpoint, args.backend, args.threads, "--max-batch", "1")
            try:
                unbatched = asyncio.run(run_phase(server.url, "feature", max(clients), args.seconds,
                                                  bodies["feature"], image, args.topk))
            finally:
                server.stop()

    print()
    print("| queries | clients | requests | req/s | p50 ms | p99 ms | errors | queries per search | time per search, "
          "share of the phase | load generator CPU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for phase in phases:
        print(phase.row())
    if unbatched:
        print(unbatched.row().replace("| feature |", "| feature, --max-batch 1 |"))
    print(f"server memory: peak resident {memory['VmHWM'] / 2**30:.2f} GiB (of which the mapped index file "
          f"{memory['RssFile'] / 2**30:.2f} GiB, shared with the page cache; own allocations, the aligned copy of its "
          f"vectors included, "
          f"{memory['RssAnon'] / 2**30:.2f} GiB)")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    bound_after = rate_after * 1e9 / (2 * n * d)
    print(f"bound measured again after the feature phases: sgemm {rate_after:.0f} GFLOP/s -> {bound_after:.1f} "
          f"queries/s (before them: {bound:.1f}); the ratio below takes the higher")
    bound = max(bound, bound_after)
    errors = sum(p.errors for p in phases) + (unbatched.errors if unbatched else 0)
    for kind in ("feature", "feature-b64"):
        top = max((p for p in phases if p.kind == kind), key=lambda p: p.clients)
        print(f"{kind} queries at {top.clients} clients: {top.rate:.1f}/s = {100 * top.rate / bound:.0f} % of the "
              f"bound {bound:.1f}/s (goal >= 70 %); {top.rate / faiss_qps:.2f}x FAISS IndexFlatIP on 32 at once"
              + (f"; {top.rate / unbatched.rate:.2f}x the same server searching one by one" if unbatched else ""))
    p99_4 = {p.kind: np.percentile(p.latencies, 99) * 1e3 for p in phases if p.kind != "image" and p.clients == 4}
    if p99_4:
        print("p99 at 4 clients: " + ", ".join(f"{kind} {ms:.0f} ms" for kind, ms in p99_4.items()) + " (goal < 50 ms)")
    print(f"errors: {errors} (goal 0)" + "".join(f"; first: {p.first_error}" for p in phases if p.first_error)[:400])


async def _health(url: str) -> dict:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return (await client.get("/api/health")).json()


if __name__ == "__main__":
    main()
