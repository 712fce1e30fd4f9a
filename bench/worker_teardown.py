"""How long burst workers take to exit on an empty queue: RQ's SimpleWorker against ours.

`python -m bench.worker_teardown --redis-url redis://127.0.0.1:6379/7 --bursts 20` runs that
many bursts of each class (flushing that database before and after) and prints the total, the
slowest and how many took over 5 s. RQ's pub/sub thread reads for 60 s at a time and redis-py 8
joins it without a timeout, so some of its bursts take a minute (workers/worker.py).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from redis import Redis
from rq import Queue, SimpleWorker

from workers.worker import EcholabelWorker

from .report import load_average


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--redis-url", required=True, help="a database this run may flush")
    parser.add_argument("--bursts", type=int, default=20)
    args = parser.parse_args(argv)
    connection = Redis.from_url(args.redis_url)
    connection.flushdb()
    queue = Queue("teardown-probe", connection=connection)
    print(f"{time.strftime('%Y-%m-%d %H:%M')} UTC, load {load_average()}")
    totals = {}
    try:
        for worker_class in (SimpleWorker, EcholabelWorker):
            times = []
            for _ in range(args.bursts):
                started = time.monotonic()
                worker_class([queue], connection=connection).work(
                    burst=True, logging_level="WARNING"
                )
                times.append(time.monotonic() - started)
            totals[worker_class.__name__] = sum(times)
            print(
                f"{worker_class.__name__}: {args.bursts} bursts in {sum(times):.1f} s, slowest "
                f"{max(times):.2f} s, {sum(t > 5 for t in times)} over 5 s"
            )
    finally:
        connection.flushdb()
    ours = totals["EcholabelWorker"]
    print(f"SimpleWorker / EcholabelWorker: {totals['SimpleWorker'] / ours:.1f}x the time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
