"""Metrics (issue 17, SPEC §12): ``Engine.metrics()``, ``Engine.metrics_text()`` and
``sluicegate.prometheus.SluicegateCollector`` count exactly what was done, and the Prometheus
exposition of the engine and of ``prometheus_client`` parse to the same samples."""

import subprocess
import sys
import threading
from collections import Counter

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import sluicegate
from sluicegate import Outcome
from sluicegate.prometheus import SluicegateCollector

SECOND = 1_000_000_000
TIERS = ("flex", "default", "priority")
EVENTS = (
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
)
# Where each event is exposed: (family's sample name, label, value). Written out here, not taken
# from the module, so that a mapping wrong in both would still be caught.
EXPOSED = {
    "admitted": ("sluicegate_requests_total", "outcome", "admitted"),
    "over_limit": ("sluicegate_requests_total", "outcome", "over_limit"),
    "shed": ("sluicegate_requests_total", "outcome", "shed"),
    "spend_refused": ("sluicegate_requests_total", "outcome", "spend_refused"),
    "concurrency_limited": ("sluicegate_requests_total", "outcome", "concurrency_limited"),
    "invalid": ("sluicegate_requests_total", "outcome", "invalid"),
    "table_full": ("sluicegate_requests_total", "outcome", "table_full"),
    "rate_limited_requests": ("sluicegate_rate_limited_total", "metric", "requests"),
    "rate_limited_prompt_tokens": ("sluicegate_rate_limited_total", "metric", "prompt_tokens"),
    "rate_limited_uncached_prompt_tokens": ("sluicegate_rate_limited_total", "metric", "uncached_prompt_tokens"),
    "rate_limited_generated_tokens": ("sluicegate_rate_limited_total", "metric", "generated_tokens"),
    "succeeded": ("sluicegate_permits_ended_total", "completion", "success"),
    "upstream_failure": ("sluicegate_permits_ended_total", "completion", "upstream_failure"),
    "cancelled": ("sluicegate_permits_ended_total", "completion", "cancelled"),
    "expired": ("sluicegate_permits_ended_total", "completion", "expired"),
}
FAMILIES = [
    ("sluicegate_requests", "counter", "Admission outcomes other than 429."),
    ("sluicegate_rate_limited", "counter", "429s, by the metric that bound."),
    ("sluicegate_permits_ended", "counter", "Permits settled, by how, or expired."),
    ("sluicegate_spend_microdollars", "counter", "Micro-dollars billed."),
    ("sluicegate_in_flight", "gauge", "Permits outstanding."),
    ("sluicegate_load", "gauge", "The model's load, 1 at capacity."),
]
OUTCOME_EVENTS = {
    Outcome.ADMIT: "admitted",
    Outcome.ADMIT_OVER_LIMIT: "over_limit",
    Outcome.SHED: "shed",
    Outcome.REJECT_SPEND: "spend_refused",
    Outcome.REJECT_CONCURRENCY: "concurrency_limited",
    Outcome.REJECT_INVALID: "invalid",
}


def event_of(d):
    """The event a decision is counted as."""
    if d.outcome is Outcome.REJECT_RATE_LIMITED:
        return "rate_limited_" + d.binding_metric
    return OUTCOME_EVENTS[d.outcome]


