"""Engine.admit + settle, and Scope.admit + settle, against the `limits` package, in the same process.

`limits` is configured as a gateway would compose it for four metrics: a window in memory storage
per metric, `hit` on each (with the token counts as cost), with its moving-window strategy and with
its fixed-window one, its fastest. Run:

    python python/bench/bench_admit.py [--calls N]
"""

import argparse
import time

import limits
import limits.storage
import limits.strategies

import sluicegate

ACCOUNTS = [f"acct-{i:04d}" for i in range(1_000)]
MODEL = "llama-v3p1-70b-instruct"


def per_call(fn, calls):
    """Best of five runs, seconds per call."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        fn(calls)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def engine():
    return sluicegate.Engine(
        policy="fixed",
        capacity=4_000,
        requests_per_minute=1e12,
        prompt_tokens_per_minute=1e12,
        uncached_prompt_tokens_per_minute=1e12,
        generated_tokens_per_minute=1e12,
    )


def sluicegate_loop(calls):
    e = engine()
    admit, settle = e.admit, e.settle

    def run(n):
        for i in range(n):
            d = admit(ACCOUNTS[i % 1_000], MODEL, prompt_tokens=1_200, max_tokens=256)
            settle(d, prompt_tokens=1_200, generated_tokens=180)

    return run


def scope_loop(calls):
    """A gateway resolves each API key's scope once and caches it."""
    e = engine()
    scopes = [e.scope(a, MODEL).admit for a in ACCOUNTS]
    settle = e.settle

    def run(n):
        for i in range(n):
            d = scopes[i % 1_000](prompt_tokens=1_200, max_tokens=256)
            settle(d, prompt_tokens=1_200, generated_tokens=180)

    return run


def limits_loop(strategy):
    storage = limits.storage.MemoryStorage()
    window = strategy(storage)
    per_metric = [limits.parse(f"{10**9}/minute") for _ in range(4)]
    costs = (1, 1_200, 1_200, 256)
    hit = window.hit

    def run(n):
        for i in range(n):
            account = ACCOUNTS[i % 1_000]
            for limit, cost in zip(per_metric, costs):
                hit(limit, account, MODEL, cost=cost)

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=100_000)
    args = parser.parse_args()
    ours = per_call(sluicegate_loop(args.calls), args.calls)
    scoped = per_call(scope_loop(args.calls), args.calls)
    # Each hit with cost k stores k timestamps in the moving window: far fewer calls suffice.
    moving = per_call(limits_loop(limits.strategies.MovingWindowRateLimiter), args.calls // 100)
    fixed = per_call(limits_loop(limits.strategies.FixedWindowRateLimiter), args.calls // 10)
    print(f"sluicegate Engine.admit + settle: {ours * 1e6:.3f} us per call")
    print(f"sluicegate Scope.admit + settle:  {scoped * 1e6:.3f} us per call")
    print(f"limits moving window, 4 x hit:    {moving * 1e6:.3f} us per call")
    print(f"limits fixed window, 4 x hit:     {fixed * 1e6:.3f} us per call (its fastest)")
    print(f"ratio to limits' fastest: Engine.admit {fixed / ours:.1f}x, Scope.admit {fixed / scoped:.1f}x faster")


if __name__ == "__main__":
    main()
