"""Annotation bursts against a real backend and a real RQ worker, with the embedded store.

Each burst starts `echolabel serve` (REDIS_URL set, no QDRANT_URL: workers embed, the backend
upserts what they return) beside one long-lived `echolabel worker embed`, then sends, as fast as
one client can: CREATED webhooks for every task, UPDATED ones with other labels and a later
time for some, and DELETED ones for others, all while their embed jobs are still queued. When
the backend has settled it checks, per burst:

- labelled == points == annotated tasks, read back from the store after the backend stopped;
- no embed job is marked applied without its point in the store;
- deleted and updated labels are as the last webhook left them;
- SIGTERM ends the backend within `--term-limit` seconds;
- idle CPU after the burst is back at the idle baseline measured before it.

    python -m bench.webhook_burst --bursts 10            # the long run (issue 20)
    python -m bench.webhook_burst --bursts 3 --tasks 60  # what the default suite runs

Exit status 0 when every burst passed; one line per burst, then a summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from redis import Redis
from rq import Queue
from rq.job import Job
from rq.registry import FinishedJobRegistry, StartedJobRegistry

from bench.processes import (
    ROOT,
    free_port,
    opened_store,
    process_env,
    start_backend,
    stop_backend,
    write_images,
)
from bench.processes import webhook as annotation_webhook
from vectorstore import Point
from workers.queues import EMBED
from workers.results import ResultList, store_key

PROJECT = 7
LABEL_CONFIG = """<View><Image name="image" value="$image"/>
<Choices name="organ" toName="image"><Choice value="dark"/><Choice value="bright"/>
<Choice value="grey"/></Choices></View>"""
CREATED_AT = "2026-12-01T00:00:00Z"
UPDATED_AT = "2026-12-01T00:05:00Z"


@dataclass
class BurstPlan:
    tasks: int = 624
    updates: int = 40
    deletes: int = 25

    def labels(self, task: int) -> str:
        return ("dark", "bright")[task % 2]

    def updated(self) -> range:
        return range(self.updates)

    def deleted(self) -> range:
        return range(self.updates, self.updates + self.deletes)

    def expected(self) -> dict[int, str | None]:
        """Each task's organ after the burst: the last webhook wins (None: no labels)."""
        out: dict[int, str | None] = {t: self.labels(t) for t in range(self.tasks)}
        out.update({t: "grey" for t in self.updated()})
        out.update({t: None for t in self.deleted()})
        return out


@dataclass
class BurstResult:
    number: int
    problems: list[str] = field(default_factory=list)
    settle_s: float = 0.0
    term_s: float = 0.0
    idle_cpu_before: float = 0.0
    idle_cpu_after: float = 0.0
    points: int = 0
    labelled: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        verdict = "ok" if self.ok else "FAILED: " + "; ".join(self.problems)
        return (
            f"burst {self.number}: points {self.points}, labelled {self.labelled}, "
            f"settled in {self.settle_s:.1f} s, SIGTERM exit {self.term_s:.2f} s, idle CPU "
            f"{self.idle_cpu_before:.1%} before / {self.idle_cpu_after:.1%} after: {verdict}"
        )


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu(pid: int, window_s: float) -> float:
    """Share of one core the process used over `window_s` seconds of wall time."""
    start, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(window_s)
    return (cpu_seconds(pid) - start) / (time.monotonic() - t0)


@contextlib.contextmanager
def worker_process(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "echolabel.cli", "worker", EMBED],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def webhook(action: str, task: int, image: str, organ: str | None, updated_at: str) -> dict:
    labels = None if organ is None else {"organ": organ}
    return annotation_webhook(PROJECT, action, task, image, labels, updated_at)


def send_burst(base: str, plan: BurstPlan, images: Sequence[str]) -> None:
    """Every webhook, in order, on one keep-alive connection; each must be acknowledged."""
    bodies = [
        webhook("ANNOTATION_CREATED", t, images[t], plan.labels(t), CREATED_AT)
        for t in range(plan.tasks)
    ]
    bodies += [
        webhook("ANNOTATION_UPDATED", t, images[t], "grey", UPDATED_AT) for t in plan.updated()
    ]
    bodies += [
        webhook("ANNOTATION_DELETED", t, images[t], None, UPDATED_AT) for t in plan.deleted()
    ]
    with httpx.Client(base_url=base, timeout=10) as client:
        for body in bodies:
            answer = client.post("/webhook", json=body)
            if answer.status_code != 200:
                raise RuntimeError(f"webhook refused: {answer.status_code} {answer.text[:200]}")