class Expected:
    """What a test did: counts per (model, variant, tier, event), nano-dollars billed per
    (model, variant, tier), and the gauges of each model variant."""

    def __init__(self):
        self.counts = Counter()
        self.spend_nanos = Counter()
        self.gauges = {}

    def add(self, model, tier, event, n=1, variant="regular"):
        self.counts[(model, variant, tier, event)] += n

    def entries(self):
        """The (model, variant) of every entry metrics() should list."""
        return {(m, v) for (m, v, _, _), n in self.counts.items() if n} | set(self.gauges)

    def samples(self):
        """Every sample the exposition should hold: {(name, labels): value}."""
        out = {}
        for (model, variant, tier, event), n in self.counts.items():
            if n:
                name, label, value = EXPOSED[event]
                labels = {"model": model, "variant": variant, "service_tier": tier, label: value}
                out[(name, frozenset(labels.items()))] = n
        for (model, variant, tier), nanos in self.spend_nanos.items():
            if nanos // 1_000:
                labels = {"model": model, "variant": variant, "service_tier": tier}
                out[("sluicegate_spend_microdollars_total", frozenset(labels.items()))] = nanos // 1_000
        for model, variant in self.entries():
            if model:  # the requests refused before any model was found have no gauges
                in_flight, load = self.gauges.get((model, variant), (0, 0.0))
                labels = frozenset({"model": model, "variant": variant}.items())
                out[("sluicegate_in_flight", labels)] = in_flight
                out[("sluicegate_load", labels)] = load
        return out


def parse(text):
    """The families [(name, type, help)] and samples {(name, labels): value} of an exposition."""
    families, samples = [], {}
    for family in text_string_to_metric_families(text):
        families.append((family.name, family.type, family.documentation))
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = s.value
    return families, samples


def collected(engine):
    """The exposition prometheus_client writes for a registry holding the engine's collector."""
    registry = CollectorRegistry()
    registry.register(SluicegateCollector(engine))
    return generate_latest(registry).decode()


def check(engine, expected):
    """metrics(), metrics_text() and the collector all say exactly what `expected` says."""
    want = expected.samples()
    assert parse(engine.metrics_text())[1] == want
    assert parse(collected(engine)) == (FAMILIES, want)
    models = engine.metrics()["models"]
    assert sorted((m["model"], m["variant"]) for m in models) == sorted(expected.entries())
    for m in models:
        key = (m["model"], m["variant"])
        assert set(m) == {"model", "variant", "in_flight", "load", "counts"}
        assert (m["in_flight"], m["load"]) == expected.gauges.get(key, (0, 0.0)), key
        assert list(m["counts"]) == list(TIERS)
        for tier in TIERS:
            counts = m["counts"][tier]
            assert list(counts) == [*EVENTS, "spend_microdollars"]
            assert all(type(v) is int for v in counts.values())
            assert {e: counts[e] for e in EVENTS} == {e: expected.counts[(*key, tier, e)] for e in EVENTS}, (key, tier)
            assert counts["spend_microdollars"] == expected.spend_nanos[(*key, tier)] // 1_000, (key, tier)


