"""What the processes of test_shared.py run (spawned: they import this module, which imports only
sluicegate and the standard library, so that they start quickly)."""

import os
import time

import sluicegate

ACCOUNT = "acct-shared"
MODEL = "llama-v3p1-8b"


def admit_many(path, config, rounds, per_round, now_ns, start, results):
    """Opens the shared engine, then admits ``per_round`` requests at ``now_ns`` in each of
    ``rounds`` rounds, every round starting when all processes are ready for it (``start``, a
    barrier), settling each admitted one at once; reports (pid, admitted, refused as rate
    limited, admitted in the first round)."""
    try:
        engine = sluicegate.Engine(shared=path, **config)
        admitted = limited = first = 0
        for r in range(rounds):
            start.wait(timeout=60)
            for _ in range(per_round):
                d = engine.admit(ACCOUNT, MODEL, now_ns=now_ns)
                if d.admitted:
                    admitted += 1
                    first += r == 0
                    engine.settle(d, now_ns=now_ns)
                elif d.outcome is sluicegate.Outcome.REJECT_RATE_LIMITED and d.binding_metric == "requests":
                    limited += 1
        results.put((os.getpid(), admitted, limited, first))
    except BaseException as exc:
        results.put((os.getpid(), "error", repr(exc)))


def hold_open(path, config, opened, release):
    """Keeps the shared engine open until ``release`` is set (at most a minute)."""
    engine = sluicegate.Engine(shared=path, **config)
    opened.set()
    release.wait(timeout=60)
    del engine


def settle_twice(path, config, decisions, now_ns, results):
    """Settles each (pickled) decision on its own engine over the same file, then again;
    reports what each attempt did."""
    try:
        engine = sluicegate.Engine(shared=path, **config)
        seen = []
        for d in decisions:
            for _ in range(2):
                try:
                    engine.settle(d, generated_tokens=7, now_ns=now_ns)
                    seen.append("settled")
                except sluicegate.Error as exc:
                    seen.append(type(exc).__name__)
        results.put(seen)
    except BaseException as exc:
        results.put(["error", repr(exc)])


def hold_permits(path, config, n, now_ns, holding):
    """Admits ``n`` requests and never settles them; sleeps until killed (at most a minute)."""
    engine = sluicegate.Engine(shared=path, **config)
    held = [engine.admit(ACCOUNT, MODEL, now_ns=now_ns) for _ in range(n)]
    if all(d.admitted for d in held):
        holding.set()
    time.sleep(60)
