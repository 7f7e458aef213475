"""Type stubs and documentation of the native module ``sluicegate._sluicegate``."""

import os
from typing import Literal, Optional, SupportsIndex, TypedDict, Union

from typing_extensions import final

from sluicegate._errors import AlreadySettledError as AlreadySettledError
from sluicegate._errors import ArgumentError as ArgumentError
from sluicegate._errors import ArgumentOverflowError as ArgumentOverflowError
from sluicegate._errors import ArgumentTypeError as ArgumentTypeError
from sluicegate._errors import CorruptSnapshotError as CorruptSnapshotError
from sluicegate._errors import EngineInUseError as EngineInUseError
from sluicegate._errors import Error as Error
from sluicegate._errors import InvalidKeyError as InvalidKeyError
from sluicegate._errors import InvalidUsageError as InvalidUsageError
from sluicegate._errors import PermitExpiredError as PermitExpiredError
from sluicegate._errors import PolicyError as PolicyError
from sluicegate._errors import QuotaExceededError as QuotaExceededError
from sluicegate._errors import SharedRegionError as SharedRegionError
from sluicegate._errors import RedisError as RedisError
from sluicegate._errors import SpendLimitAboveTierError as SpendLimitAboveTierError
from sluicegate._errors import StalePermitError as StalePermitError
from sluicegate._errors import TableFullError as TableFullError
from sluicegate._errors import UnknownAccountError as UnknownAccountError
from sluicegate._outcome import Outcome as Outcome

__version__: str
"""The package's version (the Cargo workspace's)."""

_Key = Union[str, bytes]
_Dialect = Literal["fireworks", "together", "openai", "anthropic", "ietf"]
_MetricName = Literal["requests", "prompt_tokens", "uncached_prompt_tokens", "generated_tokens"]
_QuotaName = Literal["deployed_models", "a100_gpus", "h100_gpus"]
_ServiceTier = Literal["flex", "default", "priority"]

class _TierCounts(TypedDict):
    """One service tier's counts of each event, and its spend, in :meth:`Engine.metrics`."""

    admitted: int
    over_limit: int
    rate_limited_requests: int
    rate_limited_prompt_tokens: int
    rate_limited_uncached_prompt_tokens: int
    rate_limited_generated_tokens: int
    shed: int
    spend_refused: int
    concurrency_limited: int
    invalid: int
    table_full: int
    expired: int
    succeeded: int
    upstream_failure: int
    cancelled: int
    spend_microdollars: int

class _Counts(TypedDict):
    """Each service tier's counts, in :meth:`Engine.metrics`."""

    flex: _TierCounts
    default: _TierCounts
    priority: _TierCounts

class _ModelMetrics(TypedDict):
    """One model variant's entry in :meth:`Engine.metrics`."""

    model: str
    variant: Literal["regular", "fast"]
    in_flight: int
    load: float
    counts: _Counts

class _Metrics(TypedDict):
    """What :meth:`Engine.metrics` returns."""

    models: list[_ModelMetrics]

__all__ = [
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
    "__version__",
]

