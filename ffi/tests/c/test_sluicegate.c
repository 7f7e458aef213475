/*
 * The C API test: calls every function of include/sluicegate.h, checks every result code that
 * correct C code can get back, and passes NULL for every pointer argument of every function.
 * The same file builds as C11 and as C++17 (both with -Wall -Wextra -Werror -pedantic) and runs
 * under AddressSanitizer + UndefinedBehaviorSanitizer + LeakSanitizer; every engine it creates
 * is freed, so any leak reported is ours. It exits non-zero at the first failed check, naming
 * it, and otherwise ends with the line "N passed, 0 failed".
 *
 *   cc -std=c11 -Wall -Wextra -Werror -pedantic -Iinclude ffi/tests/c/test_sluicegate.c \
 *      target/debug/libsluicegate.a -lpthread -ldl -lm -o test_sluicegate && ./test_sluicegate
 *
 * Not tested, because it is undefined behaviour (the header says so, and no check on the Rust
 * side could detect it): freeing an engine twice, using an engine after sg_engine_free,
 * freeing an engine or calling sg_restore while another thread uses it, a preset string that is
 * not NUL-terminated, a pointer valid for fewer bytes than the length passed with it (keys,
 * buffers, snapshot bytes), and pointers to memory that is not a live object of the right type.
 *
 * SG_ERR_PANIC is never expected: it means Rust code panicked, which is a bug to report, so no
 * check here accepts it. SG_ERR_REGION_NOT_LOCK_FREE cannot be returned on the machines these
 * tests run on (x86_64 and aarch64 have lock-free 16-byte atomics). Every other code (0..45
 * except 2 and 28) must be returned by at least one check below; main() verifies that.
 */
#ifndef _DEFAULT_SOURCE
#define _DEFAULT_SOURCE 1 /* POSIX and MAP_ANONYMOUS, for the shared engines */
#endif

#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "sluicegate.h"

/* One past the highest result code (SG_ERR_REDIS). */
#define CODES 47

static int passed = 0;
static int seen[CODES]; /* result codes some check expected and got */

static void fail(const char *file, int line, const char *what) {
    fprintf(stderr, "%s:%d: check failed: %s\n", file, line, what);
    printf("%d passed, 1 failed\n", passed);
    exit(1);
}

