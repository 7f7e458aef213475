/*
 * Every function of include/sluicegate.h, every result code reachable from C, NULL for every
 * pointer argument. Compiles as C11 and as C++17, and runs under ASan + UBSan.
 *
 * Undefined behaviour, and so not tested: freeing an engine twice or using it after
 * sg_engine_free, freeing it (or calling sg_restore) while another thread uses it, a preset
 * string without its NUL, and byte pointers valid for fewer bytes than the length passed.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sluicegate.h"

static int passed = 0;

#define CHECK(cond)                                                             \
    do {                                                                        \
        if (!(cond)) {                                                          \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
            printf("%d passed, 1 failed\n", passed);                            \
            exit(1);                                                            \
        }                                                                       \
        passed++;                                                               \
    } while (0)

#define KEY(s) (const uint8_t *)(s), strlen(s)

static const char *MODEL = "llama-v3p1-70b";

static sg_request request(const char *account, uint64_t prompt, uint64_t max_tokens) {
    sg_request r;
    memset(&r, 0, sizeof r);
    r.account = (const uint8_t *)account;
    r.account_len = strlen(account);
    r.model = (const uint8_t *)MODEL;
    r.model_len = strlen(MODEL);
    r.prompt_tokens = prompt;
    r.max_tokens = max_tokens;
    r.n = 1;
    return r;
}

static sg_engine *engine_with(const char *preset, uint64_t scopes) {
    sg_config cfg;
    CHECK(sg_config_default(&cfg) == SG_OK);
    cfg.preset = preset;
    cfg.scopes = scopes;
    cfg.seed = 42;
    sg_engine *e = NULL;
    CHECK(sg_engine_new(&cfg, &e) == SG_OK && e != NULL);
    return e;
}

static void test_result_strings(void) {
    for (uint32_t code = 0; code <= 24; code++) {
        const char *s = sg_result_str(code);
        CHECK(s != NULL && strcmp(s, "unknown result code") != 0);
    }
    CHECK(strcmp(sg_result_str(9999), "unknown result code") == 0);
    CHECK(strcmp(sg_result_str(SG_OK), "ok") == 0);
}

static void test_config_and_lifecycle(void) {
    sg_config cfg;
    sg_engine *e = NULL;
    CHECK(sg_config_default(NULL) == SG_ERR_NULL);
    CHECK(sg_config_default(&cfg) == SG_OK);
    CHECK(cfg.preset == NULL && cfg.max_wait_ns == UINT64_MAX);
    CHECK(sg_engine_new(NULL, &e) == SG_ERR_NULL);
    CHECK(sg_engine_new(&cfg, NULL) == SG_ERR_NULL);
    cfg.preset = "no-such-preset";
    CHECK(sg_engine_new(&cfg, &e) == SG_ERR_INVALID_ARGUMENT);
    cfg.preset = "fixed";
    cfg.floor[SG_METRIC_REQUESTS] = 0.5;
    CHECK(sg_engine_new(&cfg, &e) == SG_ERR_POLICY);
    cfg.floor[SG_METRIC_REQUESTS] = 0;
    cfg.hard_factor = 0.5;
    CHECK(sg_engine_new(&cfg, &e) == SG_ERR_POLICY);
    cfg.hard_factor = 0;
    cfg.models = 5000;
    CHECK(sg_engine_new(&cfg, &e) == SG_ERR_BAD_CAPACITY);
    cfg.models = 0;
    CHECK(sg_engine_new(&cfg, &e) == SG_OK);
    sg_engine_free(e);
    sg_engine_free(NULL);
    uint64_t a = sg_now_ns(), b = sg_now_ns();
    CHECK(b >= a);
}

static void test_admit_settle_charge_cancel(void) {
    sg_engine *e = engine_with("fixed", 1000);
    sg_request r = request("acct", 1000, 3000);
    sg_decision d;
    CHECK(sg_admit(NULL, &r, 0, &d) == SG_ERR_NULL);
    CHECK(sg_admit(e, NULL, 0, &d) == SG_ERR_NULL);
    CHECK(sg_admit(e, &r, 0, NULL) == SG_ERR_NULL);
    CHECK(sg_admit(e, &r, 0, &d) == SG_OK && d.outcome == SG_ADMIT && d.over_limit == 0);
    CHECK(d.cost[SG_METRIC_GENERATED_TOKENS] == 3000);

    sg_levels l;
    CHECK(sg_decision_levels(NULL, &l) == SG_ERR_NULL && sg_decision_levels(&d, NULL) == SG_ERR_NULL);
    CHECK(sg_decision_levels(&d, &l) == SG_OK);
    CHECK(l.limit[SG_METRIC_REQUESTS] == 60 && l.remaining[SG_METRIC_REQUESTS] == 59);
    CHECK(l.remaining[SG_METRIC_GENERATED_TOKENS] == 3000);

    CHECK(sg_charge(NULL, &d.permit, 10, 0) == SG_ERR_NULL && sg_charge(e, NULL, 10, 0) == SG_ERR_NULL);
    CHECK(sg_charge(e, &d.permit, 3500, 0) == SG_OK);

    sg_usage u;
    memset(&u, 0, sizeof u);
    u.prompt_tokens = 1000;
    u.generated_tokens = 3500;
    CHECK(sg_settle(NULL, &d.permit, &u, SG_COMPLETION_SUCCESS, 0) == SG_ERR_NULL);
    CHECK(sg_settle(e, NULL, &u, SG_COMPLETION_SUCCESS, 0) == SG_ERR_NULL);
    CHECK(sg_settle(e, &d.permit, NULL, SG_COMPLETION_SUCCESS, 0) == SG_ERR_NULL);
    CHECK(sg_settle(e, &d.permit, &u, 7, 0) == SG_ERR_INVALID_ARGUMENT);
    u.cached_tokens = 2000;
    CHECK(sg_settle(e, &d.permit, &u, SG_COMPLETION_SUCCESS, 0) == SG_ERR_INVALID_USAGE);
    u.cached_tokens = 0;
    CHECK(sg_settle(e, &d.permit, &u, SG_COMPLETION_SUCCESS, 0) == SG_OK);
    CHECK(sg_settle(e, &d.permit, &u, SG_COMPLETION_SUCCESS, 0) == SG_ERR_ALREADY_SETTLED);
    CHECK(sg_charge(e, &d.permit, 1, 0) == SG_ERR_ALREADY_SETTLED);

    CHECK(sg_limits(e, KEY("acct"), KEY(MODEL), 0, 0, &l) == SG_OK);
    CHECK(l.remaining[SG_METRIC_GENERATED_TOKENS] == 2500);
    CHECK(sg_limits(NULL, KEY("acct"), KEY(MODEL), 0, 0, &l) == SG_ERR_NULL);
    CHECK(sg_limits(e, NULL, 4, KEY(MODEL), 0, 0, &l) == SG_ERR_NULL);
    CHECK(sg_limits(e, KEY("acct"), NULL, 3, 0, 0, &l) == SG_ERR_NULL);
    CHECK(sg_limits(e, KEY("acct"), KEY(MODEL), 0, 0, NULL) == SG_ERR_NULL);

    sg_decision c;
    sg_request small = request("acct", 10, 100);
    CHECK(sg_admit(e, &small, 0, &c) == SG_OK && c.outcome == SG_ADMIT);
    CHECK(sg_cancel(NULL, &c.permit, &u, 0) == SG_ERR_NULL);
    u.generated_tokens = 10;
    CHECK(sg_cancel(e, &c.permit, &u, 0) == SG_OK);
    CHECK(sg_cancel(e, &c.permit, &u, 0) == SG_ERR_ALREADY_SETTLED);

    /* A forged permit is refused, never trusted. */
    sg_permit forged;
    memset(&forged, 0xAB, sizeof forged);
    CHECK(sg_settle(e, &forged, &u, SG_COMPLETION_SUCCESS, 0) == SG_ERR_STALE_PERMIT);
    sg_engine_free(e);
}