@final
class Decision:
    """An admission decision; settle it with :meth:`Engine.settle` if it was admitted.

    Decisions pickle: a process sharing the engine's file (``Engine(shared=...)``) can settle
    one that another admitted.
    """

    @property
    def outcome(self) -> Outcome:
        """What to do with the request."""
    @property
    def admitted(self) -> bool:
        """Whether the request may run (normally or over its limit)."""
    @property
    def over_limit(self) -> bool:
        """Whether it runs (or would run) over its limit, at lower priority."""
    @property
    def service_tier(self) -> Optional[_ServiceTier]:
        """The service tier an admitted request is served at (the one asked for, capped by its
        account's grant); None if not admitted."""
    @property
    def status_code(self) -> int:
        """The HTTP status in the engine's dialect: 200, 400, 402, 429 or 503."""
    @property
    def retry_after(self) -> Optional[float]:
        """Seconds until the request would fit (429) or the shed delay (503); else None."""
    @property
    def retry_after_ns(self) -> Optional[int]:
        """:attr:`retry_after` in nanoseconds."""
    @property
    def wait(self) -> float:
        """Seconds to delay forwarding an admitted request (smoothing); usually 0."""
    @property
    def binding_metric(self) -> Optional[_MetricName]:
        """For a 429, the metric that binds."""
    @property
    def too_large(self) -> bool:
        """For a 429, whether the request can never fit at the current limit."""
    @property
    def reason(self) -> Optional[str]:
        """For spend, concurrency and invalid refusals, why (e.g. ``"concurrency_limited"``)."""
    @property
    def limits(self) -> dict[str, Optional[int]]:
        """Each metric's limit per minute (None when not enforced)."""
    @property
    def remaining(self) -> dict[str, Optional[int]]:
        """Each metric's units left before its limit, None when not enforced."""
    @property
    def cost(self) -> dict[str, Optional[int]]:
        """What the request costs on each metric."""
    def headers(
        self, dialect: Optional[_Dialect] = None, *, unix_ns: Optional[SupportsIndex] = None, jitter_seed: Optional[SupportsIndex] = None
    ) -> list[tuple[str, str]]:
        """The rate-limit headers to send, in ``dialect`` (the engine's by default).

        ``unix_ns`` anchors the engine's clock to wall time for Anthropic's RFC 3339 resets
        (default: now); ``jitter_seed`` seeds a 503's retry-after jitter.
        """
    def error_body(self, dialect: Optional[_Dialect] = None, *, jitter_seed: Optional[SupportsIndex] = None) -> Optional[dict[str, object]]:
        """The OpenAI-compatible JSON error body of a refusal, parsed; None if admitted."""

