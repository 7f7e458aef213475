"""Engines shared between processes through a memory-mapped file: ``Engine(shared=path)`` (issue 14).

Every process here is started with the ``spawn`` method (a fresh interpreter, as uvicorn and
gunicorn workers), joined with a timeout, and killed if it outlives it. Each test's file is its
own (``/dev/shm`` when there is one) and is removed afterwards: sluicegate never removes it.
"""

import concurrent.futures
import gc
import multiprocessing
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections import Counter

import pytest

import sluicegate
from sluicegate import Outcome

import shared_workers
from shared_workers import ACCOUNT, MODEL

CONFIG = dict(policy="fixed", capacity=1024, requests_per_minute=600)
"""What every process of a test passes besides ``shared``: a plain limiter of 600 requests a minute."""
NOW = 10**12
"""The instant every process admits at: the limit is what the bucket holds, nothing refills."""
SPAWN = multiprocessing.get_context("spawn")
TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def region():
    """A path no other test uses, removed afterwards."""
    root = "/dev/shm" if os.path.isdir("/dev/shm") else None
    import tempfile

    path = os.path.join(root or tempfile.gettempdir(), f"sluicegate-test-{os.getpid()}-{uuid.uuid4().hex}")
    yield path
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class Processes:
    """Spawned processes, always reaped: joined within ``timeout``, killed if still alive."""

    def __init__(self, timeout=60):
        self.timeout = timeout
        self.started = []

    def start(self, target, *args):
        p = SPAWN.Process(target=target, args=args, daemon=True)
        p.start()
        self.started.append(p)
        return p

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        deadline = time.monotonic() + self.timeout
        for p in self.started:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
        for p in self.started:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)


def results_of(queue, n, timeout=60):
    """``n`` results from ``queue``, waiting at most ``timeout`` seconds in all."""
    deadline = time.monotonic() + timeout
    return [queue.get(timeout=max(0.1, deadline - time.monotonic())) for _ in range(n)]


def contents(path):
    with open(path, "rb") as f:
        return f.read()


# -- one limit across processes -------------------------------------------------------------------


def test_four_processes_admit_exactly_the_limit_between_them(region):
    """4 processes × 1,000 requests at one instant, 600 a minute: 600 admitted in all.

    They admit in 10 rounds of 100, each round starting when all four are ready for it, so that
    they do race: the first round's 400 all fit, and the second's 400 race for the last 200.
    """
    sluicegate.Engine(shared=region, **CONFIG)  # created here; the workers attach
    start, results = SPAWN.Barrier(4), SPAWN.Queue()
    with Processes() as procs:
        for _ in range(4):
            procs.start(shared_workers.admit_many, region, CONFIG, 10, 100, NOW, start, results)
        reports = results_of(results, 4)
    assert all(r[1] != "error" for r in reports), reports
    admitted = sum(r[1] for r in reports)
    refused = sum(r[2] for r in reports)
    print(f"\nadmitted per process: {[r[1] for r in reports]}; total {admitted} of 4000, {refused} refused (429)")
    assert (admitted, refused) == (600, 3_400), reports
    assert len({r[0] for r in reports}) == 4
    assert [r[3] for r in reports] == [100] * 4, reports  # all four took part
    # This process sees what they did: nothing left at that instant, every permit settled.
    here = sluicegate.Engine(shared=region, **CONFIG)
    assert here.remaining(ACCOUNT, MODEL, now_ns=NOW)["requests"] == 0
    assert here.account(ACCOUNT)["in_flight"] == 0
    assert not here.admit(ACCOUNT, MODEL, now_ns=NOW).admitted