def wait_settled(base: str, redis: Redis, results: ResultList, timeout_s: float) -> tuple[int, int]:
    """Poll until every webhook was handled, no embed job is queued or running and every
    result was applied (or time out); returns the backend's last (points, labelled)."""
    deadline = time.monotonic() + timeout_s
    embed = Queue(EMBED, connection=redis)
    started = StartedJobRegistry(EMBED, connection=redis)
    with httpx.Client(base_url=base, timeout=10) as client:
        while time.monotonic() < deadline:
            idle = (
                client.get("/health").json()["webhooks_pending"] == 0
                and embed.count == 0
                and started.count == 0
                and results.waiting() == 0
            )
            if idle:
                break
            time.sleep(0.5)
        rows = [
            r
            for r in client.get("/admin/projects").json()["projects"]
            if str(r["project"]) == str(PROJECT)
        ]
    return (rows[0].get("points", 0), rows[0].get("labelled", 0)) if rows else (0, 0)


def check_store(model_dir: Path, plan: BurstPlan, result: BurstResult) -> dict[int, Point]:
    """Read the embedded store the backend left behind and compare with the plan; returns
    its points by task."""
    with opened_store(model_dir) as store:
        points = {p.task: p for p in store.iter_points(PROJECT, with_vectors=False)}
    result.points = len(points)
    result.labelled = sum(p.labelled for p in points.values())
    missing = sorted(set(range(plan.tasks)) - set(points))
    if missing:
        result.problems.append(f"{len(missing)} task(s) have no point (e.g. {missing[:5]})")
    wrong = [
        (t, organ, (points[t].labels or {}).get("organ"))
        for t, organ in plan.expected().items()
        if t in points and (points[t].labels or {}).get("organ") != organ
    ]
    if wrong:
        result.problems.append(
            f"{len(wrong)} task(s) with wrong labels (task, want, got): {wrong[:5]}"
        )
    return points


def check_applied_jobs(
    redis: Redis, since: float, points: dict[int, Point], result: BurstResult
) -> None:
    """Every embed job that finished in this burst and says it was applied has its points."""
    registry = FinishedJobRegistry(EMBED, connection=redis)
    orphans = []
    for job in Job.fetch_many(registry.get_job_ids(), connection=redis):
        if job is None or not job.ended_at or job.ended_at.timestamp() < since:
            continue
        if job.meta.get("applied"):
            orphans += [t["task"] for t in job.args[2] if t["task"] not in points]
    if orphans:
        result.problems.append(f"{len(orphans)} job task(s) marked applied without a point")


def run_burst(
    number: int,
    work: Path,
    plan: BurstPlan,
    images: Sequence[str],
    redis_url: str,
    encoder: str,
    term_limit_s: float,
) -> BurstResult:
    result = BurstResult(number)
    model_dir = work / f"burst-{number}"
    env = process_env(model_dir, Path(images[0]).parent, redis_url, encoder)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    backend = start_backend(env, port, work / f"backend-{number}.log")
    redis = Redis.from_url(redis_url)
    results = ResultList(redis, store_key(model_dir))
    try:
        httpx.post(f"{base}/setup", json={"project": PROJECT, "schema": LABEL_CONFIG}, timeout=10)
        result.idle_cpu_before = idle_cpu(backend.pid, 3.0)
        started = time.time()
        t0 = time.monotonic()
        send_burst(base, plan, images)
        reported = wait_settled(base, redis, results, timeout_s=120 + plan.tasks * 2.0)
        result.settle_s = time.monotonic() - t0
        time.sleep(2.0)  # "within seconds"
        result.idle_cpu_after = idle_cpu(backend.pid, 3.0)
    finally:
        result.term_s = stop_backend(backend, term_limit_s)
    if result.term_s > term_limit_s:
        result.problems.append(f"SIGTERM took {result.term_s:.1f} s (limit {term_limit_s} s)")
    if result.idle_cpu_after > result.idle_cpu_before + 0.02:
        result.problems.append(
            f"idle CPU {result.idle_cpu_after:.1%} after the burst, "
            f"{result.idle_cpu_before:.1%} before"
        )
    try:
        check_applied_jobs(redis, started, check_store(model_dir, plan, result), result)
    finally:
        redis.close()
    if reported != (result.points, result.labelled):
        result.problems.append(
            f"the backend reported {reported[0]} points / {reported[1]} labelled, the store "
            f"holds {result.points} / {result.labelled}"
        )
    return result


def run_bursts(
    bursts: int,
    plan: BurstPlan,
    work: Path,
    redis_url: str,
    encoder: str = "efficientnet_lite0",
    term_limit_s: float = 5.0,
    echo: bool = True,
) -> list[BurstResult]:
    images = write_images(work / "images", plan.tasks)
    worker_env = process_env(work / "worker", work / "images", redis_url, encoder)
    results = []
    with worker_process(worker_env, work / "worker.log"):
        for number in range(1, bursts + 1):
            result = run_burst(number, work, plan, images, redis_url, encoder, term_limit_s)
            results.append(result)
            if echo:
                print(result.line(), flush=True)
    return results