@final
class Engine:
    """The admission engine: fixed-capacity tables, safe to share between threads.

    ``policy`` is a preset (``fireworks_2024``, ``fireworks_2026``, ``together``, ``fixed``).
    Keyword overrides are collected, then resolved and checked together, so their order never
    matters:

    - ``<metric>_per_minute`` (``requests_per_minute``, ``prompt_tokens_per_minute``,
      ``uncached_prompt_tokens_per_minute``, ``generated_tokens_per_minute``) is the metric's
      limit, its floor when limits adapt. Under ``fixed``, naming any metric's limit enforces only
      the metrics named; ``fixed`` with none named keeps its documented floors.
    - ``<metric>_ceiling`` (e.g. ``requests_ceiling``) bounds adaptation (default: the preset's,
      raised to the floor); a floor above its ceiling is a :class:`PolicyError`.
    - ``hard_factor`` (ρ ≥ 1), ``max_wait`` (smoothing, seconds; 0 turns it off), ``tick``
      (seconds) and ``permit_ttl`` (seconds, at least 1; default 900, 15 minutes): a decision not
      settled within ``permit_ttl`` of its ``now_ns`` expires, and settling it raises
      :class:`PermitExpiredError`.
    - ``max_in_flight`` (a whole number, at least 1) caps the permits one account may have
      outstanding; default: a quarter of ``permits``, so that no account can take the whole
      ledger. Beyond it, admission is ``Outcome.REJECT_CONCURRENCY``, a 429
      ``concurrency_limited``; :meth:`set_max_in_flight` gives one account its own cap.
    - ``None`` means ``inf``, no limit: it turns a metric off under any preset, removes a
      ceiling, makes permits never expire, lifts the ``max_in_flight`` cap.

    A value out of range raises :class:`PolicyError` naming it; an unknown keyword raises
    ``TypeError`` naming it. ``repr(engine)`` shows each metric's limit in force (``off`` when
    not enforced) and ``max_in_flight``. Every ``now_ns`` defaults to ``time.monotonic_ns()``;
    pass explicit values to simulate hours in milliseconds.

    ``shared`` (a path: str or ``os.PathLike``; default None, this process's memory) puts the
    tables in a memory-mapped file, e.g. ``/dev/shm/sluicegate-api``: every process that opens
    the same path with the same policy, overrides and capacities shares each account's limits
    exactly, such as the workers of ``uvicorn --workers 4`` each creating its engine at import.
    The first opener creates the file (mode 0600) and initialises it; a file made for another
    configuration, damaged, or not a sluicegate region raises :class:`SharedRegionError` and is
    left as it was. sluicegate never deletes the file: remove it, once no process has it open,
    to start afresh. Permits held by a process that dies are not given back at once: each
    expires ``permit_ttl`` after its admission (its reservation stays charged), and what it
    held, its account's in-flight place and its model's load, comes back as the engine meets
    it, sweeping the ledger as time goes (4,096 permits a tick, more on refusals). One killed
    inside a call may leave a count one off until every process has closed the file: the
    next opener, alone, recounts the region first. ``seed``
    cannot be given with ``shared``: the region keeps the seed of the process that created it.

    ``redis`` (a URL, ``redis://host:port/db``; default None) makes the engine one replica of
    many behind a load balancer: every engine connected to the same Redis 7 with the same
    policy and overrides shares each scope's limits, as one engine would. Admissions stay local,
    from leases of the global buckets a background thread keeps (a scope's first request waits
    for one Redis call); if Redis stops answering, leases run out, then each replica admits its
    share of the limits (the limit / replicas still heard from). Redis unreachable (within
    200 ms) raises :class:`RedisError`. ``redis`` cannot be given with ``shared``.
    """

    def __new__(
        cls,
        policy: str = "fireworks_2024",
        capacity: Optional[SupportsIndex] = None,
        *,
        accounts: Optional[SupportsIndex] = None,
        models: Optional[SupportsIndex] = None,
        permits: Optional[SupportsIndex] = None,
        seed: Optional[SupportsIndex] = None,
        dialect: _Dialect = "fireworks",
        shared: Union[str, os.PathLike[str], None] = None,
        redis: Optional[str] = None,
        **overrides: Optional[float],
    ) -> Engine: ...
    @property
    def shared(self) -> Optional[str]:
        """The file of a shared engine (``Engine(shared=...)``), as given; None for this process's memory."""
    @property
    def redis(self) -> Optional[str]:
        """The Redis of a replica's engine (``Engine(redis=...)``), as given; None for a standalone one."""
    @property
    def policy(self) -> str:
        """The preset the engine was built from."""
    @property
    def dialect(self) -> _Dialect:
        """The dialect decisions render in by default (``Engine(dialect=...)``)."""
    def admit(
        self,
        account: _Key,
        model: _Key,
        prompt_tokens: Optional[SupportsIndex] = None,
        cached_tokens: Optional[SupportsIndex] = None,
        max_tokens: Optional[SupportsIndex] = None,
        n: Optional[SupportsIndex] = None,
        priority: bool = False,
        fast: bool = False,
        expected_tokens: Optional[SupportsIndex] = None,
        now_ns: Optional[SupportsIndex] = None,
        *,
        service_tier: Optional[_ServiceTier] = None,
    ) -> Decision:
        """Decides whether a request may run now; reserves its costs only if it is admitted.

        ``prompt_tokens`` (of which ``cached_tokens`` are expected to hit the prompt cache),
        ``max_tokens`` per completion, ``n`` completions (default 1) and ``expected_tokens`` (the
        completion length expected, if below ``max_tokens``) size the reservation; ``fast``
        selects the model's fast variant. Counts are ints or anything with ``__index__``.

        ``service_tier`` (``"flex"``, ``"default"``, ``"priority"``; default ``"default"``) is
        the tier asked for: under load, flex is shed first and priority last. The account's grant
        (:meth:`set_service_tier_grant`, ``"default"`` until set) caps it: asking above the grant
        is not refused, it is served at the grant (:attr:`Decision.service_tier`).
        ``priority=True`` is ``service_tier="priority"``; with another ``service_tier`` it raises
        :class:`ArgumentError`.

        Refusals are decisions, not exceptions; settle an admitted decision with :meth:`settle`
        (or :meth:`cancel`).
        """
    def scope(self, account: _Key, model: _Key, *, fast: bool = False, now_ns: Optional[SupportsIndex] = None) -> Scope:
        """Resolves the scope of ``account`` and ``model`` (creating it if new) for :meth:`Scope.admit`.

        Keys, ``fast`` and ``now_ns`` are as for :meth:`admit`, and so are the exceptions:
        :class:`InvalidKeyError` for an empty or too long key, :class:`TableFullError` when no
        slot is free for a new one. Resolve once per API key and keep the scope.
        """
    def settle(
        self,
        decision: Decision,
        prompt_tokens: Optional[SupportsIndex] = None,
        cached_tokens: Optional[SupportsIndex] = None,
        generated_tokens: Optional[SupportsIndex] = None,
        *,
        completion: Literal["success", "upstream_failure", "cancelled"] = "success",
        now_ns: Optional[SupportsIndex] = None,
    ) -> None:
        """Settles an admitted decision with actual usage.

        Every field left out is what was reserved at admission: ``prompt_tokens`` and
        ``cached_tokens`` as admitted (cached at most ``prompt_tokens``), ``generated_tokens`` as
        reserved. ``completion="upstream_failure"`` refunds and bills nothing.

        Raises :class:`AlreadySettledError` on a second settle, and :class:`PermitExpiredError`
        past the policy's ``permit_ttl``.
        """
    def cancel(
        self,
        decision: Decision,
        prompt_tokens: Optional[SupportsIndex] = None,
        cached_tokens: Optional[SupportsIndex] = None,
        generated_tokens: Optional[SupportsIndex] = None,
        *,
        now_ns: Optional[SupportsIndex] = None,
    ) -> None:
        """Settles a request the client abandoned, with what it used (omitted: what was reserved)."""
    def charge(self, decision: Decision, generated_tokens: SupportsIndex, *, now_ns: Optional[SupportsIndex] = None) -> None:
        """Records generated tokens of a stream as they arrive."""
    def limits(self, account: _Key, model: _Key, *, fast: bool = False, now_ns: Optional[SupportsIndex] = None) -> dict[str, Optional[int]]:
        """Each metric's current limit per minute for a scope, None when not enforced (the scope is not created)."""
    def remaining(self, account: _Key, model: _Key, *, fast: bool = False, now_ns: Optional[SupportsIndex] = None) -> dict[str, Optional[int]]:
        """Each metric's units left for a scope, None when not enforced."""
    def set_load(self, model: _Key, load: float, *, fast: bool = False) -> None:
        """Sets a model's load signal (1.0 = at capacity); classes of request are shed as it rises."""
    def load(self, model: _Key, *, fast: bool = False) -> float:
        """A model's current load."""
    def set_model_capacity(self, model: _Key, in_flight: SupportsIndex, *, fast: bool = False) -> None:
        """Derives a model's load from outstanding permits: in-flight / ``in_flight`` (0: off)."""
    def set_price(self, model: _Key, *, uncached_prompt: SupportsIndex, cached_prompt: SupportsIndex, generated: SupportsIndex, fast: bool = False) -> None:
        """Sets a model's prices in micro-dollars per million tokens."""
    def account(self, account: _Key) -> dict[str, object]:
        """Everything about an account (money in micro-dollars); UnknownAccountError if unseen.

        Money is reserved at admission: ``reserved`` is the worst-case cost of the account's
        outstanding permits, held against ``spend_limit`` (None: none) with ``period_spend`` until
        each is settled (then replaced by what it is billed) or expires (then billed).
        ``in_flight`` counts those permits; ``max_in_flight`` is the account's own cap on them
        (None: the policy's). ``service_tier_grant`` is the highest service tier its requests are
        served at (:meth:`set_service_tier_grant`).
        """
    def add_credits(self, account: _Key, micros: SupportsIndex) -> None:
        """Adds prepaid credits; they count toward historical spend and so the tier."""
    def set_payment_method(self, account: _Key, on_file: bool) -> None:
        """Records whether a payment method is on file."""
    def set_spend_limit(self, account: _Key, micros: SupportsIndex) -> None:
        """Sets the user's own monthly spend limit, within the tier's."""
    def set_max_in_flight(self, account: _Key, max_in_flight: Optional[SupportsIndex]) -> None:
        """Caps the account's permits in flight at ``max_in_flight`` (None: back to the policy's).

        Beyond it, admission is ``Outcome.REJECT_CONCURRENCY`` (429 ``concurrency_limited``), e.g.
        more for an account that streams many slow completions. A cap below 1 raises
        :class:`ArgumentError`.
        """
    def set_service_tier_grant(self, account: _Key, service_tier: _ServiceTier) -> None:
        """Grants an account a service tier: ``"flex"``, ``"default"`` (every account's until set)
        or ``"priority"``.

        Its requests are served at the tier they ask for (:meth:`admit`'s ``service_tier``), or at
        the grant if they ask for more: a flex grant makes all its traffic flex, shed first. The
        grant keeps the account in its table (it is not reclaimed while idle) and is in snapshots.
        """
    def set_suspended(self, account: _Key, reason: Literal["operator", "payment_failed"] = "operator", suspended: bool = True) -> None:
        """Suspends an account (or lifts the suspension)."""
    def set_tier(self, account: _Key, tier: Optional[Literal["tier_1", "tier_2", "tier_3", "tier_4", "unlimited"]], *, now_ns: Optional[SupportsIndex] = None) -> None:
        """Grants a tier, or with None returns to the earned one; ceilings change at once."""
    def set_limits_override(
        self, account: _Key, metric: _MetricName, floor: Optional[float] = None, ceiling: Optional[float] = None, *, now_ns: Optional[SupportsIndex] = None
    ) -> None:
        """Gives an account its own floor and ceiling on a metric (None: the policy's)."""
    def start_billing_period(self, now_ns: Optional[SupportsIndex] = None) -> None:
        """Starts a new billing period for every account; permits expired by ``now_ns`` are billed
        to the closing period first."""
    def acquire_quota(self, account: _Key, quota: _QuotaName, n: Optional[SupportsIndex] = None) -> tuple[int, int]:
        """Acquires units of a quota; returns (used, limit)."""
    def release_quota(self, account: _Key, quota: _QuotaName, n: Optional[SupportsIndex] = None) -> tuple[int, int]:
        """Releases units of a quota; returns (used, limit)."""
    def set_quota_limit(self, account: _Key, quota: _QuotaName, limit: SupportsIndex) -> tuple[int, int]:
        """Sets a quota's limit (not below use); returns (used, limit)."""
    def metrics(self) -> _Metrics:
        """Every model's admission counters and gauges (SPEC §12), read without stopping traffic.

        ``{"models": [...]}`` has an entry for each model variant with any counter or gauge above
        zero: ``model`` (the id's text: each backslash doubled, each byte that is not UTF-8 as ``\\xNN``),
        ``variant`` (``"regular"`` or ``"fast"``), ``in_flight`` (permits outstanding), ``load``
        (1.0 at capacity) and ``counts``, which maps each service tier (``"flex"``, ``"default"``,
        ``"priority"``) to its requests' count of every event, zeros included: ``admitted``,
        ``over_limit``, ``rate_limited_requests``, ``rate_limited_prompt_tokens``,
        ``rate_limited_uncached_prompt_tokens``, ``rate_limited_generated_tokens``, ``shed``,
        ``spend_refused``, ``concurrency_limited``, ``invalid``, ``table_full``, ``expired``,
        ``succeeded``, ``upstream_failure``, ``cancelled``; and ``spend_microdollars`` billed.
        Requests refused before any model was found (invalid, or no slot free for their key) are
        counted under model ``""``.

        Each count is exact; the whole is not one atomic cut. Counts restart when a model's slot
        is reclaimed for another model and when the engine is restored. :meth:`metrics_text`
        writes them for Prometheus, as does ``sluicegate.prometheus.SluicegateCollector``.
        """
    def metrics_text(self) -> str:
        """:meth:`metrics` in the Prometheus text exposition format (version 0.0.4), for a
        ``/metrics`` endpoint.

        Counters ``sluicegate_requests_total`` (label ``outcome``),
        ``sluicegate_rate_limited_total`` (``metric``), ``sluicegate_permits_ended_total``
        (``completion``) and ``sluicegate_spend_microdollars_total``, each by ``model``,
        ``variant`` and ``service_tier``; gauges ``sluicegate_in_flight`` and ``sluicegate_load``
        by ``model`` and ``variant``. Counters that are zero are left out.
        """
    def snapshot(self, *, now_ns: Optional[SupportsIndex] = None) -> bytes:
        """The whole state as a versioned, checksummed byte string.

        Safe while other threads use the engine: each scope is read atomically (the snapshot is
        not one cut across scopes), and keys added meanwhile are taken in.
        """
    def restore(self, data: Union[bytes, bytearray, memoryview], *, now_ns: Optional[SupportsIndex] = None) -> None:
        """Replaces the state with a snapshot's, re-based on this clock; needs the same capacities.

        ``data`` is any bytes-like object. Safe while other threads use the engine: a new engine
        is built from the snapshot and swapped in whole; calls in progress finish on the old one,
        and permits it issued settle with :class:`StalePermitError`. A damaged or foreign snapshot
        raises :class:`CorruptSnapshotError` and changes nothing.

        A shared engine's restore replaces the tables every process shares, so it needs the file
        to itself: while any other process (or another ``Engine`` of this one) has it open, it
        raises :class:`EngineInUseError` and changes nothing. Calls made by other threads while it
        runs wait for it.
        """

