"""An engine's metrics for ``prometheus_client`` (``pip install 'sluicegate[prometheus]'``).

:class:`SluicegateCollector` reads :meth:`sluicegate.Engine.metrics` at each scrape and gives the
same families, labels and values as :meth:`sluicegate.Engine.metrics_text`, so an application
that already serves ``prometheus_client``'s registry gets sluicegate's series beside its own:

>>> import sluicegate
>>> from prometheus_client import CollectorRegistry
>>> from sluicegate.prometheus import SluicegateCollector
>>> engine = sluicegate.Engine(policy="fixed", capacity=1_000)
>>> d = engine.admit("acct", "llama", service_tier="flex", now_ns=0)
>>> registry = CollectorRegistry()
>>> registry.register(SluicegateCollector(engine))
>>> llama = {"model": "llama", "variant": "regular"}
>>> registry.get_sample_value("sluicegate_in_flight", llama)
1
>>> admitted = {**llama, "service_tier": "flex", "outcome": "admitted"}
>>> registry.get_sample_value("sluicegate_requests_total", admitted)
1
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

try:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError:
    # An optional extra: say which. (Raised in the handler, the first error stays attached.)
    raise ImportError("sluicegate.prometheus needs prometheus_client: pip install 'sluicegate[prometheus]'")

from sluicegate._sluicegate import Engine

__all__ = ["SluicegateCollector"]

if TYPE_CHECKING:  # types only: stubtest holds a runtime Literal alias to be a Union
    from typing import Literal

    _Tier = Literal["flex", "default", "priority"]
    # The keys of a tier's counts in Engine.metrics(), literal so that mypy checks each of them.
    _Event = Literal[
        "admitted",
        "over_limit",
        "rate_limited_requests",
        "rate_limited_prompt_tokens",
        "rate_limited_uncached_prompt_tokens",
        "rate_limited_generated_tokens",
        "shed",
        "spend_refused",
        "concurrency_limited",
        "invalid",
        "table_full",
        "expired",
        "succeeded",
        "upstream_failure",
        "cancelled",
    ]

_TIERS: tuple[_Tier, ...] = ("flex", "default", "priority")

# (family, help, label, ((label value, key in Engine.metrics()'s counts), ...)): the counters
# of sluicegate_core::metrics::write_prometheus, in its order and with its words.
_COUNTERS: tuple[tuple[str, str, str, tuple[tuple[str, _Event], ...]], ...] = (
    (
        "sluicegate_requests",
        "Admission outcomes other than 429.",
        "outcome",
        (
            ("admitted", "admitted"),
            ("over_limit", "over_limit"),
            ("shed", "shed"),
            ("spend_refused", "spend_refused"),
            ("concurrency_limited", "concurrency_limited"),
            ("invalid", "invalid"),
            ("table_full", "table_full"),
        ),
    ),
    (
        "sluicegate_rate_limited",
        "429s, by the metric that bound.",
        "metric",
        (
            ("requests", "rate_limited_requests"),
            ("prompt_tokens", "rate_limited_prompt_tokens"),
            ("uncached_prompt_tokens", "rate_limited_uncached_prompt_tokens"),
            ("generated_tokens", "rate_limited_generated_tokens"),
        ),
    ),
    (
        "sluicegate_permits_ended",
        "Permits settled, by how, or expired.",
        "completion",
        (
            ("success", "succeeded"),
            ("upstream_failure", "upstream_failure"),
            ("cancelled", "cancelled"),
            ("expired", "expired"),
        ),
    ),
)


# Collector is an ABC in older prometheus_client and a Protocol in newer: a subclass is one either way.
class SluicegateCollector(Collector):
    """A ``prometheus_client`` collector of one engine's metrics (SPEC §12).

    Register it once: ``prometheus_client.REGISTRY.register(SluicegateCollector(engine))``.
    Each scrape reads :meth:`sluicegate.Engine.metrics` once, without stopping traffic, and
    yields the families :meth:`sluicegate.Engine.metrics_text` writes, with the same labels and
    values: the counters ``sluicegate_requests_total`` (``outcome``),
    ``sluicegate_rate_limited_total`` (``metric``), ``sluicegate_permits_ended_total``
    (``completion``) and ``sluicegate_spend_microdollars_total`` by ``model``, ``variant`` and
    ``service_tier`` (zeros left out), and the gauges ``sluicegate_in_flight`` and
    ``sluicegate_load`` by ``model`` and ``variant``.

    With ``Engine(shared=...)`` the model counters live in the shared file, so every worker's
    collector reports all workers' requests; only those refused before any model was found (model
    ``""``) are counted by each ``Engine`` object alone.
    """

    def __init__(self, engine: Engine) -> None:
        """Collects ``engine``'s metrics (the collector keeps the engine alive)."""
        self._engine = engine

    def describe(self) -> list[Metric]:
        """The families, without samples: registering checks their names without reading the engine."""
        counters, spend, in_flight, load = self._families()
        return [*counters, spend, in_flight, load]

    def collect(self) -> Iterator[Metric]:
        """Reads the engine's metrics once and yields them as metric families."""
        models = self._engine.metrics()["models"]
        counters, spend, in_flight, load = self._families()
        for family, (_, _, label, events) in zip(counters, _COUNTERS):
            for m in models:
                for tier in _TIERS:
                    counts = m["counts"][tier]
                    for value, key in events:
                        n = counts[key]
                        if n:
                            family.add_metric([m["model"], m["variant"], tier, value], n)
        for m in models:
            for tier in _TIERS:
                micros = m["counts"][tier]["spend_microdollars"]
                if micros:
                    spend.add_metric([m["model"], m["variant"], tier], micros)
        # The requests refused before any model was found have no gauges.
        for m in models:
            if m["model"]:
                in_flight.add_metric([m["model"], m["variant"]], m["in_flight"])
                load.add_metric([m["model"], m["variant"]], m["load"])
        yield from counters
        yield spend
        yield in_flight
        yield load

    def _families(
        self,
    ) -> tuple[list[CounterMetricFamily], CounterMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        """Every family, empty: the three event counters, spend, in flight and load."""
        by_model = ["model", "variant"]
        by_tier = [*by_model, "service_tier"]
        counters = [CounterMetricFamily(n, text, labels=[*by_tier, label]) for n, text, label, _ in _COUNTERS]
        spend = CounterMetricFamily("sluicegate_spend_microdollars", "Micro-dollars billed.", labels=by_tier)
        in_flight = GaugeMetricFamily("sluicegate_in_flight", "Permits outstanding.", labels=by_model)
        load = GaugeMetricFamily("sluicegate_load", "The model's load, 1 at capacity.", labels=by_model)
        return counters, spend, in_flight, load

    def __repr__(self) -> str:
        return f"<SluicegateCollector {self._engine!r}>"
