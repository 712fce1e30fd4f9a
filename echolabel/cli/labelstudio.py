"""Getting set up with Label Studio: `echolabel demo` (a real Label Studio with this backend
connected, on a folder of images), `echolabel connect` (a backend to a project) and
`echolabel doctor` (what to fix, step by step)."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

from echolabel.settings import ConfigError, Settings


def add_commands(sub: Any) -> None:
    demo = sub.add_parser(
        "demo", help="a real Label Studio with this backend connected, on a folder of images"
    )
    demo.add_argument("--images", type=Path, required=True, help="folder of images (read only)")
    demo.add_argument("--labels", type=Path, help="CSV with an `image` column and label fields")
    demo.add_argument("--field", action="append", default=[], help="a label column (repeat)")
    demo.add_argument(
        "--choices",
        type=lambda text: [c.strip() for c in text.split(",") if c.strip()],
        default=[],
        help="without --labels: the classes to annotate with, comma-separated (field `label`, "
        "or the one --field names)",
    )
    demo.add_argument(
        "--annotate", type=float, default=0.2, help="share of tasks annotated from the CSV"
    )
    demo.add_argument(
        "--home",
        type=Path,
        default=Path("~/.cache/echolabel/demo").expanduser(),
        help="where Label Studio's venv and the demo's data live",
    )
    demo.add_argument("--port", type=int, help="Label Studio's port (default: a free one)")
    demo.add_argument(
        "--exit-after-setup", action="store_true", help="stop everything once set up (tests)"
    )
    demo.set_defaults(run=_demo)

    doctor = sub.add_parser(
        "doctor", help="check the set-up step by step and say what to fix (exit 1 on a failure)"
    )
    doctor.add_argument("--project", type=int, help="also check this Label Studio project")
    doctor.add_argument(
        "--backend-url", help="the backend's URL as Label Studio knows it (webhook check)"
    )
    doctor.add_argument("--json", action="store_true", help="print the checks as JSON")
    doctor.add_argument(
        "--troubleshooting",
        action="store_true",
        help="print docs/troubleshooting.md's table (every way a check fails, and its fix)",
    )
    # A bad configuration is the doctor's first finding, not an error (see echolabel.cli.main).
    doctor.set_defaults(run=_doctor, on_config_error=_doctor_bad_configuration)

    connect = sub.add_parser(
        "connect",
        help="connect this backend to a Label Studio project (and let its webhook through "
        "basic auth)",
    )
    connect.add_argument("--project", type=int, required=True, help="Label Studio project id")
    connect.add_argument(
        "--backend-url",
        required=True,
        help="this backend's URL as Label Studio reaches it, e.g. http://backend:9090",
    )
    connect.add_argument("--title", default="echolabel")
    connect.set_defaults(run=_connect)


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    import time

    from echolabel.demo import USER, running_demo

    if args.labels and not args.field:
        raise ValueError("with --labels, name the label columns to use with --field")
    if not args.labels:
        args.annotate = 0.0
        if len(args.field) > 1:
            raise ValueError("without --labels, --choices fills one field: give one --field")
    say = functools.partial(print, file=sys.stderr, flush=True)
    with running_demo(
        args.images,
        args.labels,
        args.field,
        home=args.home,
        annotate=args.annotate,
        choices=args.choices,
        port=args.port,
        say=say,
    ) as demo:
        print(
            f"\nOpen {demo.url}\n  user {USER}\n  password {demo.password}\n"
            f"{demo.tasks} tasks, {demo.annotated} annotated from the CSV"
            + (", the others pre-annotated" if demo.annotated else "")
            + f"; backend {demo.backend_url}\n",
            flush=True,
        )
        if args.exit_after_setup:
            return 0
        say("running until Ctrl-C")
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            say("stopping Label Studio and the backend")
    return 0


def _doctor(args: argparse.Namespace, settings: Settings) -> int:
    from backend.doctor import Doctor, troubleshooting_markdown
    from workers.runtime import open_runtime

    if args.troubleshooting:
        print(troubleshooting_markdown(), end="")
        return 0
    with open_runtime(settings) as runtime:  # the store opens only if a check asks for it
        checker = Doctor(runtime)
        checks = checker.run(args.project, args.backend_url)
    if args.json:
        print(json.dumps([c.as_dict() for c in checks], indent=2))
    else:
        print("\n".join(c.line() for c in checks))
    return 0 if checker.healthy else 1


def _doctor_bad_configuration(error: ConfigError) -> int:
    from backend.doctor import BAD_CONFIGURATION, Check

    print(Check("configuration", False, str(error), BAD_CONFIGURATION.fix).line())
    return 1


def _connect(args: argparse.Namespace, settings: Settings) -> int:
    from echolabel.labelstudio import LabelStudioClient

    url = args.backend_url.rstrip("/")
    basic_auth = (
        (settings.basic_auth_user, settings.basic_auth_pass or "")
        if settings.basic_auth_user
        else None
    )
    connection = LabelStudioClient(settings).connect(args.project, url, args.title, basic_auth)
    if connection.already_connected:
        print(f"echolabel: {url} is already connected to project {args.project}")
    else:
        print(f"echolabel: connected {url} to project {args.project}")
    if not connection.webhook:
        print(
            f"echolabel: project {args.project} has no webhook to {url}/webhook, so the backend "
            "will not learn from new annotations: Label Studio's SSRF protection refused the "
            "address (set SSRF_PROTECTION_ENABLED=false in Label Studio, or add the webhook "
            "under Settings → Webhooks)",
            file=sys.stderr,
        )
        return 1
    print(f"echolabel: webhook {url}/webhook present" + (" with basic auth" if basic_auth else ""))
    return 0
