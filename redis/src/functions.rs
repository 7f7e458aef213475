//! The Redis function library (`lua/sluicegate.lua`) and the calls into it: loaded with
//! `FUNCTION LOAD REPLACE`, and again by itself whenever Redis answers that a function is missing.

use std::time::Duration;

use redis::{Connection, Value};

use crate::error::Error;

/// The library's source; its version is in its functions' names.
pub const LIBRARY: &str = include_str!("../lua/sluicegate.lua");
/// The lease function of this version of the library.
pub const LEASE: &str = "sg_lease_v2";
/// The heartbeat function of this version of the library.
pub const HEARTBEAT: &str = "sg_heartbeat_v2";
/// The leader election function of this version of the library.
pub const LEAD: &str = "sg_lead_v2";
/// The adaptation tick function of this version of the library.
pub const TICK: &str = "sg_tick_v2";

/// What one metric's bucket is asked for in a lease call.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MetricAsk {
    /// µs per unit of the metric's limit (0: not limited); the level the hash starts at.
    pub interval_us: f64,
    /// Every correction the caller has sent, summed (positive charges usage beyond what was
    /// leased, negative gives back): the hash applies what it has not applied yet, so a call
    /// that timed out is made good by the next and nothing counts twice.
    pub sent: i64,
    /// Every unit the caller has received in answers, summed: units granted beyond it were lost
    /// with an answer that never arrived, and go back into the bucket.
    pub received: u64,
    /// The least grant worth having.
    pub need: u64,
    /// The grant wanted.
    pub want: u64,
}

/// One lease call: settle the corrections, then grant.
#[derive(Clone, Debug, PartialEq)]
pub struct LeaseCall {
    /// The caller's clock in µs, or `None` for Redis `TIME`.
    pub now_us: Option<u64>,
    /// µs of use a bucket holds within its limit.
    pub window_us: u64,
    /// µs of use a bucket holds at all (window × hard factor).
    pub hard_us: u64,
    /// How long an untouched scope's hash lives, ms.
    pub ttl_ms: u64,
    /// Who calls: one name per lease a replica starts on a scope.
    pub caller: String,
    /// The caller's call number, rising: a late call (one that timed out) changes nothing.
    pub seq: u64,
    /// The caller is done with this scope: its counts are deleted (ask for no grant then).
    pub done: bool,
    /// Per metric.
    pub metrics: [MetricAsk; 4],
    /// The caller has had an answer before: if the hash no longer knows it, the call is
    /// [`Error::Forgotten`] rather than its sums applied a second time.
    pub answered: bool,
}

/// One metric's part of a lease answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MetricGrant {
    /// Units granted.
    pub grant: u64,
    /// The global bucket's debt after the call, µs.
    pub debt_us: u64,
    /// ns per unit of the global limit (0: not limited).
    pub interval_ns: u64,
}

/// What a lease call answered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeaseAnswer {
    /// The function's clock, µs.
    pub now_us: u64,
    /// Some global bucket is past its window: what was granted runs over its limit.
    pub over: bool,
    /// Per metric.
    pub metrics: [MetricGrant; 4],
}

/// A scope's adaptation, as its hash holds it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Adaptive {
    /// Net units used ever, per metric.
    pub used: [Option<f64>; 4],
    /// `used` at the last tick applied.
    pub mark: [Option<f64>; 4],
    /// The adaptive limit per minute.
    pub limit: [Option<f64>; 4],
    /// The adaptive memory (peak or average).
    pub memory: [Option<f64>; 4],
    /// The last tick applied.
    pub tick: Option<f64>,
}

/// One metric of an adaptation tick.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MetricTick {
    /// µs per unit of the new limit (0: not limited).
    pub interval_us: f64,
    /// The new adaptive limit per minute.
    pub limit: f64,
    /// The new adaptive memory.
    pub memory: f64,
    /// The usage count this tick consumed.
    pub mark: f64,
}

/// A connection to Redis with the library loaded, and timeouts on every read and write.
pub struct Functions {
    connection: Connection,
}

