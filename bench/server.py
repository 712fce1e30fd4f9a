"""A real backend process whose store already holds N labelled vectors, serving on loopback.

`python -m bench.server --points N ...` builds the app from the same public pieces as
`echolabel serve` (Settings, the runtime, create_app) with a store (`--store`: the embedded
default, Qdrant Edge under a MODEL_DIR, or qdrant-client's local mode in memory behind the matmul
cache, the embedded store before Edge), fills it (`--reuse`: opens a MODEL_DIR filled before),
serves it with uvicorn on 127.0.0.1 and prints one `BENCH-SERVER {json}` line with its port and
its RSS after each phase. It then answers commands on stdin (`profile N`, `stats`, `recall K`,
`timings`) and stops at end of input. Running it as its own process keeps the load generator off its
cores' GIL and lets the RSS be its own.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import json
import os
import pstats
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from .profiles import ROOT

PROJECT = "1.1700000000"  # Label Studio sends "id.epoch"
PROJECT_ID = 1
FIELD = "finding"
CLASSES = ("benign", "malignant", "normal")
LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    f'<Choices name="{FIELD}" toName="image">'
    + "".join(f'<Choice value="{c}"/>' for c in CLASSES)
    + "</Choices></View>"
)
QUERY_TASK_BASE = 1_000_000_000  # stored, unlabelled tasks that /predict is asked about
EMBED_TASK_BASE = 2_000_000_000  # tasks whose image is embedded on request
QUERY_TASKS = 64  # how many stored query tasks a server holds by default
STORES = ("local-memory", "edge")
_FILL_CHUNK = 1_000


def task(task_id: int, image: str) -> dict[str, Any]:
    return {"id": task_id, "data": {"image": image}, "project": PROJECT_ID}


def predict_body(task_id: int, image: str) -> dict[str, Any]:
    """The body Label Studio posts to /predict for one task."""
    return {"tasks": [task(task_id, image)], "project": PROJECT, "label_config": LABEL_CONFIG}


def in_memory_runtime(settings: Any) -> Any:
    """The backend's runtime over qdrant-client's local mode *in memory*: the same arrays and
    search path as the on-disk embedded store, without its per-point SQLite commit (~17 ms a
    point here), which only slows filling the store, not what the benches measure."""
    from qdrant_client import QdrantClient

    from vectorstore import ExactSearchStore, QdrantStore
    from workers.runtime import open_runtime

    inner = QdrantStore(QdrantClient(":memory:"), local=True)
    limit = settings.exact_search_max_points
    return open_runtime(
        settings, store=ExactSearchStore(inner, max_points=limit) if limit > 0 else inner
    )


def store_runtime(store: str, settings: Any) -> Any:
    """The backend's runtime on one of STORES: "edge", the embedded default under
    settings.model_dir, or "local-memory", the embedded store before Edge."""
    from workers.runtime import open_runtime

    return open_runtime(settings) if store == "edge" else in_memory_runtime(settings)


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


def peak_rss() -> int:
    """This process's own peak RSS.

    Linux's VmHWM belongs to this process image; ru_maxrss would not do: a child inherits
    its parent's peak across fork and exec, so a server started by a bench that once held a
    1M-point matrix would report that matrix.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    # Elsewhere ru_maxrss, in bytes on macOS (KiB on Linux).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class BackendProcess:
    """The parent's handle on a `bench.server` process: start, ask, stop (by its own pid)."""

    def __init__(
        self,
        points: int,
        dim: int,
        encoder: str,
        *,
        queries: int = QUERY_TASKS,
        images: Path | None = None,
        load_encoder: bool = False,
        seed: int = 0,
        store: str = "local-memory",
        model_dir: Path | None = None,
        reuse: bool = False,
        env: dict[str, str] | None = None,
        timeout_s: float = 900.0,
        max_batch: int | None = None,
        base_http_middleware: bool = False,
    ) -> None:
        command = [sys.executable, "-m", "bench.server", "--points", str(points)]
        if max_batch is not None:
            command += ["--max-batch", str(max_batch)]
        if base_http_middleware:
            command.append("--base-http-middleware")
        command += ["--dim", str(dim), "--encoder", encoder, "--queries", str(queries)]
        command += ["--seed", str(seed), "--store", store]
        if model_dir is not None:
            command += ["--model-dir", str(model_dir)]
        if reuse:
            command.append("--reuse")
        if images is not None:
            command += ["--images", str(images)]
        if load_encoder:
            command.append("--load-encoder")
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.timeout_s = timeout_s
        self.ready = self._answer()
        self.ready_s = time.perf_counter() - self.started  # process start to serving
        self.url = f"http://127.0.0.1:{self.ready['port']}"

    def ask(self, command: str) -> dict[str, Any]:
        """Send one stdin command and wait for its answer line."""
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._answer()

    def _answer(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(
                    f"bench server exited with {self.process.wait()} before answering; "
                    "its stderr above says why"
                )
            if line.startswith("BENCH-SERVER "):
                answer: dict[str, Any] = json.loads(line.removeprefix("BENCH-SERVER "))
                return answer
        raise TimeoutError(f"bench server gave no answer within {self.timeout_s:.0f} s")

    def close(self) -> None:
        if self.process.stdin is not None and not self.process.stdin.closed:
            self.process.stdin.close()  # end of input: the server stops by itself
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.terminate()
            self.process.wait(timeout=10)

    def __enter__(self) -> BackendProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--points", type=int, required=True, help="labelled points to store")
    parser.add_argument("--dim", type=int, required=True)
    parser.add_argument("--encoder", required=True, help="the collection's encoder")
    parser.add_argument("--queries", type=int, default=QUERY_TASKS, help="stored query tasks")
    parser.add_argument("--images", type=Path, help="local-files root for embedded requests")
    parser.add_argument("--load-encoder", action="store_true", help="load it before serving")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--store",
        choices=STORES,
        default="local-memory",
        help="edge: the embedded default (Qdrant Edge); local-memory: local mode + matmul cache",
    )
    parser.add_argument("--model-dir", type=Path, help="MODEL_DIR to fill (default: a temp dir)")
    parser.add_argument(
        "--max-batch",
        type=int,
        help="most concurrent searches merged into one (1: none merged, the baseline)",
    )
    parser.add_argument(
        "--reuse", action="store_true", help="serve --model-dir as it is: no fill (a restart)"
    )
    parser.add_argument(
        "--base-http-middleware",
        action="store_true",
        help="add a pass-through Starlette BaseHTTPMiddleware, as the app had before 369fb9e",
    )
    args = parser.parse_args(argv)
    if args.reuse and (args.model_dir is None or args.store != "edge"):
        parser.error("--reuse needs --model-dir and --store edge")

    import uvicorn

    from backend.app import create_app
    from echolabel.settings import Settings

    from .data import latent_clusters

    phases = {"imported": rss()}
    model_dir = args.model_dir or Path(tempfile.mkdtemp(prefix="echolabel-bench-server-"))
    # The environment's settings (e.g. ECHOLABEL_EXACT_SEARCH_MAX_POINTS) apply, so other
    # thresholds can be measured; storage, encoder and image root are the bench's.
    settings = dataclasses.replace(
        Settings.from_env(),
        model_dir=model_dir,
        encoder=args.encoder,
        local_files_root=args.images,
        redis_url=None,
        qdrant_url=None,
    )
    started = time.perf_counter()
    runtime = store_runtime(args.store, settings)
    if args.max_batch is not None:
        runtime.searches.max_batch = args.max_batch
    store = runtime.store
    open_s = time.perf_counter() - started
    started = time.perf_counter()
    queries = latent_clusters(args.queries, args.dim, seed=args.seed + 10**9)
    upsert_s = _fill(store, args, queries) if not args.reuse else 0.0
    fill_s = time.perf_counter() - started
    phases["filled"] = rss()
    started = time.perf_counter()
    # Edge builds its HNSW graph when a generation goes live (switch_generation); a store
    # filled in place builds it here, as `echolabel migrate-store` does. After a restart
    # (--reuse) this finds the graph loaded from disk and builds nothing.
    built = store.build_index(PROJECT_ID)
    index_s = time.perf_counter() - started
    phases["indexed"] = rss()
    started = time.perf_counter()
    store.nearest(PROJECT_ID, queries[0], settings.top_k)  # loads the exact cache, if any
    warm_s = time.perf_counter() - started
    phases["search_ready"] = rss()
    if args.load_encoder:
        runtime.embedder.encoder(args.encoder)
        phases["encoder_loaded"] = rss()

    timings = RequestTimings()
    served = create_app(settings, runtime)
    if args.base_http_middleware:
        from starlette.middleware.base import BaseHTTPMiddleware

        async def passthrough(request: Any, call_next: Any) -> Any:
            return await call_next(request)

        served.add_middleware(BaseHTTPMiddleware, dispatch=passthrough)
    app = timings.wrap(served)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets that say so, and without
    # it every response waits ~40 ms for a delayed ACK (Nagle), as `uvicorn.run` never does.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise SystemExit("bench server: uvicorn stopped before it started")
        time.sleep(0.05)
    _say(
        {
            "port": listener.getsockname()[1],
            "points": args.points,
            "dim": args.dim,
            "exact_max_points": settings.exact_search_max_points,
            "store": type(store).__name__,
            "open_s": open_s,
            "fill_s": fill_s,
            "upsert_s": upsert_s,
            "index_built": bool(built),
            "index_s": index_s,
            "search_warm_s": warm_s,
            "rss": phases,
        }
    )
    for line in sys.stdin:
        command = line.split()
        if command[:1] == ["profile"]:
            _say(profile(runtime, int(command[1]), args.queries))
        elif command[:1] == ["stats"]:
            _say({"rss": rss(), "peak_rss": peak_rss()})
        elif command[:1] == ["recall"]:
            _say(recall(store, queries, int(command[1])))
        elif command[:1] == ["timings"]:
            _say(timings.take())
    server.should_exit = True
    thread.join(timeout=10)
    runtime.close()
    if args.model_dir is None:
        shutil.rmtree(model_dir, ignore_errors=True)
    return 0