static void test_outcomes_and_keys(void) {
    sg_engine *e = engine_with(NULL, 1000);
    sg_decision d;
    sg_request r = request("burst", 10, 10);
    int admitted = 0, over = 0, limited = 0;
    for (int i = 0; i < 121; i++) {
        CHECK(sg_admit(e, &r, 0, &d) == SG_OK);
        admitted += d.outcome == SG_ADMIT;
        over += d.outcome == SG_ADMIT_OVER_LIMIT;
        limited += d.outcome == SG_REJECT_RATE_LIMITED;
    }
    CHECK(admitted == 60 && over == 60 && limited == 1);
    CHECK(d.metric == SG_METRIC_REQUESTS && d.retry_after_ns > 0 && d.too_large == 0);

    sg_request big = request("big", 10000000, 0);
    CHECK(sg_admit(e, &big, 0, &d) == SG_OK && d.outcome == SG_REJECT_RATE_LIMITED && d.too_large == 1);

    sg_request zero = request("zero", 10, 10);
    zero.n = 0;
    CHECK(sg_admit(e, &zero, 0, &d) == SG_OK && d.outcome == SG_REJECT_INVALID && d.reason == 0);

    sg_request empty = request("", 10, 10);
    CHECK(sg_admit(e, &empty, 0, &d) == SG_ERR_EMPTY_KEY);
    char longkey[80];
    memset(longkey, 'a', sizeof longkey - 1);
    longkey[sizeof longkey - 1] = 0;
    sg_request longer = request(longkey, 10, 10);
    CHECK(sg_admit(e, &longer, 0, &d) == SG_ERR_KEY_TOO_LONG);
    sg_request nullkey = request("x", 10, 10);
    nullkey.account = NULL;
    CHECK(sg_admit(e, &nullkey, 0, &d) == SG_ERR_NULL);

    CHECK(sg_set_load(e, KEY(MODEL), 0, 1500) == SG_OK);
    sg_request fresh = request("fresh", 10, 10);
    CHECK(sg_admit(e, &fresh, 0, &d) == SG_OK && d.outcome == SG_SHED && d.load == 1500);
    CHECK(sg_set_load(NULL, KEY(MODEL), 0, 0) == SG_ERR_NULL);
    CHECK(sg_set_load(e, NULL, 5, 0, 0) == SG_ERR_NULL);
    CHECK(sg_set_load(e, KEY(MODEL), 0, 0) == SG_OK);
    CHECK(sg_set_model_capacity(e, KEY(MODEL), 1, 10) == SG_OK);
    CHECK(sg_set_model_capacity(NULL, KEY(MODEL), 1, 10) == SG_ERR_NULL);
    sg_engine_free(e);

    sg_engine *tiny = engine_with("fixed", 2);
    sg_result last = SG_OK;
    for (int i = 0; i < 200 && last == SG_OK; i++) {
        char name[16];
        snprintf(name, sizeof name, "a%d", i);
        sg_request t = request(name, 1, 1);
        last = sg_admit(tiny, &t, 0, &d);
    }
    CHECK(last == SG_ERR_TABLE_FULL);
    sg_engine_free(tiny);
}

