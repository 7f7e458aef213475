//! sluicegate against governor, side by side in each group so one report shows the ratio.
//! Run: `cargo bench -p sluicegate-benches` (CI runs it with `-- --test`: once, untimed).

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sluicegate_benches::{
    AtomicFloor, CEngine, KEYS, MODEL, accounts, admit_settle, admit_settle_scope, backed_engine, capacity,
    engine, governor_direct, governor_keyed, governor_keys, policy, request, scopes, shared_engine,
};

#[path = "../../redis/tests/common/mod.rs"]
mod redis_server;

/// A caller-supplied clock that moves 1 µs per call, so buckets refill as they would in life.
fn ticker() -> impl FnMut() -> u64 {
    let mut now = 0u64;
    move || {
        now += 1_000;
        now
    }
}

fn admit_settle_group(c: &mut Criterion) {
    let mut g = c.benchmark_group("admit_settle");
    g.throughput(Throughput::Elements(1));
    let names = accounts(KEYS);
    let e = engine(KEYS);
    let mut i = 0usize;
    let mut now = ticker();
    g.bench_function("sluicegate keyed 4-metric admit+settle, caller time", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            admit_settle(&e, black_box(&names[i]), now());
        })
    });
    g.bench_function("sluicegate keyed 4-metric admit+settle, std clock read", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            admit_settle(&e, black_box(&names[i]), sluicegate_core::clock::now_ns());
        })
    });
    let handles = scopes(&e, &names);
    g.bench_function("sluicegate resolved scope 4-metric admit+settle, caller time", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            admit_settle_scope(&e, black_box(&handles[i]), now());
        })
    });
    let floor = AtomicFloor::default();
    g.bench_function("the 12 atomic read-modify-writes of a resolved admit+settle alone", |b| {
        b.iter(|| black_box(&floor).admit_settle())
    });
    let direct = governor_direct();
    g.bench_function("governor direct check()", |b| b.iter(|| black_box(direct.check())));
    let keyed = governor_keyed();
    let keys = governor_keys(&names);
    g.bench_function("governor keyed check_key, 1000 keys", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(keyed.check_key(&keys[i]))
        })
    });
    let four = [governor_keyed(), governor_keyed(), governor_keyed(), governor_keyed()];
    g.bench_function("governor 4 keyed limiters composed, 1000 keys", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            // What a user composes for four metrics: four checks, not all-or-nothing.
            four.iter().all(|l| l.check_key(&keys[i]).is_ok())
        })
    });
    g.finish();
}

fn scopes_group(c: &mut Criterion) {
    let mut g = c.benchmark_group("scopes");
    g.throughput(Throughput::Elements(1));
    g.sample_size(20);
    for n in [1_000usize, 100_000, 1_000_000] {
        let names = accounts(n);
        let e = engine(n);
        let mut now = ticker();
        for a in &names {
            admit_settle(&e, a, now());
        }
        // A fixed pseudo-random walk over the keys: mostly cache misses at the larger sizes.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        g.bench_with_input(BenchmarkId::new("sluicegate admit+settle", n), &n, |b, _| {
            b.iter(|| admit_settle(&e, &names[next()], now()))
        });
        drop(e);
        let keyed = governor_keyed();
        let keys = governor_keys(&names);
        for k in &keys {
            let _ = keyed.check_key(k);
        }
        g.bench_with_input(BenchmarkId::new("governor keyed check_key", n), &n, |b, _| {
            b.iter(|| black_box(keyed.check_key(&keys[next()])))
        });
    }
    g.finish();
}

/// Runs `iters` operations split over `threads` scoped threads; returns the wall time.
fn spread(threads: usize, iters: u64, op: impl Fn(usize, u64) + Sync) -> Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let op = &op;
            s.spawn(move || {
                for k in 0..iters / threads as u64 {
                    op(t, k);
                }
            });
        }
    });
    start.elapsed()
}

fn threads_group(c: &mut Criterion) {
    let mut g = c.benchmark_group("threads");
    g.throughput(Throughput::Elements(1));
    let names = accounts(KEYS);
    let e = engine(KEYS);
    let keyed = governor_keyed();
    let keys = governor_keys(&names);
    let clock = AtomicU64::new(0);
    let now = || clock.fetch_add(1, Ordering::Relaxed) * 1_000;
    for threads in [1usize, 2] {
        g.bench_function(BenchmarkId::new("sluicegate disjoint scopes", threads), |b| {
            b.iter_custom(|iters| {
                spread(threads, iters, |t, k| {
                    admit_settle(&e, &names[(t * 500 + k as usize % 500) % KEYS], k * 1_000)
                })
            })
        });
        g.bench_function(BenchmarkId::new("sluicegate one hot scope", threads), |b| {
            b.iter_custom(|iters| spread(threads, iters, |_, _| admit_settle(&e, &names[0], now())))
        });
        g.bench_function(BenchmarkId::new("governor keyed disjoint keys", threads), |b| {
            b.iter_custom(|iters| {
                spread(threads, iters, |t, k| {
                    black_box(keyed.check_key(&keys[(t * 500 + k as usize % 500) % KEYS]).is_ok());
                })
            })
        });
        g.bench_function(BenchmarkId::new("governor keyed one hot key", threads), |b| {
            b.iter_custom(|iters| {
                spread(threads, iters, |_, _| {
                    black_box(keyed.check_key(&keys[0]).is_ok());
                })
            })
        });
    }
    g.finish();
}