#define CHECK(cond)                                   \
    do {                                              \
        if (!(cond)) fail(__FILE__, __LINE__, #cond); \
        passed++;                                     \
    } while (0)

/* A call that must return `expected`; a failure prints both codes and their descriptions. */
#define EXPECT(call, expected)                                                                    \
    do {                                                                                          \
        sg_result rc_ = (call);                                                                   \
        if (rc_ != (expected)) {                                                                  \
            fprintf(stderr, "%s:%d: %s returned %u (%s), expected %s\n", __FILE__, __LINE__, #call, \
                    (unsigned)rc_, sg_result_str((uint32_t)rc_), #expected);                      \
            fail(__FILE__, __LINE__, #call);                                                      \
        }                                                                                         \
        if ((uint32_t)rc_ < CODES) seen[(uint32_t)rc_] = 1;                                       \
        passed++;                                                                                 \
    } while (0)

#define KEY(s) (const uint8_t *)(s), strlen(s)

static const char *MODEL = "llama-v3p1-70b";
static const uint64_t SEC = 1000000000ULL;

static int contains(const uint8_t *buf, size_t len, const char *needle) {
    size_t n = strlen(needle);
    for (size_t i = 0; n <= len && i <= len - n; i++) {
        if (memcmp(buf + i, needle, n) == 0) return 1;
    }
    return 0;
}

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

static sg_usage usage(uint64_t prompt, uint64_t cached, uint64_t generated) {
    sg_usage u;
    memset(&u, 0, sizeof u);
    u.prompt_tokens = prompt;
    u.cached_tokens = cached;
    u.generated_tokens = generated;
    return u;
}

static sg_engine *engine_with(const char *preset, uint64_t scopes) {
    sg_config cfg;
    EXPECT(sg_config_default(&cfg), SG_OK);
    cfg.preset = preset;
    cfg.scopes = scopes;
    cfg.seed = 42;
    sg_engine *e = NULL;
    EXPECT(sg_engine_new(&cfg, &e), SG_OK);
    CHECK(e != NULL);
    return e;
}

static int admitted(const sg_decision *d) {
    return d->outcome == SG_ADMIT || d->outcome == SG_ADMIT_OVER_LIMIT;
}

/* Settles an admitted decision (every permit must be settled once); ignores refusals. */
static void settle_if_admitted(sg_engine *e, const sg_decision *d, uint64_t now) {
    if (admitted(d)) {
        sg_usage u = usage(d->cost[SG_METRIC_PROMPT_TOKENS], 0, d->cost[SG_METRIC_GENERATED_TOKENS]);
        EXPECT(sg_settle(e, &d->permit, &u, SG_COMPLETION_SUCCESS, now), SG_OK);
    }
}

/* Issue 18: replicas sharing limits through Redis. Without Redis, typed errors; with a real
 * redis-server (SG_REDIS_URL, started by the Rust harness), two engines connected to it admit
 * the limit between them, not the limit each. */
static void test_redis(void) {
    sg_config cfg;
    sg_engine *e = (sg_engine *)&cfg;
    EXPECT(sg_config_default(&cfg), SG_OK);
    cfg.preset = "fixed";
    cfg.floor[SG_METRIC_REQUESTS] = 60.0;
    cfg.ceiling[SG_METRIC_REQUESTS] = 60.0;
    cfg.hard_factor = 1.0;
    EXPECT(sg_engine_connect_redis(NULL, &cfg, &e), SG_ERR_NULL);
    CHECK(e == NULL);
    e = (sg_engine *)&cfg;
    /* Nothing listens on port 1: refused at once. */
    EXPECT(sg_engine_connect_redis("redis://127.0.0.1:1/0", &cfg, &e), SG_ERR_REDIS);
    CHECK(e == NULL);
    EXPECT(sg_engine_connect_redis("not a url", &cfg, &e), SG_ERR_REDIS);
    sg_config bad = cfg;
    bad.hard_factor = 0.5;
    EXPECT(sg_engine_connect_redis("redis://127.0.0.1:1/0", &bad, &e), SG_ERR_POLICY);
    const char *url = getenv("SG_REDIS_URL");
    if (url == NULL) {
        return;
    }
    sg_engine *replicas[2] = {NULL, NULL};
    EXPECT(sg_engine_connect_redis(url, &cfg, &replicas[0]), SG_OK);
    EXPECT(sg_engine_connect_redis(url, &cfg, &replicas[1]), SG_OK);
    sg_request r;
    memset(&r, 0, sizeof r);
    r.account = (const uint8_t *)"acct";
    r.account_len = 4;
    r.model = (const uint8_t *)"model";
    r.model_len = 5;
    r.n = 1;
    int admitted[2] = {0, 0};
    /* Two seconds of requests, alternating replicas: the bucket holds 60 and refills 1 a second. */
    for (int i = 0; i < 2000; i++) {
        sg_decision d;
        int which = i % 2;
        EXPECT(sg_admit(replicas[which], &r, sg_now_ns(), &d), SG_OK);
        if (d.outcome == SG_ADMIT || d.outcome == SG_ADMIT_OVER_LIMIT) {
            admitted[which]++;
            sg_usage u = {0, 0, 0};
            EXPECT(sg_settle(replicas[which], &d.permit, &u, SG_COMPLETION_SUCCESS, sg_now_ns()), SG_OK);
        } else {
            CHECK(d.outcome == SG_REJECT_RATE_LIMITED);
        }
        struct timespec ms = {0, 1000000};
        nanosleep(&ms, NULL);
    }
    int total = admitted[0] + admitted[1];
    CHECK(total >= 60 && total <= 63);
    CHECK(admitted[0] > 0 && admitted[1] > 0);
    sg_engine_free(replicas[0]);
    sg_engine_free(replicas[1]);
}

static void test_result_strings(void) {
    for (uint32_t code = 0; code < CODES; code++) {
        const char *s = sg_result_str(code);
        CHECK(s != NULL && s[0] != '\0' && strcmp(s, "unknown result code") != 0);
        for (uint32_t other = 0; other < code; other++) {
            CHECK(strcmp(s, sg_result_str(other)) != 0); /* every code has its own text */
        }
    }
    CHECK(strcmp(sg_result_str(SG_OK), "ok") == 0);
    CHECK(strcmp(sg_result_str(CODES), "unknown result code") == 0);
    CHECK(strcmp(sg_result_str(9999), "unknown result code") == 0);
    CHECK(strcmp(sg_result_str(UINT32_MAX), "unknown result code") == 0);
}

static void test_config_and_lifecycle(void) {
    sg_config cfg;
    sg_engine *e = NULL;
    EXPECT(sg_config_default(&cfg), SG_OK);
    CHECK(cfg.preset == NULL && cfg.scopes == 0 && cfg.accounts == 0 && cfg.models == 0 && cfg.permits == 0);
    for (int m = 0; m < 4; m++) {
        CHECK(cfg.floor[m] == 0.0 && cfg.ceiling[m] == 0.0);
    }
    CHECK(cfg.hard_factor == 0.0 && cfg.max_wait_ns == 0 && cfg.permit_ttl_ns == 0 && cfg.seed == 0);
    CHECK(cfg.max_in_flight == 0);
    /* Every field 0: the defaults are a zero-initialised sg_config, byte for byte. */
    sg_config zero;
    memset(&zero, 0, sizeof zero);
    CHECK(memcmp(&zero, &cfg, sizeof cfg) == 0);

    /* Every preset, and NULL for the default. */
    const char *presets[] = {NULL, "fireworks_2024", "fireworks_2026", "together", "fixed"};
    for (size_t i = 0; i < sizeof presets / sizeof presets[0]; i++) {
        cfg.preset = presets[i];
        cfg.scopes = 64;
        e = NULL;
        EXPECT(sg_engine_new(&cfg, &e), SG_OK);
        CHECK(e != NULL);
        sg_engine_free(e);
    }

    /* Every failure sets *engine to NULL, whatever it held: never a stale handle to free. The
     * garbage is never dereferenced. */
    sg_engine *const garbage = (sg_engine *)(uintptr_t)0xDEADBEEF;
#define EXPECT_NO_ENGINE(config, expected) \
    do {                                    \
        e = garbage;                        \
        EXPECT(sg_engine_new(config, &e), expected); \
        CHECK(e == NULL);                   \
    } while (0)

    /* Bad preset names, including bytes that are not UTF-8. */
    const char *bad[] = {"no-such-preset", "", "FIXED", "fixed ", "\xff\xfe"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        cfg.preset = bad[i];
        EXPECT_NO_ENGINE(&cfg, SG_ERR_INVALID_ARGUMENT);
    }
    EXPECT_NO_ENGINE(NULL, SG_ERR_NULL);

    /* Unusable policies: every value out of its range, under every preset. */
    EXPECT(sg_config_default(&cfg), SG_OK);
    cfg.preset = "fixed";
    cfg.scopes = 64;
    cfg.floor[SG_METRIC_REQUESTS] = 0.5;
    EXPECT_NO_ENGINE(&cfg, SG_ERR_POLICY);
    cfg.floor[SG_METRIC_REQUESTS] = -1.0;
    EXPECT_NO_ENGINE(&cfg, SG_ERR_POLICY);
    cfg.floor[SG_METRIC_REQUESTS] = NAN;
    EXPECT_NO_ENGINE(&cfg, SG_ERR_POLICY);
    cfg.floor[SG_METRIC_REQUESTS] = -INFINITY;
    EXPECT_NO_ENGINE(&cfg, SG_ERR_POLICY);
    cfg.floor[SG_METRIC_REQUESTS] = 0.0;
    cfg.ceiling[SG_METRIC_GENERATED_TOKENS] = NAN;
    EXPECT_NO_ENGINE(&cfg, SG_ERR_POLICY);
    cfg.ceiling[SG_METRIC_GENERATED_TOKENS] = 0.0;
    cfg.hard_factor = 0.5;
    EXPECT_NO_ENGINE(&cfg, SG_ERR_POLICY);
    cfg.hard_factor = -2.0;
    EXPECT_NO_ENGINE(&cfg, SG_ERR_POLICY);
    cfg.hard_factor = NAN;
    EXPECT_NO_ENGINE(&cfg, SG_ERR_POLICY);
    cfg.hard_factor = INFINITY;
    EXPECT_NO_ENGINE(&cfg, SG_ERR_POLICY);
    cfg.hard_factor = 0.0;
    cfg.max_wait_ns = 1000000 * SEC; /* longer than the longest horizon */
    EXPECT_NO_ENGINE(&cfg, SG_ERR_POLICY);
    cfg.max_wait_ns = 0;
    cfg.preset = NULL; /* fireworks_2024 floors at 60 RPM: a ceiling of 10 is below it */
    cfg.ceiling[SG_METRIC_REQUESTS] = 10.0;
    EXPECT_NO_ENGINE(&cfg, SG_ERR_POLICY);
    cfg.ceiling[SG_METRIC_REQUESTS] = 0.0;
    /* A floor above its ceiling is refused under every preset (C has no order of overrides:
     * both are resolved together). */
    const char *presets_too[] = {NULL, "fireworks_2026", "together", "fixed"};
    for (size_t i = 0; i < sizeof presets_too / sizeof presets_too[0]; i++) {
        cfg.preset = presets_too[i];
        cfg.floor[SG_METRIC_PROMPT_TOKENS] = 100000.0;
        cfg.ceiling[SG_METRIC_PROMPT_TOKENS] = 99999.0;
        EXPECT_NO_ENGINE(&cfg, SG_ERR_POLICY);
        cfg.ceiling[SG_METRIC_PROMPT_TOKENS] = 100000.0; /* equal is a fixed limit */
        e = garbage;
        EXPECT(sg_engine_new(&cfg, &e), SG_OK);
        CHECK(e != NULL && e != garbage);
        sg_engine_free(e);
        cfg.floor[SG_METRIC_PROMPT_TOKENS] = cfg.ceiling[SG_METRIC_PROMPT_TOKENS] = 0.0;
    }
    cfg.preset = NULL;
    cfg.permit_ttl_ns = SEC / 2; /* a permit TTL must be at least a second */
    EXPECT_NO_ENGINE(&cfg, SG_ERR_POLICY);
    cfg.permit_ttl_ns = SEC - 1;
    EXPECT_NO_ENGINE(&cfg, SG_ERR_POLICY);
    cfg.permit_ttl_ns = SEC;
    cfg.scopes = 64;
    e = NULL;
    EXPECT(sg_engine_new(&cfg, &e), SG_OK);
    CHECK(e != NULL);
    sg_engine_free(e);

    /* Capacities beyond the tables' limits (nothing is allocated for these). */
    EXPECT(sg_config_default(&cfg), SG_OK);
    cfg.models = 4097;
    EXPECT_NO_ENGINE(&cfg, SG_ERR_BAD_CAPACITY);
    cfg.models = 0;
    cfg.accounts = (1ULL << 24) + 1;
    EXPECT_NO_ENGINE(&cfg, SG_ERR_BAD_CAPACITY);
    cfg.accounts = 0;
    cfg.permits = 1ULL << 23;
    EXPECT_NO_ENGINE(&cfg, SG_ERR_BAD_CAPACITY);
    cfg.permits = 0;
    cfg.scopes = 1ULL << 32;
    EXPECT_NO_ENGINE(&cfg, SG_ERR_BAD_CAPACITY);
#undef EXPECT_NO_ENGINE

    sg_engine_free(NULL); /* a no-op */
    uint64_t a = sg_now_ns(), b = sg_now_ns();
    CHECK(b >= a);
}

/* The "fixed" preset: 60 requests/min, a burst of exactly 60, one more per second. */
static void test_fixed_limits(void) {
    sg_engine *e = engine_with("fixed", 1000);
    sg_request r = request("fixed", 100, 10);
    sg_decision d[61];
    for (int i = 0; i < 60; i++) {
        EXPECT(sg_admit(e, &r, 0, &d[i]), SG_OK);
        CHECK(d[i].outcome == SG_ADMIT && d[i].over_limit == 0 && d[i].wait_ns == 0);
    }
    CHECK(d[0].cost[SG_METRIC_REQUESTS] == 1 && d[0].cost[SG_METRIC_PROMPT_TOKENS] == 100);
    CHECK(d[0].cost[SG_METRIC_UNCACHED_PROMPT_TOKENS] == 100 && d[0].cost[SG_METRIC_GENERATED_TOKENS] == 10);
    EXPECT(sg_admit(e, &r, 0, &d[60]), SG_OK);
    CHECK(d[60].outcome == SG_REJECT_RATE_LIMITED && d[60].metric == SG_METRIC_REQUESTS);
    CHECK(d[60].retry_after_ns == SEC && d[60].too_large == 0);

    sg_levels l;
    EXPECT(sg_decision_levels(&d[0], &l), SG_OK);
    CHECK(l.limit[SG_METRIC_REQUESTS] == 60 && l.remaining[SG_METRIC_REQUESTS] == 59);
    CHECK(l.limit[SG_METRIC_PROMPT_TOKENS] == 60000 && l.limit[SG_METRIC_GENERATED_TOKENS] == 6000);
    EXPECT(sg_decision_levels(&d[60], &l), SG_OK);
    CHECK(l.remaining[SG_METRIC_REQUESTS] == 0);
    for (int i = 0; i < 60; i++) {
        settle_if_admitted(e, &d[i], 0);
    }

    /* Each simulated second refills exactly one request. */
    for (uint64_t s = 1; s <= 3; s++) {
        sg_decision one, two;
        EXPECT(sg_admit(e, &r, s * SEC, &one), SG_OK);
        EXPECT(sg_admit(e, &r, s * SEC, &two), SG_OK);
        CHECK(one.outcome == SG_ADMIT && two.outcome == SG_REJECT_RATE_LIMITED);
        settle_if_admitted(e, &one, s * SEC);
    }

    /* n choices cost n requests and n x max_tokens generated tokens; cached tokens are not
     * uncached ones. */
    sg_request choices = request("choices", 100, 10);
    choices.n = 2;
    choices.cached_tokens = 40;
    sg_decision c;
    EXPECT(sg_admit(e, &choices, 0, &c), SG_OK);
    CHECK(c.outcome == SG_ADMIT && c.cost[SG_METRIC_REQUESTS] == 2 && c.cost[SG_METRIC_PROMPT_TOKENS] == 100);
    CHECK(c.cost[SG_METRIC_UNCACHED_PROMPT_TOKENS] == 60 && c.cost[SG_METRIC_GENERATED_TOKENS] == 20);
    settle_if_admitted(e, &c, 0);
    sg_engine_free(e);

    /* A floor of 600 under "fixed" is a limit of 600 a minute: retry after 100 ms. */
    sg_config cfg;
    EXPECT(sg_config_default(&cfg), SG_OK);
    cfg.preset = "fixed";
    cfg.scopes = 1000;
    cfg.floor[SG_METRIC_REQUESTS] = 600.0;
    e = NULL;
    EXPECT(sg_engine_new(&cfg, &e), SG_OK);
    sg_request small = request("six-hundred", 0, 0);
    int count = 0;
    sg_decision x;
    for (int i = 0; i < 601; i++) {
        EXPECT(sg_admit(e, &small, 0, &x), SG_OK);
        count += x.outcome == SG_ADMIT;
        settle_if_admitted(e, &x, 0);
    }
    CHECK(count == 600 && x.outcome == SG_REJECT_RATE_LIMITED && x.retry_after_ns == SEC / 10);
    sg_engine_free(e);
}

/* What a burst of 64 one-request calls on one scope at t = 0 gets. */
typedef struct {
    int admitted, waited, refused;
} burst_counts;

static burst_counts burst(const sg_config *cfg) {
    burst_counts c = {0, 0, 0};
    sg_engine *e = NULL;
    EXPECT(sg_engine_new(cfg, &e), SG_OK);
    CHECK(e != NULL);
    sg_request r = request("burst", 10, 10);
    for (int i = 0; i < 64; i++) {
        sg_decision d;
        EXPECT(sg_admit(e, &r, 0, &d), SG_OK);
        if (admitted(&d)) {
            c.admitted++;
            c.waited += d.wait_ns > 0; /* smoothing: forward after wait_ns */
            settle_if_admitted(e, &d, d.wait_ns);
        } else {
            CHECK(d.outcome == SG_REJECT_RATE_LIMITED && d.metric == SG_METRIC_REQUESTS);
            c.refused++;
        }
    }
    sg_engine_free(e);
    return c;
}

/* Issue 22: zero keeps the preset's value in EVERY sg_config field. "together" smooths bursts
 * with waits of up to 2 s; a zero max_wait_ns used to mean "no wait" (60 admitted, 0 waits, 4
 * refused) while sg_config_default kept the preset's (62 admitted, 2 of them after a wait). */
static void test_zero_fields_keep_the_preset(void) {
    sg_config zero, def;
    memset(&zero, 0, sizeof zero);
    zero.preset = "together";
    EXPECT(sg_config_default(&def), SG_OK);
    def.preset = "together";
    burst_counts z = burst(&zero), d = burst(&def);
    printf("together, 64 requests at once: zero-initialised sg_config %d admitted (%d after a wait), %d refused; "
           "sg_config_default %d admitted (%d after a wait), %d refused\n",
           z.admitted, z.waited, z.refused, d.admitted, d.waited, d.refused);
    CHECK(d.admitted == 62 && d.waited == 2 && d.refused == 2); /* 60 at once, 1 s and 2 s later */
    CHECK(z.admitted == d.admitted && z.waited == d.waited && z.refused == d.refused);

    /* SG_MAX_WAIT_OFF turns smoothing off; any other value is the longest wait. */
    zero.max_wait_ns = SG_MAX_WAIT_OFF;
    burst_counts off = burst(&zero);
    CHECK(off.admitted == 60 && off.waited == 0 && off.refused == 4);
    zero.max_wait_ns = 3 * SEC;
    burst_counts three = burst(&zero);
    CHECK(three.admitted == 63 && three.waited == 3 && three.refused == 1);
    zero.max_wait_ns = 0;

    /* The other zero fields keep the preset's too: the permit TTL is 15 minutes, ... */
    sg_engine *e = NULL;
    sg_decision x;
    sg_usage u = usage(10, 0, 10);
    sg_request r = request("ttl", 10, 10);
    const uint64_t MIN = 60 * SEC;
    EXPECT(sg_engine_new(&zero, &e), SG_OK);
    EXPECT(sg_admit(e, &r, 0, &x), SG_OK);
    EXPECT(sg_settle(e, &x.permit, &u, SG_COMPLETION_SUCCESS, 16 * MIN), SG_ERR_PERMIT_EXPIRED);
    /* ... the limits are the preset's (60 RPM, 60,000 prompt TPM, 6,000 generated TPM) ... */
    sg_levels l;
    EXPECT(sg_limits(e, KEY("fresh"), KEY(MODEL), 0, 0, &l), SG_OK);
    CHECK(l.limit[SG_METRIC_REQUESTS] == 60 && l.limit[SG_METRIC_PROMPT_TOKENS] == 60000);
    CHECK(l.limit[SG_METRIC_GENERATED_TOKENS] == 6000);
    /* ... and the hard factor is the preset's 1: no over-limit band. */
    for (int i = 0; i < 62; i++) {
        EXPECT(sg_admit(e, &r, 20 * MIN, &x), SG_OK);
        CHECK(x.outcome != SG_ADMIT_OVER_LIMIT);
        settle_if_admitted(e, &x, 20 * MIN + x.wait_ns);
    }
    sg_engine_free(e);

    /* SG_PERMIT_TTL_NEVER: a permit settles ten years later. */
    zero.permit_ttl_ns = SG_PERMIT_TTL_NEVER;
    EXPECT(sg_engine_new(&zero, &e), SG_OK);
    EXPECT(sg_admit(e, &r, 0, &x), SG_OK);
    CHECK(admitted(&x));
    EXPECT(sg_settle(e, &x.permit, &u, SG_COMPLETION_SUCCESS, 10 * 365 * 24 * 60 * MIN), SG_OK);
    sg_engine_free(e);
}

/* INFINITY in sg_config.floor turns a metric off under any preset; under "fixed", the floors
 * set are the only limits enforced. An off metric reads SG_UNLIMITED in sg_levels. */
static void check_off(const sg_levels *l, int metric) {
    CHECK(l->limit[metric] == SG_UNLIMITED && l->remaining[metric] == SG_UNLIMITED && l->reset_ns[metric] == 0);
}

static void test_off_and_fixed_enforcing_only_what_is_set(void) {
    const char *presets[] = {NULL, "fireworks_2026", "together", "fixed"};
    for (size_t i = 0; i < sizeof presets / sizeof presets[0]; i++) {
        sg_config cfg;
        EXPECT(sg_config_default(&cfg), SG_OK);
        cfg.preset = presets[i];
        cfg.scopes = 64;
        cfg.floor[SG_METRIC_GENERATED_TOKENS] = INFINITY;
        sg_engine *e = NULL;
        EXPECT(sg_engine_new(&cfg, &e), SG_OK);
        /* Far more than any preset's generated tokens, even over its limit: admitted. */
        sg_request r = request("no-generated-limit", 10, 100000000);
        sg_decision d;
        EXPECT(sg_admit(e, &r, 0, &d), SG_OK);
        CHECK(d.outcome == SG_ADMIT && d.cost[SG_METRIC_GENERATED_TOKENS] == 100000000);
        sg_levels l;
        EXPECT(sg_decision_levels(&d, &l), SG_OK);
        check_off(&l, SG_METRIC_GENERATED_TOKENS);
        settle_if_admitted(e, &d, 0);
        EXPECT(sg_limits(e, KEY("no-generated-limit"), KEY(MODEL), 0, 0, &l), SG_OK);
        check_off(&l, SG_METRIC_GENERATED_TOKENS);
        /* Adapting presets keep their other limits (fireworks_2026 has none on requests).
         * Under "fixed", naming a limit enforces only the limits named (below). */
        if (i == 1) {
            check_off(&l, SG_METRIC_REQUESTS);
        } else if (i != 3) {
            CHECK(l.limit[SG_METRIC_REQUESTS] == 60 && l.remaining[SG_METRIC_REQUESTS] == 59);
        }
        if (i != 3) CHECK(l.limit[SG_METRIC_PROMPT_TOKENS] != SG_UNLIMITED);
        sg_engine_free(e);
    }

    /* "fixed" with only floor[SG_METRIC_REQUESTS] = 5: only requests are limited. */
    sg_config cfg;
    EXPECT(sg_config_default(&cfg), SG_OK);
    cfg.preset = "fixed";
    cfg.scopes = 64;
    cfg.floor[SG_METRIC_REQUESTS] = 5.0;
    sg_engine *e = NULL;
    EXPECT(sg_engine_new(&cfg, &e), SG_OK);
    sg_request huge = request("only-requests", 100000000, 100000000);
    sg_decision d;
    for (int i = 0; i < 5; i++) {
        EXPECT(sg_admit(e, &huge, 0, &d), SG_OK);
        CHECK(d.outcome == SG_ADMIT);
        settle_if_admitted(e, &d, 0);
    }
    EXPECT(sg_admit(e, &huge, 0, &d), SG_OK);
    CHECK(d.outcome == SG_REJECT_RATE_LIMITED && d.metric == SG_METRIC_REQUESTS && d.retry_after_ns == 12 * SEC);
    sg_levels l;
    EXPECT(sg_limits(e, KEY("only-requests"), KEY(MODEL), 0, 0, &l), SG_OK);
    CHECK(l.limit[SG_METRIC_REQUESTS] == 5 && l.remaining[SG_METRIC_REQUESTS] == 0);
    check_off(&l, SG_METRIC_PROMPT_TOKENS);
    check_off(&l, SG_METRIC_UNCACHED_PROMPT_TOKENS);
    check_off(&l, SG_METRIC_GENERATED_TOKENS);
    sg_engine_free(e);

    /* A ceiling of INFINITY is no ceiling: the limit starts at the preset's floor. */
    EXPECT(sg_config_default(&cfg), SG_OK);
    cfg.preset = NULL;
    cfg.scopes = 64;
    cfg.ceiling[SG_METRIC_REQUESTS] = INFINITY;
    EXPECT(sg_engine_new(&cfg, &e), SG_OK);
    EXPECT(sg_limits(e, KEY("any"), KEY(MODEL), 0, 0, &l), SG_OK);
    CHECK(l.limit[SG_METRIC_REQUESTS] == 60);
    sg_engine_free(e);
}

static void test_admit_settle_charge_cancel(void) {
    sg_engine *e = engine_with("fixed", 1000);
    sg_request r = request("acct", 1000, 3000);
    sg_decision d;
    EXPECT(sg_admit(e, &r, 0, &d), SG_OK);
    CHECK(d.outcome == SG_ADMIT && d.cost[SG_METRIC_GENERATED_TOKENS] == 3000);
    sg_levels l;
    EXPECT(sg_decision_levels(&d, &l), SG_OK);
    CHECK(l.remaining[SG_METRIC_GENERATED_TOKENS] == 3000);

    /* A stream that goes 500 tokens past its reservation is charged as it goes. */
    EXPECT(sg_charge(e, &d.permit, 3500, 0), SG_OK);
    EXPECT(sg_charge(e, &d.permit, UINT64_MAX, 0), SG_ERR_INVALID_USAGE);

    sg_usage u = usage(1000, 0, 3500);
    EXPECT(sg_settle(e, &d.permit, &u, 3, 0), SG_ERR_INVALID_ARGUMENT); /* no such completion */
    EXPECT(sg_settle(e, &d.permit, &u, UINT32_MAX, 0), SG_ERR_INVALID_ARGUMENT);
    u.cached_tokens = 2000; /* more cached than prompt tokens */
    EXPECT(sg_settle(e, &d.permit, &u, SG_COMPLETION_SUCCESS, 0), SG_ERR_INVALID_USAGE);
    u.cached_tokens = 0;
    EXPECT(sg_settle(e, &d.permit, &u, SG_COMPLETION_SUCCESS, 0), SG_OK);
    EXPECT(sg_settle(e, &d.permit, &u, SG_COMPLETION_SUCCESS, 0), SG_ERR_ALREADY_SETTLED);
    EXPECT(sg_cancel(e, &d.permit, &u, 0), SG_ERR_ALREADY_SETTLED);
    EXPECT(sg_charge(e, &d.permit, 1, 0), SG_ERR_ALREADY_SETTLED);

    EXPECT(sg_limits(e, KEY("acct"), KEY(MODEL), 0, 0, &l), SG_OK);
    CHECK(l.remaining[SG_METRIC_GENERATED_TOKENS] == 2500 && l.remaining[SG_METRIC_REQUESTS] == 59);
    /* sg_limits does not create a scope: an unseen one is full. */
    EXPECT(sg_limits(e, KEY("unseen"), KEY(MODEL), 1, 0, &l), SG_OK);
    CHECK(l.remaining[SG_METRIC_REQUESTS] == 60);

    /* The other completions, and sg_cancel. */
    uint32_t completions[] = {SG_COMPLETION_UPSTREAM_FAILURE, SG_COMPLETION_CANCELLED};
    for (int i = 0; i < 2; i++) {
        sg_request small = request("acct", 10, 100);
        EXPECT(sg_admit(e, &small, 0, &d), SG_OK);
        CHECK(d.outcome == SG_ADMIT);
        u = usage(10, 0, 5);
        EXPECT(sg_settle(e, &d.permit, &u, completions[i], 0), SG_OK);
        EXPECT(sg_settle(e, &d.permit, &u, completions[i], 0), SG_ERR_ALREADY_SETTLED);
    }
    sg_request small = request("acct", 10, 100);
    EXPECT(sg_admit(e, &small, 0, &d), SG_OK);
    u = usage(10, 0, 10);
    EXPECT(sg_cancel(e, &d.permit, &u, 0), SG_OK);
    EXPECT(sg_cancel(e, &d.permit, &u, 0), SG_ERR_ALREADY_SETTLED);
    EXPECT(sg_settle(e, &d.permit, &u, SG_COMPLETION_SUCCESS, 0), SG_ERR_ALREADY_SETTLED);

    /* A forged permit is refused, never trusted. */
    sg_permit forged;
    memset(&forged, 0xAB, sizeof forged);
    EXPECT(sg_settle(e, &forged, &u, SG_COMPLETION_SUCCESS, 0), SG_ERR_STALE_PERMIT);
    EXPECT(sg_charge(e, &forged, 1, 0), SG_ERR_STALE_PERMIT);
    memset(&forged, 0, sizeof forged);
    EXPECT(sg_cancel(e, &forged, &u, 0), SG_ERR_STALE_PERMIT);
    sg_engine_free(e);
}

static void test_outcomes(void) {
    sg_engine *e = engine_with(NULL, 1000); /* fireworks_2024: 60 RPM, over-limit up to 120 */
    sg_decision d[121];
    sg_request r = request("burst", 10, 10);
    int admit = 0, over = 0, limited = 0;
    for (int i = 0; i < 121; i++) {
        EXPECT(sg_admit(e, &r, 0, &d[i]), SG_OK);
        admit += d[i].outcome == SG_ADMIT;
        over += d[i].outcome == SG_ADMIT_OVER_LIMIT && d[i].over_limit == 1;
        limited += d[i].outcome == SG_REJECT_RATE_LIMITED;
    }
    CHECK(admit == 60 && over == 60 && limited == 1);
    CHECK(d[120].metric == SG_METRIC_REQUESTS && d[120].retry_after_ns > 0 && d[120].too_large == 0);
    for (int i = 0; i < 121; i++) {
        settle_if_admitted(e, &d[i], 0);
    }

    sg_decision x;
    sg_request big = request("big", 10000000, 0); /* more than 2 x 60,000 prompt tokens */
    EXPECT(sg_admit(e, &big, 0, &x), SG_OK);
    CHECK(x.outcome == SG_REJECT_RATE_LIMITED && x.too_large == 1);
    CHECK(x.metric == SG_METRIC_PROMPT_TOKENS || x.metric == SG_METRIC_UNCACHED_PROMPT_TOKENS);

    sg_request invalid = request("invalid", 10, 10);
    invalid.n = 0;
    EXPECT(sg_admit(e, &invalid, 0, &x), SG_OK);
    CHECK(x.outcome == SG_REJECT_INVALID && x.reason == 0);
    invalid = request("invalid", 10, 10);
    invalid.cached_tokens = 11;
    EXPECT(sg_admit(e, &invalid, 0, &x), SG_OK);
    CHECK(x.outcome == SG_REJECT_INVALID && x.reason == 1);
    invalid = request("invalid", 10, UINT64_MAX / 2);
    invalid.n = 3;
    EXPECT(sg_admit(e, &invalid, 0, &x), SG_OK);
    CHECK(x.outcome == SG_REJECT_INVALID && x.reason == 2);

    /* Shedding: a load signal, then a load derived from permits in flight. */
    EXPECT(sg_set_load(e, KEY(MODEL), 0, 1500), SG_OK);
    sg_request fresh = request("fresh", 10, 10);
    EXPECT(sg_admit(e, &fresh, 0, &x), SG_OK);
    CHECK(x.outcome == SG_SHED && x.load == 1500 && x.retry_after_ns > 0);
    EXPECT(sg_set_load(e, KEY(MODEL), 0, 0), SG_OK);
    EXPECT(sg_admit(e, &fresh, 0, &x), SG_OK);
    CHECK(x.outcome == SG_ADMIT);
    settle_if_admitted(e, &x, 0);

    EXPECT(sg_set_model_capacity(e, KEY("small-model"), 1, 1), SG_OK);
    sg_request fast = request("fresh", 10, 10);
    fast.model = (const uint8_t *)"small-model";
    fast.model_len = strlen("small-model");
    fast.fast = 1;
    sg_decision first, second;
    EXPECT(sg_admit(e, &fast, 0, &first), SG_OK);
    CHECK(first.outcome == SG_ADMIT);
    EXPECT(sg_admit(e, &fast, 0, &second), SG_OK); /* one in flight of a capacity of one */
    CHECK(second.outcome == SG_SHED && second.load >= 1000);
    settle_if_admitted(e, &first, 0);
    EXPECT(sg_admit(e, &fast, 0, &second), SG_OK);
    CHECK(second.outcome == SG_ADMIT);
    settle_if_admitted(e, &second, 0);
    EXPECT(sg_set_model_capacity(e, KEY("small-model"), 1, 0), SG_OK);
    sg_engine_free(e);
}

/* Service tiers (SPEC §6): six classes shed in order; the account's grant caps the tier asked. */
static void test_service_tiers(void) {
    sg_engine *e = engine_with(NULL, 1000); /* fireworks_2024 */
    sg_account a;
    sg_decision x;
    sg_request r = request("tiers", 10, 10);

    EXPECT(sg_account_get(e, KEY("tiers"), &a), SG_ERR_UNKNOWN_ACCOUNT);
    EXPECT(sg_set_service_tier_grant(e, KEY("tiers"), 3), SG_ERR_INVALID_ARGUMENT);
    EXPECT(sg_set_service_tier_grant(e, NULL, 0, SG_SERVICE_TIER_FLEX), SG_ERR_EMPTY_KEY);

    /* In-limit default is shed at 1.0, in-limit priority at 1.2. Never granted: asking for
     * priority is served at default. */
    EXPECT(sg_set_load(e, KEY(MODEL), 0, 1000), SG_OK);
    r.service_tier = SG_SERVICE_TIER_PRIORITY;
    EXPECT(sg_admit(e, &r, 0, &x), SG_OK);
    CHECK(x.outcome == SG_SHED);
    EXPECT(sg_set_service_tier_grant(e, KEY("tiers"), SG_SERVICE_TIER_PRIORITY), SG_OK);
    EXPECT(sg_account_get(e, KEY("tiers"), &a), SG_OK);
    CHECK(a.service_tier_grant == SG_SERVICE_TIER_PRIORITY);
    EXPECT(sg_admit(e, &r, 0, &x), SG_OK);
    CHECK(x.outcome == SG_ADMIT);
    settle_if_admitted(e, &x, 0);
    /* Asking below the grant is served as asked: default and flex are shed at 1.0. */
    r.service_tier = SG_SERVICE_TIER_DEFAULT;
    EXPECT(sg_admit(e, &r, 0, &x), SG_OK);
    CHECK(x.outcome == SG_SHED);
    /* In-limit flex at 0.7 is shed, at 0.69 runs. */
    r.service_tier = SG_SERVICE_TIER_FLEX;
    EXPECT(sg_set_load(e, KEY(MODEL), 0, 700), SG_OK);
    EXPECT(sg_admit(e, &r, 0, &x), SG_OK);
    CHECK(x.outcome == SG_SHED);
    EXPECT(sg_set_load(e, KEY(MODEL), 0, 699), SG_OK);
    EXPECT(sg_admit(e, &r, 0, &x), SG_OK);
    CHECK(x.outcome == SG_ADMIT);
    settle_if_admitted(e, &x, 0);
    /* A flex grant caps a priority ask at flex. */
    EXPECT(sg_set_service_tier_grant(e, KEY("tiers"), SG_SERVICE_TIER_FLEX), SG_OK);
    EXPECT(sg_set_load(e, KEY(MODEL), 0, 700), SG_OK);
    r.service_tier = SG_SERVICE_TIER_PRIORITY;
    EXPECT(sg_admit(e, &r, 0, &x), SG_OK);
    CHECK(x.outcome == SG_SHED);
    /* An unknown tier is an argument error that charges nothing. */
    EXPECT(sg_set_load(e, KEY(MODEL), 0, 0), SG_OK);
    sg_levels before, after;
    EXPECT(sg_limits(e, KEY("tiers"), KEY(MODEL), 0, 0, &before), SG_OK);
    r.service_tier = 3;
    EXPECT(sg_admit(e, &r, 0, &x), SG_ERR_INVALID_ARGUMENT);
    r.service_tier = UINT32_MAX;
    EXPECT(sg_admit(e, &r, 0, &x), SG_ERR_INVALID_ARGUMENT);
    EXPECT(sg_limits(e, KEY("tiers"), KEY(MODEL), 0, 0, &after), SG_OK);
    CHECK(memcmp(before.remaining, after.remaining, sizeof before.remaining) == 0);
    sg_engine_free(e);

    /* The thresholds are configurable: in-limit default shed at 0.5 instead of 1.0. */
    sg_config cfg;
    EXPECT(sg_config_default(&cfg), SG_OK);
    cfg.scopes = 1000;
    for (int i = 0; i < 5; i++) {
        cfg.shed_permille[i] = 100 * (uint32_t)(i + 1);
    }
    sg_engine *custom = NULL;
    EXPECT(sg_engine_new(&cfg, &custom), SG_OK);
    sg_request plain = request("plain", 10, 10);
    EXPECT(sg_set_load(custom, KEY(MODEL), 0, 500), SG_OK);
    EXPECT(sg_admit(custom, &plain, 0, &x), SG_OK);
    CHECK(x.outcome == SG_SHED);
    EXPECT(sg_set_load(custom, KEY(MODEL), 0, 499), SG_OK);
    EXPECT(sg_admit(custom, &plain, 0, &x), SG_OK);
    CHECK(x.outcome == SG_ADMIT);
    settle_if_admitted(custom, &x, 0);
    sg_engine_free(custom);
    cfg.shed_permille[4] = 1300; /* above in-limit priority's 1200: out of order */
    EXPECT(sg_engine_new(&cfg, &custom), SG_ERR_POLICY);
    CHECK(custom == NULL);
}

/* Metrics (SPEC §12): the Prometheus text, sized by a first call, counting what was done. */
static void test_metrics(void) {
    sg_engine *e = engine_with("fixed", 1000); /* 60 requests a minute */
    sg_request r = request("metered", 10, 10);
    sg_decision d;
    for (int i = 0; i < 61; i++) {
        EXPECT(sg_admit(e, &r, 0, &d), SG_OK);
        if (d.outcome == SG_ADMIT) {
            sg_usage used = {10, 0, 5};
            EXPECT(sg_settle(e, &d.permit, &used, SG_COMPLETION_SUCCESS, 0), SG_OK);
        }
    }
    size_t needed = 0;
    EXPECT(sg_metrics_render(e, NULL, 0, &needed), SG_ERR_BUFFER_TOO_SMALL);
    CHECK(needed > 100);
    char *text = (char *)malloc(needed + 1);
    CHECK(text != NULL);
    size_t written = 0;
    EXPECT(sg_metrics_render(e, (uint8_t *)text, needed - 1, &written), SG_ERR_BUFFER_TOO_SMALL);
    CHECK(written == needed);
    EXPECT(sg_metrics_render(e, (uint8_t *)text, needed, &written), SG_OK);
    CHECK(written == needed);
    text[written] = '\0';
    CHECK(strstr(text, "# TYPE sluicegate_requests_total counter\n") != NULL);
    CHECK(strstr(text, "sluicegate_requests_total{model=\"llama-v3p1-70b\",variant=\"regular\","
                       "service_tier=\"default\",outcome=\"admitted\"} 60\n") != NULL);
    CHECK(strstr(text, "sluicegate_rate_limited_total{model=\"llama-v3p1-70b\",variant=\"regular\","
                       "service_tier=\"default\",metric=\"requests\"} 1\n") != NULL);
    CHECK(strstr(text, "sluicegate_permits_ended_total{model=\"llama-v3p1-70b\",variant=\"regular\","
                       "service_tier=\"default\",completion=\"success\"} 60\n") != NULL);
    CHECK(strstr(text, "sluicegate_in_flight{model=\"llama-v3p1-70b\",variant=\"regular\"} 0\n") != NULL);
    free(text);
    EXPECT(sg_metrics_render(NULL, NULL, 0, &written), SG_ERR_NULL);
    EXPECT(sg_metrics_render(e, NULL, 0, NULL), SG_ERR_NULL);
    EXPECT(sg_metrics_render(e, NULL, 16, &written), SG_ERR_NULL);
    sg_engine_free(e);
}

static void test_keys_and_tables(void) {
    sg_engine *e = engine_with("fixed", 1000);
    sg_decision d;
    sg_levels l;
    sg_account a;
    sg_price p;
    memset(&p, 0, sizeof p);
    uint32_t used = 0, limit = 0;
    char key[200];
    memset(key, 'k', sizeof key);

    /* Empty keys, as "" and as NULL with length 0. */
    sg_request empty = request("", 10, 10);
    EXPECT(sg_admit(e, &empty, 0, &d), SG_ERR_EMPTY_KEY);
    empty.account = NULL;
    EXPECT(sg_admit(e, &empty, 0, &d), SG_ERR_EMPTY_KEY);
    empty = request("acct", 10, 10);
    empty.model_len = 0;
    EXPECT(sg_admit(e, &empty, 0, &d), SG_ERR_EMPTY_KEY);
    EXPECT(sg_limits(e, NULL, 0, KEY(MODEL), 0, 0, &l), SG_ERR_EMPTY_KEY);
    EXPECT(sg_limits(e, KEY("acct"), NULL, 0, 0, 0, &l), SG_ERR_EMPTY_KEY);
    EXPECT(sg_account_get(e, NULL, 0, &a), SG_ERR_EMPTY_KEY);
    EXPECT(sg_add_credits(e, NULL, 0, 1), SG_ERR_EMPTY_KEY);
    EXPECT(sg_set_payment_method(e, NULL, 0, 1), SG_ERR_EMPTY_KEY);
    EXPECT(sg_set_spend_limit(e, NULL, 0, 1), SG_ERR_EMPTY_KEY);
    EXPECT(sg_set_suspended(e, NULL, 0, SG_SUSPENSION_OPERATOR, 1), SG_ERR_EMPTY_KEY);
    EXPECT(sg_set_tier(e, NULL, 0, SG_TIER2, 0), SG_ERR_EMPTY_KEY);
    EXPECT(sg_set_limits_override(e, NULL, 0, SG_METRIC_REQUESTS, 10, 20, 0), SG_ERR_EMPTY_KEY);
    EXPECT(sg_quota_acquire(e, NULL, 0, SG_QUOTA_A100_GPUS, 1, &used, &limit), SG_ERR_EMPTY_KEY);
    EXPECT(sg_quota_release(e, NULL, 0, SG_QUOTA_A100_GPUS, 1, &used, &limit), SG_ERR_EMPTY_KEY);
    EXPECT(sg_quota_set_limit(e, NULL, 0, SG_QUOTA_A100_GPUS, 1, &used, &limit), SG_ERR_EMPTY_KEY);
    EXPECT(sg_set_price(e, NULL, 0, 0, &p), SG_ERR_EMPTY_KEY);
    EXPECT(sg_set_load(e, NULL, 0, 0, 10), SG_ERR_EMPTY_KEY);
    EXPECT(sg_set_model_capacity(e, NULL, 0, 0, 10), SG_ERR_EMPTY_KEY);

    /* Account keys up to 64 bytes, model keys up to 128. */
    sg_request r = request("acct", 10, 10);
    r.account = (const uint8_t *)key;
    r.account_len = 64;
    EXPECT(sg_admit(e, &r, 0, &d), SG_OK);
    settle_if_admitted(e, &d, 0);
    r.account_len = 65;
    EXPECT(sg_admit(e, &r, 0, &d), SG_ERR_KEY_TOO_LONG);
    EXPECT(sg_limits(e, (const uint8_t *)key, 65, KEY(MODEL), 0, 0, &l), SG_ERR_KEY_TOO_LONG);
    EXPECT(sg_add_credits(e, (const uint8_t *)key, 65, 1), SG_ERR_KEY_TOO_LONG);
    EXPECT(sg_account_get(e, (const uint8_t *)key, sizeof key, &a), SG_ERR_KEY_TOO_LONG);
    r = request("acct", 10, 10);
    r.model = (const uint8_t *)key;
    r.model_len = 128;
    EXPECT(sg_admit(e, &r, 0, &d), SG_OK);
    settle_if_admitted(e, &d, 0);
    r.model_len = 129;
    EXPECT(sg_admit(e, &r, 0, &d), SG_ERR_KEY_TOO_LONG);
    EXPECT(sg_set_load(e, (const uint8_t *)key, 129, 0, 10), SG_ERR_KEY_TOO_LONG);
    EXPECT(sg_set_price(e, (const uint8_t *)key, 129, 0, &p), SG_ERR_KEY_TOO_LONG);
    sg_engine_free(e);

    /* Tiny tables fill up: two accounts, then one model. */
    sg_engine *tiny = engine_with("fixed", 2);
    sg_result last = SG_OK;
    int fitted = 0;
    for (int i = 0; i < 200 && last == SG_OK; i++) {
        char name[16];
        snprintf(name, sizeof name, "a%d", i);
        sg_request t = request(name, 1, 1);
        last = sg_admit(tiny, &t, 0, &d);
        if (last == SG_OK) {
            fitted++;
            settle_if_admitted(tiny, &d, 0);
        }
    }
    EXPECT(last, SG_ERR_TABLE_FULL);
    CHECK(fitted >= 1 && fitted <= 2);
    EXPECT(sg_add_credits(tiny, KEY("one-account-too-many"), 1), SG_ERR_TABLE_FULL);
    sg_engine_free(tiny);

    sg_config cfg;
    EXPECT(sg_config_default(&cfg), SG_OK);
    cfg.preset = "fixed";
    cfg.scopes = 64;
    cfg.models = 1;
    sg_engine *one_model = NULL;
    EXPECT(sg_engine_new(&cfg, &one_model), SG_OK);
    /* model-a holds a load signal, something worth keeping (SPEC 1: a model that holds nothing
     * may be reclaimed for a new key; a full table refuses only new keys). */
    EXPECT(sg_set_load(one_model, KEY("model-a"), 0, 10), SG_OK);
    EXPECT(sg_set_load(one_model, KEY("model-b"), 0, 0), SG_ERR_TABLE_FULL);
    EXPECT(sg_set_price(one_model, KEY("model-b"), 0, &p), SG_ERR_TABLE_FULL);
    sg_engine_free(one_model);
}

static void test_accounts_prices_quotas(void) {
    sg_engine *e = engine_with(NULL, 1000);
    sg_account a;
    EXPECT(sg_account_get(e, KEY("nobody"), &a), SG_ERR_UNKNOWN_ACCOUNT);
    EXPECT(sg_add_credits(e, KEY("acct"), 100000000), SG_OK); /* $100 of credits: tier 2 */
    EXPECT(sg_account_get(e, KEY("acct"), &a), SG_OK);
    CHECK(a.tier == SG_TIER2 && a.tier_pinned == 0 && a.credits == 100000000 && a.refusal == 0);
    CHECK(a.historical_spend == 100000000);
    EXPECT(sg_set_spend_limit(e, KEY("acct"), 1000000000000ULL), SG_ERR_SPEND_LIMIT_ABOVE_TIER);
    EXPECT(sg_set_spend_limit(e, KEY("acct"), 1000), SG_OK); /* $0.001 */
    EXPECT(sg_account_get(e, KEY("acct"), &a), SG_OK);
    CHECK(a.spend_limit == 1000);

    /* $1 per million tokens: 1,000 tokens cost $0.001, which reaches the spend limit. */
    sg_price p;
    memset(&p, 0, sizeof p);
    p.uncached_prompt = p.cached_prompt = p.generated = 1000000;
    EXPECT(sg_set_price(e, KEY(MODEL), 0, &p), SG_OK);
    EXPECT(sg_set_price(e, KEY(MODEL), 1, &p), SG_OK);
    sg_decision d;
    sg_request r = request("acct", 1000, 0);
    EXPECT(sg_admit(e, &r, 0, &d), SG_OK);
    CHECK(d.outcome == SG_ADMIT);
    settle_if_admitted(e, &d, 0);
    EXPECT(sg_account_get(e, KEY("acct"), &a), SG_OK);
    CHECK(a.period_spend == 1000 && a.refusal == 1);
    EXPECT(sg_admit(e, &r, 0, &d), SG_OK);
    CHECK(d.outcome == SG_REJECT_SPEND && d.reason == 0);
    EXPECT(sg_start_billing_period(e, 0), SG_OK);
    EXPECT(sg_admit(e, &r, 0, &d), SG_OK);
    CHECK(d.outcome == SG_ADMIT);
    sg_usage none = usage(0, 0, 0);
    EXPECT(sg_settle(e, &d.permit, &none, SG_COMPLETION_UPSTREAM_FAILURE, 0), SG_OK); /* not billed */

    /* Suspensions, by either reason. */
    uint32_t reasons[] = {SG_SUSPENSION_OPERATOR, SG_SUSPENSION_PAYMENT_FAILED};
    for (int i = 0; i < 2; i++) {
        EXPECT(sg_set_suspended(e, KEY("acct"), reasons[i], 1), SG_OK);
        EXPECT(sg_account_get(e, KEY("acct"), &a), SG_OK);
        CHECK(a.suspended[i] != 0 && a.refusal == 2);
        EXPECT(sg_admit(e, &r, 0, &d), SG_OK);
        CHECK(d.outcome == SG_REJECT_SPEND && d.reason == 1);
        EXPECT(sg_set_suspended(e, KEY("acct"), reasons[i], 0), SG_OK);
    }
    EXPECT(sg_set_suspended(e, KEY("acct"), 2, 1), SG_ERR_INVALID_ARGUMENT);
    EXPECT(sg_set_payment_method(e, KEY("acct"), 1), SG_OK);
    EXPECT(sg_account_get(e, KEY("acct"), &a), SG_OK);
    CHECK(a.payment_method == 1);
    EXPECT(sg_set_payment_method(e, KEY("acct"), 0), SG_OK);

    /* Tiers: granted, pinned, back to the earned one; unknown values refused. */
    EXPECT(sg_set_tier(e, KEY("acct"), SG_TIER_UNLIMITED, 0), SG_OK);
    EXPECT(sg_account_get(e, KEY("acct"), &a), SG_OK);
    CHECK(a.tier == SG_TIER_UNLIMITED && a.tier_pinned == 1 && a.spend_limit == 1000); /* the user's own */
    EXPECT(sg_set_tier(e, KEY("acct"), 5, 0), SG_ERR_INVALID_ARGUMENT);
    EXPECT(sg_set_tier(e, KEY("acct"), 254, 0), SG_ERR_INVALID_ARGUMENT);
    EXPECT(sg_set_tier(e, KEY("acct"), 256, 0), SG_ERR_INVALID_ARGUMENT);
    EXPECT(sg_set_tier(e, KEY("acct"), SG_TIER_EARNED, 0), SG_OK);
    EXPECT(sg_account_get(e, KEY("acct"), &a), SG_OK);
    CHECK(a.tier == SG_TIER2 && a.tier_pinned == 0);

    /* Per-account limits; under "fixed", removing the override clamps back to 60. */
    sg_engine *fixed = engine_with("fixed", 64);
    EXPECT(sg_set_limits_override(fixed, KEY("acct"), SG_METRIC_REQUESTS, 600, 6000, 0), SG_OK);
    sg_levels l;
    EXPECT(sg_limits(fixed, KEY("acct"), KEY(MODEL), 0, 0, &l), SG_OK);
    CHECK(l.limit[SG_METRIC_REQUESTS] == 600);
    EXPECT(sg_set_limits_override(fixed, KEY("acct"), 4, 1, 1, 0), SG_ERR_INVALID_ARGUMENT);
    EXPECT(sg_set_limits_override(fixed, KEY("acct"), SG_METRIC_REQUESTS, 10, 5, 0), SG_ERR_POLICY);
    EXPECT(sg_set_limits_override(fixed, KEY("acct"), SG_METRIC_REQUESTS, 0.5, 5, 0), SG_ERR_POLICY);
    EXPECT(sg_set_limits_override(fixed, KEY("acct"), SG_METRIC_REQUESTS, NAN, 5, 0), SG_ERR_POLICY);
    EXPECT(sg_limits(fixed, KEY("acct"), KEY(MODEL), 0, 0, &l), SG_OK);
    CHECK(l.limit[SG_METRIC_REQUESTS] == 600); /* the refused calls changed nothing */
    EXPECT(sg_set_limits_override(fixed, KEY("acct"), SG_METRIC_REQUESTS, 0, 0, 0), SG_OK);
    EXPECT(sg_limits(fixed, KEY("acct"), KEY(MODEL), 0, 0, &l), SG_OK);
    CHECK(l.limit[SG_METRIC_REQUESTS] == 60);
    sg_engine_free(fixed);

    /* Quotas (A100 GPUs default to 8). */
    uint32_t used = 0, limit = 0;
    EXPECT(sg_quota_acquire(e, KEY("acct"), SG_QUOTA_A100_GPUS, 8, &used, &limit), SG_OK);
    CHECK(used == 8 && limit == 8);
    EXPECT(sg_quota_acquire(e, KEY("acct"), SG_QUOTA_A100_GPUS, 1, &used, &limit), SG_ERR_QUOTA_EXHAUSTED);
    EXPECT(sg_quota_release(e, KEY("acct"), SG_QUOTA_A100_GPUS, 9, NULL, NULL), SG_ERR_QUOTA_NOT_HELD);
    EXPECT(sg_quota_set_limit(e, KEY("acct"), SG_QUOTA_A100_GPUS, 4, NULL, NULL), SG_ERR_QUOTA_BELOW_USE);
    EXPECT(sg_quota_set_limit(e, KEY("acct"), SG_QUOTA_A100_GPUS, 16, &used, &limit), SG_OK);
    CHECK(used == 8 && limit == 16);
    EXPECT(sg_quota_release(e, KEY("acct"), SG_QUOTA_A100_GPUS, 8, &used, NULL), SG_OK);
    CHECK(used == 0);
    EXPECT(sg_quota_acquire(e, KEY("acct"), SG_QUOTA_DEPLOYED_MODELS, 1, NULL, &limit), SG_OK);
    CHECK(limit == 100);
    EXPECT(sg_quota_acquire(e, KEY("acct"), SG_QUOTA_H100_GPUS, 2, NULL, NULL), SG_OK);
    EXPECT(sg_account_get(e, KEY("acct"), &a), SG_OK);
    CHECK(a.quota_used[SG_QUOTA_DEPLOYED_MODELS] == 1 && a.quota_used[SG_QUOTA_H100_GPUS] == 2);
    CHECK(a.quota_limit[SG_QUOTA_A100_GPUS] == 16 && a.quota_limit[SG_QUOTA_H100_GPUS] == 8);
    EXPECT(sg_quota_acquire(e, KEY("acct"), 3, 1, NULL, NULL), SG_ERR_INVALID_ARGUMENT);
    EXPECT(sg_quota_release(e, KEY("acct"), 3, 1, NULL, NULL), SG_ERR_INVALID_ARGUMENT);
    EXPECT(sg_quota_set_limit(e, KEY("acct"), 3, 1, NULL, NULL), SG_ERR_INVALID_ARGUMENT);
    sg_engine_free(e);
}

/* Status, headers and error body of `d`; checks the sizing protocol of both buffers. */
static void check_render(const sg_decision *d, const sg_render *render, uint32_t status_wanted,
                         const char *in_headers, const char *in_body) {
    uint32_t status = 0;
    EXPECT(sg_render_status(d, render, &status), SG_OK);
    CHECK(status == status_wanted);

    uint8_t buf[4096];
    size_t written = 0, needed = 0;
    EXPECT(sg_render_headers(d, render, 0, buf, sizeof buf, &written), SG_OK);
    CHECK(written > 0 && written < sizeof buf && contains(buf, written, in_headers));
    CHECK(buf[written - 2] == '\r' && buf[written - 1] == '\n');
    EXPECT(sg_render_headers(d, render, 0, NULL, 0, &needed), SG_ERR_BUFFER_TOO_SMALL);
    CHECK(needed == written);
    memset(buf, '#', sizeof buf);
    EXPECT(sg_render_headers(d, render, 0, buf, written - 1, &needed), SG_ERR_BUFFER_TOO_SMALL);
    CHECK(needed == written && buf[written - 1] == '#'); /* nothing past len */
    EXPECT(sg_render_headers(d, render, 0, buf, written, &needed), SG_OK);
    CHECK(needed == written);

    EXPECT(sg_render_error_body(d, render, buf, sizeof buf, &written), SG_OK);
    if (in_body == NULL) {
        CHECK(written == 0);
        return;
    }
    CHECK(written > 0 && buf[0] == '{' && buf[written - 1] == '}' && contains(buf, written, in_body));
    EXPECT(sg_render_error_body(d, render, NULL, 0, &needed), SG_ERR_BUFFER_TOO_SMALL);
    CHECK(needed == written);
    memset(buf, '#', sizeof buf);
    EXPECT(sg_render_error_body(d, render, buf, written - 1, &needed), SG_ERR_BUFFER_TOO_SMALL);
    CHECK(needed == written && buf[written - 1] == '#');
    EXPECT(sg_render_error_body(d, render, buf, written, &needed), SG_OK);
    CHECK(needed == written);
}

static void test_rendering(void) {
    sg_engine *e = engine_with(NULL, 1000);
    sg_render fw;
    EXPECT(sg_render_init(e, SG_DIALECT_FIREWORKS, &fw), SG_OK);
    CHECK(fw.dialect == SG_DIALECT_FIREWORKS && fw.per_second == 0 && fw.jitter_seed == 0);
    EXPECT(sg_render_init(e, 5, &fw), SG_ERR_INVALID_ARGUMENT);
    EXPECT(sg_render_init(e, UINT32_MAX, &fw), SG_ERR_INVALID_ARGUMENT);
    EXPECT(sg_render_init(e, SG_DIALECT_FIREWORKS, &fw), SG_OK);

    /* 200, 200 over the limit, 429 (requests). */
    sg_decision d[121];
    sg_request r = request("render", 10, 10);
    for (int i = 0; i < 121; i++) {
        EXPECT(sg_admit(e, &r, 0, &d[i]), SG_OK);
    }
    check_render(&d[0], &fw, 200, "x-ratelimit-over-limit: no\r\n", NULL);
    check_render(&d[60], &fw, 200, "x-ratelimit-over-limit: yes\r\n", NULL);
    check_render(&d[120], &fw, 429, "retry-after: 1\r\n", "\"type\":\"dynamic_request_limited\"");
    /* The providers' SDKs retry unless told not to: only where a retry can succeed. */
    check_render(&d[120], &fw, 429, "retry-after-ms: 1000\r\nx-should-retry: true\r\n", "\"too_large\":false");
    CHECK(d[60].outcome == SG_ADMIT_OVER_LIMIT && d[120].outcome == SG_REJECT_RATE_LIMITED);

    /* Every dialect renders every outcome. */
    for (uint32_t dialect = SG_DIALECT_FIREWORKS; dialect <= SG_DIALECT_IETF; dialect++) {
        sg_render any;
        EXPECT(sg_render_init(e, dialect, &any), SG_OK);
        uint8_t buf[4096];
        size_t written = 0;
        for (int i = 0; i < 121; i += 60) {
            EXPECT(sg_render_headers(&d[i], &any, 0, buf, sizeof buf, &written), SG_OK);
            CHECK(written > 0);
        }
    }
    for (int i = 0; i < 121; i++) {
        settle_if_admitted(e, &d[i], 0);
    }

    /* 429 on tokens, 503, 402 or 429 for spend, 400. */
    sg_decision x;
    sg_request big = request("tokens", 10000000, 0);
    EXPECT(sg_admit(e, &big, 0, &x), SG_OK);
    check_render(&x, &fw, 429, "x-ratelimit-limit-tokens-prompt: 60000\r\n", "\"type\":\"dynamic_token_limited\"");
    check_render(&x, &fw, 429, "x-should-retry: false\r\n", "\"too_large\":true");
    EXPECT(sg_set_load(e, KEY(MODEL), 0, 1500), SG_OK);
    sg_request shed = request("shed", 10, 10);
    EXPECT(sg_admit(e, &shed, 0, &x), SG_OK);
    CHECK(x.outcome == SG_SHED);
    check_render(&x, &fw, 503, "retry-after: ", "\"type\":\"service_overloaded\"");
    check_render(&x, &fw, 503, "x-should-retry: true\r\n", "\"type\":\"service_overloaded\"");
    EXPECT(sg_set_load(e, KEY(MODEL), 0, 0), SG_OK);
    EXPECT(sg_set_suspended(e, KEY("suspended"), SG_SUSPENSION_OPERATOR, 1), SG_OK);
    sg_request susp = request("suspended", 10, 10);
    EXPECT(sg_admit(e, &susp, 0, &x), SG_OK);
    CHECK(x.outcome == SG_REJECT_SPEND && x.reason == 1);
    uint32_t spend_status = 0;
    EXPECT(sg_render_status(&x, &fw, &spend_status), SG_OK);
    CHECK(spend_status == 402 || spend_status == 429);
    check_render(&x, &fw, spend_status, ": ", "\"type\":\"account_suspended\"");
    x.reason = 0; /* the same refusal for a spend limit */
    check_render(&x, &fw, spend_status, ": ", "\"type\":\"spend_limit_exceeded\"");
    sg_request zero = request("zero", 10, 10);
    zero.n = 0;
    EXPECT(sg_admit(e, &zero, 0, &x), SG_OK);
    check_render(&x, &fw, 400, ": ", "\"type\":\"invalid_request\"");

    /* 429 concurrency_limited: the account's own cap on permits in flight. */
    EXPECT(sg_set_max_in_flight(e, KEY("capped"), 1), SG_OK);
    sg_request capped = request("capped", 10, 10);
    sg_decision c1, c2;
    EXPECT(sg_admit(e, &capped, 0, &c1), SG_OK);
    EXPECT(sg_admit(e, &capped, 0, &c2), SG_OK);
    CHECK(c1.outcome == SG_ADMIT && c2.outcome == SG_REJECT_CONCURRENCY && c2.reason == 1);
    check_render(&c2, &fw, 429, "x-should-retry: true\r\n", "\"type\":\"concurrency_limited\"");
    settle_if_admitted(e, &c1, 0);
    EXPECT(sg_admit(e, &capped, 0, &c1), SG_OK);
    CHECK(c1.outcome == SG_ADMIT); /* the settle gave the place back */
    settle_if_admitted(e, &c1, 0);
    EXPECT(sg_set_max_in_flight(e, KEY("capped"), 0), SG_OK);
    EXPECT(sg_set_max_in_flight(e, KEY("capped"), 1ULL << 32), SG_ERR_INVALID_ARGUMENT);

    /* Decisions and renders out of range are refused, not trusted. */
    uint8_t buf[512];
    size_t written = 0;
    uint32_t status = 0;
    sg_decision bad = d[120];
    bad.outcome = 7;
    EXPECT(sg_render_status(&bad, &fw, &status), SG_ERR_INVALID_ARGUMENT);
    EXPECT(sg_render_headers(&bad, &fw, 0, buf, sizeof buf, &written), SG_ERR_INVALID_ARGUMENT);
    EXPECT(sg_render_error_body(&bad, &fw, buf, sizeof buf, &written), SG_ERR_INVALID_ARGUMENT);
    bad = d[120];
    bad.metric = 4;
    EXPECT(sg_render_status(&bad, &fw, &status), SG_ERR_INVALID_ARGUMENT);
    bad = x; /* SG_REJECT_INVALID */
    bad.reason = 3;
    EXPECT(sg_render_status(&bad, &fw, &status), SG_ERR_INVALID_ARGUMENT);
    bad.outcome = SG_REJECT_SPEND;
    bad.reason = 2;
    EXPECT(sg_render_status(&bad, &fw, &status), SG_ERR_INVALID_ARGUMENT);
    bad = d[0];
    memset(&bad.permit, 0xFF, sizeof bad.permit); /* an admission with a damaged permit */
    EXPECT(sg_render_status(&bad, &fw, &status), SG_ERR_INVALID_ARGUMENT);
    sg_render bad_render = fw;
    bad_render.dialect = 17;
    EXPECT(sg_render_status(&d[0], &bad_render, &status), SG_ERR_INVALID_ARGUMENT);
    EXPECT(sg_render_headers(&d[0], &bad_render, 0, buf, sizeof buf, &written), SG_ERR_INVALID_ARGUMENT);
    EXPECT(sg_render_error_body(&d[120], &bad_render, buf, sizeof buf, &written), SG_ERR_INVALID_ARGUMENT);
    sg_engine_free(e);

    /* fireworks_2026 renders token limits per second. */
    sg_engine *e26 = engine_with("fireworks_2026", 64);
    sg_render r26;
    EXPECT(sg_render_init(e26, SG_DIALECT_FIREWORKS, &r26), SG_OK);
    CHECK(r26.per_second == 1);
    sg_engine_free(e26);
}

/* Unix seconds of an RFC 3339 "YYYY-MM-DDTHH:MM:SSZ" (days from civil, H. Hinnant); -1 if it
 * is not one. */
static long long unix_of_rfc3339(const char *text) {
    int y = 0, mo = 0, d = 0, h = 0, mi = 0, se = 0;
    if (sscanf(text, "%4d-%2d-%2dT%2d:%2d:%2dZ", &y, &mo, &d, &h, &mi, &se) != 6) return -1;
    y -= mo <= 2;
    long long era = (y >= 0 ? y : y - 399) / 400;
    long long yoe = y - era * 400;
    long long doy = (153LL * (mo > 2 ? mo - 3 : mo + 9) + 2) / 5 + d - 1;
    long long doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return (era * 146097 + doe - 719468) * 86400 + h * 3600LL + mi * 60LL + se;
}

/* The Unix time of the Anthropic requests reset rendered for `d` at `now`. */
static long long anthropic_reset(const sg_decision *d, const sg_render *render, uint64_t now) {
    char text[4096];
    size_t n = 0;
    EXPECT(sg_render_headers(d, render, now, (uint8_t *)text, sizeof text - 1, &n), SG_OK);
    text[n] = '\0';
    const char *name = "anthropic-ratelimit-requests-reset: ";
    const char *reset = strstr(text, name);
    CHECK(reset != NULL);
    reset += strlen(name);
    CHECK(strncmp(reset, "1970-", 5) != 0);
    return unix_of_rfc3339(reset);
}

/* Issue 22: sg_render_init takes the wall clock, so Anthropic's resets are real dates, not
 * 1970; a gateway on its own clock sets monotonic_at to its reading. */
static void test_anthropic_resets_are_real_dates(void) {
    CHECK(unix_of_rfc3339("1970-01-01T00:00:00Z") == 0);
    CHECK(unix_of_rfc3339("2024-02-29T23:59:59Z") == 1709251199LL);
    sg_engine *e = engine_with(NULL, 64);
    const long long wall = (long long)time(NULL);
    const uint64_t before = sg_now_ns();
    sg_render an;
    EXPECT(sg_render_init(e, SG_DIALECT_ANTHROPIC, &an), SG_OK);
    CHECK(an.dialect == SG_DIALECT_ANTHROPIC && an.jitter_seed == 0);
    CHECK(an.monotonic_at >= before && an.monotonic_at <= sg_now_ns());
    const long long unix_s = (long long)(an.unix_ns / SEC);
    CHECK(unix_s >= wall - 1 && unix_s <= wall + 5);

    /* One request of 60 a minute: the bucket is full again a second later. */
    sg_request r = request("anthropic", 10, 10);
    sg_decision d;
    const uint64_t now = sg_now_ns();
    EXPECT(sg_admit(e, &r, now, &d), SG_OK);
    CHECK(d.outcome == SG_ADMIT);
    long long reset = anthropic_reset(&d, &an, now);
    CHECK(reset >= wall && reset <= wall + 120);
    settle_if_admitted(e, &d, now);

    /* A gateway whose clock reads 0 now (simulated time) anchors it there. */
    an.monotonic_at = 0;
    sg_request own = request("own-clock", 10, 10);
    EXPECT(sg_admit(e, &own, 0, &d), SG_OK);
    reset = anthropic_reset(&d, &an, 0);
    CHECK(reset >= wall && reset <= wall + 120);
    settle_if_admitted(e, &d, 0);
    sg_engine_free(e);
}

static uint32_t crc32_ieee(const uint8_t *p, size_t n) {
    uint32_t crc = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++) {
        crc ^= p[i];
        for (int k = 0; k < 8; k++) {
            crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
        }
    }
    return ~crc;
}

static void put_le32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) {
        p[i] = (uint8_t)(v >> (8 * i));
    }
}

