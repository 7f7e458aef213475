"""Adaptive, lock-free admission control for LLM inference gateways.

For every request, :meth:`Engine.admit` decides whether it runs now
(``Outcome.ADMIT``), runs over its limit at lower priority (``ADMIT_OVER_LIMIT``),
is told to retry later (``REJECT_RATE_LIMITED``, a 429) or is shed
(``SHED``, a 503), under per-account, per-model limits on requests and tokens per
minute that grow with sustained use and shrink when idle. Settle every admitted
decision with :meth:`Engine.settle` once the upstream reports its usage.

>>> import sluicegate
>>> engine = sluicegate.Engine(policy="fixed", capacity=1_000)
>>> d = engine.admit("acct-1", "llama-v3p1-70b", prompt_tokens=1200, max_tokens=256, now_ns=0)
>>> d.outcome
Outcome.ADMIT
>>> engine.settle(d, prompt_tokens=1200, generated_tokens=180, now_ns=0)
>>> engine.limits("acct-1", "llama-v3p1-70b", now_ns=0)["requests"]
60
"""

from sluicegate._errors import (
    AlreadySettledError,
    ArgumentError,
    ArgumentOverflowError,
    ArgumentTypeError,
    CorruptSnapshotError,
    EngineInUseError,
    Error,
    InvalidKeyError,
    InvalidUsageError,
    PermitExpiredError,
    PolicyError,
    QuotaExceededError,
    SharedRegionError,
    RedisError,
    SpendLimitAboveTierError,
    StalePermitError,
    TableFullError,
    UnknownAccountError,
)
from sluicegate._outcome import Outcome
from sluicegate._sluicegate import Decision, Engine, Scope, __version__

PRESETS = ("fireworks_2024", "fireworks_2026", "together", "fixed")
"""Policy names accepted by :class:`Engine`."""

DIALECTS = ("fireworks", "together", "openai", "anthropic", "ietf")
"""Header dialects accepted by :meth:`Decision.headers`."""

METRICS = ("requests", "prompt_tokens", "uncached_prompt_tokens", "generated_tokens")
"""The four metrics every scope limits, as they appear in dictionaries."""

__all__ = [
    "DIALECTS",
    "METRICS",
    "PRESETS",
    "AlreadySettledError",
    "ArgumentError",
    "ArgumentOverflowError",
    "ArgumentTypeError",
    "CorruptSnapshotError",
    "Decision",
    "Engine",
    "EngineInUseError",
    "Error",
    "InvalidKeyError",
    "InvalidUsageError",
    "Outcome",
    "PermitExpiredError",
    "PolicyError",
    "QuotaExceededError",
    "Scope",
    "SharedRegionError",
    "RedisError",
    "SpendLimitAboveTierError",
    "StalePermitError",
    "TableFullError",
    "UnknownAccountError",
]
