//! A replica: a local engine that admits from leases of the global buckets in Redis, and the
//! background thread that keeps those leases (SPEC §11).

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use sluicegate_core::adapt::{self, MetricState, Period};
use sluicegate_core::lease::LeasedScope;
use sluicegate_core::storage::Storage;
use sluicegate_core::{
    Capacity, Completion, Decision, Engine, Error as CoreError, Heap, Outcome, PerMetric, Permit, Policy,
    Request, ScopeKey, SettleError, Usage, Variant,
};

use crate::error::Error;
use crate::functions::{Functions, LeaseCall, MetricAsk, MetricTick};
use crate::leases::{self, Caller, Leases, OwnedKey, Slot};

/// What a replica admits once Redis has been unreachable for longer than its leases last.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Outage {
    /// Its share of each global limit: L / the replicas whose heartbeat still counts.
    #[default]
    Split,
    /// Each global limit whole: no request refused for the outage, at the risk of L × replicas.
    Open,
    /// Nothing: every request is refused until Redis answers again.
    Closed,
}

/// Where a replica's admissions come from now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Leases from Redis.
    Leased,
    /// Redis does not answer: leases are used until they expire.
    Riding,
    /// Redis has not answered for longer than a lease lasts: the outage share.
    Outage,
}

/// A clock in ns: the one the caller passes to `admit` and `settle`.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// How a replica talks to Redis.
#[derive(Clone)]
pub struct Options {
    /// Bounds every connect, read and write.
    pub timeout: Duration,
    /// How often the lease thread looks at every lease.
    pub refresh: Duration,
    /// How long a lease may be used without a word from Redis.
    pub lease_ttl: Duration,
    /// How long a heartbeat counts a replica as live.
    pub heartbeat_ttl: Duration,
    /// What to admit once leases have expired in an outage.
    pub outage: Outage,
    /// The clock the caller passes to `admit` and `settle`, ns.
    pub clock: Clock,
    /// For tests only: the Redis function reads `clock` (as µs since its origin) instead of
    /// Redis `TIME`, so that hours of adaptation run in seconds. Every replica must then share
    /// one clock.
    pub function_clock: bool,
    /// Prefix of every Redis key, so engines with different policies can share a Redis.
    pub namespace: String,
    /// A label for this replica in Redis (default: the host name's stand-in, the process id).
    /// Each replica adds a part of its own, so replicas made from one `Options` stay apart.
    pub replica_id: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            timeout: Duration::from_millis(200),
            refresh: Duration::from_millis(10),
            lease_ttl: Duration::from_secs(2),
            heartbeat_ttl: Duration::from_secs(3),
            outage: Outage::Split,
            clock: Arc::new(sluicegate_core::clock::now_ns),
            function_clock: false,
            namespace: "sg1".into(),
            replica_id: format!("pid{}", std::process::id()),
        }
    }
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("timeout", &self.timeout)
            .field("refresh", &self.refresh)
            .field("lease_ttl", &self.lease_ttl)
            .field("heartbeat_ttl", &self.heartbeat_ttl)
            .field("outage", &self.outage)
            .field("function_clock", &self.function_clock)
            .field("namespace", &self.namespace)
            .field("replica_id", &self.replica_id)
            .finish_non_exhaustive()
    }
}

const WINDOW_US: u64 = 60_000_000;
/// A lease unused for this long is given back.
const IDLE_NS: u64 = 1_000_000_000;
/// How long a scope's hash, and a lease's sums in it, outlive their last call: longer than the
/// longest adaptation memory.
const HASH_TTL_MS: u64 = 3 * 60 * 60 * 1_000;
const LEASED: u8 = 0;
const RIDING: u8 = 1;
const OUTAGE: u8 = 2;

