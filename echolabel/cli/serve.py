"""`echolabel serve` (the Label Studio ML backend), `echolabel health` (ask a running one) and
`echolabel worker` (an RQ worker)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from echolabel.settings import Settings


def add_commands(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the Label Studio ML backend")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=9090)
    serve.set_defaults(run=_serve)

    health = sub.add_parser(
        "health", help="ask a running backend for /health (exit 1 unless it answers UP)"
    )
    health.add_argument("--url", default="http://127.0.0.1:9090", help="the backend's base URL")
    health.set_defaults(run=_health)

    worker = sub.add_parser("worker", help="run an RQ worker (needs REDIS_URL)")
    worker.add_argument("queues", nargs="*", help="queues to work (default: all)")
    worker.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    worker.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), help="default: ECHOLABEL_DEVICE"
    )
    worker.set_defaults(run=_worker)


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from backend.app import create_app

    print(
        f"echolabel: serving on http://{args.host}:{args.port} "
        f"(encoder {settings.encoder}, data in {settings.model_dir.resolve()}, "
        f"store {'server ' + settings.qdrant_url if settings.qdrant_url else 'embedded'})",
        file=sys.stderr,
    )
    app = create_app(settings, listen_host=args.host)
    # On SIGTERM, requests still running after 3 s are cancelled (a /predict waits at most
    # ECHOLABEL_EMBED_WAIT_S; Label Studio asks again), so docker's 10 s grace period holds.
    uvicorn.run(
        app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=3
    )
    return 0


def _health(args: argparse.Namespace, settings: Settings) -> int:
    """For container health checks: the backend's /health with its own basic auth."""
    import httpx

    auth = (settings.basic_auth_user, settings.basic_auth_pass or "")
    try:
        answer = httpx.get(
            f"{args.url.rstrip('/')}/health",
            auth=auth if settings.basic_auth_user else None,
            timeout=5.0,
        )
    except httpx.HTTPError as exc:
        print(f"echolabel: no answer from {args.url}: {exc}", file=sys.stderr)
        return 1
    print(answer.text)
    return 0 if answer.status_code == 200 and answer.json().get("status") == "UP" else 1


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    from workers.worker import run_worker

    run_worker(settings, args.queues or None, burst=args.burst, device=args.device)
    return 0