static uint32_t get_le32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void test_snapshot_restore(void) {
    sg_engine *a = engine_with("fixed", 1000);
    sg_decision d;
    sg_request r = request("snap", 10, 10);
    for (int i = 0; i < 30; i++) {
        EXPECT(sg_admit(a, &r, 0, &d), SG_OK);
        CHECK(d.outcome == SG_ADMIT);
        if (i < 29) settle_if_admitted(a, &d, 0); /* the last one stays outstanding */
    }
    size_t size = 0;
    EXPECT(sg_snapshot_size(a, &size), SG_OK);
    CHECK(size > 60);
    uint8_t *buf = (uint8_t *)malloc(size);
    CHECK(buf != NULL);
    size_t written = 0, needed = 0;
    EXPECT(sg_snapshot_write(a, NULL, 0, 0, &needed), SG_ERR_BUFFER_TOO_SMALL);
    CHECK(needed == size);
    needed = 0;
    EXPECT(sg_snapshot_write(a, buf, size - 1, 0, &needed), SG_ERR_BUFFER_TOO_SMALL);
    CHECK(needed == size);
    EXPECT(sg_snapshot_write(a, buf, size, 0, &written), SG_OK);
    CHECK(written == size && memcmp(buf, "SLGT", 4) == 0);
    CHECK(crc32_ieee(buf, written - 4) == get_le32(buf + written - 4)); /* docs/snapshot.md */

    /* Restored on another clock origin, the bucket is where it was. */
    sg_engine *b = engine_with("fixed", 1000);
    const uint64_t later = 5000 * SEC;
    EXPECT(sg_restore(b, buf, written, later), SG_OK);
    sg_levels l;
    EXPECT(sg_limits(b, KEY("snap"), KEY(MODEL), 0, later, &l), SG_OK);
    CHECK(l.remaining[SG_METRIC_REQUESTS] == 30);

    /* A permit issued before a restore is stale afterwards. */
    sg_usage u = usage(10, 0, 10);
    EXPECT(sg_restore(a, buf, written, 0), SG_OK);
    EXPECT(sg_settle(a, &d.permit, &u, SG_COMPLETION_SUCCESS, 0), SG_ERR_STALE_PERMIT);
    EXPECT(sg_charge(a, &d.permit, 1, 0), SG_ERR_STALE_PERMIT);

    /* Each kind of damage, each leaving the engine unchanged. */
    EXPECT(sg_restore(b, buf, 0, 0), SG_ERR_SNAPSHOT_TRUNCATED);
    EXPECT(sg_restore(b, buf, 10, 0), SG_ERR_SNAPSHOT_TRUNCATED);
    EXPECT(sg_restore(b, buf, written - 1, 0), SG_ERR_SNAPSHOT_TRUNCATED);
    uint8_t *longer = (uint8_t *)malloc(written + 1);
    CHECK(longer != NULL);
    memcpy(longer, buf, written);
    longer[written] = 0;
    EXPECT(sg_restore(b, longer, written + 1, 0), SG_ERR_SNAPSHOT_TRAILING_BYTES);
    free(longer);
    buf[0] = 'X';
    EXPECT(sg_restore(b, buf, written, 0), SG_ERR_SNAPSHOT_BAD_MAGIC);
    buf[0] = 'S';
    buf[4] = 9; /* format version 9 */
    EXPECT(sg_restore(b, buf, written, 0), SG_ERR_SNAPSHOT_UNSUPPORTED_VERSION);
    buf[4] = 2; /* back to the version written */
    buf[written / 2] ^= 0x40;
    EXPECT(sg_restore(b, buf, written, 0), SG_ERR_SNAPSHOT_BAD_CHECKSUM);
    buf[written / 2] ^= 0x40;
    sg_engine *c = engine_with("fixed", 500);
    EXPECT(sg_restore(c, buf, written, 0), SG_ERR_SNAPSHOT_CAPACITY_MISMATCH);
    /* An account record with an empty key, under a valid checksum: the first record's key
     * length is at offset 56 + 4. */
    CHECK(get_le32(buf + 40) >= 1 && get_le32(buf + 60) == 4);
    put_le32(buf + 60, 0);
    put_le32(buf + written - 4, crc32_ieee(buf, written - 4));
    EXPECT(sg_restore(b, buf, written, 0), SG_ERR_SNAPSHOT_CORRUPT);
    put_le32(buf + 60, 4);
    put_le32(buf + 40, 1001); /* more account records than the table holds */
    put_le32(buf + written - 4, crc32_ieee(buf, written - 4));
    EXPECT(sg_restore(b, buf, written, 0), SG_ERR_SNAPSHOT_CORRUPT);

    EXPECT(sg_limits(b, KEY("snap"), KEY(MODEL), 0, later, &l), SG_OK);
    CHECK(l.remaining[SG_METRIC_REQUESTS] == 30);
    free(buf);
    sg_engine_free(a);
    sg_engine_free(b);
    sg_engine_free(c);
}