def test_two_engines_of_one_process_share_too(region):
    a = sluicegate.Engine(shared=region, **CONFIG)
    b = sluicegate.Engine(shared=region, **CONFIG, dialect="openai")  # the dialect is each engine's own
    taken = Counter()
    for _ in range(400):
        for name, e in (("a", a), ("b", b)):
            d = e.admit(ACCOUNT, MODEL, now_ns=NOW)
            if d.admitted:
                taken[name] += 1
                (b if name == "a" else a).settle(d, now_ns=NOW)  # either settles the other's
    assert taken == {"a": 300, "b": 300}
    assert a.remaining(ACCOUNT, MODEL, now_ns=NOW) == b.remaining(ACCOUNT, MODEL, now_ns=NOW)
    assert (a.shared, b.shared, sluicegate.Engine(capacity=10).shared) == (region, region, None)
    assert f"shared='{region}'" in repr(a)


def test_a_path_like_names_the_file():
    import pathlib
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = pathlib.Path(d) / "engine"
        e = sluicegate.Engine(shared=path, **CONFIG)
        assert e.shared == str(path) and path.exists()
        assert sluicegate.Engine(shared=os.fsencode(path), **CONFIG).shared == str(path)


# -- the file: made by the first opener, refused when it is not this configuration's ---------------


@pytest.mark.parametrize(
    "other, words",
    [
        (dict(capacity=2048), "capacities"),
        (dict(permits=4096), "capacities"),
        (dict(requests_per_minute=601), "policy"),
        (dict(policy="together"), "policy"),
        (dict(max_in_flight=8), "policy"),
        (dict(permit_ttl=60), "policy"),
    ],
)
def test_another_configuration_is_refused_and_the_file_left_as_it_was(region, other, words):
    e = sluicegate.Engine(shared=region, **CONFIG)
    e.admit(ACCOUNT, MODEL, now_ns=NOW)
    before = contents(region)
    with pytest.raises(sluicegate.SharedRegionError, match=words) as err:
        sluicegate.Engine(shared=region, **{**CONFIG, **other})
    assert region in str(err.value)
    assert contents(region) == before
    assert e.remaining(ACCOUNT, MODEL, now_ns=NOW)["requests"] == 599


def test_a_damaged_header_is_refused_and_left_as_it_was(region):
    e = sluicegate.Engine(shared=region, **CONFIG)
    for _ in range(5):
        e.admit(ACCOUNT, MODEL, now_ns=NOW)
    # An opener that finds the header not ready waits for every other opener to leave.
    del e
    gc.collect()
    good = contents(region)
    refused = {}
    with open(region, "r+b") as f:
        for offset in range(88):  # magic, state, version, capacities, policy, seed, incarnation
            f.seek(offset)
            f.write(bytes([good[offset] ^ 0xFF]))
            f.flush()
            damaged = contents(region)
            with pytest.raises(sluicegate.SharedRegionError) as err:
                sluicegate.Engine(shared=region, **CONFIG)
            why = str(err.value).split(": ")[1]  # "shared region: <why>: <path>"
            refused[why] = refused.get(why, 0) + 1
            assert contents(region) == damaged, f"byte {offset}: the file was changed"
            f.seek(offset)
            f.write(good[offset : offset + 1])
            f.flush()
    assert contents(region) == good
    assert refused == {"not a sluicegate region": 8, "region header damaged (checksum mismatch)": 80}, refused
    again = sluicegate.Engine(shared=region, **CONFIG)
    assert again.remaining(ACCOUNT, MODEL, now_ns=NOW)["requests"] == 595


@pytest.mark.parametrize(
    "data",
    [b"not an engine\n", b"\x00" * 4096, b"\x5a" * 8192, os.urandom(1 << 20)],
    ids=["text", "zeros", "pattern", "random"],
)
def test_a_file_that_is_not_a_region_is_refused_and_left_as_it_was(region, data):
    with open(region, "wb") as f:
        f.write(data)
    with pytest.raises(sluicegate.SharedRegionError, match="not a sluicegate region|too small") as err:
        sluicegate.Engine(shared=region, **CONFIG)
    assert region in str(err.value)
    assert contents(region) == data


