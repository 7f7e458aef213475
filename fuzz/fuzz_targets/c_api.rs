//! Drives the C API with random calls: garbage configs, keys, buffer sizes and damaged permits.
//! No sequence may crash or panic across the boundary, and these invariants must hold (a failed
//! assertion is a crash the fuzzer reports):
//!
//! - every result code is one `include/sluicegate.h` declares in `enum sg_result`, and
//!   `sg_result_str` describes it; every admitted decision's outcome, metric and reason are in
//!   their enums;
//! - a permit settles at most once: once a settle (or cancel) of it returned `SG_OK`, no settle,
//!   cancel or charge of it — or of a damaged copy — returns `SG_OK` again; nor does any permit
//!   issued before a successful restore;
//! - admitted totals stay within the limits. In the accounting mode (a `fixed` policy of L
//!   requests per minute, hard factor ρ, smoothing wait w, a clock that never goes back), the
//!   requests admitted on one scope at instants a ≤ … ≤ b cost at most (b − a) + ρ·W + w of
//!   bucket time, W being one minute: a bucket's debt starts at 0 or more (a new scope starts
//!   full), drains one µs per µs, and admission never takes it past ρ·W + w (SPEC §3, §4). In
//!   requests: at most L·(b − a)/60 s + ρ·L + L·w/60 s.
#![no_main]

use std::collections::HashMap;
use std::ffi::CStr;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sluicegate::*;

/// One minute in µs, the capacity of every bucket (SPEC §3).
const WINDOW_Q: u128 = 60_000_000;
/// Requests-per-minute limits that divide a minute into whole µs, so a request costs exactly
/// W / L of bucket time.
const RPM: [u64; 8] = [1, 2, 3, 10, 60, 100, 600, 1_000];
/// Hard factors whose band ρ·W is a whole number of µs.
const RHO: [f64; 4] = [1.0, 1.5, 2.0, 3.0];

/// The values of `enum sg_result` in the C header.
fn header_codes() -> &'static Vec<u32> {
    static CODES: OnceLock<Vec<u32>> = OnceLock::new();
    CODES.get_or_init(|| {
        let header = include_str!("../../include/sluicegate.h");
        let start = header.find("enum sg_result\n").expect("the header declares enum sg_result");
        let body = &header[start..];
        let body = &body[..body.find("};").expect("enum sg_result ends")];
        let codes: Vec<u32> = body
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("SG_"))
            .filter_map(|l| l.split('=').nth(1)?.trim().trim_end_matches(',').parse().ok())
            .collect();
        assert!(codes.contains(&0) && codes.len() > 20, "parsed {codes:?} from the header");
        codes
    })
}

/// Checks a returned code and hands it back.
fn code(r: sg_result) -> sg_result {
    let c = r as u32;
    assert!(header_codes().contains(&c), "result code {c} is not in the header's enum sg_result");
    // SAFETY: sg_result_str returns a static NUL-terminated string for any value.
    let text = unsafe { CStr::from_ptr(sg_result_str(c)) };
    assert_ne!(text.to_bytes(), b"unknown result code", "result code {c} has no description");
    assert_ne!(r, sg_result::SgErrPanic, "a call panicked");
    r
}

fn byte(data: &[u8], i: usize) -> u8 {
    data.get(i).copied().unwrap_or(0)
}

fn word(data: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    for (k, v) in b.iter_mut().enumerate() {
        *v = byte(data, i * 8 + k);
    }
    u64::from_le_bytes(b)
}

/// A permit the target holds: its words, the permit it was copied from (itself, or the
/// original of a damaged copy), and whether it was issued before the last successful restore.
#[derive(Clone, Copy)]
struct Held {
    permit: sg_permit,
    family: usize,
    stale: bool,
}

/// What the target knows about the engine it drives.
struct World {
    engine: *mut sg_engine,
    permits: Vec<Held>,
    /// Per original permit: whether a settle or cancel of it (or a copy) returned SG_OK.
    settled: Vec<bool>,
    /// Accounting mode: (L, ρ·W + w in µs); None in the garbage mode.
    bound: Option<(u64, u128)>,
    /// Per scope (account, model, fast): admitted (µs, requests) since tracking began.
    admitted: HashMap<(Vec<u8>, Vec<u8>, bool), Vec<(u128, u128)>>,
    /// Accounts with an override: their limit is not L.
    overridden: Vec<Vec<u8>>,
    saved: Option<Vec<u8>>,
}