/* SPEC 7: a permit not settled within the permit TTL (default 15 minutes of the caller's clock)
 * expires. Settling, cancelling or charging it is SG_ERR_PERMIT_EXPIRED, every time, and
 * changes nothing; what it held (the scope's in-flight count, the model's tracked load) is
 * released by whoever meets it next, with no call from the gateway. */
static void test_permit_expiry(void) {
    const uint64_t MIN = 60 * SEC;
    sg_engine *e = engine_with("fixed", 1000); /* the preset's TTL: 15 minutes */
    sg_request r = request("expiry", 100, 10);
    sg_usage u = usage(100, 0, 10);
    sg_decision in_time, late;
    EXPECT(sg_admit(e, &r, 0, &in_time), SG_OK);
    EXPECT(sg_admit(e, &r, 0, &late), SG_OK);
    CHECK(admitted(&in_time) && admitted(&late));
    EXPECT(sg_settle(e, &in_time.permit, &u, SG_COMPLETION_SUCCESS, 14 * MIN), SG_OK);
    EXPECT(sg_settle(e, &late.permit, &u, SG_COMPLETION_SUCCESS, 16 * MIN), SG_ERR_PERMIT_EXPIRED);
    /* Still refused, by any call and at any time, and never a panic. */
    EXPECT(sg_settle(e, &late.permit, &u, SG_COMPLETION_SUCCESS, 16 * MIN), SG_ERR_PERMIT_EXPIRED);
    EXPECT(sg_settle(e, &late.permit, &u, SG_COMPLETION_UPSTREAM_FAILURE, 17 * MIN), SG_ERR_PERMIT_EXPIRED);
    EXPECT(sg_cancel(e, &late.permit, &u, 16 * MIN), SG_ERR_PERMIT_EXPIRED);
    EXPECT(sg_charge(e, &late.permit, 5, 16 * MIN), SG_ERR_PERMIT_EXPIRED);
    CHECK(sg_settle(e, &late.permit, &u, SG_COMPLETION_SUCCESS, 0) != SG_OK); /* a clock gone back */
    CHECK(sg_settle(e, &late.permit, &u, SG_COMPLETION_SUCCESS, UINT64_MAX) != SG_OK);
    /* A settled permit stays settled past its TTL: no second settle is ever accepted. */
    CHECK(sg_settle(e, &in_time.permit, &u, SG_COMPLETION_SUCCESS, 16 * MIN) != SG_OK);

    /* A stream is charged until its deadline, and not after. */
    sg_decision stream;
    EXPECT(sg_admit(e, &r, 20 * MIN, &stream), SG_OK);
    CHECK(admitted(&stream));
    EXPECT(sg_charge(e, &stream.permit, 5, 34 * MIN), SG_OK);
    EXPECT(sg_charge(e, &stream.permit, 10, 36 * MIN), SG_ERR_PERMIT_EXPIRED);
    EXPECT(sg_settle(e, &stream.permit, &u, SG_COMPLETION_SUCCESS, 36 * MIN), SG_ERR_PERMIT_EXPIRED);

    /* An abandoned permit releases the model's tracked load: with an in-flight capacity of one,
     * the model sheds until the permit expires, then admits again. */
    EXPECT(sg_set_model_capacity(e, KEY(MODEL), 0, 1), SG_OK);
    const uint64_t t0 = 60 * MIN;
    sg_decision abandoned, shed, after;
    EXPECT(sg_admit(e, &r, t0, &abandoned), SG_OK);
    CHECK(abandoned.outcome == SG_ADMIT);
    sg_request other = request("other-account", 100, 10);
    EXPECT(sg_admit(e, &other, t0 + 14 * MIN, &shed), SG_OK);
    CHECK(shed.outcome == SG_SHED);
    EXPECT(sg_admit(e, &other, t0 + 16 * MIN, &after), SG_OK);
    CHECK(after.outcome == SG_ADMIT);
    settle_if_admitted(e, &after, t0 + 16 * MIN);
    EXPECT(sg_settle(e, &abandoned.permit, &u, SG_COMPLETION_SUCCESS, t0 + 16 * MIN), SG_ERR_PERMIT_EXPIRED);
    EXPECT(sg_set_model_capacity(e, KEY(MODEL), 0, 0), SG_OK);
    sg_engine_free(e);

    /* sg_config.permit_ttl_ns sets the TTL: 60 s here. */
    sg_config cfg;
    EXPECT(sg_config_default(&cfg), SG_OK);
    cfg.preset = "fixed";
    cfg.scopes = 64;
    cfg.permit_ttl_ns = 60 * SEC;
    e = NULL;
    EXPECT(sg_engine_new(&cfg, &e), SG_OK);
    EXPECT(sg_admit(e, &r, 0, &in_time), SG_OK);
    EXPECT(sg_admit(e, &r, 0, &late), SG_OK);
    CHECK(admitted(&in_time) && admitted(&late));
    EXPECT(sg_settle(e, &in_time.permit, &u, SG_COMPLETION_SUCCESS, 59 * SEC), SG_OK);
    EXPECT(sg_settle(e, &late.permit, &u, SG_COMPLETION_SUCCESS, 61 * SEC), SG_ERR_PERMIT_EXPIRED);
    EXPECT(sg_settle(e, &late.permit, &u, SG_COMPLETION_SUCCESS, 61 * SEC), SG_ERR_PERMIT_EXPIRED);
    sg_engine_free(e);
}

