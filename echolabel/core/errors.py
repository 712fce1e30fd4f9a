"""Errors the core's long work raises to say whether trying again can help.

The jobs layer (workers/) maps them onto RQ: a transient error is retried on the job's Retry
policy, a permanent one goes straight to the failed registry with its message. The core raises
them without knowing whether it runs in an RQ worker, a thread of the backend or the CLI.
"""


class TransientJobError(RuntimeError):
    """Worth retrying later (RQ's Retry policy does)."""


class PermanentJobError(RuntimeError):
    """Retrying cannot help; the job goes straight to the failed registry with this reason."""