class RequestTimings:
    """Where a request's time goes inside this process: the app's own handling of each path
    (ASGI call to its return: body, routing, thread hand-off, response) and the prediction
    itself (`SimilarityModel.predict`). The rest of what a client measures is uvicorn's HTTP
    parsing, the sockets and the client."""

    def __init__(self) -> None:
        from echolabel.core.model import SimilarityModel

        self._app: dict[str, list[float]] = {}
        self._predict: list[float] = []
        original = SimilarityModel.predict

        def timed(model: Any, *args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return original(model, *args, **kwargs)
            finally:
                self._predict.append(time.perf_counter() - began)

        SimilarityModel.predict = timed  # type: ignore[method-assign]

    def wrap(self, app: Any) -> Any:
        async def timed_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            began = time.perf_counter()
            try:
                await app(scope, receive, send)
            finally:
                self._app.setdefault(scope["path"], []).append(time.perf_counter() - began)

        return timed_app

    def take(self) -> dict[str, Any]:
        """p50 in ms per path and of the predictions since the last call, then forget them."""
        taken = {
            "app_p50_ms": {
                path: 1000 * statistics.median(samples) for path, samples in self._app.items()
            },
            "predict_call_p50_ms": (
                1000 * statistics.median(self._predict) if self._predict else None
            ),
        }
        self._app, self._predict = {}, []
        return taken


def _fill(store: Any, args: argparse.Namespace, queries: Any) -> float:
    """N labelled points in clusters, then the unlabelled query tasks /predict is asked about;
    returns the seconds spent inside `upsert` (making the vectors excluded)."""
    import numpy as np

    from vectorstore import Point

    from .data import latent_clusters

    store.ensure_collection(PROJECT_ID, args.encoder, args.dim, "bench")
    rng = np.random.default_rng(args.seed)
    upsert_s = 0.0
    for start in range(0, args.points, _FILL_CHUNK):
        count = min(_FILL_CHUNK, args.points - start)
        vectors = latent_clusters(count, args.dim, seed=args.seed + 1 + start)
        labels = rng.integers(0, len(CLASSES), count)
        points = [
            Point(task=start + i, vector=vectors[i], labels={FIELD: CLASSES[labels[i]]})
            for i in range(count)
        ]
        began = time.perf_counter()
        store.upsert(PROJECT_ID, args.encoder, points)
        upsert_s += time.perf_counter() - began
    store.upsert(
        PROJECT_ID,
        args.encoder,
        [Point(task=QUERY_TASK_BASE + i, vector=queries[i]) for i in range(len(queries))],
    )
    return upsert_s


def recall(store: Any, queries: Any, k: int) -> dict[str, Any]:
    """recall@k of the store's own search (HNSW above Edge's exact threshold) against Edge's
    exact search over the query tasks, and the mean time of each. Other stores search exactly
    by construction below their threshold: their recall is not measured (None)."""
    from vectorstore.edge_store import EdgeStore

    found = truths = 0
    searched_s = exact_s = 0.0
    for query in queries:
        started = time.perf_counter()
        answer = {n.task for n in store.nearest(PROJECT_ID, query, k)}
        searched_s += time.perf_counter() - started
        if isinstance(store, EdgeStore):
            started = time.perf_counter()
            truth = {n.task for n in store.nearest(PROJECT_ID, query, k, exact=True)}
            exact_s += time.perf_counter() - started
            found += len(answer & truth)
            truths += len(truth)
    return {
        "k": k,
        "queries": len(queries),
        "recall": found / truths if truths else None,
        "search_ms": 1000 * searched_s / len(queries),
        "exact_ms": 1000 * exact_s / len(queries) if truths else None,
    }


def profile(runtime: Any, calls: int, queries: int) -> dict[str, Any]:
    """Where one /predict's time goes, in process: wall time per call, then cProfile's view."""
    from echolabel.core.model import SimilarityModel

    def predict_request(i: int) -> None:
        # What the /predict handler does with the parsed body.
        body = predict_body(QUERY_TASK_BASE + i % queries, "none.png")
        model = SimilarityModel(runtime, body["project"], body["label_config"])
        model.predict(body["tasks"])
        _ = model.model_version

    predict_request(0)
    started = time.perf_counter()
    for i in range(calls):
        predict_request(i)
    wall_ms = 1000 * (time.perf_counter() - started) / calls
    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(calls):
        predict_request(i)
    profiler.disable()
    stats = pstats.Stats(profiler)
    rows = []
    for (path, line, name), (_, calls_made, own, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append(
            {
                "function": f"{_short(path)}:{line}({name})",
                "calls_per_predict": calls_made / calls,
                "cumulative_ms": 1000 * cumulative / calls,
                "own_ms": 1000 * own / calls,
            }
        )
    rows.sort(key=lambda r: -r["cumulative_ms"])
    by_own = sorted(rows, key=lambda r: -r["own_ms"])
    return {
        "calls": calls,
        "predict_wall_ms": wall_ms,
        "top_cumulative": rows[:25],
        "top_own": by_own[:15],
    }


def _short(path: str) -> str:
    """A profiled function's file relative to the repository or to site-packages."""
    for marker in (f"{ROOT}/", "site-packages/", "/lib/python3"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def _say(message: dict[str, Any]) -> None:
    print("BENCH-SERVER " + json.dumps(message), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