/* Issue 19: an engine on which only money and max_in_flight decide ("fixed", every metric off). */
static sg_engine *unlimited_engine(uint64_t permits, uint64_t max_in_flight) {
    sg_config cfg;
    EXPECT(sg_config_default(&cfg), SG_OK);
    cfg.preset = "fixed";
    cfg.scopes = 64;
    cfg.permits = permits;
    cfg.max_in_flight = max_in_flight;
    cfg.seed = 42;
    for (int m = 0; m < 4; m++) cfg.floor[m] = INFINITY;
    sg_engine *e = NULL;
    EXPECT(sg_engine_new(&cfg, &e), SG_OK);
    CHECK(e != NULL);
    return e;
}

/* Issue 19's scenario: 1,000 requests of 1,000 prompt + 1,000 max tokens admitted at one instant
 * against a $1 spend limit, at $1 per million prompt tokens and $10 per million generated
 * (11,000 µ$ each at worst), then settled at full use. Billing only at settle let all 1,000 run
 * and billed $11.00; money reserved at admission lets 90 run and bills $0.99, and every refusal
 * is SG_REJECT_SPEND, spend limit exceeded (reason 0). */
static void test_a_burst_at_one_instant_never_bills_past_the_spend_limit(void) {
    sg_engine *e = unlimited_engine(2048, 0);
    sg_price p;
    memset(&p, 0, sizeof p);
    p.uncached_prompt = p.cached_prompt = 1000000; /* µ$ per million tokens: $1 */
    p.generated = 10000000;                      /* $10 */
    EXPECT(sg_set_price(e, KEY(MODEL), 0, &p), SG_OK);
    EXPECT(sg_set_spend_limit(e, KEY("burst"), 1000000), SG_OK); /* $1 */
    sg_request r = request("burst", 1000, 1000);
    static sg_decision d[1000];
    int n_admitted = 0, spend_refusals = 0, other = 0;
    for (int i = 0; i < 1000; i++) {
        if (sg_admit(e, &r, 0, &d[i]) != SG_OK) fail(__FILE__, __LINE__, "sg_admit of the burst");
        if (d[i].outcome == SG_ADMIT) {
            n_admitted++;
        } else if (d[i].outcome == SG_REJECT_SPEND && d[i].reason == 0) {
            spend_refusals++;
        } else {
            other++;
        }
    }
    CHECK(n_admitted == 90 && spend_refusals == 910 && other == 0);
    sg_account a;
    EXPECT(sg_account_get(e, KEY("burst"), &a), SG_OK);
    CHECK(a.reserved == 990000 && a.period_spend == 0 && a.in_flight == 90); /* refusals hold nothing */
    CHECK(a.refusal == 0);
    sg_usage full = usage(1000, 0, 1000);
    for (int i = 0; i < 1000; i++) {
        if (d[i].outcome == SG_ADMIT) EXPECT(sg_settle(e, &d[i].permit, &full, SG_COMPLETION_SUCCESS, 0), SG_OK);
    }
    EXPECT(sg_account_get(e, KEY("burst"), &a), SG_OK);
    CHECK(a.period_spend == 990000 && a.reserved == 0 && a.in_flight == 0);
    CHECK(a.period_spend <= a.spend_limit);
    printf("issue 19 burst: %d of 1000 admitted, %d refused (spend_limit_exceeded), $%.2f billed against a "
           "$%.2f limit\n",
           n_admitted, spend_refusals, a.period_spend / 1e6, a.spend_limit / 1e6);
    /* The $0.01 left: a request of worst case 11,000 µ$ no longer fits, one of exactly 10,000 does,
     * and then the limit is reached. */
    sg_decision x;
    EXPECT(sg_admit(e, &r, 0, &x), SG_OK);
    CHECK(x.outcome == SG_REJECT_SPEND && x.reason == 0);
    sg_request last = request("burst", 1000, 900);
    EXPECT(sg_admit(e, &last, 0, &x), SG_OK);
    CHECK(x.outcome == SG_ADMIT);
    EXPECT(sg_account_get(e, KEY("burst"), &a), SG_OK);
    CHECK(a.reserved == 10000 && a.refusal == 1);
    /* Settled below its reservation, it gives the rest back. */
    sg_usage less = usage(1000, 0, 100);
    EXPECT(sg_settle(e, &x.permit, &less, SG_COMPLETION_SUCCESS, 0), SG_OK);
    EXPECT(sg_account_get(e, KEY("burst"), &a), SG_OK);
    CHECK(a.period_spend == 992000 && a.reserved == 0 && a.refusal == 0);
    sg_engine_free(e);
}

/* Issue 19: one account opening 100,000 permits it never settles takes at most a quarter of the
 * permit ledger (the default max_in_flight: 1,024 of 4,096); every 1,000 attempts a second
 * account is admitted (and settles). The refusals are cheap, so this takes well under a second,
 * under AddressSanitizer too (the Rust side is not instrumented). */
static void test_one_account_can_never_take_the_whole_ledger(void) {
    enum { ATTEMPTS = 100000, EVERY = 1000 };
    sg_engine *e = unlimited_engine(4096, 0);
    sg_request greedy = request("greedy", 1, 0), neighbour = request("neighbour", 1, 0);
    sg_usage u = usage(1, 0, 0);
    sg_decision d;
    long held = 0, limited = 0, wrong = 0, others = 0;
    for (uint64_t i = 0; i < ATTEMPTS; i++) {
        if (sg_admit(e, &greedy, i, &d) != SG_OK) {
            wrong++;
        } else if (d.outcome == SG_ADMIT) {
            held++;
        } else if (d.outcome == SG_REJECT_CONCURRENCY && d.reason == 1024 && d.retry_after_ns == SEC) {
            limited++;
        } else {
            wrong++;
        }
        if (i % EVERY == 0) {
            if (sg_admit(e, &neighbour, i, &d) != SG_OK || d.outcome != SG_ADMIT) {
                fprintf(stderr, "attempt %lu: the second account got outcome %u\n", (unsigned long)i, (unsigned)d.outcome);
                fail(__FILE__, __LINE__, "a second account is admitted at every instant");
            }
            if (sg_settle(e, &d.permit, &u, SG_COMPLETION_SUCCESS, i) != SG_OK) {
                fail(__FILE__, __LINE__, "the second account settles");
            }
            others++;
        }
    }
    CHECK(wrong == 0 && held == 1024 && limited == ATTEMPTS - 1024 && others == ATTEMPTS / EVERY);
    sg_account a;
    EXPECT(sg_account_get(e, KEY("greedy"), &a), SG_OK);
    CHECK(a.in_flight == 1024 && a.max_in_flight == 0);
    EXPECT(sg_account_get(e, KEY("neighbour"), &a), SG_OK);
    CHECK(a.in_flight == 0);
    printf("issue 19 ledger: one account made %d attempts without settling: %ld admitted, %ld refused "
           "concurrency_limited; a second account admitted all %ld times it asked\n",
           (int)ATTEMPTS, held, limited, others);
    sg_engine_free(e); /* the 1,024 unsettled permits go with the engine */
}

/* sg_config.max_in_flight, the engine's cap on each account's permits in flight, and
 * sg_set_max_in_flight, an account's own: every way a permit ends gives its place back; refusals
 * of any kind hold none; above UINT32_MAX there is no cap. */
static void test_max_in_flight(void) {
    const uint64_t MIN = 60 * SEC;
    sg_engine *e = unlimited_engine(0, 3);
    sg_request r = request("capped", 10, 10);
    sg_usage u = usage(10, 0, 10);
    sg_decision p[3], x;
    sg_account a;
    for (int i = 0; i < 3; i++) {
        EXPECT(sg_admit(e, &r, 0, &p[i]), SG_OK);
        CHECK(p[i].outcome == SG_ADMIT);
    }
    EXPECT(sg_admit(e, &r, 0, &x), SG_OK);
    CHECK(x.outcome == SG_REJECT_CONCURRENCY && x.reason == 3 && x.retry_after_ns == SEC);
    EXPECT(sg_account_get(e, KEY("capped"), &a), SG_OK);
    CHECK(a.in_flight == 3 && a.max_in_flight == 0); /* the refusal took no place */
    /* Each account has its own places. */
    sg_request neighbour = request("neighbour", 10, 10);
    EXPECT(sg_admit(e, &neighbour, 0, &x), SG_OK);
    CHECK(x.outcome == SG_ADMIT);
    settle_if_admitted(e, &x, 0);
    /* A success, a cancel and an upstream failure each give the place back. */
    EXPECT(sg_settle(e, &p[0].permit, &u, SG_COMPLETION_SUCCESS, 0), SG_OK);
    EXPECT(sg_admit(e, &r, 0, &p[0]), SG_OK);
    CHECK(p[0].outcome == SG_ADMIT);
    EXPECT(sg_cancel(e, &p[1].permit, &u, 0), SG_OK);
    EXPECT(sg_admit(e, &r, 0, &p[1]), SG_OK);
    CHECK(p[1].outcome == SG_ADMIT);
    EXPECT(sg_settle(e, &p[2].permit, &u, SG_COMPLETION_UPSTREAM_FAILURE, 0), SG_OK);
    EXPECT(sg_admit(e, &r, 0, &p[2]), SG_OK);
    CHECK(p[2].outcome == SG_ADMIT);
    EXPECT(sg_admit(e, &r, 0, &x), SG_OK);
    CHECK(x.outcome == SG_REJECT_CONCURRENCY);
    /* A second settle gives nothing back twice. */
    EXPECT(sg_settle(e, &p[2].permit, &u, SG_COMPLETION_SUCCESS, 0), SG_OK);
    EXPECT(sg_settle(e, &p[2].permit, &u, SG_COMPLETION_SUCCESS, 0), SG_ERR_ALREADY_SETTLED);
    EXPECT(sg_account_get(e, KEY("capped"), &a), SG_OK);
    CHECK(a.in_flight == 2);
    /* Expiry gives the place back (the preset's TTL: 15 minutes). */
    EXPECT(sg_settle(e, &p[0].permit, &u, SG_COMPLETION_SUCCESS, 16 * MIN), SG_ERR_PERMIT_EXPIRED);
    EXPECT(sg_settle(e, &p[1].permit, &u, SG_COMPLETION_SUCCESS, 16 * MIN), SG_ERR_PERMIT_EXPIRED);
    EXPECT(sg_account_get(e, KEY("capped"), &a), SG_OK);
    CHECK(a.in_flight == 0);

    /* The account's own cap, above the engine's; 0 returns it to the engine's. */
    EXPECT(sg_set_max_in_flight(e, KEY("capped"), 5), SG_OK);
    EXPECT(sg_account_get(e, KEY("capped"), &a), SG_OK);
    CHECK(a.max_in_flight == 5);
    sg_decision five[5];
    for (int i = 0; i < 5; i++) {
        EXPECT(sg_admit(e, &r, 20 * MIN, &five[i]), SG_OK);
        CHECK(five[i].outcome == SG_ADMIT);
    }
    EXPECT(sg_admit(e, &r, 20 * MIN, &x), SG_OK);
    CHECK(x.outcome == SG_REJECT_CONCURRENCY && x.reason == 5);
    EXPECT(sg_set_max_in_flight(e, KEY("capped"), 0), SG_OK);
    EXPECT(sg_admit(e, &r, 20 * MIN, &x), SG_OK);
    CHECK(x.outcome == SG_REJECT_CONCURRENCY && x.reason == 3);
    EXPECT(sg_set_max_in_flight(e, KEY("capped"), (uint64_t)UINT32_MAX + 1), SG_ERR_INVALID_ARGUMENT);
    for (int i = 0; i < 5; i++) settle_if_admitted(e, &five[i], 20 * MIN);
    EXPECT(sg_account_get(e, KEY("capped"), &a), SG_OK);
    CHECK(a.in_flight == 0 && a.max_in_flight == 0);
    sg_engine_free(e);

    /* The cap is checked before the rate limits: with 5 requests a minute and a cap of 1, ten
     * refusals for concurrency spend none of the five; a refusal by the rate limits holds no
     * place. */
    sg_config cfg;
    EXPECT(sg_config_default(&cfg), SG_OK);
    cfg.preset = "fixed";
    cfg.scopes = 64;
    cfg.floor[SG_METRIC_REQUESTS] = 5.0;
    cfg.max_in_flight = 1;
    e = NULL;
    EXPECT(sg_engine_new(&cfg, &e), SG_OK);
    EXPECT(sg_admit(e, &r, 0, &p[0]), SG_OK);
    CHECK(p[0].outcome == SG_ADMIT);
    for (int i = 0; i < 10; i++) {
        EXPECT(sg_admit(e, &r, 0, &x), SG_OK);
        CHECK(x.outcome == SG_REJECT_CONCURRENCY && x.reason == 1);
    }
    settle_if_admitted(e, &p[0], 0);
    for (int i = 0; i < 4; i++) {
        EXPECT(sg_admit(e, &r, 0, &x), SG_OK);
        CHECK(x.outcome == SG_ADMIT);
        settle_if_admitted(e, &x, 0);
    }
    for (int i = 0; i < 3; i++) {
        EXPECT(sg_admit(e, &r, 0, &x), SG_OK);
        CHECK(x.outcome == SG_REJECT_RATE_LIMITED && x.metric == SG_METRIC_REQUESTS);
    }
    EXPECT(sg_account_get(e, KEY("capped"), &a), SG_OK);
    CHECK(a.in_flight == 0);
    sg_engine_free(e);

    /* The default is a quarter of the permit ledger (1,024 entries here: 256); above UINT32_MAX
     * there is no cap, and UINT32_MAX itself is a cap no ledger reaches. */
    uint64_t caps[] = {0, (uint64_t)UINT32_MAX + 1, UINT64_MAX, UINT32_MAX};
    for (size_t c = 0; c < sizeof caps / sizeof caps[0]; c++) {
        e = unlimited_engine(1024, caps[c]);
        static sg_decision held[300];
        int n_admitted = 0, refused = 0;
        for (int i = 0; i < 300; i++) {
            if (sg_admit(e, &r, 0, &held[i]) != SG_OK) fail(__FILE__, __LINE__, "sg_admit");
            if (held[i].outcome == SG_ADMIT) {
                n_admitted++;
            } else if (held[i].outcome == SG_REJECT_CONCURRENCY && held[i].reason == 256) {
                refused++;
            }
        }
        if (caps[c] == 0) {
            CHECK(n_admitted == 256 && refused == 44);
        } else {
            CHECK(n_admitted == 300 && refused == 0);
        }
        for (int i = 0; i < 300; i++) settle_if_admitted(e, &held[i], 0);
        EXPECT(sg_account_get(e, KEY("capped"), &a), SG_OK);
        CHECK(a.in_flight == 0);
        sg_engine_free(e);
    }
}

