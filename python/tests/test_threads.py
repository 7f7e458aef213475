"""One engine shared by threads: exact conservation, no lost or doubled settles."""

import threading

import sluicegate


def test_threads_admit_exactly_what_the_limit_allows_and_settle_once():
    # max_in_flight=None: one account may hold every permit (the default is a quarter of them).
    e = sluicegate.Engine(policy="fixed", capacity=100, permits=10_000, requests_per_minute=5_000, max_in_flight=None)
    admitted = []
    lock = threading.Lock()

    def worker():
        mine = [d for d in (e.admit("a", "m", now_ns=0) for _ in range(4_000)) if d.admitted]
        with lock:
            admitted.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 5_000

    errors = []

    def settler(decisions):
        for d in decisions:
            try:
                e.settle(d, now_ns=0)
            except sluicegate.AlreadySettledError:
                errors.append(d)

    # Two threads settle every permit: each is settled exactly once.
    both = [threading.Thread(target=settler, args=(admitted,)) for _ in range(2)]
    for t in both:
        t.start()
    for t in both:
        t.join()
    assert len(errors) == len(admitted)
    assert e.remaining("a", "m", now_ns=0)["requests"] == 0