fn adapt_group(c: &mut Criterion) {
    let mut g = c.benchmark_group("adapt");
    // Adaptive policy with limits that never bind, so every call is admitted.
    let mut policy = sluicegate_core::Policy::fireworks_2024();
    for l in policy.limits.0.iter_mut() {
        *l = sluicegate_core::MetricLimits { floor: 1e12, ceiling: 1e13 };
    }
    let capacity = sluicegate_core::Capacity::scopes(1024);
    let e = sluicegate_core::Engine::new(policy, capacity).unwrap_or_else(|e| panic!("{e}"));
    let mut minute = 0u64;
    g.bench_function("admit+settle, first call after a tick boundary (catch-up)", |b| {
        b.iter(|| {
            // Each call lands in a new minute: it wins the tick and adapts all four limits.
            minute += 1;
            admit_settle(&e, "acct", minute * 60_000_000_000);
        })
    });
    let mut now = ticker();
    let base = (minute + 1) * 60_000_000_000;
    g.bench_function("admit+settle within a tick", |b| {
        b.iter(|| admit_settle(&e, "acct", base + now() % 1_000_000_000))
    });
    g.finish();
}

fn ffi_group(c: &mut Criterion) {
    let mut g = c.benchmark_group("ffi");
    g.throughput(Throughput::Elements(1));
    let names = accounts(KEYS);
    let c = CEngine::new(KEYS);
    let mut i = 0;
    let mut now = ticker();
    g.bench_function("sluicegate admit+settle through the C ABI", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            c.admit_settle(black_box(&names[i]), now());
        })
    });
    let c_scopes: Vec<_> = names.iter().map(|n| c.scope(n)).collect();
    g.bench_function("sluicegate resolved scope admit+settle through the C ABI", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            c.admit_settle_scope(black_box(c_scopes[i]), now());
        })
    });
    // The C API's engine is behind `Backing`, so the Rust baseline is too: the rows differ by
    // the C ABI alone, not by how the compiler inlined one storage type or the other.
    let e = backed_engine(KEYS);
    let mut now = ticker();
    g.bench_function("sluicegate admit+settle in Rust", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            admit_settle(&e, &names[i], now());
        })
    });
    let handles = scopes(&e, &names);
    g.bench_function("sluicegate resolved scope admit+settle in Rust", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            admit_settle_scope(&e, black_box(&handles[i]), now());
        })
    });
    c_scopes.into_iter().for_each(|s| c.free_scope(s));
    g.finish();
}

/// Issue 14: an engine in a shared file (what `uvicorn --workers N` uses) beside the heap engine,
/// and the heap engine behind the run-time storage choice of the C API and Python.
fn shared_group(c: &mut Criterion) {
    let mut g = c.benchmark_group("shared");
    g.throughput(Throughput::Elements(1));
    let names = accounts(KEYS);
    let dir =
        if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm".into() } else { std::env::temp_dir() };
    let path = dir.join(format!("sluicegate-bench-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let heap = engine(KEYS);
    let backed = backed_engine(KEYS);
    let shared = shared_engine(KEYS, &path);
    let mut i = 0usize;
    let mut now = ticker();
    g.bench_function("heap admit+settle", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            admit_settle(&heap, black_box(&names[i]), now());
        })
    });
    g.bench_function("heap behind Backing admit+settle", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            admit_settle(&backed, black_box(&names[i]), now());
        })
    });
    g.bench_function("shared file admit+settle", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            admit_settle(&shared, black_box(&names[i]), now());
        })
    });
    drop(shared);
    let _ = std::fs::remove_file(&path);
    g.finish();
}

/// Issue 18's cost: a replica's admit+settle stays the local engine's, from its lease; Redis is
/// called in the background. The global limits never bind here, as the local engine's do not.
fn many_hosts_group(c: &mut Criterion) {
    let mut g = c.benchmark_group("many_hosts");
    g.throughput(Throughput::Elements(1));
    let names = accounts(KEYS);
    let local = engine(KEYS);
    let server = redis_server::RedisServer::start();
    let replica =
        sluicegate_redis::Replica::connect(&server.url(), policy(), capacity(KEYS, 4096), Default::default())
            .unwrap_or_else(|e| panic!("replica: {e}"));
    let mut i = 0usize;
    let mut now = ticker();
    g.bench_function("local engine admit+settle", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            admit_settle(&local, black_box(&names[i]), now());
        })
    });
    g.bench_function("replica admit+settle, leased from Redis", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            let key = sluicegate_core::ScopeKey::new(black_box(names[i].as_bytes()), MODEL);
            let at = now();
            if let Ok(d) = replica.admit(key, &request(), at) {
                if let Some(p) = d.permit() {
                    let usage = sluicegate_core::Usage::new(1_200, 180);
                    let _ = replica.settle(p, &usage, sluicegate_core::Completion::Success, at);
                }
            }
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    admit_settle_group,
    scopes_group,
    threads_group,
    adapt_group,
    ffi_group,
    shared_group,
    many_hosts_group
);
criterion_main!(benches);
