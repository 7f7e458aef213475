"""The outcome of an admission, as a Python enum (hashable, iterable, with ``.name``)."""

import enum


class Outcome(enum.IntEnum):
    """The outcome of an admission; exactly one per request.

    ``ADMIT``: within every limit, run now (HTTP 200, ``x-ratelimit-over-limit: no``).
    ``ADMIT_OVER_LIMIT``: over a limit but within the hard band, run at lower priority.
    ``REJECT_RATE_LIMITED``: beyond the hard band, 429 with ``retry-after``.
    ``SHED``: the model is overloaded for this request's class, 503.
    ``REJECT_SPEND``: the account is suspended or over its spend limit, 402/429.
    ``REJECT_INVALID``: malformed request, 400.
    ``REJECT_CONCURRENCY``: the account has ``max_in_flight`` requests outstanding, 429
    ``concurrency_limited``.
    """

    ADMIT = 0
    ADMIT_OVER_LIMIT = 1
    REJECT_RATE_LIMITED = 2
    SHED = 3
    REJECT_SPEND = 4
    REJECT_INVALID = 5
    REJECT_CONCURRENCY = 6

    def __repr__(self) -> str:
        return f"Outcome.{self.name}"

    __str__ = __repr__


Outcome.__module__ = "sluicegate"