/* Issue 14: engines several processes share, in a file (sg_engine_open_shared) or in memory the
 * host owns (sg_engine_in_region). ffi/tests/c/shared.c runs them across processes; here every
 * function and result code, in one process. */

/* A file name of this process's own, on a memory file system if there is one. */
static void shared_path(char *buf, size_t len, const char *name) {
    const char *dir = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
    snprintf(buf, len, "%s/sluicegate-c-api-%ld-%s", dir, (long)getpid(), name);
    unlink(buf);
}

static uint64_t get_le64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) {
        v = v << 8 | p[i];
    }
    return v;
}

static void put_le64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) {
        p[i] = (uint8_t)(v >> (8 * i));
    }
}

/* The region header's checksum: CRC-32 over the words magic, version, the four capacities,
 * fingerprint, seed, incarnation and a zero (the state word at 8 and the checksum at 80 are
 * not covered). */
static uint64_t header_checksum(const uint8_t *h) {
    uint8_t words[80];
    memcpy(words, h, 8);
    memcpy(words + 8, h + 16, 64);
    memset(words + 72, 0, 8);
    return crc32_ieee(words, sizeof words);
}

static void read_header(const char *path, uint8_t h[128]) {
    int fd = open(path, O_RDONLY);
    CHECK(fd >= 0 && pread(fd, h, 128, 0) == 128);
    close(fd);
}

static void write_header(const char *path, const uint8_t h[128]) {
    int fd = open(path, O_WRONLY);
    CHECK(fd >= 0 && pwrite(fd, h, 128, 0) == 128);
    close(fd);
}

/* Opening `path` as `cfg` must fail with `expected`, set *engine to NULL over a garbage
 * pointer, and leave the header as it was. */
static void expect_refused(const char *path, const sg_config *cfg, sg_result expected) {
    uint8_t before[128], after[128];
    read_header(path, before);
    sg_engine *e = (sg_engine *)(uintptr_t)0xDEADBEEF;
    EXPECT(sg_engine_open_shared(path, cfg, &e), expected);
    CHECK(e == NULL);
    read_header(path, after);
    CHECK(memcmp(before, after, sizeof before) == 0);
}

static sg_config shared_config(void) {
    sg_config cfg;
    EXPECT(sg_config_default(&cfg), SG_OK);
    cfg.preset = "fixed";
    cfg.scopes = 64; /* 64 accounts, 256 models, 1,024 permits */
    cfg.floor[SG_METRIC_REQUESTS] = 600.0;
    return cfg;
}

static void test_shared_file(void) {
    char path[256];
    shared_path(path, sizeof path, "engine");
    sg_config cfg = shared_config();
    sg_engine *const garbage = (sg_engine *)(uintptr_t)0xDEADBEEF;
    sg_engine *e = garbage;

    /* Configurations no engine can have create no file. */
    sg_config bad = cfg;
    bad.models = 4097;
    EXPECT(sg_engine_open_shared(path, &bad, &e), SG_ERR_BAD_CAPACITY);
    CHECK(e == NULL);
    bad = cfg;
    bad.permit_ttl_ns = SEC / 2;
    e = garbage;
    EXPECT(sg_engine_open_shared(path, &bad, &e), SG_ERR_POLICY);
    CHECK(e == NULL);
    bad.preset = "no-such-preset";
    e = garbage;
    EXPECT(sg_engine_open_shared(path, &bad, &e), SG_ERR_INVALID_ARGUMENT);
    CHECK(e == NULL);
    CHECK(access(path, F_OK) != 0);
    e = garbage;
    EXPECT(sg_engine_open_shared("/nonexistent-sluicegate-dir/engine", &cfg, &e), SG_ERR_IO);
    CHECK(e == NULL);

    /* Two handles on one file share one engine: a permit from one settles through the other. */
    sg_engine *a = NULL, *b = NULL;
    EXPECT(sg_engine_open_shared(path, &cfg, &a), SG_OK);
    EXPECT(sg_engine_open_shared(path, &cfg, &b), SG_OK);
    CHECK(a != NULL && b != NULL && a != b);
    size_t size = 0;
    EXPECT(sg_region_size(&cfg, &size), SG_OK);
    struct stat st;
    CHECK(stat(path, &st) == 0 && (size_t)st.st_size == size && (st.st_mode & 0777) == 0600);
    sg_request r = request("shared", 10, 10);
    sg_decision d;
    EXPECT(sg_admit(a, &r, 0, &d), SG_OK);
    CHECK(d.outcome == SG_ADMIT);
    sg_usage u = usage(10, 0, 10);
    EXPECT(sg_settle(b, &d.permit, &u, SG_COMPLETION_SUCCESS, 0), SG_OK);
    EXPECT(sg_settle(a, &d.permit, &u, SG_COMPLETION_SUCCESS, 0), SG_ERR_ALREADY_SETTLED);
    sg_levels l;
    EXPECT(sg_limits(b, KEY("shared"), KEY(MODEL), 0, 0, &l), SG_OK);
    CHECK(l.limit[SG_METRIC_REQUESTS] == 600 && l.remaining[SG_METRIC_REQUESTS] == 599);

    /* A restore while another handle has the file open is refused and changes nothing; alone,
     * it succeeds. */
    size_t snap_size = 0, written = 0;
    EXPECT(sg_snapshot_size(a, &snap_size), SG_OK);
    uint8_t *snap = (uint8_t *)malloc(snap_size);
    CHECK(snap != NULL);
    EXPECT(sg_snapshot_write(a, snap, snap_size, 0, &written), SG_OK);
    EXPECT(sg_admit(a, &r, 0, &d), SG_OK);
    settle_if_admitted(a, &d, 0);
    EXPECT(sg_restore(a, snap, written, 0), SG_ERR_SNAPSHOT_IN_USE);
    EXPECT(sg_limits(a, KEY("shared"), KEY(MODEL), 0, 0, &l), SG_OK);
    CHECK(l.remaining[SG_METRIC_REQUESTS] == 598);
    sg_engine_free(b);
    EXPECT(sg_restore(a, snap, written, 0), SG_OK);
    EXPECT(sg_limits(a, KEY("shared"), KEY(MODEL), 0, 0, &l), SG_OK);
    CHECK(l.remaining[SG_METRIC_REQUESTS] == 599);
    free(snap);
    sg_engine_free(a);
    CHECK(access(path, F_OK) == 0); /* sg_engine_free never deletes the file */

    /* The header (docs: little-endian words): magic, state ready, layout version 2, the
     * capacities, and a checksum this test computes the same way. */
    uint8_t h[128], pristine[128];
    read_header(path, h);
    memcpy(pristine, h, sizeof h);
    CHECK(memcmp(h, "SLUICEGR", 8) == 0 && get_le64(h + 8) == 0x5EAD4EAD5EAD0002ULL && get_le64(h + 16) == 2);
    CHECK(get_le64(h + 24) == 64 && get_le64(h + 32) == 64 && get_le64(h + 40) == 256 && get_le64(h + 48) == 1024);
    CHECK(get_le64(h + 80) == header_checksum(h));

    /* Openers that disagree; damage; and, under a recomputed checksum, a header from another
     * layout, capacity or policy. Nothing is written to the file. */
    sg_config other = cfg;
    other.permits = 2048;
    expect_refused(path, &other, SG_ERR_REGION_CAPACITY_MISMATCH);
    other = cfg;
    other.floor[SG_METRIC_REQUESTS] = 601.0;
    expect_refused(path, &other, SG_ERR_REGION_POLICY_MISMATCH);
    h[0] ^= 0x01; /* the magic */
    write_header(path, h);
    expect_refused(path, &cfg, SG_ERR_NOT_A_REGION);
    memcpy(h, pristine, sizeof h);
    h[64] ^= 0x10; /* the seed, under the old checksum */
    write_header(path, h);
    expect_refused(path, &cfg, SG_ERR_REGION_CORRUPT);
    memcpy(h, pristine, sizeof h);
    put_le64(h + 16, 3); /* layout version 3 */
    put_le64(h + 80, header_checksum(h));
    write_header(path, h);
    expect_refused(path, &cfg, SG_ERR_REGION_UNSUPPORTED_VERSION);
    memcpy(h, pristine, sizeof h);
    put_le64(h + 48, 2048); /* 2,048 permits */
    put_le64(h + 80, header_checksum(h));
    write_header(path, h);
    expect_refused(path, &cfg, SG_ERR_REGION_CAPACITY_MISMATCH);
    memcpy(h, pristine, sizeof h);
    h[56] ^= 0x01; /* the policy fingerprint */
    put_le64(h + 80, header_checksum(h));
    write_header(path, h);
    expect_refused(path, &cfg, SG_ERR_REGION_POLICY_MISMATCH);
    write_header(path, pristine);
    e = NULL;
    EXPECT(sg_engine_open_shared(path, &cfg, &e), SG_OK); /* repaired, with its state */
    EXPECT(sg_limits(e, KEY("shared"), KEY(MODEL), 0, 0, &l), SG_OK);
    CHECK(l.remaining[SG_METRIC_REQUESTS] == 599);
    sg_engine_free(e);

    /* A file that is not a region is left alone; one shorter than a header is too small. */
    int fd = open(path, O_WRONLY | O_TRUNC);
    CHECK(fd >= 0);
    char text[4096];
    for (size_t i = 0; i < sizeof text; i++) text[i] = (char)('a' + i % 26);
    CHECK(write(fd, text, sizeof text) == (ssize_t)sizeof text);
    close(fd);
    expect_refused(path, &cfg, SG_ERR_NOT_A_REGION);
    CHECK(stat(path, &st) == 0 && st.st_size == (off_t)sizeof text);
    fd = open(path, O_WRONLY | O_TRUNC);
    CHECK(fd >= 0 && write(fd, "short", 5) == 5);
    close(fd);
    e = garbage;
    EXPECT(sg_engine_open_shared(path, &cfg, &e), SG_ERR_REGION_TOO_SMALL);
    CHECK(e == NULL);
    CHECK(unlink(path) == 0);
}

static void test_region_in_host_memory(void) {
    sg_config cfg = shared_config();
    size_t size = 0;
    EXPECT(sg_region_size(&cfg, &size), SG_OK);
    CHECK(size % 128 == 0 && size > 1024 * 64);
    sg_config bad = cfg;
    bad.models = 4097;
    size_t unchanged = 1;
    EXPECT(sg_region_size(&bad, &unchanged), SG_ERR_BAD_CAPACITY);
    CHECK(unchanged == 1);
    bad = cfg;
    bad.scopes = 1ULL << 32;
    EXPECT(sg_region_size(&bad, &unchanged), SG_ERR_BAD_CAPACITY);
    sg_config bigger = cfg;
    bigger.scopes = 128;
    size_t bigger_size = 0;
    EXPECT(sg_region_size(&bigger, &bigger_size), SG_OK);
    CHECK(bigger_size > size);

    uint8_t *mem = (uint8_t *)mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    CHECK(mem != MAP_FAILED);
    sg_engine *const garbage = (sg_engine *)(uintptr_t)0xDEADBEEF;
    sg_engine *e = garbage;
    EXPECT(sg_engine_in_region(mem, size - 128, &cfg, 1, &e), SG_ERR_REGION_TOO_SMALL);
    CHECK(e == NULL);
    e = garbage;
    EXPECT(sg_engine_in_region(mem + 8, size - 8, &cfg, 1, &e), SG_ERR_REGION_MISALIGNED);
    CHECK(e == NULL);
    e = garbage;
    bad = cfg;
    bad.models = 4097;
    EXPECT(sg_engine_in_region(mem, size, &bad, 1, &e), SG_ERR_BAD_CAPACITY);
    CHECK(e == NULL);
    e = garbage;
    bad = cfg;
    bad.floor[SG_METRIC_REQUESTS] = NAN;
    EXPECT(sg_engine_in_region(mem, size, &bad, 1, &e), SG_ERR_POLICY);
    CHECK(e == NULL);
    /* Only attaching, to memory nobody initialised: refused once the wait for an initialiser
     * runs out (2^26 spins: about 2 s optimised, 17 s in a debug build). */
    e = garbage;
    EXPECT(sg_engine_in_region(mem, size, &cfg, 0, &e), SG_ERR_REGION_NOT_READY);
    CHECK(e == NULL);
    int zero = 1;
    for (size_t i = 0; i < size; i++) zero &= mem[i] == 0;
    CHECK(zero); /* none of the refusals wrote anything */

    /* The first caller initialises; a second attaches and sees the same limits. */
    sg_engine *first = NULL, *second = NULL;
    EXPECT(sg_engine_in_region(mem, size, &cfg, 1, &first), SG_OK);
    EXPECT(sg_engine_in_region(mem, size, &cfg, 0, &second), SG_OK);
    CHECK(first != NULL && second != NULL);
    sg_request r = request("region", 10, 10);
    sg_decision d;
    EXPECT(sg_admit(first, &r, 0, &d), SG_OK);
    CHECK(d.outcome == SG_ADMIT);
    sg_levels l;
    EXPECT(sg_limits(second, KEY("region"), KEY(MODEL), 0, 0, &l), SG_OK);
    CHECK(l.remaining[SG_METRIC_REQUESTS] == 599);
    settle_if_admitted(second, &d, 0);
    e = garbage;
    EXPECT(sg_engine_in_region(mem, size, &bigger, 1, &e), SG_ERR_REGION_CAPACITY_MISMATCH);
    CHECK(e == NULL);
    sg_config other = cfg;
    other.preset = "together";
    e = garbage;
    EXPECT(sg_engine_in_region(mem, size, &other, 0, &e), SG_ERR_REGION_POLICY_MISMATCH);
    CHECK(e == NULL);
    sg_engine_free(first);
    sg_engine_free(second);
    CHECK(memcmp(mem, "SLUICEGR", 8) == 0); /* sg_engine_free leaves the memory as it is */

    /* Memory that is neither zero nor a region is not written. */
    memset(mem, 0x5A, 256);
    e = garbage;
    EXPECT(sg_engine_in_region(mem, size, &cfg, 1, &e), SG_ERR_NOT_A_REGION);
    CHECK(e == NULL && mem[0] == 0x5A && mem[255] == 0x5A);
    munmap(mem, size);
}

/* NULL for every pointer argument of every function (a byte pointer with a non-zero length). */
/* Two decisions are the same but for their permits (each names its own scope). */
static int same_decision(const sg_decision *a, const sg_decision *b) {
    return a->outcome == b->outcome && a->metric == b->metric && a->too_large == b->too_large &&
           a->over_limit == b->over_limit && a->reason == b->reason && a->load == b->load &&
           a->retry_after_ns == b->retry_after_ns && a->wait_ns == b->wait_ns &&
           memcmp(a->cost, b->cost, sizeof a->cost) == 0 && memcmp(a->debt, b->debt, sizeof a->debt) == 0 &&
           memcmp(a->interval, b->interval, sizeof a->interval) == 0;
}

static uint64_t remaining_requests(sg_engine *e, const char *account, const char *model, uint64_t now) {
    sg_levels l;
    EXPECT(sg_limits(e, KEY(account), KEY(model), 0, now, &l), SG_OK);
    return l.remaining[SG_METRIC_REQUESTS];
}

/* Resolved scopes (sg_scope_resolve, sg_admit_scope, sg_scope_free): the same decisions as
 * sg_admit on a twin key, the same errors, permits that settle as any other, and a handle whose
 * scope was reclaimed for another key (or that is used with another engine) admitting its own
 * key. */
