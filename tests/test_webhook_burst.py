"""Issue 20's stress test, short: real backend and worker processes, real Redis.

The long version is `python -m bench.webhook_burst --bursts 10` (624 annotations a burst) and
`python -m bench.webhook_burst --inline-kills 5`; see docs/production.md (workers).
"""

from __future__ import annotations

import pytest

from bench.webhook_burst import BurstPlan, inline_kill_run, run_bursts
from tests.helpers import REDIS_URL

pytestmark = pytest.mark.slow


@pytest.mark.redis
def test_bursts_with_updates_and_deletes_lose_nothing(tmp_path, redis_db):
    plan = BurstPlan(tasks=40, updates=10, deletes=8)
    results = run_bursts(3, plan, tmp_path, REDIS_URL, echo=False)
    assert [r.line() for r in results if not r.ok] == []
    assert all(r.points == 40 and r.labelled == 32 for r in results)


def test_the_inline_backend_killed_mid_burst_loses_no_acknowledged_annotation(tmp_path):
    acknowledged, problems = inline_kill_run(tmp_path, tasks=60, threads=8, kill_after=20)
    assert acknowledged >= 20
    assert problems == []