struct Shared {
    policy: Policy,
    leases: Leases,
    options: Options,
    /// This replica's name in Redis: its label and a part no other replica has.
    name: String,
    url: String,
    hard_us: u64,
    /// µs per unit of each metric's starting limit (0: not limited).
    floors_us: [f64; 4],
    stop: AtomicBool,
    mode: AtomicU8,
    live: AtomicU64,
    calls: AtomicU64,
    /// A connection for a scope's first request, which has no lease yet.
    cold: Mutex<Option<Functions>>,
}

/// The many-hosts side of a replica: each scope's lease of the global buckets kept in Redis,
/// and the background thread that keeps them. An engine admits through it
/// ([`Hosts::admit`]) instead of from its own buckets; [`Replica`] pairs it with a heap engine,
/// and the C API and Python with theirs.
pub struct Hosts {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Hosts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hosts").field("options", &self.shared.options).field("mode", &self.mode()).finish()
    }
}

impl Hosts {
    /// Connects to Redis at `url` (`redis://host:port/db`), loads the function library, and
    /// starts the lease thread, for an engine of `policy` with `scopes` scope slots. `policy`
    /// must be the same on every replica.
    pub fn connect(url: &str, policy: &Policy, scopes: usize, options: Options) -> Result<Hosts, Error> {
        let functions = Functions::connect(url, options.timeout)?;
        let hard_us = (WINDOW_US as f64 * policy.hard_factor.max(1.0)) as u64;
        let floors_us =
            policy.limits.0.map(|l| if l.is_limited() { WINDOW_US as f64 / l.floor } else { 0.0 });
        let leases = Leases::new(scopes, hard_us, duration_ns(options.refresh));
        let shared = Arc::new(Shared {
            policy: *policy,
            leases,
            name: format!("{}-{:016x}", options.replica_id, unique()),
            options,
            url: url.to_owned(),
            hard_us,
            floors_us,
            stop: AtomicBool::new(false),
            mode: AtomicU8::new(LEASED),
            live: AtomicU64::new(1),
            calls: AtomicU64::new(0),
            cold: Mutex::new(None),
        });
        let worker = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("sluicegate-leases".into())
            .spawn(move || LeaseThread::new(worker, functions).run())
            .map_err(Error::Thread)?;
        Ok(Hosts { shared, thread: Some(thread) })
    }

    /// [`Engine::admit`] of `engine`, decided locally from the scope's lease. `engine` must be
    /// the one this was connected for (its policy, its scope slots).
    pub fn admit<S: Storage>(
        &self,
        engine: &Engine<S>,
        key: ScopeKey<'_>,
        request: &Request,
        now_ns: u64,
    ) -> Result<Decision, CoreError> {
        let leases = &self.shared.leases;
        let d = engine.admit_leased(key, request, now_ns, leases)?;
        if let (Outcome::RejectRateLimited(_), Some(scope)) = (&d.outcome, leases::take_cold()) {
            if self.fetch_cold(scope, d.cost, now_ns) {
                return engine.admit_leased(key, request, now_ns, leases);
            }
        }
        Ok(d)
    }

    /// [`Engine::settle`]: the corrections go back to Redis with the next lease call.
    pub fn settle<S: Storage>(
        &self,
        engine: &Engine<S>,
        permit: &Permit,
        usage: &Usage,
        completion: Completion,
        now_ns: u64,
    ) -> Result<(), SettleError> {
        engine.settle_leased(permit, usage, completion, now_ns, &self.shared.leases)
    }

    /// [`Engine::charge`]: streamed tokens beyond the reservation are charged to the lease.
    pub fn charge<S: Storage>(
        &self,
        engine: &Engine<S>,
        permit: &Permit,
        generated_tokens: u64,
        now_ns: u64,
    ) -> Result<(), SettleError> {
        engine.charge_leased(permit, generated_tokens, now_ns, &self.shared.leases)
    }

    /// Where admissions come from now.
    pub fn mode(&self) -> Mode {
        match self.shared.mode.load(Ordering::Acquire) {
            LEASED => Mode::Leased,
            RIDING => Mode::Riding,
            _ => Mode::Outage,
        }
    }

