"""`/health` and `/predict` over loopback HTTP: the app as it is, and with the pass-through
Starlette `BaseHTTPMiddleware` it carried before (basic auth, installed even when unset).

`python -m bench.http_path [--points 15000] [--rounds 2]` fills one embedded store with N
labelled 1280-d points, then serves it in rounds, each round both apps one after the other
(`bench.server --reuse` on the same directory), and prints per app and round the p50 of
`GET /health` and `/predict` from one client, the app's own time of each (`bench.server`'s
`timings`) and the throughput with 1 and 8 clients.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import httpx

from .latency import _load
from .server import QUERY_TASK_BASE, QUERY_TASKS, BackendProcess, predict_body
from .timing import summarize

ENCODER = "efficientnet_lite0"
DIM = 1280


def _p50_ms(samples: list[float]) -> float:
    return 1000 * summarize(samples).median


def _measure(backend: BackendProcess, requests: int) -> str:
    def predict(http: httpx.Client, i: int) -> httpx.Response:
        return http.post(
            "/predict", json=predict_body(QUERY_TASK_BASE + i % QUERY_TASKS, "none.png")
        )

    backend.ask("timings")
    health = _load(backend.url, 1, requests, lambda h, i: h.get("/health"))
    one = _load(backend.url, 1, requests, predict)
    inside = backend.ask("timings")
    eight = _load(backend.url, 8, requests, predict)
    health_ms, predict_ms = _p50_ms(health["samples"]), _p50_ms(one["samples"])
    return (
        f"/health {health_ms:.3f} ms, /predict {predict_ms:.3f} ms "
        f"({predict_ms / health_ms:.2f}x); in the app /health "
        f"{inside['app_p50_ms']['/health']:.3f} ms, /predict "
        f"{inside['app_p50_ms']['/predict']:.3f} ms, predicting "
        f"{inside['predict_call_p50_ms']:.3f} ms; req/s 1 client "
        f"{len(one['samples']) / one['elapsed_s']:.0f}, 8 clients "
        f"{len(eight['samples']) / eight['elapsed_s']:.0f}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, default=15_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=800)
    args = parser.parse_args(argv)
    model_dir = Path(tempfile.mkdtemp(prefix="echolabel-http-path-"))
    try:
        with BackendProcess(args.points, DIM, ENCODER, store="edge", model_dir=model_dir):
            pass  # filled and indexed once; every served app below reopens it
        for round_ in range(1, args.rounds + 1):
            for label, base_middleware in (("now", False), ("BaseHTTPMiddleware", True)):
                with BackendProcess(
                    args.points,
                    DIM,
                    ENCODER,
                    store="edge",
                    model_dir=model_dir,
                    reuse=True,
                    base_http_middleware=base_middleware,
                ) as backend:
                    print(
                        f"round {round_}, {label}: {_measure(backend, args.requests)}", flush=True
                    )
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