def test_a_known_mix_of_outcomes_is_counted_exactly_in_every_form():
    # Two models (a third does not fit), an 8-permit ledger, a minute's TTL; a hard factor of 2
    # gives an over-limit band between each limit and twice it.
    e = sluicegate.Engine(
        "fixed",
        capacity=64,
        models=2,
        permits=8,
        requests_per_minute=5,
        prompt_tokens_per_minute=1_000,
        uncached_prompt_tokens_per_minute=500,
        generated_tokens_per_minute=2_000,
        hard_factor=2,
        permit_ttl=60,
    )
    # Nano-dollars a token: 1,000 uncached, 500 cached, 2,000 generated (the fast variant: free).
    e.set_price("llama", uncached_prompt=1_000_000, cached_prompt=500_000, generated=2_000_000)
    e.set_load("hot", 1.3)  # beyond every class's shedding point
    e.set_service_tier_grant("vip", "priority")
    e.set_suspended("broke")
    e.set_max_in_flight("busy", 1)
    x = Expected()
    # A load is a gauge: the model is listed before any request. A price is not.
    zeros = {**dict.fromkeys(EVENTS, 0), "spend_microdollars": 0}
    hot = {"model": "hot", "variant": "regular", "in_flight": 0, "load": 1.3, "counts": dict.fromkeys(TIERS, zeros)}
    assert e.metrics() == {"models": [hot]}

    def admit(account, model, event, tier="default", fast=False, now_ns=120 * SECOND, **request):
        d = e.admit(account, model, fast=fast, now_ns=now_ns, **request)
        assert event_of(d) == event, (account, model, d.outcome, d.binding_metric)
        if d.admitted:
            assert d.service_tier == tier
        x.add("" if event == "invalid" else model, tier, event, variant="fast" if fast else "regular")
        return d

    # Admitted at 0 and never settled: expired by the minute's TTL, billed its reservation.
    late = admit("late", "llama", "admitted", prompt_tokens=100, max_tokens=100, now_ns=0)
    with pytest.raises(sluicegate.PermitExpiredError):
        e.settle(late, now_ns=120 * SECOND)
    x.add("llama", "default", "expired")
    x.spend_nanos[("llama", "regular", "default")] += 100 * 1_000 + 100 * 2_000

    # Everything else at 120 s. Five requests a minute, five more over the limit, then 429s.
    for event in ["admitted"] * 5 + ["over_limit"] * 5 + ["rate_limited_requests"] * 2:
        d = admit("free", "llama", event, prompt_tokens=10, max_tokens=10)
        if d.admitted:
            e.settle(d, prompt_tokens=10, cached_tokens=4, generated_tokens=5, now_ns=120 * SECOND)
            x.add("llama", "default", "succeeded")
            x.spend_nanos[("llama", "regular", "default")] += 6 * 1_000 + 4 * 500 + 5 * 2_000
    # Each token metric binding once: too many prompt tokens (all cached), too many uncached,
    # too many to generate.
    admit("a1", "llama", "rate_limited_prompt_tokens", prompt_tokens=2_500, cached_tokens=2_500)
    admit("a2", "llama", "rate_limited_uncached_prompt_tokens", prompt_tokens=1_200)
    admit("a3", "llama", "rate_limited_generated_tokens", max_tokens=5_000)

    # The priority account: a success, an upstream failure (billed nothing) and a cancel.
    def vip():
        return admit("vip", "llama", "admitted", "priority", prompt_tokens=100, max_tokens=50, service_tier="priority")

    e.settle(vip(), prompt_tokens=100, cached_tokens=0, generated_tokens=50, now_ns=120 * SECOND)
    e.settle(vip(), completion="upstream_failure", now_ns=120 * SECOND)
    e.cancel(vip(), generated_tokens=10, now_ns=120 * SECOND)
    x.add("llama", "priority", "succeeded")
    x.add("llama", "priority", "upstream_failure")
    x.add("llama", "priority", "cancelled")
    x.spend_nanos[("llama", "regular", "priority")] += (100 * 1_000 + 50 * 2_000) + (100 * 1_000 + 10 * 2_000)

    # Flex on the fast variant: one settled, one left in flight.
    flexy = [admit("flexy", "llama", "admitted", "flex", fast=True, service_tier="flex") for _ in range(2)]
    e.settle(flexy[0], now_ns=120 * SECOND)
    x.add("llama", "flex", "succeeded", variant="fast")

    # Refusals: shed at every tier asked for (priority above its grant is served at default),
    # suspended, one in flight at most, invalid (counted without a model, at the tier asked for).
    admit("free", "hot", "shed")
    admit("vip", "hot", "shed", "priority", service_tier="priority")
    admit("free", "hot", "shed", "default", service_tier="priority")
    admit("flexy", "hot", "shed", "flex", service_tier="flex")
    admit("broke", "llama", "spend_refused")
    held = admit("busy", "llama", "admitted")
    admit("busy", "llama", "concurrency_limited")
    admit("vip", "llama", "invalid", "priority", n=0, service_tier="priority")
    admit("flexy", "llama", "invalid", "flex", fast=True, prompt_tokens=5, cached_tokens=6, service_tier="flex")
    admit("anyone", "llama", "invalid", n=0)

    # A third model finds no slot: counted without a model.
    with pytest.raises(sluicegate.TableFullError, match="model table"):
        e.admit("anyone", "extra", now_ns=120 * SECOND)
    x.add("", "default", "table_full")
    # A ledger of 8 with 2 held: the third account fills it, then is refused for it.
    e.set_max_in_flight("hog", 8)
    for event in ["admitted"] * 5 + ["over_limit"]:
        admit("hog", "llama", event)
    with pytest.raises(sluicegate.TableFullError, match="permit table"):
        e.admit("hog", "llama", now_ns=120 * SECOND)
    x.add("llama", "default", "table_full")

    x.gauges = {("llama", "regular"): (1 + 6, 0.0), ("llama", "fast"): (1, 0.0), ("hot", "regular"): (0, 1.3)}
    assert e.account("hog")["in_flight"] == 6 and held.admitted
    check(e, x)
    # A few of the engine's own lines, spelled out.
    text = e.metrics_text()
    for line in [
        'sluicegate_requests_total{model="llama",variant="regular",service_tier="default",outcome="admitted"} 12',
        'sluicegate_requests_total{model="",variant="fast",service_tier="flex",outcome="invalid"} 1',
        'sluicegate_spend_microdollars_total{model="llama",variant="regular",service_tier="default"} 480',
        'sluicegate_spend_microdollars_total{model="llama",variant="regular",service_tier="priority"} 320',
        'sluicegate_in_flight{model="llama",variant="regular"} 7',
        'sluicegate_load{model="hot",variant="regular"} 1.300',
    ]:
        assert line in text.splitlines()

    # Settling the held permits moves them from in flight to ended.
    e.settle(flexy[1], now_ns=120 * SECOND)
    e.settle(held, completion="upstream_failure", now_ns=120 * SECOND)
    x.add("llama", "flex", "succeeded", variant="fast")
    x.add("llama", "default", "upstream_failure")
    x.gauges[("llama", "regular")] = (6, 0.0)
    x.gauges[("llama", "fast")] = (0, 0.0)
    check(e, x)

    # A restore starts the counts afresh (the held permits are void; a model kept for its load
    # shows only that).
    e.restore(e.snapshot(now_ns=120 * SECOND), now_ns=120 * SECOND)
    fresh = Expected()
    fresh.gauges = {("hot", "regular"): (0, 1.3)}
    check(e, fresh)