    /// Units held in leases (or, in an outage, in outage shares) per metric, over every scope:
    /// what this replica may still admit without asking Redis.
    pub fn held(&self) -> PerMetric<u64> {
        PerMetric(self.shared.leases.held())
    }

    /// Replicas whose heartbeat counted at the last heartbeat (this one included).
    pub fn live_replicas(&self) -> u64 {
        self.shared.live.load(Ordering::Acquire)
    }

    /// Redis calls made so far (lease and heartbeat calls, and loads of the library).
    pub fn redis_calls(&self) -> u64 {
        self.shared.calls.load(Ordering::Relaxed)
    }

    /// Leases a scope's first request its need, unless Redis is known to be down.
    fn fetch_cold(&self, scope: LeasedScope, cost: PerMetric<u64>, now_ns: u64) -> bool {
        let s = &self.shared;
        if s.mode.load(Ordering::Acquire) != LEASED {
            return false;
        }
        let Some(slot) = s.leases.slot(scope.slot) else { return false };
        if slot.ready_id() != Some(scope.id) {
            return false;
        }
        let Ok(mut cold) = s.cold.lock() else { return false };
        if cold.is_none() {
            *cold = Functions::connect(&s.url, s.options.timeout).ok();
        }
        let Some(functions) = cold.as_mut() else { return false };
        let want = cost.0.map(|c| c.saturating_mul(4));
        let fetched = s.exchange(functions, slot, now_ns, [0; 4], (cost.0, want), false).is_ok();
        if !fetched {
            *cold = None;
        }
        fetched
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            // The thread gives back every lease before it ends.
            let _ = t.join();
        }
    }
}

/// A replica of a gateway behind a load balancer: a heap engine that admits from leases of
/// each scope's global buckets kept in Redis, so every replica together admits what one engine
/// would.
///
/// The hot path is the local engine's ([`Engine::admit_leased`]); a background thread leases
/// and gives back. A scope's first request on a replica waits for one lease call.
#[derive(Debug)]
pub struct Replica {
    // Dropped first: the lease thread gives back every lease before the engine goes.
    hosts: Hosts,
    engine: Engine<Heap>,
}

impl Replica {
    /// Connects to Redis at `url` (`redis://host:port/db`), loads the function library, and
    /// starts the lease thread. `policy` must be the same on every replica.
    pub fn connect(
        url: &str,
        policy: Policy,
        capacity: Capacity,
        options: Options,
    ) -> Result<Replica, Error> {
        let engine = Engine::new(policy, capacity)?;
        let hosts = Hosts::connect(url, &policy, capacity.scopes, options)?;
        Ok(Replica { hosts, engine })
    }

    /// [`Engine::admit`] on this replica: decided locally, from the scope's lease.
    pub fn admit(&self, key: ScopeKey<'_>, request: &Request, now_ns: u64) -> Result<Decision, CoreError> {
        self.hosts.admit(&self.engine, key, request, now_ns)
    }

    /// [`Engine::settle`]: the corrections go back to Redis with the next lease call.
    pub fn settle(
        &self,
        permit: &Permit,
        usage: &Usage,
        completion: Completion,
        now_ns: u64,
    ) -> Result<(), SettleError> {
        self.hosts.settle(&self.engine, permit, usage, completion, now_ns)
    }

    /// [`Engine::cancel`].
    pub fn cancel(&self, permit: &Permit, usage: &Usage, now_ns: u64) -> Result<(), SettleError> {
        self.settle(permit, usage, Completion::Cancelled, now_ns)
    }

    /// [`Engine::charge`]: streamed tokens beyond the reservation are charged to the lease.
    pub fn charge(&self, permit: &Permit, generated_tokens: u64, now_ns: u64) -> Result<(), SettleError> {
        self.hosts.charge(&self.engine, permit, generated_tokens, now_ns)
    }

    /// The local engine: accounts, spend, prices, load and metrics are configured there.
    pub fn engine(&self) -> &Engine<Heap> {
        &self.engine
    }