impl Functions {
    /// Connects to `url` (`redis://host:port/db`) within `timeout`, which also bounds each call,
    /// and loads the library.
    pub fn connect(url: &str, timeout: Duration) -> Result<Self, Error> {
        let client = redis::Client::open(url).map_err(Error::from_redis)?;
        let connection = client.get_connection_with_timeout(timeout).map_err(Error::from_redis)?;
        connection.set_read_timeout(Some(timeout)).map_err(Error::from_redis)?;
        connection.set_write_timeout(Some(timeout)).map_err(Error::from_redis)?;
        let mut functions = Functions { connection };
        functions.load()?;
        Ok(functions)
    }

    /// Loads (or replaces) the library.
    pub fn load(&mut self) -> Result<(), Error> {
        redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg("REPLACE")
            .arg(LIBRARY)
            .query::<Value>(&mut self.connection)
            .map_err(Error::from_redis)
            .map(drop)
    }

    /// Leases from the hash `key`, listed in the set `registry` (see the library for the
    /// arithmetic).
    pub fn lease(&mut self, key: &[u8], registry: &[u8], call: &LeaseCall) -> Result<LeaseAnswer, Error> {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(LEASE).arg(2).arg(key).arg(registry);
        cmd.arg(call.now_us.map_or(String::new(), |n| n.to_string()));
        cmd.arg(call.window_us).arg(call.hard_us).arg(call.ttl_ms);
        cmd.arg(&call.caller).arg(call.seq).arg(u8::from(call.done));
        for m in &call.metrics {
            cmd.arg(m.interval_us).arg(m.sent).arg(m.received).arg(m.need).arg(m.want);
        }
        cmd.arg(u8::from(call.answered));
        let value = self.call(&cmd)?;
        parse_lease(&value)
    }

    /// Records this replica's heartbeat in the set `key` for `ttl_us` and counts the replicas
    /// whose heartbeat still counts.
    pub fn heartbeat(
        &mut self,
        key: &[u8],
        now_us: Option<u64>,
        replica: &str,
        ttl_us: u64,
    ) -> Result<u64, Error> {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(HEARTBEAT).arg(1).arg(key);
        cmd.arg(now_us.map_or(String::new(), |n| n.to_string())).arg(replica).arg(ttl_us);
        match self.call(&cmd)? {
            Value::Int(n) => u64::try_from(n).map_err(|_| Error::Answer("a negative replica count")),
            _ => Err(Error::Answer("a heartbeat answer that is not an integer")),
        }
    }

    /// Takes or keeps the lead (the key `key`) for `ttl_ms`; true if this replica leads.
    pub fn lead(&mut self, key: &[u8], replica: &str, ttl_ms: u64) -> Result<bool, Error> {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(LEAD).arg(1).arg(key).arg(replica).arg(ttl_ms);
        match self.call(&cmd)? {
            Value::Int(n @ (0 | 1)) => Ok(n == 1),
            _ => Err(Error::Answer("a lead answer that is neither 0 nor 1")),
        }
    }

    /// The hashes listed in the set `registry`.
    pub fn scopes(&mut self, registry: &[u8]) -> Result<Vec<Vec<u8>>, Error> {
        match redis::cmd("SMEMBERS")
            .arg(registry)
            .query::<Value>(&mut self.connection)
            .map_err(Error::from_redis)?
        {
            Value::Array(items) | Value::Set(items) => items
                .into_iter()
                .map(|v| match v {
                    Value::BulkString(b) => Ok(b),
                    _ => Err(Error::Answer("a scope name that is not a string")),
                })
                .collect(),
            _ => Err(Error::Answer("a scope set that is not an array")),
        }
    }