def test_an_engine_with_no_traffic_has_every_family_and_no_sample():
    e = sluicegate.Engine("fixed", capacity=64)
    assert e.metrics() == {"models": []}
    for text in (e.metrics_text(), collected(e)):
        assert parse(text) == (FAMILIES, {})


def test_the_engine_exposition_types_its_counters_as_prometheus_client_does():
    e = sluicegate.Engine("fixed", capacity=64)
    e.admit("a", "m", now_ns=0)
    families, _ = parse(e.metrics_text())
    assert families == FAMILIES == parse(collected(e))[0]


@pytest.mark.parametrize(
    "model",
    [
        'quote"back\\slash\nnewline',
        "ünïcødé/模型:v1",
        b"bad\xff\xfeend",
        b"cut\xe2\x82",  # a character cut short
        b"\xed\xa0\x80surrogate",  # UTF-8 of a surrogate is not UTF-8
        b"\xf0\x9f\x98\x80\x80ok",
        b"\\xff",  # the text of an escape: its backslash doubled, unlike the invalid byte's
    ],
)
def test_a_model_name_round_trips_through_the_exposition(model):
    e = sluicegate.Engine("fixed", capacity=64)
    e.admit("a", model, now_ns=0)
    raw = model.encode() if isinstance(model, str) else model
    label = raw.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")
    x = Expected()
    x.add(label, "default", "admitted")
    x.gauges[(label, "regular")] = (1, 0.0)
    check(e, x)
    assert [m["model"] for m in e.metrics()["models"]] == [label]