def inline_kill_run(
    work: Path,
    tasks: int = 120,
    threads: int = 8,
    kill_after: int = 40,
    encoder: str = "efficientnet_lite0",
) -> tuple[int, list[str]]:
    """The inline backend (no Redis) is SIGKILLed while `threads` clients send CREATED
    webhooks; after a restart every acknowledged annotation must be in the store, once.
    Returns (acknowledged, problems)."""
    images = write_images(work / "images", tasks)
    model_dir = work / "inline"
    env = process_env(model_dir, work / "images", None, encoder)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    backend = start_backend(env, port, work / "inline-backend.log")
    httpx.post(f"{base}/setup", json={"project": PROJECT, "schema": LABEL_CONFIG}, timeout=10)
    acknowledged: set[int] = set()
    lock = threading.Lock()
    killed = threading.Event()

    def send(mine: Sequence[int]) -> None:
        with httpx.Client(base_url=base, timeout=10) as client:
            for t in mine:
                body = webhook(
                    "ANNOTATION_CREATED", t, images[t], BurstPlan().labels(t), CREATED_AT
                )
                try:
                    ok = client.post("/webhook", json=body).status_code == 200
                except httpx.HTTPError:
                    return  # the backend is gone
                with lock:
                    if ok:
                        acknowledged.add(t)
                    if len(acknowledged) >= kill_after and not killed.is_set():
                        killed.set()
                        backend.kill()

    senders = [
        threading.Thread(target=send, args=(range(i, tasks, threads),)) for i in range(threads)
    ]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    backend.wait()
    restarted = start_backend(env, port, work / "inline-backend.log")
    problems = []
    try:
        deadline = time.monotonic() + 120 + tasks
        while httpx.get(f"{base}/health", timeout=10).json()["webhooks_pending"]:
            if time.monotonic() > deadline:
                problems.append("the restarted backend did not replay its inbox in time")
                break
            time.sleep(0.2)
    finally:
        stop_backend(restarted, 5.0)
    with opened_store(model_dir) as store:
        points = list(store.iter_points(PROJECT, with_vectors=False))
    by_task = {p.task: p for p in points}
    if len(by_task) != len(points):
        problems.append(f"{len(points) - len(by_task)} duplicate point(s)")
    lost = sorted(t for t in acknowledged if not by_task.get(t) or not by_task[t].labelled)
    if lost:
        problems.append(f"{len(lost)} acknowledged annotation(s) lost (e.g. {lost[:5]})")
    wrong = [
        t
        for t in acknowledged
        if t in by_task and by_task[t].labels.get("organ") != BurstPlan().labels(t)
    ]
    if wrong:
        problems.append(f"{len(wrong)} task(s) with wrong labels")
    return len(acknowledged), problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bursts", type=int, default=10)
    parser.add_argument("--tasks", type=int, default=624)
    parser.add_argument("--updates", type=int, default=40)
    parser.add_argument("--deletes", type=int, default=25)
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/12")
    )
    parser.add_argument("--encoder", default="efficientnet_lite0")
    parser.add_argument("--term-limit", type=float, default=5.0)
    parser.add_argument("--work", type=Path, help="folder for images, stores and logs")
    parser.add_argument(
        "--inline-kills",
        type=int,
        default=0,
        help="instead: SIGKILL the inline backend (no Redis) mid-burst this many times",
    )
    args = parser.parse_args(argv)
    plan = BurstPlan(args.tasks, args.updates, args.deletes)
    work = args.work or Path(tempfile.mkdtemp(prefix="echolabel-burst-"))
    if args.inline_kills:
        failures = 0
        for run in range(1, args.inline_kills + 1):
            acknowledged, problems = inline_kill_run(work / f"kill-{run}", tasks=args.tasks)
            failures += bool(problems)
            verdict = "ok" if not problems else "FAILED: " + "; ".join(problems)
            print(f"kill {run}: {acknowledged} acknowledged before SIGKILL: {verdict}", flush=True)
        print(f"{args.inline_kills - failures} of {args.inline_kills} runs passed")
        return 1 if failures else 0
    Redis.from_url(args.redis_url).flushdb()
    print(
        json.dumps(
            {
                "plan": plan.__dict__,
                "work": str(work),
                "redis": args.redis_url,
                "load_average": os.getloadavg(),
                "date": time.strftime("%Y-%m-%d"),
            }
        )
    )
    results = run_bursts(args.bursts, plan, work, args.redis_url, args.encoder, args.term_limit)
    passed = sum(r.ok for r in results)
    print(f"{passed} of {len(results)} bursts passed")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