static void test_scopes(void) {
    sg_engine *e = engine_with("fixed", 1000);
    sg_scope *const garbage = (sg_scope *)(uintptr_t)0xDEADBEEF;
    sg_scope *s = garbage;
    EXPECT(sg_scope_resolve(e, KEY("twin-a"), KEY(MODEL), 0, 0, &s), SG_OK);
    CHECK(s != NULL && s != garbage);
    /* Resolving creates the scope, as sg_admit does, and charges nothing. */
    CHECK(remaining_requests(e, "twin-a", MODEL, 0) == 60);

    /* Through the handle and by key on a twin: the same decision, call after call, up to the
     * limit of 60 and the 429s after. The handle's request names another account, NULL model
     * bytes with a length, and the fast variant: all ignored. */
    sg_request by_key = request("twin-b", 100, 10);
    sg_request through = request("decoy", 100, 10);
    through.model = NULL;
    through.fast = 1;
    sg_decision k[62], h[62];
    sg_levels lk, lh;
    int admits = 0, limited = 0;
    for (int i = 0; i < 62; i++) {
        EXPECT(sg_admit(e, &by_key, 0, &k[i]), SG_OK);
        EXPECT(sg_admit_scope(e, s, &through, 0, &h[i]), SG_OK);
        CHECK(same_decision(&k[i], &h[i]));
        EXPECT(sg_decision_levels(&k[i], &lk), SG_OK);
        EXPECT(sg_decision_levels(&h[i], &lh), SG_OK);
        CHECK(memcmp(&lk, &lh, sizeof lk) == 0);
        CHECK(lh.remaining[SG_METRIC_REQUESTS] == (i < 60 ? (uint64_t)(59 - i) : 0));
        admits += h[i].outcome == SG_ADMIT;
        limited += h[i].outcome == SG_REJECT_RATE_LIMITED && h[i].metric == SG_METRIC_REQUESTS &&
                   h[i].retry_after_ns == SEC;
    }
    CHECK(admits == 60 && limited == 2);
    CHECK(h[0].cost[SG_METRIC_PROMPT_TOKENS] == 100 && h[0].cost[SG_METRIC_GENERATED_TOKENS] == 10);
    /* The handle charged its own key, not the request's account nor the fast variant. */
    CHECK(remaining_requests(e, "twin-a", MODEL, 0) == 0);
    CHECK(remaining_requests(e, "decoy", MODEL, 0) == 60);
    sg_levels fast;
    EXPECT(sg_limits(e, KEY("twin-a"), KEY(MODEL), 1, 0, &fast), SG_OK);
    CHECK(fast.remaining[SG_METRIC_REQUESTS] == 60);

    /* Its permits settle with sg_settle, once; the twin's first with the same usage. */
    sg_usage u = usage(100, 0, 4);
    EXPECT(sg_settle(e, &h[0].permit, &u, SG_COMPLETION_SUCCESS, 0), SG_OK);
    EXPECT(sg_settle(e, &h[0].permit, &u, SG_COMPLETION_SUCCESS, 0), SG_ERR_ALREADY_SETTLED);
    EXPECT(sg_cancel(e, &h[0].permit, &u, 0), SG_ERR_ALREADY_SETTLED);
    EXPECT(sg_settle(e, &k[0].permit, &u, SG_COMPLETION_SUCCESS, 0), SG_OK);
    for (int i = 1; i < 62; i++) {
        settle_if_admitted(e, &h[i], 0);
        settle_if_admitted(e, &k[i], 0);
    }
    /* A second later one request came back to each, and the two decide alike. */
    sg_decision one_k, one_h;
    EXPECT(sg_admit(e, &by_key, SEC, &one_k), SG_OK);
    EXPECT(sg_admit_scope(e, s, &through, SEC, &one_h), SG_OK);
    CHECK(one_h.outcome == SG_ADMIT && same_decision(&one_k, &one_h));
    settle_if_admitted(e, &one_k, SEC);
    settle_if_admitted(e, &one_h, SEC);
    /* An invalid request through a handle is refused as by key. */
    through.n = 0;
    EXPECT(sg_admit_scope(e, s, &through, SEC, &one_h), SG_OK);
    CHECK(one_h.outcome == SG_REJECT_INVALID && one_h.reason == 0);

    /* Bad keys: sg_admit's codes for the same key, and *scope NULL. */
    char longest[200];
    memset(longest, 'k', sizeof longest);
    struct {
        const uint8_t *account;
        size_t account_len;
        const uint8_t *model;
        size_t model_len;
        sg_result expected;
    } bad[] = {
        {(const uint8_t *)"", 0, (const uint8_t *)MODEL, strlen(MODEL), SG_ERR_EMPTY_KEY},
        {NULL, 0, (const uint8_t *)MODEL, strlen(MODEL), SG_ERR_EMPTY_KEY},
        {(const uint8_t *)"acct", 4, NULL, 0, SG_ERR_EMPTY_KEY},
        {(const uint8_t *)longest, 65, (const uint8_t *)MODEL, strlen(MODEL), SG_ERR_KEY_TOO_LONG},
        {(const uint8_t *)"acct", 4, (const uint8_t *)longest, 129, SG_ERR_KEY_TOO_LONG},
        {NULL, 4, (const uint8_t *)MODEL, strlen(MODEL), SG_ERR_NULL},
        {(const uint8_t *)"acct", 4, NULL, 5, SG_ERR_NULL},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        sg_request r = request("x", 10, 10);
        r.account = bad[i].account;
        r.account_len = bad[i].account_len;
        r.model = bad[i].model;
        r.model_len = bad[i].model_len;
        sg_decision d;
        EXPECT(sg_admit(e, &r, 0, &d), bad[i].expected);
        sg_scope *t = garbage;
        EXPECT(sg_scope_resolve(e, bad[i].account, bad[i].account_len, bad[i].model, bad[i].model_len, 0, 0, &t),
               bad[i].expected);
        CHECK(t == NULL);
    }
    /* The longest keys resolve. */
    sg_scope *longest_scope = NULL;
    EXPECT(sg_scope_resolve(e, (const uint8_t *)longest, 64, (const uint8_t *)longest, 128, 1, 0, &longest_scope),
           SG_OK);
    sg_decision d;
    EXPECT(sg_admit_scope(e, longest_scope, &through, SEC, &d), SG_OK); /* n = 0: still invalid */
    CHECK(d.outcome == SG_REJECT_INVALID);
    through.n = 1;
    EXPECT(sg_admit_scope(e, longest_scope, &through, SEC, &d), SG_OK);
    CHECK(d.outcome == SG_ADMIT);
    settle_if_admitted(e, &d, SEC);
    sg_levels l;
    EXPECT(sg_limits(e, (const uint8_t *)longest, 64, (const uint8_t *)longest, 128, 1, SEC, &l), SG_OK);
    CHECK(l.remaining[SG_METRIC_REQUESTS] == 59);
    sg_scope_free(longest_scope);

    /* A full table: a new key's scope is SG_ERR_TABLE_FULL, as sg_admit's; a known key's
     * still resolves. */
    sg_engine *tiny = engine_with("fixed", 2);
    sg_result last = SG_OK;
    char name[16] = "a0";
    for (int i = 0; i < 200 && last == SG_OK; i++) {
        snprintf(name, sizeof name, "a%d", i);
        sg_request t = request(name, 1, 1);
        last = sg_admit(tiny, &t, 0, &d);
        if (last == SG_OK) settle_if_admitted(tiny, &d, 0);
    }
    EXPECT(last, SG_ERR_TABLE_FULL);
    sg_scope *t = garbage;
    EXPECT(sg_scope_resolve(tiny, KEY(name), KEY(MODEL), 0, 0, &t), SG_ERR_TABLE_FULL);
    CHECK(t == NULL);
    EXPECT(sg_scope_resolve(tiny, KEY("a0"), KEY(MODEL), 0, 0, &t), SG_OK);
    EXPECT(sg_admit_scope(tiny, t, &through, 0, &d), SG_OK);
    CHECK(d.outcome == SG_ADMIT);
    settle_if_admitted(tiny, &d, 0);
    sg_scope_free(t);
    sg_engine_free(tiny);

    /* NULL pointers: SG_ERR_NULL, as sg_admit's, and nothing resolved or admitted. */
    sg_scope *n = garbage;
    EXPECT(sg_scope_resolve(NULL, KEY("null"), KEY(MODEL), 0, 0, &n), SG_ERR_NULL);
    CHECK(n == NULL);
    EXPECT(sg_scope_resolve(e, KEY("null"), KEY(MODEL), 0, 0, NULL), SG_ERR_NULL);
    EXPECT(sg_admit_scope(NULL, s, &through, SEC, &d), SG_ERR_NULL);
    EXPECT(sg_admit_scope(e, NULL, &through, SEC, &d), SG_ERR_NULL);
    EXPECT(sg_admit_scope(e, s, NULL, SEC, &d), SG_ERR_NULL);
    EXPECT(sg_admit_scope(e, s, &through, SEC, NULL), SG_ERR_NULL);
    sg_account acct;
    EXPECT(sg_account_get(e, KEY("null"), &acct), SG_ERR_UNKNOWN_ACCOUNT); /* never created */
    /* None of the refused calls at 1 s charged anything: 2 s refilled one request. */
    CHECK(remaining_requests(e, "twin-a", MODEL, 2 * SEC) == 1);
    sg_scope_free(NULL);
    sg_scope_free(s);

    sg_engine_free(e);

    /* A handle used with another engine admits its key there, never the scope of the key that
     * came first there, as its own key did where it was resolved. */
    sg_engine *first = engine_with("fixed", 1000), *other = engine_with("fixed", 1000);
    EXPECT(sg_scope_resolve(first, KEY("travels"), KEY(MODEL), 0, 0, &s), SG_OK);
    sg_request squatter = request("squatter", 1, 1);
    EXPECT(sg_admit(other, &squatter, 0, &d), SG_OK);
    settle_if_admitted(other, &d, 0);
    EXPECT(sg_admit_scope(other, s, &through, 0, &d), SG_OK);
    CHECK(d.outcome == SG_ADMIT);
    settle_if_admitted(other, &d, 0);
    CHECK(remaining_requests(other, "travels", MODEL, 0) == 59);
    CHECK(remaining_requests(other, "squatter", MODEL, 0) == 59);
    CHECK(remaining_requests(first, "travels", MODEL, 0) == 60);
    /* The engines may go first: the handle does not point into them. */
    sg_engine_free(first);
    sg_engine_free(other);
    sg_scope_free(s);

    /* Reclaimed (core/tests/suite/handles.rs): one scope slot. "a" is resolved and used, then idle
     * for minutes while "b" takes the slot; the handle then never charges "b": while "b" is
     * busy "a" finds no room (as sg_admit would), and once "b" is idle "a" takes the slot back. */
    sg_config cfg;
    EXPECT(sg_config_default(&cfg), SG_OK);
    cfg.preset = "fixed";
    cfg.scopes = 1;
    cfg.accounts = 4;
    cfg.models = 1;
    cfg.permits = 8;
    cfg.seed = 7;
    sg_engine *one = NULL;
    EXPECT(sg_engine_new(&cfg, &one), SG_OK);
    const uint64_t MINUTE = 60 * SEC;
    EXPECT(sg_scope_resolve(one, KEY("a"), KEY("m"), 0, 0, &s), SG_OK);
    EXPECT(sg_admit_scope(one, s, &through, 0, &d), SG_OK);
    CHECK(d.outcome == SG_ADMIT);
    settle_if_admitted(one, &d, 0);
    sg_request b = request("b", 1, 1);
    b.model = (const uint8_t *)"m";
    b.model_len = 1;
    EXPECT(sg_admit(one, &b, 5 * MINUTE, &d), SG_OK);
    CHECK(d.outcome == SG_ADMIT);
    settle_if_admitted(one, &d, 5 * MINUTE);
    sg_request a = b;
    a.account = (const uint8_t *)"a";
    EXPECT(sg_admit(one, &a, 5 * MINUTE, &d), SG_ERR_TABLE_FULL);
    EXPECT(sg_admit_scope(one, s, &through, 5 * MINUTE, &d), SG_ERR_TABLE_FULL);
    CHECK(remaining_requests(one, "b", "m", 5 * MINUTE) == 59); /* only b's own request */
    EXPECT(sg_admit_scope(one, s, &through, 11 * MINUTE, &d), SG_OK);
    CHECK(d.outcome == SG_ADMIT);
    settle_if_admitted(one, &d, 11 * MINUTE);
    CHECK(remaining_requests(one, "a", "m", 11 * MINUTE) == 59);
    /* The handle remembers where: the next admission charges the same scope. */
    EXPECT(sg_admit_scope(one, s, &through, 11 * MINUTE, &d), SG_OK);
    CHECK(d.outcome == SG_ADMIT);
    settle_if_admitted(one, &d, 11 * MINUTE);
    CHECK(remaining_requests(one, "a", "m", 11 * MINUTE) == 58);
    sg_scope_free(s);

    /* After sg_restore (a new incarnation) a handle resolved before still admits its key. */
    EXPECT(sg_scope_resolve(one, KEY("a"), KEY("m"), 0, 11 * MINUTE, &s), SG_OK);
    size_t size = 0, written = 0;
    EXPECT(sg_snapshot_size(one, &size), SG_OK);
    uint8_t *snap = (uint8_t *)malloc(size);
    CHECK(snap != NULL);
    EXPECT(sg_snapshot_write(one, snap, size, 11 * MINUTE, &written), SG_OK);
    EXPECT(sg_restore(one, snap, written, 11 * MINUTE), SG_OK);
    free(snap);
    EXPECT(sg_admit_scope(one, s, &through, 11 * MINUTE, &d), SG_OK);
    CHECK(d.outcome == SG_ADMIT);
    settle_if_admitted(one, &d, 11 * MINUTE);
    CHECK(remaining_requests(one, "a", "m", 11 * MINUTE) == 57);
    sg_scope_free(s);
    sg_engine_free(one);
}

/* *o filled with 0xFF bytes, as stale memory: every call must overwrite all of it. */
static sg_result scan(const char *body, sg_openai_request *o) {
    memset(o, 0xFF, sizeof *o);
    return sg_openai_request_scan((const uint8_t *)body, strlen(body), o);
}

/* After a refusal: every field zero but error_offset, which is `offset`. */
static int zero_but_offset(const sg_openai_request *o, uint64_t offset) {
    for (size_t i = 0; i < SG_MODEL_MAX; i++) {
        if (o->model[i] != 0) return 0;
    }
    return o->model_len == 0 && o->max_tokens == 0 && o->n == 0 && !o->stream && !o->include_usage &&
           o->prompt_chars == 0 && o->prompt_token_ids == 0 && o->prompt_tokens == 0 &&
           o->error_offset == offset;
}

/* The request-body scanner: a chat body's fields, admitted as they say; each 400 code, with
 * *out zeroed but for the offset of a JSON error. */
static void test_openai_request_scan(void) {
    sg_openai_request o;
    /* "brève" is 5 characters in 6 bytes: 11 + 20 characters, 7 tokens. */
    EXPECT(scan("{\"model\": \"llama-v3p1-70b\", \"max_completion_tokens\": 300, \"max_tokens\": 100,"
                " \"n\": 2, \"stream\": true, \"stream_options\": {\"include_usage\": true},"
                " \"messages\": [{\"role\": \"system\", \"content\": \"Sois br\xc3\xa8ve.\"},"
                " {\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": \"How far is the moon?\"}]}]}",
                &o),
           SG_OK);
    CHECK(o.model_len == strlen(MODEL) && memcmp(o.model, MODEL, o.model_len) == 0);
    CHECK(o.max_tokens == 300 && o.n == 2 && o.stream && o.include_usage);
    CHECK(o.prompt_chars == 31 && o.prompt_token_ids == 0 && o.prompt_tokens == 7);
    CHECK(o.error_offset == 0);

    /* What it scanned is what a gateway admits. */
    sg_engine *e = engine_with("fixed", 64);
    sg_request r = request("acct-scan", o.prompt_tokens, o.max_tokens);
    r.model = o.model;
    r.model_len = o.model_len;
    r.n = o.n;
    sg_decision d;
    EXPECT(sg_admit(e, &r, 0, &d), SG_OK);
    CHECK(admitted(&d));
    CHECK(d.cost[SG_METRIC_REQUESTS] == 2 && d.cost[SG_METRIC_PROMPT_TOKENS] == 7);
    CHECK(d.cost[SG_METRIC_GENERATED_TOKENS] == 600);
    settle_if_admitted(e, &d, 0);
    sg_engine_free(e);

    /* A pre-tokenized prompt; no max_tokens reads 0 (the gateway's default), no n 1. */
    EXPECT(scan("{\"model\": \"m\", \"prompt\": [1, 2, 3], \"stream\": false}", &o), SG_OK);
    CHECK(o.model_len == 1 && o.model[0] == 'm' && o.max_tokens == 0 && o.n == 1);
    CHECK(!o.stream && !o.include_usage && o.prompt_chars == 0 && o.prompt_token_ids == 3 &&
          o.prompt_tokens == 3);

    char deep[200];
    memset(deep, '[', 65);
    memset(deep + 65, ']', 65);
    deep[130] = '\0';
    char long_model[200];
    snprintf(long_model, sizeof long_model, "{\"model\": \"%0129d\"}", 0); /* 129 bytes */
    EXPECT(scan("{\"model\": x}", &o), SG_ERR_JSON_MALFORMED);
    CHECK(zero_but_offset(&o, 10));
    EXPECT(scan(deep, &o), SG_ERR_JSON_TOO_DEEP);
    CHECK(zero_but_offset(&o, 64)); /* the 65th '[' */
    EXPECT(scan("{\"model\":\"m\"", &o), SG_ERR_JSON_TRUNCATED);
    CHECK(zero_but_offset(&o, 0));
    EXPECT(scan("[1]", &o), SG_ERR_BODY_NOT_AN_OBJECT);
    CHECK(zero_but_offset(&o, 0));
    EXPECT(scan("{\"messages\": []}", &o), SG_ERR_BODY_MISSING_MODEL);
    CHECK(zero_but_offset(&o, 0));
    EXPECT(scan(long_model, &o), SG_ERR_BODY_INVALID_MODEL);
    CHECK(zero_but_offset(&o, 0));
    snprintf(long_model, sizeof long_model, "{\"model\": \"%0128d\"}", 0); /* 128 bytes: fits */
    EXPECT(scan(long_model, &o), SG_OK);
    CHECK(o.model_len == SG_MODEL_MAX && o.model[0] == '0' && o.model[SG_MODEL_MAX - 1] == '0');
    EXPECT(scan("{\"model\": \"m\", \"max_tokens\": 0}", &o), SG_ERR_BODY_INVALID_MAX_TOKENS);
    CHECK(zero_but_offset(&o, 0));
    EXPECT(scan("{\"model\": \"m\", \"n\": 1.5}", &o), SG_ERR_BODY_INVALID_N);
    CHECK(zero_but_offset(&o, 0));

    /* An empty body may come as NULL with length 0. */
    memset(&o, 0xFF, sizeof o);
    EXPECT(sg_openai_request_scan(NULL, 0, &o), SG_ERR_JSON_TRUNCATED);
    CHECK(zero_but_offset(&o, 0));

    const sg_result codes[] = {SG_ERR_JSON_MALFORMED,       SG_ERR_JSON_TOO_DEEP,
                               SG_ERR_JSON_TRUNCATED,       SG_ERR_BODY_NOT_AN_OBJECT,
                               SG_ERR_BODY_MISSING_MODEL,   SG_ERR_BODY_INVALID_MODEL,
                               SG_ERR_BODY_INVALID_MAX_TOKENS, SG_ERR_BODY_INVALID_N};
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++) {
        const char *text = sg_result_str((uint32_t)codes[i]);
        CHECK(text != NULL && strcmp(text, "unknown result code") != 0);
    }
}

/* A streamed chat completion as OpenAI sends it with stream_options.include_usage: a role chunk,
 * two content deltas (" w\xc3\xb6rld" is 6 characters in 7 bytes), a finish chunk, each with
 * "usage": null, then the usage chunk and [DONE]. */
static const char STREAMED[] =
    "data: {\"id\":\"chatcmpl-9\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":"
    "[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}],\"usage\":null}\n\n"
    "data: {\"id\":\"chatcmpl-9\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":"
    "[{\"index\":0,\"delta\":{\"content\":\"Hello\"},\"finish_reason\":null}],\"usage\":null}\n\n"
    "data: {\"id\":\"chatcmpl-9\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":"
    "[{\"index\":0,\"delta\":{\"content\":\" w\xc3\xb6rld\"},\"finish_reason\":null}],\"usage\":null}\n\n"
    "data: {\"id\":\"chatcmpl-9\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":"
    "[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n"
    "data: {\"id\":\"chatcmpl-9\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[],"
    "\"usage\":{\"prompt_tokens\":1017,\"completion_tokens\":3,\"total_tokens\":1020,"
    "\"prompt_tokens_details\":{\"cached_tokens\":1000}}}\n\n"
    "data: [DONE]\n\n";

static int usage_is_zero(const sg_response_usage *u) {
    return u->prompt_tokens == 0 && u->cached_tokens == 0 && u->completion_tokens == 0 &&
           u->generated_chars == 0 && u->objects == 0 && !u->has_usage && !u->has_prompt_tokens &&
           !u->malformed_usage;
}

/* The response-usage scanner in caller-owned storage: a stream in 7-byte pieces, charged as it
 * goes; a JSON body; unusable usage; refused before init and after finish. */