    /// The many-hosts side: mode, leases held, live replicas, Redis calls.
    pub fn hosts(&self) -> &Hosts {
        &self.hosts
    }
}

impl Shared {
    fn now(&self) -> u64 {
        (self.options.clock)()
    }

    /// The name of one of the namespace's own keys.
    fn key(&self, name: &str) -> String {
        format!("{}:{name}", self.options.namespace)
    }

    /// The name of a scope's hash: the namespace, then account, model and variant, hex-encoded
    /// so that no two keys share a name.
    fn hash(&self, key: &OwnedKey) -> Vec<u8> {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let variant = if key.variant == Variant::Fast { "fast" } else { "regular" };
        format!("{}:scope:{}:{}:{variant}", self.options.namespace, hex(&key.account), hex(&key.model))
            .into_bytes()
    }

    /// One lease call for `slot` on `functions`: sends `delta` (with whatever earlier calls
    /// could not deliver), asks for `need` and `want`, and fills the lease with the grant. With
    /// `done`, the lease ends: nothing is asked, and Redis forgets its sums.
    fn exchange(
        &self,
        functions: &mut Functions,
        slot: &Slot,
        now_ns: u64,
        delta: [i64; 4],
        ask: ([u64; 4], [u64; 4]),
        done: bool,
    ) -> Result<(), Error> {
        let (need, want) = ask;
        let mut caller = slot.caller();
        for (sent, d) in caller.sent.iter_mut().zip(delta) {
            *sent = sent.saturating_add(d);
        }
        let (hash, registry) = (self.hash(&slot.key()), self.key("scopes"));
        let mut call = |caller: &mut Caller| {
            caller.seq += 1;
            let metrics = std::array::from_fn(|m| MetricAsk {
                interval_us: self.floors_us[m],
                sent: caller.sent[m],
                received: caller.received[m],
                need: need[m],
                want: want[m],
            });
            let call = LeaseCall {
                now_us: self.options.function_clock.then_some(now_ns / 1_000),
                window_us: WINDOW_US,
                hard_us: self.hard_us,
                ttl_ms: HASH_TTL_MS,
                caller: format!("{}:{}.{}", self.name, caller.epoch, caller.renamed),
                seq: caller.seq,
                done,
                metrics,
                answered: caller.answered,
            };
            self.calls.fetch_add(1, Ordering::Relaxed);
            functions.lease(&hash, registry.as_bytes(), &call)
        };
        let answer = match call(&mut caller) {
            Err(Error::Forgotten) => {
                caller.rename(delta);
                call(&mut caller)?
            }
            answer => answer?,
        };
        caller.answered = true;
        for (received, g) in caller.received.iter_mut().zip(answer.metrics) {
            *received = received.saturating_add(g.grant);
        }
        if !done {
            slot.fill(&answer, now_ns, now_ns.saturating_add(duration_ns(self.options.lease_ttl)));
        }
        Ok(())
    }
}