def test_threads_admitting_and_settling_are_counted_exactly(fast_thread_switches):
    # Two threads share an account (their 1,200 attempts meet its 1,000 a minute); one asks for
    # priority under a priority grant, one for flex. A fifth thread reads the metrics meanwhile:
    # no count ever goes down.
    e = sluicegate.Engine("fixed", capacity=64, permits=4_096, requests_per_minute=1_000, max_in_flight=None)
    e.set_price("m", uncached_prompt=1_000_000, cached_prompt=1_000_000, generated=1_000_000)
    e.set_service_tier_grant("vip", "priority")
    workers = [("shared", "default"), ("shared", "default"), ("vip", "priority"), ("cheap", "flex")]
    seen = [Counter() for _ in workers]
    done, problems = threading.Event(), []
    completions = ("success", "upstream_failure", "cancelled")
    ended = {"success": "succeeded", "upstream_failure": "upstream_failure", "cancelled": "cancelled"}

    def work(i):
        account, tier = workers[i]
        mine = seen[i]
        for n in range(600):
            d = e.admit(account, "m", prompt_tokens=3, max_tokens=2, service_tier=tier, now_ns=0)
            mine[(tier, event_of(d))] += 1
            if d.admitted:
                completion = completions[(n + i) % 3]
                e.settle(d, generated_tokens=1, completion=completion, now_ns=0)
                mine[(tier, ended[completion])] += 1
                # 3 prompt and 1 generated token at 1 µ$ each, unless refunded.
                mine[(tier, "spend_microdollars")] += 0 if completion == "upstream_failure" else 4

    def read():
        last = Counter()
        while not done.is_set():
            for m in e.metrics()["models"]:
                for tier, counts in m["counts"].items():
                    for event, n in counts.items():
                        key = (m["model"], m["variant"], tier, event)
                        if n < last[key]:
                            problems.append((key, last[key], n))
                        last[key] = n

    reader = threading.Thread(target=read)
    reader.start()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    reader.join()
    assert problems == []

    total = sum(seen, Counter())
    assert total[("default", "admitted")] == 1_000 and total[("default", "rate_limited_requests")] == 200
    assert total[("priority", "admitted")] == total[("flex", "admitted")] == 600
    x = Expected()
    for (tier, event), n in total.items():
        if event == "spend_microdollars":
            x.spend_nanos[("m", "regular", tier)] += n * 1_000
        else:
            x.add("m", tier, event, n)
    check(e, x)


@pytest.fixture
def fast_thread_switches():
    """Switch threads every microsecond, so the threads of a test interleave finely."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def test_engines_sharing_a_file_share_the_model_counters(tmp_path):
    path = tmp_path / "region"
    a = sluicegate.Engine("fixed", capacity=64, shared=path)
    b = sluicegate.Engine("fixed", capacity=64, shared=path)
    a.admit("acct", "m", now_ns=0)
    b.settle(b.admit("acct", "m", now_ns=0), now_ns=0)
    a.admit("acct", "m", n=0, now_ns=0)  # invalid: counted by `a` alone
    shared = Expected()
    shared.add("m", "default", "admitted", 2)
    shared.add("m", "default", "succeeded")
    shared.gauges[("m", "regular")] = (1, 0.0)
    check(b, shared)
    shared.add("", "default", "invalid")
    check(a, shared)


def test_the_collector_describes_its_families_and_cannot_be_registered_twice():
    e = sluicegate.Engine("fixed", capacity=64)
    collector = SluicegateCollector(e)
    assert [(f.name, f.type, f.documentation, f.samples) for f in collector.describe()] == [(*f, []) for f in FAMILIES]
    registry = CollectorRegistry()
    registry.register(collector)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(SluicegateCollector(e))
    assert repr(collector).startswith("<SluicegateCollector <Engine policy='fixed'")


def test_prometheus_client_is_imported_only_by_the_collector_module():
    code = "import sys, sluicegate; sluicegate.Engine().metrics_text(); print('prometheus_client' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