static void test_accounts_prices_quotas(void) {
    sg_engine *e = engine_with(NULL, 1000);
    sg_account a;
    CHECK(sg_account_get(e, KEY("nobody"), &a) == SG_ERR_UNKNOWN_ACCOUNT);
    CHECK(sg_account_get(NULL, KEY("x"), &a) == SG_ERR_NULL);
    CHECK(sg_account_get(e, KEY("x"), NULL) == SG_ERR_NULL);
    CHECK(sg_add_credits(e, KEY("acct"), 100000000) == SG_OK);
    CHECK(sg_account_get(e, KEY("acct"), &a) == SG_OK && a.tier == SG_TIER2 && a.credits == 100000000);
    CHECK(sg_add_credits(NULL, KEY("acct"), 1) == SG_ERR_NULL);
    CHECK(sg_set_spend_limit(e, KEY("acct"), 1000000000000ULL) == SG_ERR_SPEND_LIMIT_ABOVE_TIER);
    CHECK(sg_set_spend_limit(e, KEY("acct"), 1000) == SG_OK);
    CHECK(sg_set_spend_limit(NULL, KEY("acct"), 1) == SG_ERR_NULL);

    sg_price p;
    memset(&p, 0, sizeof p);
    p.uncached_prompt = p.cached_prompt = p.generated = 1000000;
    CHECK(sg_set_price(e, KEY(MODEL), 0, &p) == SG_OK);
    CHECK(sg_set_price(e, KEY(MODEL), 0, NULL) == SG_ERR_NULL);
    CHECK(sg_set_price(NULL, KEY(MODEL), 0, &p) == SG_ERR_NULL);
    sg_decision d;
    sg_request r = request("acct", 1000, 0);
    CHECK(sg_admit(e, &r, 0, &d) == SG_OK && d.outcome == SG_ADMIT);
    sg_usage u;
    memset(&u, 0, sizeof u);
    u.prompt_tokens = 1000;
    CHECK(sg_settle(e, &d.permit, &u, SG_COMPLETION_SUCCESS, 0) == SG_OK);
    CHECK(sg_admit(e, &r, 0, &d) == SG_OK && d.outcome == SG_REJECT_SPEND && d.reason == 0);
    CHECK(sg_start_billing_period(e) == SG_OK && sg_start_billing_period(NULL) == SG_ERR_NULL);
    CHECK(sg_admit(e, &r, 0, &d) == SG_OK && d.outcome == SG_ADMIT);

    CHECK(sg_set_suspended(e, KEY("acct"), SG_SUSPENSION_PAYMENT_FAILED, 1) == SG_OK);
    sg_decision s;
    CHECK(sg_admit(e, &r, 0, &s) == SG_OK && s.outcome == SG_REJECT_SPEND && s.reason == 1);
    CHECK(sg_set_suspended(e, KEY("acct"), 9, 1) == SG_ERR_INVALID_ARGUMENT);
    CHECK(sg_set_suspended(e, KEY("acct"), SG_SUSPENSION_PAYMENT_FAILED, 0) == SG_OK);
    CHECK(sg_set_payment_method(e, KEY("acct"), 1) == SG_OK && sg_set_payment_method(NULL, KEY("a"), 1) == SG_ERR_NULL);

    CHECK(sg_set_tier(e, KEY("acct"), SG_TIER_UNLIMITED, 0) == SG_OK);
    CHECK(sg_account_get(e, KEY("acct"), &a) == SG_OK && a.tier == SG_TIER_UNLIMITED && a.tier_pinned == 1);
    CHECK(sg_set_tier(e, KEY("acct"), 77, 0) == SG_ERR_INVALID_ARGUMENT);
    CHECK(sg_set_tier(e, KEY("acct"), SG_TIER_EARNED, 0) == SG_OK);
    CHECK(sg_set_limits_override(e, KEY("acct"), SG_METRIC_REQUESTS, 600, 6000, 0) == SG_OK);
    sg_levels l;
    CHECK(sg_limits(e, KEY("acct"), KEY(MODEL), 0, 0, &l) == SG_OK && l.limit[SG_METRIC_REQUESTS] == 600);
    CHECK(sg_set_limits_override(e, KEY("acct"), 9, 1, 1, 0) == SG_ERR_INVALID_ARGUMENT);
    CHECK(sg_set_limits_override(e, KEY("acct"), SG_METRIC_REQUESTS, 10, 5, 0) == SG_ERR_POLICY);
    CHECK(sg_set_limits_override(e, KEY("acct"), SG_METRIC_REQUESTS, 0, 0, 0) == SG_OK);

    uint32_t used = 0, limit = 0;
    CHECK(sg_quota_acquire(e, KEY("acct"), SG_QUOTA_A100_GPUS, 8, &used, &limit) == SG_OK && used == 8 && limit == 8);
    CHECK(sg_quota_acquire(e, KEY("acct"), SG_QUOTA_A100_GPUS, 1, &used, &limit) == SG_ERR_QUOTA_EXHAUSTED);
    CHECK(sg_quota_release(e, KEY("acct"), SG_QUOTA_A100_GPUS, 9, NULL, NULL) == SG_ERR_QUOTA_NOT_HELD);
    CHECK(sg_quota_set_limit(e, KEY("acct"), SG_QUOTA_A100_GPUS, 4, NULL, NULL) == SG_ERR_QUOTA_BELOW_USE);
    CHECK(sg_quota_set_limit(e, KEY("acct"), SG_QUOTA_A100_GPUS, 16, &used, &limit) == SG_OK && limit == 16);
    CHECK(sg_quota_release(e, KEY("acct"), SG_QUOTA_A100_GPUS, 8, &used, NULL) == SG_OK && used == 0);
    CHECK(sg_quota_acquire(e, KEY("acct"), 5, 1, NULL, NULL) == SG_ERR_INVALID_ARGUMENT);
    CHECK(sg_quota_acquire(NULL, KEY("acct"), SG_QUOTA_A100_GPUS, 1, NULL, NULL) == SG_ERR_NULL);
    sg_engine_free(e);
}

