"""Replicas sharing limits through Redis: ``Engine(redis=url)`` (issue 18).

Each test starts its own ``redis-server`` (Debian's package; ``.ci/run`` installs it) on a free
loopback port, without persistence, and stops it afterwards.
"""

import shutil
import socket
import subprocess
import time

import pytest

import sluicegate
from sluicegate import Outcome


@pytest.fixture
def redis_url():
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as c:
                    c.sendall(b"PING\r\n")
                    if c.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait(timeout=10)


def replica(url):
    return sluicegate.Engine("fixed", redis=url, requests_per_minute=60, hard_factor=1)


def test_two_replicas_admit_the_limit_between_them_not_each(redis_url):
    a, b = replica(redis_url), replica(redis_url)
    assert a.redis == redis_url and sluicegate.Engine("fixed").redis is None
    admitted = {id(a): 0, id(b): 0}
    # Two seconds of requests, alternating replicas: the bucket holds 60, refills 1 a second.
    deadline = time.monotonic() + 2
    i = 0
    while time.monotonic() < deadline:
        engine = (a, b)[i % 2]
        i += 1
        d = engine.admit("acct", "model", prompt_tokens=0, max_tokens=0)
        if d.admitted:
            admitted[id(engine)] += 1
            engine.settle(d)
        else:
            assert d.outcome == Outcome.REJECT_RATE_LIMITED
        time.sleep(0.001)
    assert 60 <= sum(admitted.values()) <= 63
    assert all(n > 0 for n in admitted.values())


def test_a_scope_and_streams_go_through_the_lease(redis_url):
    e = replica(redis_url)
    scope = e.scope("acct", "model")
    d = scope.admit(prompt_tokens=10, max_tokens=5)
    assert d.admitted
    e.charge(d, 7)
    e.settle(d, generated_tokens=7)
    with pytest.raises(sluicegate.AlreadySettledError):
        e.settle(d)


def test_redis_that_does_not_answer_is_a_typed_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(sluicegate.RedisError):
        sluicegate.Engine("fixed", redis=f"redis://127.0.0.1:{port}/0")
    with pytest.raises(sluicegate.RedisError):
        sluicegate.Engine("fixed", redis="not a url")
    with pytest.raises(sluicegate.ArgumentError):
        sluicegate.Engine("fixed", redis="redis://127.0.0.1:1/0", shared="/dev/shm/never")
