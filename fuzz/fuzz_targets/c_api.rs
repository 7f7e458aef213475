//! Drives the C API with random calls: garbage configs, keys, buffers sizes and permits. Any
//! sequence must return result codes, never crash or panic across the boundary.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluicegate::*;

fn word(data: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    for (k, byte) in b.iter_mut().enumerate() {
        *byte = data.get(i * 8 + k).copied().unwrap_or(0);
    }
    u64::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    let mut cfg = std::mem::MaybeUninit::<sg_config>::uninit();
    // SAFETY: valid out-pointer; every field is written.
    let mut cfg = unsafe {
        sg_config_default(cfg.as_mut_ptr());
        cfg.assume_init()
    };
    cfg.scopes = word(data, 0) % 64;
    cfg.hard_factor = f64::from_bits(word(data, 1));
    cfg.floor[0] = f64::from_bits(word(data, 2));
    let mut engine: *mut sg_engine = std::ptr::null_mut();
    // SAFETY: valid pointers.
    if unsafe { sg_engine_new(&cfg, &mut engine) } != sg_result::SgOk {
        return;
    }
    let mut decision = sg_decision::default();
    let mut buf = vec![0u8; (word(data, 3) % 4096) as usize];
    for step in data.chunks(16).skip(4) {
        let account = step.get(..(step.first().copied().unwrap_or(1) % 8) as usize).unwrap_or(&[]);
        let request = sg_request {
            account: account.as_ptr(),
            account_len: account.len(),
            model: b"m".as_ptr(),
            model_len: 1,
            prompt_tokens: word(step, 0) % 100_000,
            cached_tokens: word(step, 1) % 1000,
            max_tokens: u64::from(step.get(2).copied().unwrap_or(0)) * 10,
            expected_tokens: 0,
            n: u64::from(step.get(3).copied().unwrap_or(1) % 4),
            priority: u32::from(step.get(4).copied().unwrap_or(0) & 1),
            fast: u32::from(step.get(5).copied().unwrap_or(0) & 1),
        };
        let now = word(step, 1);
        let usage = sg_usage { prompt_tokens: word(step, 0) % 1000, cached_tokens: 0, generated_tokens: word(step, 1) % 1000 };
        let mut written = 0usize;
        let mut render = sg_render::default();
        // SAFETY: every pointer is valid for what it claims; the permit may be garbage, which the
        // API must refuse.
        unsafe {
            match step.get(6).copied().unwrap_or(0) % 6 {
                0 => { let _ = sg_admit(engine, &request, now, &mut decision); }
                1 => { let _ = sg_settle(engine, &decision.permit, &usage, u32::from(step.get(7).copied().unwrap_or(0)), now); }
                2 => { let _ = sg_charge(engine, &decision.permit, word(step, 0), now); }
                3 => {
                    render.dialect = u32::from(step.get(7).copied().unwrap_or(0) % 6);
                    let _ = sg_render_headers(&decision, &render, now, buf.as_mut_ptr(), buf.len(), &mut written);
                    let _ = sg_render_error_body(&decision, &render, buf.as_mut_ptr(), buf.len(), &mut written);
                }
                4 => { let _ = sg_snapshot_write(engine, buf.as_mut_ptr(), buf.len(), now, &mut written); }
                _ => { let _ = sg_restore(engine, step.as_ptr(), step.len(), now); }
            }
        }
        decision.permit.words[0] ^= word(step, 0) & 0xFF;
    }
    // SAFETY: engine came from sg_engine_new and is freed once.
    unsafe { sg_engine_free(engine) };
});
