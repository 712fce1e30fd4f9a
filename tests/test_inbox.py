"""The durable webhook inbox: order kept, failures kept with reasons, transient ones retried."""

from __future__ import annotations

from backend.inbox import WebhookInbox
from vectorstore import StoreUnavailableError


def test_transient_failure_is_retried_in_order_and_nothing_overtakes_it(tmp_path):
    handled: list[int] = []
    outages = iter([True, True])

    def handle(payload):
        if payload["n"] == 1 and next(outages, False):
            raise StoreUnavailableError("the Qdrant server at http://q:6333 is unreachable")
        handled.append(payload["n"])

    inbox = WebhookInbox(
        tmp_path, handle, transient=(StoreUnavailableError,), retry_after_s=(0.05,)
    )
    for n in (1, 2, 3):
        inbox.put({"n": n})
    inbox.start()
    try:
        assert inbox.wait_idle(10)
    finally:
        inbox.stop()
    assert handled == [1, 2, 3]
    assert inbox.failed() == [] and inbox.blocked_by is None


def test_while_blocked_the_payload_stays_pending_with_the_reason(tmp_path):
    def handle(payload):
        raise StoreUnavailableError("the Qdrant server at http://q:6333 is unreachable")

    inbox = WebhookInbox(tmp_path, handle, transient=(StoreUnavailableError,))
    inbox.put({"n": 1})
    assert inbox.process(inbox.pending()[0]) is False
    assert len(inbox.pending()) == 1 and inbox.failed() == []
    assert "unreachable" in inbox.blocked_by


def test_other_failures_are_kept_in_failed_with_their_reason(tmp_path):
    def handle(payload):
        raise ValueError("no image in task")

    inbox = WebhookInbox(tmp_path, handle, transient=(StoreUnavailableError,))
    inbox.put({"n": 1})
    assert inbox.process(inbox.pending()[0]) is True
    (failed,) = inbox.failed()
    assert "no image in task" in failed.with_suffix(".error.txt").read_text()
    assert inbox.pending() == []