impl World {
    /// Records an admission and checks every run of admissions ending with it on its scope.
    fn admit(&mut self, key: (Vec<u8>, Vec<u8>, bool), now_ns: u64, requests: u64) {
        let Some((rpm, band_q)) = self.bound else { return };
        if self.overridden.contains(&key.0) {
            return;
        }
        let events = self.admitted.entry(key).or_default();
        let now_q = u128::from(now_ns / 1_000);
        events.push((now_q, u128::from(requests)));
        let cost = WINDOW_Q / u128::from(rpm);
        let mut total = 0u128;
        for &(at_q, n) in events.iter().rev() {
            total += n * cost;
            assert!(
                total <= now_q - at_q + band_q,
                "{} requests admitted within {} µs at {rpm} RPM, hard band {band_q} µs: {events:?}",
                total / cost,
                now_q - at_q,
            );
        }
    }

    /// Settles (or cancels, or charges) permit `i`; checks it settles at most once.
    fn settle(&mut self, i: usize, op: u8, usage: &sg_usage, completion: u32, now: u64) {
        let Some(held) = self.permits.get(i).copied() else { return };
        // SAFETY: a live engine; valid pointers; the permit may be damaged, which the API refuses.
        let r = code(unsafe {
            match op % 3 {
                0 => sg_settle(self.engine, &held.permit, usage, completion, now),
                1 => sg_cancel(self.engine, &held.permit, usage, now),
                _ => sg_charge(self.engine, &held.permit, usage.generated_tokens, now),
            }
        });
        if r == sg_result::SgOk {
            assert!(!held.stale, "a permit issued before a restore was accepted after it");
            assert!(!self.settled[held.family], "a settled permit was accepted again (op {})", op % 3);
            if op % 3 != 2 {
                self.settled[held.family] = true;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut cfg = std::mem::MaybeUninit::<sg_config>::uninit();
    // SAFETY: valid out-pointer; every field is written.
    let mut cfg = unsafe {
        code(sg_config_default(cfg.as_mut_ptr()));
        cfg.assume_init()
    };
    let accounting = byte(data, 0) & 1 == 1;
    let mut bound = None;
    if accounting {
        let rpm = RPM[usize::from(byte(data, 1)) % RPM.len()];
        let rho = RHO[usize::from(byte(data, 2)) % RHO.len()];
        let wait_ns = if byte(data, 3) & 1 == 1 { 2_000_000_000 } else { 0 };
        cfg.preset = c"fixed".as_ptr();
        cfg.floor[0] = rpm as f64;
        cfg.hard_factor = rho;
        cfg.max_wait_ns = wait_ns;
        cfg.scopes = 16 + word(data, 1) % 64;
        cfg.models = 8;
        cfg.permits = 128;
        bound = Some((rpm, (rho * WINDOW_Q as f64).ceil() as u128 + u128::from(wait_ns / 1_000)));
    } else {
        // Zero takes the default capacity (100,000 scopes): rarely, it is slow to allocate.
        cfg.scopes = word(data, 0) % 64;
        if cfg.scopes == 0 && byte(data, 4) != 0 {
            cfg.scopes = 1;
        }
        cfg.hard_factor = f64::from_bits(word(data, 1));
        cfg.floor[0] = f64::from_bits(word(data, 2));
    }
    let mut engine: *mut sg_engine = std::ptr::null_mut();
    // SAFETY: valid pointers.
    if code(unsafe { sg_engine_new(&cfg, &mut engine) }) != sg_result::SgOk {
        return;
    }
    let mut w = World {
        engine,
        permits: Vec::new(),
        settled: Vec::new(),
        bound,
        admitted: HashMap::new(),
        overridden: Vec::new(),
        saved: None,
    };
    let mut decision = sg_decision::default();
    let mut buf = vec![0u8; (word(data, 3) % 4096) as usize];
    let mut now: u64 = 1_000_000_000;
    for step in data.chunks(16).skip(4) {
        let account = step.get(..usize::from(byte(step, 0) % 8)).unwrap_or(&[]);
        let model: &[u8] = if byte(step, 5) & 2 == 0 { b"m" } else { b"model-2" };
        let fast = u32::from(byte(step, 5) & 1);
        if accounting {
            // A clock that never goes back: mostly small steps, sometimes past a minute.
            now += match byte(step, 7) % 8 {
                0..=3 => u64::from(byte(step, 8)) * 10_000_000,
                4 | 5 => 0,
                6 => u64::from(byte(step, 8)) * 1_000,
                _ => 61_000_000_000,
            };
        } else {
            now = word(step, 1);
        }
        let request = sg_request {
            account: account.as_ptr(),
            account_len: account.len(),
            model: model.as_ptr(),
            model_len: model.len(),
            prompt_tokens: word(step, 0) % 100_000,
            cached_tokens: word(step, 1) % 1000,
            max_tokens: u64::from(byte(step, 2)) * 10,
            expected_tokens: 0,
            n: u64::from(byte(step, 3) % 4),
            // 3 is no tier: SG_ERR_INVALID_ARGUMENT, nothing charged.
            service_tier: u32::from(byte(step, 4) & 3),
            fast,
        };
        let usage = sg_usage {
            prompt_tokens: word(step, 0) % 1000,
            cached_tokens: 0,
            generated_tokens: word(step, 1) % 1000,
        };
        let pick = usize::from(byte(step, 9));
        let mut written = 0usize;
        // SAFETY: every pointer is valid for what it claims; permits may be damaged, which the
        // API must refuse.
        unsafe {
            match byte(step, 6) % 16 {
                0..=3 => {
                    if code(sg_admit(engine, &request, now, &mut decision)) == sg_result::SgOk {
                        let d = decision;
                        assert!(d.outcome <= 5, "unknown outcome {}", d.outcome);
                        assert!(d.outcome != 2 || d.metric < 4, "unknown metric {}", d.metric);
                        assert!(d.outcome != 4 || d.reason < 2, "unknown spend reason {}", d.reason);
                        assert!(d.outcome != 5 || d.reason < 3, "unknown invalid reason {}", d.reason);
                        if d.outcome <= 1 {
                            w.settled.push(false);
                            w.permits.push(Held {
                                permit: d.permit,
                                family: w.settled.len() - 1,
                                stale: false,
                            });
                            w.admit((account.to_vec(), model.to_vec(), fast != 0), now, d.cost[0]);
                        }
                    }
                }
                4 | 5 => {
                    let i = if w.permits.is_empty() { 0 } else { pick % w.permits.len() };
                    w.settle(i, byte(step, 10), &usage, u32::from(byte(step, 11) % 4), now);
                }
                6 => {
                    let mut render = sg_render::default();
                    if code(sg_render_init(engine, u32::from(byte(step, 7) % 6), &mut render))
                        != sg_result::SgOk
                    {
                        render.dialect = u32::from(byte(step, 7));
                    }
                    code(sg_render_headers(
                        &decision,
                        &render,
                        now,
                        buf.as_mut_ptr(),
                        buf.len(),
                        &mut written,
                    ));
                    code(sg_render_error_body(&decision, &render, buf.as_mut_ptr(), buf.len(), &mut written));
                    let mut status = 0u32;
                    code(sg_render_status(&decision, &render, &mut status));
                    let mut levels = sg_levels::default();
                    code(sg_decision_levels(&decision, &mut levels));
                }
                7 => {
                    let mut levels = sg_levels::default();
                    let r = code(sg_limits(
                        engine,
                        account.as_ptr(),
                        account.len(),
                        model.as_ptr(),
                        model.len(),
                        fast,
                        now,
                        &mut levels,
                    ));
                    if r == sg_result::SgOk {
                        for m in 0..4 {
                            assert!(
                                levels.remaining[m] <= levels.limit[m],
                                "remaining above the limit: {levels:?}"
                            );
                        }
                    }
                }
                8 => {
                    let mut size = 0usize;
                    code(sg_snapshot_size(engine, &mut size));
                    let mut snap = vec![0u8; if byte(step, 10) & 1 == 0 { size } else { buf.len() }];
                    if code(sg_snapshot_write(engine, snap.as_mut_ptr(), snap.len(), now, &mut written))
                        == sg_result::SgOk
                    {
                        snap.truncate(written);
                        w.saved = Some(snap);
                    }
                }
                9 => {
                    let saved = w.saved.clone().filter(|_| byte(step, 10) & 1 == 0);
                    let bytes = saved.as_deref().unwrap_or(step);
                    if code(sg_restore(engine, bytes.as_ptr(), bytes.len(), now)) == sg_result::SgOk {
                        // State rolls back to the snapshot's: permits go stale, tracking restarts.
                        w.permits.iter_mut().for_each(|p| p.stale = true);
                        w.admitted.clear();
                    }
                }
                10 => {
                    let n = u32::from(byte(step, 10));
                    let (mut used, mut limit) = (0u32, 0u32);
                    let (acct, len) = (account.as_ptr(), account.len());
                    let r = match byte(step, 11) % 12 {
                        0 => sg_add_credits(engine, acct, len, word(step, 1)),
                        1 => sg_set_spend_limit(engine, acct, len, word(step, 1)),
                        2 => sg_set_suspended(
                            engine,
                            acct,
                            len,
                            u32::from(byte(step, 12) % 3),
                            u32::from(byte(step, 13) & 1),
                        ),
                        3 => sg_set_payment_method(engine, acct, len, u32::from(byte(step, 12) & 1)),
                        4 => sg_set_tier(engine, acct, len, u32::from(byte(step, 12)), now),
                        5 => sg_start_billing_period(engine, now),
                        6 => {
                            let price = sg_price {
                                uncached_prompt: word(step, 1),
                                cached_prompt: 1,
                                generated: word(step, 0),
                            };
                            sg_set_price(engine, model.as_ptr(), model.len(), fast, &price)
                        }
                        7 => sg_quota_acquire(
                            engine,
                            acct,
                            len,
                            u32::from(byte(step, 12) % 4),
                            n,
                            &mut used,
                            &mut limit,
                        ),
                        8 => sg_quota_release(
                            engine,
                            acct,
                            len,
                            u32::from(byte(step, 12) % 4),
                            n,
                            &mut used,
                            &mut limit,
                        ),
                        9 => sg_quota_set_limit(
                            engine,
                            acct,
                            len,
                            u32::from(byte(step, 12) % 4),
                            n,
                            &mut used,
                            &mut limit,
                        ),
                        _ => {
                            let mut state = sg_account::default();
                            let r = sg_account_get(engine, acct, len, &mut state);
                            if r == sg_result::SgOk {
                                assert!(state.tier <= 4, "unknown tier {}", state.tier);
                                for q in 0..3 {
                                    assert!(
                                        state.quota_used[q] <= state.quota_limit[q],
                                        "quota above its limit: {state:?}"
                                    );
                                }
                            }
                            r
                        }
                    };
                    code(r);
                }
                11 => {
                    let floor = f64::from(byte(step, 10)) * 10.0;
                    let ceiling = floor * f64::from(byte(step, 11) % 4);
                    let r = sg_set_limits_override(
                        engine,
                        account.as_ptr(),
                        account.len(),
                        u32::from(byte(step, 12) % 5),
                        floor,
                        ceiling,
                        now,
                    );
                    if code(r) == sg_result::SgOk {
                        w.overridden.push(account.to_vec());
                    }
                }
                12 => {
                    code(sg_set_load(
                        engine,
                        model.as_ptr(),
                        model.len(),
                        fast,
                        u32::from(byte(step, 10)) * 8,
                    ));
                }
                13 => {
                    code(sg_set_model_capacity(
                        engine,
                        model.as_ptr(),
                        model.len(),
                        fast,
                        u32::from(byte(step, 10) % 4),
                    ));
                }
                _ => {
                    // A damaged copy of a held permit: it belongs to the same family.
                    if let Some(held) = w.permits.get(pick % w.permits.len().max(1)).copied() {
                        let mut copy = held;
                        let k = usize::from(byte(step, 10)) % copy.permit.words.len();
                        copy.permit.words[k] ^= word(step, 1) | 1;
                        w.permits.push(copy);
                    }
                }
            }
        }
    }
    // SAFETY: engine came from sg_engine_new and is freed once.
    unsafe { sg_engine_free(engine) };
});