    /// A scope's adaptation as its hash holds it; a missing or damaged field reads as `None`.
    pub fn adaptation(&mut self, key: &[u8]) -> Result<Adaptive, Error> {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(key);
        for field in ["u", "w", "l", "m"] {
            (0..4).for_each(|m| {
                cmd.arg(format!("{field}{m}"));
            });
        }
        cmd.arg("k");
        let Value::Array(items) = cmd.query::<Value>(&mut self.connection).map_err(Error::from_redis)? else {
            return Err(Error::Answer("an HMGET answer that is not an array"));
        };
        let numbers: Vec<Option<f64>> = items
            .iter()
            .map(|v| match v {
                Value::BulkString(b) => {
                    std::str::from_utf8(b).ok().and_then(|t| t.parse::<f64>().ok()).filter(|x| x.is_finite())
                }
                _ => None,
            })
            .collect();
        let [u @ .., k] = numbers.as_slice() else { return Err(Error::Answer("a short HMGET answer")) };
        let at = |i: usize| u.get(i).copied().flatten();
        Ok(Adaptive {
            used: std::array::from_fn(at),
            mark: std::array::from_fn(|m| at(4 + m)),
            limit: std::array::from_fn(|m| at(8 + m)),
            memory: std::array::from_fn(|m| at(12 + m)),
            tick: *k,
        })
    }

    /// Writes a scope's adaptation for tick `index`; false if it was not applied (a stale tick,
    /// or a hash that expired, which is then dropped from `registry`).
    pub fn tick(
        &mut self,
        key: &[u8],
        registry: &[u8],
        now_us: Option<u64>,
        index: u64,
        metrics: &[MetricTick; 4],
    ) -> Result<bool, Error> {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(TICK).arg(2).arg(key).arg(registry);
        cmd.arg(now_us.map_or(String::new(), |n| n.to_string())).arg(index);
        for m in metrics {
            cmd.arg(m.interval_us).arg(m.limit).arg(m.memory).arg(m.mark);
        }
        match self.call(&cmd)? {
            Value::Int(n @ (0 | 1)) => Ok(n == 1),
            _ => Err(Error::Answer("a tick answer that is neither 0 nor 1")),
        }
    }

    /// Runs `cmd`, loading the library and trying once more if Redis no longer has it.
    fn call(&mut self, cmd: &redis::Cmd) -> Result<Value, Error> {
        match cmd.query::<Value>(&mut self.connection) {
            Err(e) if is_missing_function(&e) => {
                self.load()?;
                cmd.query::<Value>(&mut self.connection).map_err(Error::from_redis)
            }
            other => other.map_err(Error::from_redis),
        }
    }
}

fn is_missing_function(e: &redis::RedisError) -> bool {
    e.to_string().contains("Function not found")
}

/// Reads a lease answer: `{now, over, then grant, debt, interval per metric}`, every one a
/// non-negative integer; `{now, 2}` is [`Error::Forgotten`].
pub fn parse_lease(value: &Value) -> Result<LeaseAnswer, Error> {
    let Value::Array(items) = value else {
        return Err(Error::Answer("a lease answer that is not an array"));
    };
    if let [Value::Int(_), Value::Int(2)] = items.as_slice() {
        return Err(Error::Forgotten);
    }
    if items.len() != 14 {
        return Err(Error::Answer("a lease answer of the wrong length"));
    }
    let mut numbers = [0u64; 14];
    for (n, item) in numbers.iter_mut().zip(items) {
        *n = match item {
            Value::Int(i) => {
                u64::try_from(*i).map_err(|_| Error::Answer("a negative number in a lease answer"))?
            }
            _ => return Err(Error::Answer("a lease answer holding something other than integers")),
        };
    }
    let [now_us, over, rest @ ..] = numbers;
    if over > 1 {
        return Err(Error::Answer("a lease answer whose band flag is neither 0 nor 1"));
    }
    let mut metrics = [MetricGrant::default(); 4];
    for (m, chunk) in metrics.iter_mut().zip(rest.chunks_exact(3)) {
        if let [grant, debt_us, interval_ns] = *chunk {
            *m = MetricGrant { grant, debt_us, interval_ns };
        }
    }
    Ok(LeaseAnswer { now_us, over: over == 1, metrics })
}