static void test_rendering(void) {
    sg_engine *e = engine_with(NULL, 1000);
    sg_decision d;
    sg_request r = request("render", 10, 10);
    for (int i = 0; i < 121; i++) {
        CHECK(sg_admit(e, &r, 0, &d) == SG_OK);
    }
    CHECK(d.outcome == SG_REJECT_RATE_LIMITED);
    sg_render render;
    CHECK(sg_render_init(e, SG_DIALECT_FIREWORKS, &render) == SG_OK);
    CHECK(sg_render_init(e, 42, &render) == SG_ERR_INVALID_ARGUMENT);
    CHECK(sg_render_init(NULL, 0, &render) == SG_ERR_NULL && sg_render_init(e, 0, NULL) == SG_ERR_NULL);

    uint32_t status = 0;
    CHECK(sg_render_status(&d, &render, &status) == SG_OK && status == 429);
    CHECK(sg_render_status(NULL, &render, &status) == SG_ERR_NULL);
    CHECK(sg_render_status(&d, NULL, &status) == SG_ERR_NULL);
    CHECK(sg_render_status(&d, &render, NULL) == SG_ERR_NULL);

    uint8_t buf[2048];
    size_t written = 0;
    CHECK(sg_render_headers(&d, &render, 0, buf, sizeof buf, &written) == SG_OK && written > 0);
    CHECK(memmem(buf, written, "retry-after: 1\r\n", 16) != NULL);
    CHECK(memmem(buf, written, "x-ratelimit-over-limit: yes\r\n", 29) != NULL);
    size_t needed = 0;
    CHECK(sg_render_headers(&d, &render, 0, buf, 10, &needed) == SG_ERR_BUFFER_TOO_SMALL && needed == written);
    CHECK(sg_render_headers(&d, &render, 0, NULL, 0, &needed) == SG_ERR_BUFFER_TOO_SMALL && needed == written);
    CHECK(sg_render_headers(&d, &render, 0, NULL, 10, &needed) == SG_ERR_NULL);
    CHECK(sg_render_headers(&d, &render, 0, buf, sizeof buf, NULL) == SG_ERR_NULL);

    CHECK(sg_render_error_body(&d, &render, buf, sizeof buf, &written) == SG_OK);
    CHECK(memmem(buf, written, "\"type\":\"dynamic_request_limited\"", 32) != NULL);
    CHECK(sg_render_error_body(&d, &render, buf, 5, &needed) == SG_ERR_BUFFER_TOO_SMALL && needed == written);
    CHECK(sg_render_error_body(NULL, &render, buf, sizeof buf, &written) == SG_ERR_NULL);

    sg_decision garbage = d;
    garbage.outcome = 99;
    CHECK(sg_render_status(&garbage, &render, &status) == SG_ERR_INVALID_ARGUMENT);
    render.dialect = 17;
    CHECK(sg_render_headers(&d, &render, 0, buf, sizeof buf, &written) == SG_ERR_INVALID_ARGUMENT);

    sg_render openai;
    CHECK(sg_render_init(e, SG_DIALECT_OPENAI, &openai) == SG_OK);
    sg_decision admitted;
    sg_request other = request("other", 10, 10);
    CHECK(sg_admit(e, &other, 0, &admitted) == SG_OK);
    CHECK(sg_render_status(&admitted, &openai, &status) == SG_OK && status == 200);
    CHECK(sg_render_error_body(&admitted, &openai, buf, sizeof buf, &written) == SG_OK && written == 0);
    sg_engine_free(e);
}