def test_a_file_that_cannot_be_opened_is_a_region_error_saying_why(tmp_path):
    with pytest.raises(sluicegate.SharedRegionError, match="No such file or directory") as err:
        sluicegate.Engine(shared=tmp_path / "missing" / "engine", **CONFIG)
    assert "missing" in str(err.value)
    with pytest.raises(sluicegate.SharedRegionError, match="directory"):
        sluicegate.Engine(shared=tmp_path, **CONFIG)


def test_the_file_is_readable_by_its_owner_only_whatever_the_umask(region):
    old = os.umask(0)
    try:
        sluicegate.Engine(shared=region, **CONFIG)
    finally:
        os.umask(old)
    assert os.stat(region).st_mode & 0o777 == 0o600


def test_seed_is_refused_with_shared_and_bad_capacities_are_policy_errors(region):
    with pytest.raises(sluicegate.ArgumentError, match="seed"):
        sluicegate.Engine(shared=region, seed=7, **CONFIG)
    with pytest.raises(sluicegate.PolicyError, match="permit table capacity"):
        sluicegate.Engine(shared=region, **{**CONFIG, "permits": 0})
    with pytest.raises(sluicegate.ArgumentTypeError, match="shared"):
        sluicegate.Engine(shared=3.5, **CONFIG)
    assert not os.path.exists(region)  # nothing was created for a refused configuration


# -- restore: only with the file to itself ----------------------------------------------------------


def test_restore_is_refused_while_another_process_has_the_engine_open(region):
    e = sluicegate.Engine(shared=region, **CONFIG)
    for _ in range(10):
        e.settle(e.admit(ACCOUNT, MODEL, now_ns=NOW), now_ns=NOW)
    snap = e.snapshot(now_ns=NOW)
    held = e.admit(ACCOUNT, MODEL, now_ns=NOW)
    opened, release = SPAWN.Event(), SPAWN.Event()
    with Processes() as procs:
        other = procs.start(shared_workers.hold_open, region, CONFIG, opened, release)
        assert opened.wait(timeout=60)
        before = contents(region)
        with pytest.raises(sluicegate.EngineInUseError, match="other processes"):
            e.restore(snap, now_ns=NOW)
        # Nothing changed: the same bytes, and the permit issued before still settles.
        assert contents(region) == before
        assert e.remaining(ACCOUNT, MODEL, now_ns=NOW)["requests"] == 589
        e.settle(held, now_ns=NOW)
        held = e.admit(ACCOUNT, MODEL, now_ns=NOW)
        release.set()
        other.join(timeout=60)
        assert other.exitcode == 0
    # Alone now: the snapshot's state, and permits from before it are stale.
    e.restore(snap, now_ns=NOW)
    assert e.remaining(ACCOUNT, MODEL, now_ns=NOW)["requests"] == 590
    with pytest.raises(sluicegate.StalePermitError):
        e.settle(held, now_ns=NOW)
    # Every process that opens the file now sees the restored state.
    assert sluicegate.Engine(shared=region, **CONFIG).remaining(ACCOUNT, MODEL, now_ns=NOW)["requests"] == 590


def test_restore_is_refused_while_another_engine_of_this_process_has_the_file(region):
    e = sluicegate.Engine(shared=region, **CONFIG)
    snap = e.snapshot(now_ns=NOW)
    other = sluicegate.Engine(shared=region, **CONFIG)
    e.admit(ACCOUNT, MODEL, now_ns=NOW)
    with pytest.raises(sluicegate.EngineInUseError):
        e.restore(snap, now_ns=NOW)
    assert other.remaining(ACCOUNT, MODEL, now_ns=NOW)["requests"] == 599
    del other
    gc.collect()
    e.restore(snap, now_ns=NOW)
    e.restore(snap, now_ns=NOW)  # the engine restored holds the file as before: again
    assert e.remaining(ACCOUNT, MODEL, now_ns=NOW)["requests"] == 600
    with pytest.raises(sluicegate.CorruptSnapshotError):
        e.restore(snap[:-1], now_ns=NOW)
    assert e.admit(ACCOUNT, MODEL, now_ns=NOW).admitted