@final
class Scope:
    """A scope resolved by :meth:`Engine.scope`: admissions through it skip the key lookups of
    :meth:`Engine.admit` and decide exactly as it does.

    Resolve one per API key, keep it and share it between threads. It keeps its engine alive
    (:attr:`engine`) and stays correct for the engine's whole life: if its scope was reclaimed
    while idle for another key, or the engine restored, the next :meth:`admit` looks the key up
    again. Settle its decisions with :meth:`Engine.settle`, as any other.
    """

    def admit(
        self,
        prompt_tokens: Optional[SupportsIndex] = None,
        cached_tokens: Optional[SupportsIndex] = None,
        max_tokens: Optional[SupportsIndex] = None,
        n: Optional[SupportsIndex] = None,
        priority: bool = False,
        expected_tokens: Optional[SupportsIndex] = None,
        now_ns: Optional[SupportsIndex] = None,
        *,
        service_tier: Optional[_ServiceTier] = None,
    ) -> Decision:
        """Decides as :meth:`Engine.admit` with the scope's key, without looking the key up.

        The arguments, their defaults and their checks are :meth:`Engine.admit`'s. A scope whose
        slot another key took while it was idle takes a slot again, and raises
        :class:`TableFullError` if none is free, as :meth:`Engine.admit` would for its key.
        """
    @property
    def engine(self) -> Engine:
        """The engine the scope was resolved in (the scope keeps it alive)."""
    @property
    def account(self) -> _Key:
        """The account key, as given to :meth:`Engine.scope` (``str`` or ``bytes``)."""
    @property
    def model(self) -> _Key:
        """The model key, as given to :meth:`Engine.scope` (``str`` or ``bytes``)."""
    @property
    def fast(self) -> bool:
        """Whether the scope is the model's fast variant."""