static void test_usage_scanner(void) {
    CHECK(sizeof(sg_usage_scanner) == 8 * SG_USAGE_SCANNER_WORDS);
    sg_usage_scanner s; /* on the stack, uninitialised */
    sg_response_usage u;
    uint64_t chars = 99;
    EXPECT(sg_usage_scanner_init(&s, true), SG_OK);
    EXPECT(sg_usage_scanner_generated_chars(&s, &chars), SG_OK);
    CHECK(chars == 0);
    const size_t len = sizeof STREAMED - 1;
    uint64_t last = 0;
    int grew = 0;
    for (size_t off = 0; off < len; off += 7) {
        size_t n = len - off < 7 ? len - off : 7;
        EXPECT(sg_usage_scanner_feed(&s, (const uint8_t *)STREAMED + off, n), SG_OK);
        EXPECT(sg_usage_scanner_generated_chars(&s, &chars), SG_OK);
        CHECK(chars >= last);
        if (chars != last) {
            grew++;
            /* Counted when the event's line ends: the piece just fed holds that newline. */
            CHECK(memchr(STREAMED + off, '\n', n) != NULL);
            CHECK(chars == (grew == 1 ? 5u : 11u));
        }
        last = chars;
    }
    CHECK(grew == 2);
    EXPECT(sg_usage_scanner_feed(&s, NULL, 0), SG_OK); /* nothing */
    memset(&u, 0xFF, sizeof u);
    EXPECT(sg_usage_scanner_finish(&s, &u), SG_OK);
    CHECK(u.has_usage && u.has_prompt_tokens && !u.malformed_usage);
    CHECK(u.prompt_tokens == 1017 && u.cached_tokens == 1000 && u.completion_tokens == 3);
    CHECK(u.generated_chars == 11 && u.objects == 5);

    /* Finished: refused until initialised again, *out and *chars zeroed. */
    memset(&u, 0xFF, sizeof u);
    EXPECT(sg_usage_scanner_finish(&s, &u), SG_ERR_SCANNER_NOT_INITIALISED);
    CHECK(usage_is_zero(&u));
    EXPECT(sg_usage_scanner_feed(&s, (const uint8_t *)"data", 4), SG_ERR_SCANNER_NOT_INITIALISED);
    chars = 99;
    EXPECT(sg_usage_scanner_generated_chars(&s, &chars), SG_ERR_SCANNER_NOT_INITIALISED);
    CHECK(chars == 0);

    /* Never initialised (zeroed): refused, and not written. */
    sg_usage_scanner zero;
    memset(&zero, 0, sizeof zero);
    EXPECT(sg_usage_scanner_feed(&zero, (const uint8_t *)STREAMED, len), SG_ERR_SCANNER_NOT_INITIALISED);
    EXPECT(sg_usage_scanner_finish(&zero, &u), SG_ERR_SCANNER_NOT_INITIALISED);
    int untouched = 1;
    for (size_t i = 0; i < SG_USAGE_SCANNER_WORDS; i++) {
        if (zero.opaque[i] != 0) untouched = 0;
    }
    CHECK(untouched);

    /* A JSON body (not a stream), in storage from the heap as a request pool would give it:
     * "Bonjour \xc3\xa0 vous" is 14 characters. */
    sg_usage_scanner *heap = (sg_usage_scanner *)malloc(sizeof *heap);
    CHECK(heap != NULL);
    const char *body =
        "{\"id\": \"chatcmpl-1\", \"object\": \"chat.completion\", \"choices\": [{\"index\": 0,"
        " \"message\": {\"role\": \"assistant\", \"content\": \"Bonjour \xc3\xa0 vous\"},"
        " \"finish_reason\": \"stop\"}], \"usage\": {\"prompt_tokens\": 20, \"completion_tokens\": 9}}";
    EXPECT(sg_usage_scanner_init(heap, false), SG_OK);
    EXPECT(sg_usage_scanner_feed(heap, (const uint8_t *)body, strlen(body)), SG_OK);
    EXPECT(sg_usage_scanner_finish(heap, &u), SG_OK);
    CHECK(u.has_usage && u.has_prompt_tokens && !u.malformed_usage);
    CHECK(u.prompt_tokens == 20 && u.cached_tokens == 0 && u.completion_tokens == 9);
    CHECK(u.generated_chars == 14 && u.objects == 1);

    /* Usage without completion_tokens is flagged and not used; the text still counts. */
    const char *bad = "data: {\"choices\": [{\"delta\": {\"content\": \"abc\"}}], \"usage\": {\"prompt_tokens\": 4}}\n\n";
    EXPECT(sg_usage_scanner_init(heap, true), SG_OK);
    EXPECT(sg_usage_scanner_feed(heap, (const uint8_t *)bad, strlen(bad)), SG_OK);
    EXPECT(sg_usage_scanner_finish(heap, &u), SG_OK);
    CHECK(!u.has_usage && !u.has_prompt_tokens && u.malformed_usage);
    CHECK(u.prompt_tokens == 0 && u.completion_tokens == 0 && u.generated_chars == 3 && u.objects == 1);
    free(heap);

    const char *text = sg_result_str(SG_ERR_SCANNER_NOT_INITIALISED);
    CHECK(text != NULL && strcmp(text, "unknown result code") != 0);
}

static void test_null_pointers(void) {
    sg_engine *e = engine_with("fixed", 64);
    sg_config cfg;
    EXPECT(sg_config_default(&cfg), SG_OK);
    sg_engine *out = NULL;
    const uint8_t *acct = (const uint8_t *)"acct";
    const uint8_t *model = (const uint8_t *)MODEL;
    size_t model_len = strlen(MODEL);
    sg_account a;
    sg_price p;
    memset(&p, 0, sizeof p);
    uint32_t used = 0, limit = 0, status = 0;
    sg_request r = request("acct", 10, 10);
    sg_decision d;
    EXPECT(sg_admit(e, &r, 0, &d), SG_OK);
    sg_usage u = usage(10, 0, 10);
    sg_levels l;
    sg_render render;
    EXPECT(sg_render_init(e, SG_DIALECT_FIREWORKS, &render), SG_OK);
    uint8_t buf[1024];
    size_t n = 0;

    EXPECT(sg_config_default(NULL), SG_ERR_NULL);
    EXPECT(sg_engine_new(NULL, &out), SG_ERR_NULL);
    EXPECT(sg_engine_new(&cfg, NULL), SG_ERR_NULL);

    EXPECT(sg_account_get(NULL, acct, 4, &a), SG_ERR_NULL);
    EXPECT(sg_account_get(e, NULL, 4, &a), SG_ERR_NULL);
    EXPECT(sg_account_get(e, acct, 4, NULL), SG_ERR_NULL);
    EXPECT(sg_add_credits(NULL, acct, 4, 1), SG_ERR_NULL);
    EXPECT(sg_add_credits(e, NULL, 4, 1), SG_ERR_NULL);
    EXPECT(sg_set_payment_method(NULL, acct, 4, 1), SG_ERR_NULL);
    EXPECT(sg_set_payment_method(e, NULL, 4, 1), SG_ERR_NULL);
    EXPECT(sg_set_spend_limit(NULL, acct, 4, 1), SG_ERR_NULL);
    EXPECT(sg_set_max_in_flight(NULL, acct, 4, 1), SG_ERR_NULL);
    EXPECT(sg_set_max_in_flight(e, NULL, 4, 1), SG_ERR_NULL);
    EXPECT(sg_set_spend_limit(e, NULL, 4, 1), SG_ERR_NULL);
    EXPECT(sg_set_suspended(NULL, acct, 4, SG_SUSPENSION_OPERATOR, 1), SG_ERR_NULL);
    EXPECT(sg_set_suspended(e, NULL, 4, SG_SUSPENSION_OPERATOR, 1), SG_ERR_NULL);
    EXPECT(sg_set_tier(NULL, acct, 4, SG_TIER2, 0), SG_ERR_NULL);
    EXPECT(sg_set_tier(e, NULL, 4, SG_TIER2, 0), SG_ERR_NULL);
    EXPECT(sg_set_limits_override(NULL, acct, 4, SG_METRIC_REQUESTS, 10, 20, 0), SG_ERR_NULL);
    EXPECT(sg_set_limits_override(e, NULL, 4, SG_METRIC_REQUESTS, 10, 20, 0), SG_ERR_NULL);
    EXPECT(sg_start_billing_period(NULL, 0), SG_ERR_NULL);
    EXPECT(sg_set_price(NULL, model, model_len, 0, &p), SG_ERR_NULL);
    EXPECT(sg_set_price(e, NULL, model_len, 0, &p), SG_ERR_NULL);
    EXPECT(sg_set_price(e, model, model_len, 0, NULL), SG_ERR_NULL);
    EXPECT(sg_quota_acquire(NULL, acct, 4, SG_QUOTA_A100_GPUS, 1, &used, &limit), SG_ERR_NULL);
    EXPECT(sg_quota_acquire(e, NULL, 4, SG_QUOTA_A100_GPUS, 1, &used, &limit), SG_ERR_NULL);
    EXPECT(sg_quota_release(NULL, acct, 4, SG_QUOTA_A100_GPUS, 1, &used, &limit), SG_ERR_NULL);
    EXPECT(sg_quota_release(e, NULL, 4, SG_QUOTA_A100_GPUS, 1, &used, &limit), SG_ERR_NULL);
    EXPECT(sg_quota_set_limit(NULL, acct, 4, SG_QUOTA_A100_GPUS, 9, &used, &limit), SG_ERR_NULL);
    EXPECT(sg_quota_set_limit(e, NULL, 4, SG_QUOTA_A100_GPUS, 9, &used, &limit), SG_ERR_NULL);
    /* The quota outputs are optional. */
    EXPECT(sg_quota_acquire(e, acct, 4, SG_QUOTA_A100_GPUS, 1, NULL, NULL), SG_OK);
    EXPECT(sg_quota_set_limit(e, acct, 4, SG_QUOTA_A100_GPUS, 9, NULL, NULL), SG_OK);
    EXPECT(sg_quota_release(e, acct, 4, SG_QUOTA_A100_GPUS, 1, NULL, NULL), SG_OK);

    sg_request no_account = r, no_model = r;
    no_account.account = NULL;
    no_model.model = NULL;
    EXPECT(sg_admit(NULL, &r, 0, &d), SG_ERR_NULL);
    EXPECT(sg_admit(e, NULL, 0, &d), SG_ERR_NULL);
    EXPECT(sg_admit(e, &r, 0, NULL), SG_ERR_NULL);
    EXPECT(sg_admit(e, &no_account, 0, &d), SG_ERR_NULL);
    EXPECT(sg_admit(e, &no_model, 0, &d), SG_ERR_NULL);
    EXPECT(sg_settle(NULL, &d.permit, &u, SG_COMPLETION_SUCCESS, 0), SG_ERR_NULL);
    EXPECT(sg_settle(e, NULL, &u, SG_COMPLETION_SUCCESS, 0), SG_ERR_NULL);
    EXPECT(sg_settle(e, &d.permit, NULL, SG_COMPLETION_SUCCESS, 0), SG_ERR_NULL);
    EXPECT(sg_cancel(NULL, &d.permit, &u, 0), SG_ERR_NULL);
    EXPECT(sg_cancel(e, NULL, &u, 0), SG_ERR_NULL);
    EXPECT(sg_cancel(e, &d.permit, NULL, 0), SG_ERR_NULL);
    EXPECT(sg_charge(NULL, &d.permit, 1, 0), SG_ERR_NULL);
    EXPECT(sg_charge(e, NULL, 1, 0), SG_ERR_NULL);
    EXPECT(sg_decision_levels(NULL, &l), SG_ERR_NULL);
    EXPECT(sg_decision_levels(&d, NULL), SG_ERR_NULL);
    EXPECT(sg_limits(NULL, acct, 4, model, model_len, 0, 0, &l), SG_ERR_NULL);
    EXPECT(sg_limits(e, NULL, 4, model, model_len, 0, 0, &l), SG_ERR_NULL);
    EXPECT(sg_limits(e, acct, 4, NULL, model_len, 0, 0, &l), SG_ERR_NULL);
    EXPECT(sg_limits(e, acct, 4, model, model_len, 0, 0, NULL), SG_ERR_NULL);
    EXPECT(sg_set_load(NULL, model, model_len, 0, 10), SG_ERR_NULL);
    EXPECT(sg_set_load(e, NULL, model_len, 0, 10), SG_ERR_NULL);
    EXPECT(sg_set_model_capacity(NULL, model, model_len, 0, 10), SG_ERR_NULL);
    EXPECT(sg_set_model_capacity(e, NULL, model_len, 0, 10), SG_ERR_NULL);

    EXPECT(sg_render_init(NULL, SG_DIALECT_FIREWORKS, &render), SG_ERR_NULL);
    EXPECT(sg_render_init(e, SG_DIALECT_FIREWORKS, NULL), SG_ERR_NULL);
    EXPECT(sg_render_status(NULL, &render, &status), SG_ERR_NULL);
    EXPECT(sg_render_status(&d, NULL, &status), SG_ERR_NULL);
    EXPECT(sg_render_status(&d, &render, NULL), SG_ERR_NULL);
    EXPECT(sg_render_headers(NULL, &render, 0, buf, sizeof buf, &n), SG_ERR_NULL);
    EXPECT(sg_render_headers(&d, NULL, 0, buf, sizeof buf, &n), SG_ERR_NULL);
    EXPECT(sg_render_headers(&d, &render, 0, NULL, sizeof buf, &n), SG_ERR_NULL);
    EXPECT(sg_render_headers(&d, &render, 0, buf, sizeof buf, NULL), SG_ERR_NULL);
    EXPECT(sg_render_error_body(NULL, &render, buf, sizeof buf, &n), SG_ERR_NULL);
    EXPECT(sg_render_error_body(&d, NULL, buf, sizeof buf, &n), SG_ERR_NULL);
    EXPECT(sg_render_error_body(&d, &render, NULL, sizeof buf, &n), SG_ERR_NULL);
    EXPECT(sg_render_error_body(&d, &render, buf, sizeof buf, NULL), SG_ERR_NULL);

    EXPECT(sg_snapshot_size(NULL, &n), SG_ERR_NULL);
    EXPECT(sg_snapshot_size(e, NULL), SG_ERR_NULL);
    EXPECT(sg_snapshot_write(NULL, buf, sizeof buf, 0, &n), SG_ERR_NULL);
    EXPECT(sg_snapshot_write(e, NULL, sizeof buf, 0, &n), SG_ERR_NULL);
    EXPECT(sg_snapshot_write(e, buf, sizeof buf, 0, NULL), SG_ERR_NULL);
    EXPECT(sg_restore(NULL, buf, sizeof buf, 0), SG_ERR_NULL);
    EXPECT(sg_restore(e, NULL, sizeof buf, 0), SG_ERR_NULL);

    sg_openai_request scanned;
    memset(&scanned, 0xFF, sizeof scanned);
    EXPECT(sg_openai_request_scan(buf, 0, NULL), SG_ERR_NULL);
    EXPECT(sg_openai_request_scan(NULL, 5, &scanned), SG_ERR_NULL);
    CHECK(zero_but_offset(&scanned, 0)); /* no stale fields after a refusal */

    sg_usage_scanner scanner;
    sg_response_usage ru;
    uint64_t chars = 99;
    EXPECT(sg_usage_scanner_init(NULL, true), SG_ERR_NULL);
    EXPECT(sg_usage_scanner_init(&scanner, true), SG_OK);
    EXPECT(sg_usage_scanner_feed(NULL, buf, 1), SG_ERR_NULL);
    EXPECT(sg_usage_scanner_feed(&scanner, NULL, 5), SG_ERR_NULL);
    EXPECT(sg_usage_scanner_generated_chars(NULL, &chars), SG_ERR_NULL);
    CHECK(chars == 0);
    EXPECT(sg_usage_scanner_generated_chars(&scanner, NULL), SG_ERR_NULL);
    memset(&ru, 0xFF, sizeof ru);
    EXPECT(sg_usage_scanner_finish(NULL, &ru), SG_ERR_NULL);
    CHECK(usage_is_zero(&ru));
    EXPECT(sg_usage_scanner_finish(&scanner, NULL), SG_ERR_NULL);
    EXPECT(sg_usage_scanner_finish(&scanner, &ru), SG_OK); /* not finished by the NULL out */
    CHECK(usage_is_zero(&ru));

    /* The shared engines: every failure sets *engine to NULL, and creates no file. */
    char path[256];
    shared_path(path, sizeof path, "null");
    sg_engine *const garbage = (sg_engine *)(uintptr_t)0xDEADBEEF;
    out = garbage;
    EXPECT(sg_engine_open_shared(NULL, &cfg, &out), SG_ERR_NULL);
    CHECK(out == NULL);
    out = garbage;
    EXPECT(sg_engine_open_shared(path, NULL, &out), SG_ERR_NULL);
    CHECK(out == NULL);
    EXPECT(sg_engine_open_shared(path, &cfg, NULL), SG_ERR_NULL);
    CHECK(access(path, F_OK) != 0);
    EXPECT(sg_region_size(NULL, &n), SG_ERR_NULL);
    EXPECT(sg_region_size(&cfg, NULL), SG_ERR_NULL);
    cfg.scopes = 64;
    EXPECT(sg_region_size(&cfg, &n), SG_OK);
    uint8_t *mem = (uint8_t *)mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(mem != MAP_FAILED);
    out = garbage;
    EXPECT(sg_engine_in_region(NULL, n, &cfg, 1, &out), SG_ERR_NULL);
    CHECK(out == NULL);
    out = garbage;
    EXPECT(sg_engine_in_region(mem, n, NULL, 1, &out), SG_ERR_NULL);
    CHECK(out == NULL);
    EXPECT(sg_engine_in_region(mem, n, &cfg, 1, NULL), SG_ERR_NULL);
    CHECK(mem[0] == 0 && mem[8] == 0); /* not initialised by any of them */
    munmap(mem, n);

    /* None of the refused calls touched the permit. */
    EXPECT(sg_settle(e, &d.permit, &u, SG_COMPLETION_SUCCESS, 0), SG_OK);
    sg_engine_free(e);
}

int main(void) {
    test_result_strings();
    test_config_and_lifecycle();
    test_fixed_limits();
    test_zero_fields_keep_the_preset();
    test_off_and_fixed_enforcing_only_what_is_set();
    test_admit_settle_charge_cancel();
    test_outcomes();
    test_service_tiers();
    test_metrics();
    test_keys_and_tables();
    test_accounts_prices_quotas();
    test_rendering();
    test_anthropic_resets_are_real_dates();
    test_snapshot_restore();
    test_permit_expiry();
    test_a_burst_at_one_instant_never_bills_past_the_spend_limit();
    test_one_account_can_never_take_the_whole_ledger();
    test_max_in_flight();
    test_shared_file();
    test_region_in_host_memory();
    test_scopes();
    test_openai_request_scan();
    test_usage_scanner();
    test_null_pointers();
    test_redis();
    /* Every code reachable from C was returned somewhere above (SG_ERR_PANIC never should be;
     * SG_ERR_REGION_NOT_LOCK_FREE only on a machine without lock-free 16-byte atomics, which
     * x86_64 and aarch64 are not). */
    for (uint32_t code = 0; code < CODES; code++) {
        if (code != SG_ERR_PANIC && code != SG_ERR_REGION_NOT_LOCK_FREE && !seen[code]) {
            fprintf(stderr, "no check returned %u (%s)\n", code, sg_result_str(code));
            fail(__FILE__, __LINE__, "every result code is checked");
        }
    }
    CHECK(!seen[SG_ERR_PANIC]);
    printf("%d passed, 0 failed\n", passed);
    return 0;
}