/// A number no other replica of this process, and almost surely of any other, has.
fn unique() -> u64 {
    static MADE: AtomicU64 = AtomicU64::new(0);
    let made = MADE.fetch_add(1, Ordering::Relaxed);
    let mixed = sluicegate_core::clock::now_ns()
        ^ u64::from(std::process::id()).rotate_left(32)
        ^ made.rotate_left(48);
    mixed.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Book {
    /// Units requests took from `slot`'s lease since the last call, per metric.
    fn took(&mut self, slot: &Slot) -> [u64; 4] {
        let ever = slot.taken_ever();
        let taken = std::array::from_fn(|m| ever[m].saturating_sub(self.taken_ever[m]));
        self.taken_ever = std::array::from_fn(|m| ever[m].max(self.taken_ever[m]));
        taken
    }
}

/// What the lease thread keeps about one slot.
#[derive(Clone, Copy, Debug, Default)]
struct Book {
    /// Units requests had taken from the lease at the last look (`Slot::taken_ever`).
    taken_ever: [u64; 4],
    /// Units per second taken, smoothed.
    rate: [f64; 4],
    /// Units of the outage share accrued but not yet granted.
    credit: [f64; 4],
    /// Units admitted from the outage share, charged to Redis once it answers.
    owed: [i64; 4],
    /// The lease holds outage-share units, which Redis never granted.
    local: bool,
    /// Up to when the outage share has accrued, ns.
    accrued_ns: u64,
    /// When the slot was last looked at, ns.
    seen_ns: u64,
    /// Seconds between the last two looks.
    look_s: f64,
    /// Units taken since the rate last moved.
    pending: [u64; 4],
    /// What the lease was last sized to hold.
    asked: [u64; 4],
    /// When the lease was last used or wanted, ns.
    used_ns: u64,
    /// The caller's clock moved since the look before this one.
    moved: bool,
}

struct LeaseThread {
    shared: Arc<Shared>,
    functions: Option<Functions>,
    books: Vec<Book>,
    /// When Redis last answered, ns.
    answered_ns: u64,
    next_heartbeat_ns: u64,
    /// The last call failed: until a heartbeat gets through, no lease call is tried.
    down: bool,
    /// The last adaptation tick this replica looked at (as leader or not).
    ticked: u64,
}

impl LeaseThread {
    fn new(shared: Arc<Shared>, functions: Functions) -> Self {
        let books = vec![Book::default(); shared.leases.slots().len()];
        let now = shared.now();
        let ticked = now / shared.policy.tick_ns.max(1);
        LeaseThread {
            shared,
            functions: Some(functions),
            books,
            answered_ns: now,
            next_heartbeat_ns: 0,
            down: false,
            ticked,
        }
    }

    fn run(mut self) {
        while !self.shared.stop.load(Ordering::Acquire) {
            let now = self.shared.now();
            self.heartbeat(now);
            self.adapt(now);
            for index in 0..self.books.len() {
                self.look_after(index, now);
            }
            self.settle_mode(now);
            std::thread::sleep(self.shared.options.refresh);
        }
        self.give_back_all();
    }

    fn connected(&mut self) -> Option<&mut Functions> {
        if self.functions.is_none() {
            self.shared.calls.fetch_add(1, Ordering::Relaxed);
            self.functions = Functions::connect(&self.shared.url, self.shared.options.timeout).ok();
        }
        self.functions.as_mut()
    }

    /// Counts this replica live, every third of the heartbeat's TTL; while Redis is down, it is
    /// also the probe that finds it back (at most one per timeout).
    fn heartbeat(&mut self, now: u64) {
        if now < self.next_heartbeat_ns {
            return;
        }
        let s = Arc::clone(&self.shared);
        let ttl_ns = duration_ns(s.options.heartbeat_ttl);
        let probe_ns = duration_ns(s.options.timeout).max(duration_ns(s.options.refresh));
        let key = s.key("replicas");
        let now_us = s.options.function_clock.then_some(now / 1_000);
        let answer = match self.connected() {
            Some(f) => {
                s.calls.fetch_add(1, Ordering::Relaxed);
                f.heartbeat(key.as_bytes(), now_us, &s.name, ttl_ns / 1_000)
            }
            None => Err(Error::Unreachable("not connected".into())),
        };
        match answer {
            Ok(live) => {
                s.live.store(live.max(1), Ordering::Release);
                self.answered_ns = now;
                self.down = false;
                self.next_heartbeat_ns = now.saturating_add(ttl_ns / 3);
            }
            Err(e) => self.failed(&e, now.saturating_add(probe_ns)),
        }
    }

    fn failed(&mut self, e: &Error, next_probe_ns: u64) {
        if matches!(e, Error::Unreachable(_)) {
            self.functions = None;
        }
        self.down = true;
        self.next_heartbeat_ns = next_probe_ns;
    }

    /// Adaptation on global usage (SPEC §5, §11): at each tick, the replica that holds the lead
    /// applies the tick to every scope's hash, with the engine's own rules (`adapt::next`) on
    /// the usage Redis counted from every replica. A lead outlives its holder by two ticks.
    fn adapt(&mut self, now: u64) {
        let s = Arc::clone(&self.shared);
        let policy = s.policy;
        let tick_ns = policy.tick_ns.max(1);
        let index = now / tick_ns;
        if index <= self.ticked || self.down {
            return;
        }
        let rid = s.name.clone();
        let lead_ms = (2 * tick_ns / 1_000_000).max(1);
        let registry = s.key("scopes");
        let now_us = s.options.function_clock.then_some(now / 1_000);
        let Some(f) = self.connected() else { return };
        s.calls.fetch_add(1, Ordering::Relaxed);
        let outcome = f.lead(s.key("leader").as_bytes(), &rid, lead_ms).and_then(|leads| {
            if !leads {
                return Ok(());
            }
            for hash in f.scopes(registry.as_bytes())? {
                let held = f.adaptation(&hash)?;
                let last = held.tick.map_or(index.saturating_sub(1), |k| k as u64);
                if index <= last {
                    continue;
                }
                let duration_ns = (index - last).saturating_mul(tick_ns);
                let metrics = std::array::from_fn(|m| {
                    let bounds = policy.limits.0[m];
                    let fresh = MetricState::fresh(&policy.adaptation, bounds);
                    let state = MetricState {
                        limit: held.limit[m].unwrap_or(fresh.limit),
                        memory: held.memory[m].unwrap_or(fresh.memory),
                    };
                    let used = held.used[m].unwrap_or(0.0);
                    let usage = (used - held.mark[m].unwrap_or(0.0)).max(0.0) as u64;
                    let next = adapt::next(
                        &policy.adaptation,
                        state,
                        bounds,
                        Period { usage, duration_ns, loaded: false },
                    );
                    let interval_us = if bounds.is_limited() { WINDOW_US as f64 / next.limit } else { 0.0 };
                    MetricTick { interval_us, limit: next.limit, memory: next.memory, mark: used }
                });
                s.calls.fetch_add(2, Ordering::Relaxed);
                f.tick(&hash, registry.as_bytes(), now_us, index, &metrics)?;
            }
            Ok(())
        });
        match outcome {
            Ok(()) => self.ticked = index,
            Err(e) => self.failed(&e, now.saturating_add(duration_ns(s.options.timeout))),
        }
    }

    /// Whether Redis answers, and whether leases still carry the replica through an outage.
    fn settle_mode(&self, now: u64) {
        let silent = now.saturating_sub(self.answered_ns);
        let o = &self.shared.options;
        let mode = if !self.down {
            LEASED
        } else if silent < duration_ns(o.lease_ttl) {
            RIDING
        } else {
            OUTAGE
        };
        self.shared.mode.store(mode, Ordering::Release);
    }

    fn look_after(&mut self, index: usize, now: u64) {
        let s = Arc::clone(&self.shared);
        let Some(slot) = s.leases.slot(index) else { return };
        let Some(book) = self.books.get_mut(index) else { return };
        if slot.ready_id().is_none() {
            *book = Book::default();
            return;
        }
        let need = slot.drain_need();
        let taken = book.took(slot);
        if taken.iter().chain(&need).any(|t| *t > 0) {
            book.used_ns = now;
        }
        for ((pending, owed), t) in book.pending.iter_mut().zip(&mut book.owed).zip(taken) {
            *pending = pending.saturating_add(t);
            if book.local {
                *owed = owed.saturating_add(i64::try_from(t).unwrap_or(i64::MAX));
            }
        }
        // The rate moves on only with the caller's clock (a test's may stand still between looks).
        let elapsed_ns = now.saturating_sub(book.seen_ns);
        if elapsed_ns >= 1_000_000 {
            let dt_s = (elapsed_ns as f64 / 1e9).min(10.0);
            for (rate, pending) in book.rate.iter_mut().zip(&mut book.pending) {
                // Smoothed over about ten looks, or a second.
                *rate += (*pending as f64 / dt_s - *rate) * dt_s.clamp(0.1, 1.0);
                *pending = 0;
            }
            book.seen_ns = now;
            book.look_s = dt_s;
        }
        book.moved = elapsed_ns >= 1_000_000;
        if !self.down {
            match self.lease(index, slot, need, now) {
                Ok(()) => return,
                Err(e) => {
                    let probe = now
                        .saturating_add(duration_ns(s.options.timeout).max(duration_ns(s.options.refresh)));
                    self.failed(&e, probe);
                }
            }
        }
        self.outage_share(index, slot, now);
    }

    /// One lease call for a slot: gives back what the lease holds beyond its need, settles the
    /// corrections, and asks for what the recent rate wants. An outage share is dropped, and
    /// what it admitted charged.
    fn lease(&mut self, index: usize, slot: &Slot, need: [u64; 4], now: u64) -> Result<(), Error> {
        let s = Arc::clone(&self.shared);
        let Some(book) = self.books.get(index).copied() else { return Ok(()) };
        let Some(id) = slot.ready_id() else { return Ok(()) };
        let evicting = slot.evicting() && slot.begin_eviction(id);
        let expired = now >= slot.expires_ns();
        // What a lease should hold: enough for a few looks at the recent rate (looks apart on the
        // caller's clock, which a test may run faster than real time).
        let horizon_s =
            4.0 * book.look_s.max(s.options.refresh.as_secs_f64()) + s.options.timeout.as_secs_f64();
        // A lease that refused requests since the last look doubles what it asks for, so a
        // replica whose traffic jumped catches up in a few looks rather than a smoothing time.
        let starved = need.iter().any(|n| *n > 0);
        let keep: [u64; 4] = std::array::from_fn(|m| {
            let steady = (book.rate[m] * horizon_s).ceil() as u64;
            if starved { steady.max(book.asked[m].saturating_mul(2)).max(need[m]) } else { steady }
        });
        // Idle scopes hold no lease: one unused for a second gives back what it holds.
        let idle = now.saturating_sub(book.used_ns) >= IDLE_NS;
        let give_back = if book.local {
            // Units of an outage share were never leased: they are dropped, not given back.
            slot.drain_left();
            [0; 4]
        } else if evicting || expired || (idle && book.moved) {
            slot.drain_left()
        } else if book.moved {
            slot.trim(keep.map(|k| k.saturating_mul(2)))
        } else {
            // The caller's clock has not moved since the last look: what was just granted has
            // had no time to be used, and stays.
            [0; 4]
        };
        let left = slot.left();
        let (want, need) = if evicting {
            ([0; 4], [0; 4])
        } else {
            // Topped up once below half of what it should hold (or when a request went without),
            // so a steady stream costs a call per few looks, not one per look.
            let low = |m: usize| starved || left[m].saturating_mul(2) < keep[m];
            (std::array::from_fn(|m| if low(m) { keep[m].saturating_sub(left[m]) } else { 0 }), need)
        };
        if let Some(book) = self.books.get_mut(index) {
            // What a lease asks for shrinks by halves, so one quiet look does not undo the doubling.
            book.asked = std::array::from_fn(|m| keep[m].max(book.asked[m] / 2));
        }
        let mut delta = slot.drain_delta();
        let owed = if book.local { book.owed } else { [0; 4] };
        for ((d, g), o) in delta.iter_mut().zip(give_back).zip(owed) {
            *d = d.saturating_sub(i64::try_from(g).unwrap_or(i64::MAX)).saturating_add(o);
        }
        if let Some(book) = self.books.get_mut(index) {
            // Sent from now on, whether this call gets through or a later one does.
            book.owed = [0; 4];
        }
        let held = left.iter().any(|l| *l > 0);
        let renew = held && slot.expires_ns() < now.saturating_add(duration_ns(s.options.lease_ttl) / 2);
        let asks =
            want.iter().chain(&need).any(|w| *w > 0) || delta.iter().any(|d| *d != 0) || renew || evicting;
        if asks {
            let sent = match self.connected() {
                Some(f) => s.exchange(f, slot, now, delta, (need, want), evicting),
                None => {
                    // Never sent: owed again.
                    slot.add_delta(delta);
                    Err(Error::Unreachable("not connected".into()))
                }
            };
            if let Err(e) = sent {
                if evicting {
                    slot.abort_eviction(id);
                }
                return Err(e);
            }
            self.answered_ns = now;
        }
        if let Some(book) = self.books.get_mut(index) {
            if evicting {
                slot.free();
                *book = Book::default();
            } else if book.local {
                book.local = false;
                book.credit = [0.0; 4];
            }
        }
        Ok(())
    }

    /// Past its lease in an outage, a slot gets the configured share of its last known limits
    /// (the policy's floors if it never had a lease), accrued at their rate; what it admits from
    /// the share is owed to Redis.
    fn outage_share(&mut self, index: usize, slot: &Slot, now: u64) {
        let s = Arc::clone(&self.shared);
        let silent = now.saturating_sub(self.answered_ns);
        let Some(book) = self.books.get_mut(index) else { return };
        if !book.local && (silent < duration_ns(s.options.lease_ttl) || now < slot.expires_ns()) {
            return;
        }
        let factor = match s.options.outage {
            Outage::Split => 1.0 / s.live.load(Ordering::Acquire).max(1) as f64,
            Outage::Open => 1.0,
            Outage::Closed => 0.0,
        };
        let (mut limited, mut interval_ns) = slot.levels();
        if !slot.answered() {
            interval_ns = s.floors_us.map(|f| (f * 1e3) as u64);
            limited = (0..4).filter(|m| interval_ns[*m] > 0).fold(0, |mask, m| mask | 1 << m);
        }
        let dt_us = now
            .saturating_sub(book.accrued_ns.max(now.saturating_sub(duration_ns(s.options.lease_ttl))))
            as f64
            / 1e3;
        book.accrued_ns = now;
        if !book.local {
            let left = slot.drain_left();
            // An expired lease's units go back once Redis answers.
            slot.add_delta(left.map(|l| -i64::try_from(l).unwrap_or(i64::MAX)));
            book.local = true;
        }
        let mut grant = [0u64; 4];
        let left = slot.left();
        for m in 0..4 {
            if limited >> m & 1 == 0 || interval_ns[m] == 0 {
                continue;
            }
            let per_us = 1e3 / interval_ns[m] as f64;
            // At most a quarter of a window's share in hand, as a lease would hold.
            let cap = (WINDOW_US as f64 * per_us * factor / 4.0).max(1.0);
            book.credit[m] = (book.credit[m] + dt_us * per_us * factor).min(cap);
            let units = book.credit[m].min(cap - left[m] as f64).max(0.0).floor();
            book.credit[m] -= units;
            grant[m] = units as u64;
        }
        slot.share(grant, limited, now.saturating_add(duration_ns(s.options.lease_ttl)));
    }

    /// On shutdown: every lease's unused units and pending corrections go back to Redis, and
    /// Redis forgets this replica's sums.
    fn give_back_all(&mut self) {
        let s = Arc::clone(&self.shared);
        let now = s.now();
        for index in 0..self.books.len() {
            let Some(slot) = s.leases.slot(index) else { continue };
            if slot.ready_id().is_none() {
                continue;
            }
            let mut book = self.books.get(index).copied().unwrap_or_default();
            let taken = book.took(slot);
            let left = slot.drain_left();
            let mut delta = slot.drain_delta();
            for (((d, o), t), l) in delta.iter_mut().zip(book.owed).zip(taken).zip(left) {
                let [t, l] = [t, l].map(|u| i64::try_from(u).unwrap_or(i64::MAX));
                *d = if book.local { d.saturating_add(o).saturating_add(t) } else { d.saturating_sub(l) };
            }
            if let Some(f) = self.connected() {
                let _ = s.exchange(f, slot, now, delta, ([0; 4], [0; 4]), true);
            }
        }
    }
}