static void test_snapshot_restore(void) {
    sg_engine *a = engine_with("fixed", 1000);
    sg_decision d;
    sg_request r = request("snap", 10, 10);
    for (int i = 0; i < 30; i++) {
        CHECK(sg_admit(a, &r, 0, &d) == SG_OK);
    }
    size_t size = 0;
    CHECK(sg_snapshot_size(a, &size) == SG_OK && size > 0);
    CHECK(sg_snapshot_size(NULL, &size) == SG_ERR_NULL && sg_snapshot_size(a, NULL) == SG_ERR_NULL);
    uint8_t *buf = (uint8_t *)malloc(size);
    size_t written = 0, needed = 0;
    CHECK(sg_snapshot_write(a, buf, 10, 0, &needed) == SG_ERR_BUFFER_TOO_SMALL && needed == size);
    CHECK(sg_snapshot_write(a, buf, size, 0, &written) == SG_OK && written == size);
    CHECK(sg_snapshot_write(NULL, buf, size, 0, &written) == SG_ERR_NULL);
    CHECK(sg_snapshot_write(a, buf, size, 0, NULL) == SG_ERR_NULL);

    sg_engine *b = engine_with("fixed", 1000);
    CHECK(sg_restore(b, buf, written, 5000000000000ULL) == SG_OK);
    sg_levels l;
    CHECK(sg_limits(b, KEY("snap"), KEY(MODEL), 0, 5000000000000ULL, &l) == SG_OK);
    CHECK(l.remaining[SG_METRIC_REQUESTS] == 30);
    CHECK(sg_restore(b, NULL, 10, 0) == SG_ERR_NULL && sg_restore(NULL, buf, written, 0) == SG_ERR_NULL);

    /* Permits issued before a restore are stale. */
    sg_usage u;
    memset(&u, 0, sizeof u);
    CHECK(sg_restore(a, buf, written, 0) == SG_OK);
    CHECK(sg_settle(a, &d.permit, &u, SG_COMPLETION_SUCCESS, 0) == SG_ERR_STALE_PERMIT);

    CHECK(sg_restore(b, buf, written - 1, 0) == SG_ERR_SNAPSHOT_TRUNCATED);
    uint8_t *longer = (uint8_t *)malloc(written + 1);
    memcpy(longer, buf, written);
    longer[written] = 0;
    CHECK(sg_restore(b, longer, written + 1, 0) == SG_ERR_SNAPSHOT_TRAILING_BYTES);
    free(longer);
    buf[0] = 'X';
    CHECK(sg_restore(b, buf, written, 0) == SG_ERR_SNAPSHOT_BAD_MAGIC);
    buf[0] = 'S';
    buf[4] = 9;
    CHECK(sg_restore(b, buf, written, 0) == SG_ERR_SNAPSHOT_UNSUPPORTED_VERSION);
    buf[4] = 1;
    buf[written / 2] ^= 0x40;
    CHECK(sg_restore(b, buf, written, 0) == SG_ERR_SNAPSHOT_BAD_CHECKSUM);
    buf[written / 2] ^= 0x40;
    sg_engine *c = engine_with("fixed", 500);
    CHECK(sg_restore(c, buf, written, 0) == SG_ERR_SNAPSHOT_CAPACITY_MISMATCH);
    /* The failed restores changed nothing. */
    CHECK(sg_limits(b, KEY("snap"), KEY(MODEL), 0, 5000000000000ULL, &l) == SG_OK && l.remaining[SG_METRIC_REQUESTS] == 30);
    free(buf);
    sg_engine_free(a);
    sg_engine_free(b);
    sg_engine_free(c);
}

int main(void) {
    test_result_strings();
    test_config_and_lifecycle();
    test_admit_settle_charge_cancel();
    test_outcomes_and_keys();
    test_accounts_prices_quotas();
    test_rendering();
    test_snapshot_restore();
    printf("%d passed, 0 failed\n", passed);
    return 0;
}