def test_restore_is_refused_in_a_process_forked_from_the_opener(region):
    """A forked child shares its parent's file lock, so the lock cannot show that the parent
    uses the engine: the child's restore is refused whatever the lock says."""
    e = sluicegate.Engine(shared=region, **CONFIG)
    snap = e.snapshot(now_ns=NOW)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what restore did, then leave at once
        try:
            e.restore(snap, now_ns=NOW)
            said = b"restored"
        except sluicegate.EngineInUseError as exc:
            said = b"refused" if b"fork" in str(exc).encode() else b"refused without saying why"
        except BaseException as exc:
            said = repr(exc).encode()
        os.write(write, said)
        os._exit(0)
    os.close(write)
    try:
        with os.fdopen(read, "rb") as r:
            said = r.read()
    finally:
        _, status = os.waitpid(pid, 0)
    assert (said, status) == (b"refused", 0)
    # The parent, which opened it and is alone, restores.
    e.admit(ACCOUNT, MODEL, now_ns=NOW)
    e.restore(snap, now_ns=NOW)
    assert e.remaining(ACCOUNT, MODEL, now_ns=NOW)["requests"] == 600


def test_threads_keep_admitting_while_a_shared_engine_is_restored(region):
    """A restore rewrites the tables the engine in force reads: calls of other threads wait for it
    (never fail, never land in half-written tables); permits from before it settle as stale."""
    e = sluicegate.Engine(shared=region, **{**CONFIG, "requests_per_minute": 10**9})
    snap = e.snapshot(now_ns=NOW)
    stop, unexpected, counts = threading.Event(), [], Counter()

    def serve(t):
        try:
            i = 0
            while not stop.is_set():
                d = e.admit(f"acct-{t}-{i % 50}", MODEL, now_ns=NOW)
                counts[d.outcome] += 1
                try:
                    e.settle(d, now_ns=NOW)
                except sluicegate.StalePermitError:
                    counts["stale"] += 1
                i += 1
        except BaseException as exc:
            unexpected.append(exc)

    threads = [threading.Thread(target=serve, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(50):
            e.restore(snap, now_ns=NOW)
            time.sleep(0.002)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert unexpected == []
    assert counts[Outcome.ADMIT] > 0 and set(counts) <= {Outcome.ADMIT, "stale"}, counts
    # The tables are whole: each account seen by a thread is found, once.
    e.restore(snap, now_ns=NOW)
    assert e.admit("acct-0-0", MODEL, now_ns=NOW).admitted


# -- permits across processes ----------------------------------------------------------------------


def test_a_permit_settles_from_another_process_exactly_once(region):
    e = sluicegate.Engine(shared=region, **{**CONFIG, "generated_tokens_per_minute": 10_000})
    decisions = [e.admit(ACCOUNT, MODEL, max_tokens=100, now_ns=NOW) for _ in range(3)]
    assert all(d.admitted for d in decisions)
    assert e.account(ACCOUNT)["in_flight"] == 3
    results = SPAWN.Queue()
    with Processes() as procs:
        procs.start(shared_workers.settle_twice, region, {**CONFIG, "generated_tokens_per_minute": 10_000}, decisions, NOW, results)
        [seen] = results_of(results, 1)
    assert seen == ["settled", "AlreadySettledError"] * 3
    for d in decisions:
        with pytest.raises(sluicegate.AlreadySettledError):
            e.settle(d, now_ns=NOW)
    assert e.account(ACCOUNT)["in_flight"] == 0
    # Settled with 7 generated tokens each, not the 100 reserved.
    assert e.remaining(ACCOUNT, MODEL, now_ns=NOW)["generated_tokens"] == 10_000 - 3 * 7


def test_a_pickled_permit_settles_nowhere_else():
    a = sluicegate.Engine("fixed", capacity=64)
    d = a.admit(ACCOUNT, MODEL, now_ns=NOW)
    copy = pickle.loads(pickle.dumps(d))
    assert (copy.outcome, copy.headers(unix_ns=0), copy.cost) == (d.outcome, d.headers(unix_ns=0), d.cost)
    with pytest.raises(sluicegate.StalePermitError):
        sluicegate.Engine("fixed", capacity=64).settle(copy, now_ns=NOW)
    a.settle(copy, now_ns=NOW)
    with pytest.raises(sluicegate.AlreadySettledError):
        a.settle(d, now_ns=NOW)
    with pytest.raises(sluicegate.ArgumentError, match="pickled"):
        sluicegate._sluicegate._decision(b"\x00" * 232)


def _every_outcome():
    """One decision of each outcome."""
    e = sluicegate.Engine("fireworks_2024", capacity=64, max_in_flight=200)
    decisions = [e.admit("a", "m", prompt_tokens=10, max_tokens=20, now_ns=NOW) for _ in range(130)]
    e.set_load("hot", 10.0)
    decisions.append(e.admit("a", "hot", now_ns=NOW))
    e.set_suspended("s")
    decisions.append(e.admit("s", "m", now_ns=NOW))
    c = sluicegate.Engine("fixed", capacity=64, max_in_flight=1)
    decisions += [c.admit("a", "m", now_ns=NOW) for _ in range(2)]
    decisions.append(e.admit("a", "m", n=0, now_ns=NOW))
    # Each service tier a permit can carry.
    e.set_service_tier_grant("tiers", "priority")
    decisions += [e.admit("tiers", "m", service_tier=tier, now_ns=NOW) for tier in ("flex", "default", "priority")]
    return decisions


def test_every_outcome_pickles_as_itself():
    decisions = _every_outcome()
    assert {d.outcome for d in decisions} == set(Outcome)
    properties = ("outcome", "admitted", "over_limit", "status_code", "retry_after_ns", "wait", "binding_metric",
                  "too_large", "reason", "limits", "remaining", "cost", "service_tier")
    assert {d.service_tier for d in decisions} == {None, "flex", "default", "priority"}
    for d in decisions:
        copy = pickle.loads(pickle.dumps(d))
        for name in properties:
            assert getattr(copy, name) == getattr(d, name), (d, name)
        for dialect in sluicegate.DIALECTS:
            assert copy.headers(dialect, unix_ns=0, jitter_seed=0) == d.headers(dialect, unix_ns=0, jitter_seed=0)
            assert copy.error_body(dialect, jitter_seed=0) == d.error_body(dialect, jitter_seed=0)


def kill_a_worker_holding_4_permits(region, config):
    """Spawns a worker that takes 4 permits at ``NOW`` on the shared engine, then SIGKILLs it."""
    holding = SPAWN.Event()
    with Processes() as procs:
        worker = procs.start(shared_workers.hold_permits, region, config, 4, NOW, holding)
        assert holding.wait(timeout=60)
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(timeout=30)
        assert worker.exitcode == -signal.SIGKILL


def test_a_killed_worker_s_permits_come_back_after_permit_ttl(region):
    """A worker killed holding permits settles nothing; its account's in-flight places (and
    the load its model counts) come back once the permits have expired, ``permit_ttl`` after
    they were admitted, and the engine has met them. It meets expired permits as it goes: a
    stretch of the ledger at every refusal for concurrency, the whole of it (up to 4,096
    permits) when a call turns the adaptation tick (a minute under ``fixed``)."""
    config = {**CONFIG, "max_in_flight": 4, "permit_ttl": 60}
    here = sluicegate.Engine(shared=region, **config)
    here.set_model_capacity(MODEL, 8)
    kill_a_worker_holding_4_permits(region, config)
    assert here.account(ACCOUNT)["in_flight"] == 4
    assert here.load(MODEL) == 0.5
    # Until permit_ttl has passed, the places stay taken, however often the client retries
    # (100 refusals sweep the 1,024-permit ledger several times over)...
    for before in [NOW] * 50 + [NOW + 60 * 10**9 - 1] * 50:
        d = here.admit(ACCOUNT, MODEL, now_ns=before)
        assert (d.outcome, d.reason, d.status_code) == (Outcome.REJECT_CONCURRENCY, "concurrency_limited", 429)
    assert here.account(ACCOUNT)["in_flight"] == 4
    # ...then a client that retries gets all four back (each refusal meets more of the ledger).
    after = NOW + 60 * 10**9 + 1
    taken = []
    for _ in range(100):
        d = here.admit(ACCOUNT, MODEL, now_ns=after)
        if d.admitted:
            taken.append(d)
        else:
            assert d.outcome is Outcome.REJECT_CONCURRENCY
        if len(taken) == 4:
            break
    assert len(taken) == 4
    assert here.admit(ACCOUNT, MODEL, now_ns=after).outcome is Outcome.REJECT_CONCURRENCY
    for d in taken:
        here.settle(d, now_ns=after)
    assert here.account(ACCOUNT)["in_flight"] == 0
    assert here.load(MODEL) == 0.0


def test_a_killed_worker_s_permits_come_back_with_other_traffic_in_the_next_tick(region):
    """Without retries of its own, the account gets its places back when any call turns the
    tick after the permits expired: that call meets the whole ledger."""
    config = {**CONFIG, "max_in_flight": 4, "permit_ttl": 60}
    here = sluicegate.Engine(shared=region, **config)
    kill_a_worker_holding_4_permits(region, config)
    assert here.admit("another-account", MODEL, now_ns=NOW + 60 * 10**9 - 1).admitted
    assert here.account(ACCOUNT)["in_flight"] == 4
    next_tick = NOW + 120 * 10**9
    assert here.admit("another-account", MODEL, now_ns=next_tick).admitted
    assert here.account(ACCOUNT)["in_flight"] == 0
    taken = [here.admit(ACCOUNT, MODEL, now_ns=next_tick) for _ in range(5)]
    assert [d.admitted for d in taken] == [True] * 4 + [False]


# -- end to end: the ASGI middleware under uvicorn --workers 4 ------------------------------------

APP = '''
"""The test's app: the middleware in front of the fake upstream, on the shared engine."""

import os

import sluicegate
from sluicegate.asgi import SluicegateMiddleware

from fake_upstream import app as upstream

FROZEN_NS = int(os.environ["SG_TEST_NOW_NS"])


class FrozenClock:
    """The shared engine with every call at one instant (see test_workers_share_one_limit_exactly)."""

    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def admit(self, *args, **kw):
        return self.engine.admit(*args, now_ns=FROZEN_NS, **kw)

    def settle(self, *args, **kw):
        return self.engine.settle(*args, now_ns=FROZEN_NS, **kw)

    def charge(self, *args, **kw):
        return self.engine.charge(*args, now_ns=FROZEN_NS, **kw)


# Every worker opens the same file with the same configuration, at import.
engine = sluicegate.Engine("fixed", capacity=1024, requests_per_minute=600, shared=os.environ["SG_TEST_REGION"])
limited = SluicegateMiddleware(upstream, FrozenClock(engine))  # the key: $SLUICEGATE_ACCOUNT_KEY
PID = str(os.getpid()).encode()


async def app(scope, receive, send):
    """Says which worker answered, on every response (the middleware's refusals too)."""
    if scope["type"] != "http":
        return await limited(scope, receive, send)

    async def tagged(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (b"x-worker-pid", PID)]}
        await send(message)

    await limited(scope, receive, tagged)
'''


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVERS = {
    "uvicorn": ["-m", "uvicorn", "shared_app:app", "--workers", "4", "--host", "127.0.0.1", "--port", "{port}",
                "--log-level", "info", "--no-access-log"],
    # As the Python README shows it (the worker class is deprecated in favour of the uvicorn-worker
    # package, the same class).
    "gunicorn": ["-m", "gunicorn", "-k", "uvicorn.workers.UvicornWorker", "-w", "4", "-b", "127.0.0.1:{port}",
                 "--log-level", "info", "shared_app:app"],
}


@pytest.mark.parametrize("server", sorted(SERVERS))
def test_workers_share_one_limit_exactly(region, tmp_path, server):
    """2,000 chat completions through the official ``openai`` client, against ``uvicorn --workers 4``
    (and gunicorn with 4 uvicorn workers, when it is installed) whose every worker opens the same
    shared engine at import: 600 requests a minute admit exactly 600 of them, wherever they land;
    every other answer is a 429 with ``retry-after-ms``.

    The clock is frozen, honestly: a limit of 600 a minute refills 10 requests a second, and no
    policy parameter changes that (limits are per minute; ``hard_factor`` 1 adds no band; there is
    no window to set), so under the real clock a run of a few seconds admits 600 plus ten a second
    of it, a number the test cannot state exactly. The middleware calls ``engine.admit``,
    ``settle`` and ``charge`` without ``now_ns`` (the engine reads the monotonic clock), so the
    test app hands it a thin proxy of the shared engine that passes one fixed ``now_ns`` to those
    three calls; everything else, the middleware, the workers, the file, the client, is real.
    """
    openai = pytest.importorskip("openai")
    pytest.importorskip(server, reason=f"{server} is not installed here")
    from sluicegate.asgi import account_digest

    (tmp_path / "shared_app.py").write_text(textwrap.dedent(APP))
    key, api_key, port = "deployment key of the shared test", "sk-shared-test", _free_port()
    frozen = time.monotonic_ns()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([TESTS, str(tmp_path)]),
        "SLUICEGATE_ACCOUNT_KEY": key,
        "SG_TEST_REGION": region,
        "SG_TEST_NOW_NS": str(frozen),
    }
    log = tmp_path / "uvicorn.log"
    command = [sys.executable, *(arg.format(port=port) for arg in SERVERS[server])]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # Every worker up (each logs its startup), so that connections spread over all four.
        deadline = time.monotonic() + 30
        while log.read_text(errors="replace").count("Application startup complete") < 4:
            assert process.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, "uvicorn's workers did not all start:\n" + log.read_text(errors="replace")
            time.sleep(0.05)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key, max_retries=0, timeout=20)

        def one(_):
            try:
                raw = client.chat.completions.with_raw_response.create(
                    model=MODEL, messages=[{"role": "user", "content": "ping"}], max_tokens=16
                )
                return raw.http_response.status_code, raw.headers.get("x-worker-pid"), None
            except openai.APIStatusError as exc:
                return exc.status_code, exc.response.headers.get("x-worker-pid"), exc.response.headers.get("retry-after-ms")

        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(one, range(2_000), timeout=45))
        took = time.monotonic() - started
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)
    tally = Counter(status for status, _, _ in answers)
    pids = Counter(pid for _, pid, _ in answers)
    report = f"{server}: statuses {dict(tally)}, answered by {len(pids)} workers {dict(pids)}, in {took:.1f} s"
    print("\n" + report)
    assert tally == {200: 600, 429: 1_400}, report
    assert all(wait is not None and int(wait) > 0 for status, _, wait in answers if status == 429), report
    assert None not in pids and len(pids) >= 2, report
    # The file outlives the server: every admitted request was settled, once.
    after = sluicegate.Engine(shared=region, **CONFIG)
    account = account_digest(api_key, key)
    assert after.remaining(account, MODEL, now_ns=frozen)["requests"] == 0
    assert after.account(account)["in_flight"] == 0
