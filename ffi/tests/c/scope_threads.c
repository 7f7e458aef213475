/*
 * Threads sharing ONE resolved scope (sg_scope_resolve, sg_admit_scope): every window admits
 * exactly the limit in total, never one more (the limit holds under contention) and never one
 * fewer (no lost updates), including when the handle's scope has moved and every thread finds
 * it stale and looks its key up again at once. Three parts, each window starting all its
 * threads together at a barrier, on a "fixed" engine and a simulated clock:
 *
 *   1. 4 threads x 5,000 calls a phase, at 0 s, 30 s and 90 s, 10,000 requests a minute:
 *      exactly 10,000, 5,000 and 10,000 admitted.
 *   2. 20 windows a minute apart, 4 threads x 100 calls, 200 a minute; before each window the
 *      main thread restores the engine from its own snapshot (sg_restore moves every scope):
 *      exactly 200 admitted in each.
 *   3. As core/tests/suite/handles.rs: 40 windows ten minutes apart on a 16-scope engine, 50 a
 *      minute; before each the main thread admits 12 new keys, which reclaim idle scopes,
 *      the handle's among them; then 2 threads x 50 calls through the handle while a third
 *      admits those keys: exactly 50 admitted through the handle in each.
 *
 * Every admission through the handle must be SG_OK and an admit or a 429 on requests; each
 * thread settles its permits, once with SG_OK and a second time with SG_ERR_ALREADY_SETTLED.
 * Built with AddressSanitizer + UndefinedBehaviorSanitizer against the shared library.
 *
 * Ends with the line "N passed, 0 failed" (exit 0), or "N passed, M failed" (exit 1).
 *
 *   cc -std=c11 -pthread -Wall -Wextra -Werror -pedantic -Iinclude ffi/tests/c/scope_threads.c \
 *      target/debug/libsluicegate.a -lpthread -ldl -lm -o scope_threads && ./scope_threads
 */
#define _POSIX_C_SOURCE 200809L /* pthread_barrier_t */

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sluicegate.h"

#define SEC 1000000000ULL
#define MINUTE (60 * SEC)
#define MAX_THREADS 4

static int passed, failed;

static void check(int ok, const char *what) {
    if (ok) {
        passed++;
    } else {
        failed++;
        fprintf(stderr, "check failed: %s\n", what);
    }
}

/* What the threads of the current part share. */
static sg_engine *engine;
static sg_scope *scope;
static int admitters, calls, windows;
static int churning; /* part 3: one more thread admits the churn keys */
static uint64_t window_now[64];
static char churn[64][12][24]; /* part 3: the new keys of each window */
static pthread_barrier_t start, done;

static size_t admitted[MAX_THREADS][64];
static size_t unexpected[MAX_THREADS]; /* errors, outcomes other than admit / 429, bad settles */

static void *admitter(void *arg) {
    size_t t = (size_t)(uintptr_t)arg;
    sg_request r;
    memset(&r, 0, sizeof r); /* no key: the handle's is used */
    r.n = 1;                 /* costs 1 request, no tokens */
    sg_usage none;
    memset(&none, 0, sizeof none);
    for (int w = 0; w < windows; w++) {
        pthread_barrier_wait(&start);
        for (int i = 0; i < calls; i++) {
            sg_decision d;
            sg_result rc = sg_admit_scope(engine, scope, &r, window_now[w], &d);
            if (rc != SG_OK) {
                unexpected[t]++;
            } else if (d.outcome == SG_ADMIT) {
                admitted[t][w]++;
                sg_result first = sg_settle(engine, &d.permit, &none, SG_COMPLETION_SUCCESS, window_now[w]);
                sg_result second = sg_settle(engine, &d.permit, &none, SG_COMPLETION_SUCCESS, window_now[w]);
                unexpected[t] += first != SG_OK || second != SG_ERR_ALREADY_SETTLED;
            } else if (d.outcome != SG_REJECT_RATE_LIMITED || d.metric != SG_METRIC_REQUESTS) {
                unexpected[t]++;
            }
        }
        pthread_barrier_wait(&done);
    }
    return NULL;
}

/* Admits and settles a request of `name` on model "m"; 1 if it was admitted. */
static int serve(const char *name, uint64_t now) {
    sg_request r;
    memset(&r, 0, sizeof r);
    r.account = (const uint8_t *)name;
    r.account_len = strlen(name);
    r.model = (const uint8_t *)"m";
    r.model_len = 1;
    r.n = 1;
    sg_decision d;
    if (sg_admit(engine, &r, now, &d) != SG_OK || d.outcome != SG_ADMIT) return 0;
    sg_usage none;
    memset(&none, 0, sizeof none);
    return sg_settle(engine, &d.permit, &none, SG_COMPLETION_SUCCESS, now) == SG_OK;
}

static size_t churn_refused;

static void *churner(void *arg) {
    (void)arg;
    for (int w = 0; w < windows; w++) {
        pthread_barrier_wait(&start);
        for (int i = 0; i < 100; i++) {
            serve(churn[w][i % 12], window_now[w]); /* some are refused: 50 a minute each */
        }
        pthread_barrier_wait(&done);
    }
    return NULL;
}

static sg_engine *fixed_engine(double limit, uint64_t scopes, uint64_t accounts, uint64_t models, uint64_t permits) {
    sg_config cfg;
    if (sg_config_default(&cfg) != SG_OK) exit(1);
    cfg.preset = "fixed";
    cfg.floor[SG_METRIC_REQUESTS] = limit;
    cfg.scopes = scopes;
    cfg.accounts = accounts;
    cfg.models = models;
    cfg.permits = permits;
    cfg.max_in_flight = UINT64_MAX;
    sg_engine *e = NULL;
    sg_result rc = sg_engine_new(&cfg, &e);
    if (rc != SG_OK) {
        fprintf(stderr, "sg_engine_new: %s\n", sg_result_str(rc));
        exit(1);
    }
    return e;
}

/* Runs the windows of one part: `before(w)` on the main thread while the others wait, then
 * the window. Returns how many windows admitted exactly `expected[w]` through the handle. */
static int run(void (*before)(int), const size_t *expected, const char *part) {
    memset(admitted, 0, sizeof admitted);
    memset(unexpected, 0, sizeof unexpected);
    int threads = admitters + churning;
    pthread_barrier_init(&start, NULL, (unsigned)threads + 1);
    pthread_barrier_init(&done, NULL, (unsigned)threads + 1);
    pthread_t tid[MAX_THREADS + 1];
    for (int t = 0; t < admitters; t++) {
        pthread_create(&tid[t], NULL, admitter, (void *)(uintptr_t)t);
    }
    if (churning) pthread_create(&tid[admitters], NULL, churner, NULL);
    int exact = 0;
    for (int w = 0; w < windows; w++) {
        if (before) before(w);
        pthread_barrier_wait(&start);
        pthread_barrier_wait(&done);
        size_t total = 0;
        for (int t = 0; t < admitters; t++) {
            total += admitted[t][w];
        }
        if (total == expected[w]) {
            exact++;
        } else {
            fprintf(stderr, "%s: window %d admitted %zu, expected %zu\n", part, w, total, expected[w]);
        }
    }
    for (int t = 0; t < threads; t++) {
        pthread_join(tid[t], NULL);
    }
    pthread_barrier_destroy(&start);
    pthread_barrier_destroy(&done);
    size_t odd = 0;
    for (int t = 0; t < admitters; t++) {
        odd += unexpected[t];
    }
    printf("%s: %d of %d windows admitted exactly the limit; %zu unexpected results\n", part, exact, windows, odd);
    check(odd == 0, "every admission through the handle is SG_OK, an admit or a 429, and settles once");
    return exact;
}

static uint64_t remaining(const char *account, uint64_t now) {
    sg_levels l;
    sg_result rc = sg_limits(engine, (const uint8_t *)account, strlen(account), (const uint8_t *)"m", 1, 0, now, &l);
    return rc == SG_OK ? l.remaining[SG_METRIC_REQUESTS] : UINT64_MAX;
}

static int restores;

/* Part 2: restore the engine from its own snapshot, which moves every scope. */
static void restore_in_place(int w) {
    if (w == 0) return;
    size_t size = 0, written = 0;
    if (sg_snapshot_size(engine, &size) != SG_OK) return;
    uint8_t *buf = (uint8_t *)malloc(size);
    if (buf && sg_snapshot_write(engine, buf, size, window_now[w], &written) == SG_OK &&
        sg_restore(engine, buf, written, window_now[w]) == SG_OK) {
        restores++;
    }
    free(buf);
}

/* Part 3: 12 new keys, each admitted once, reclaiming idle scopes. */
static void churn_keys(int w) {
    for (int k = 0; k < 12; k++) {
        snprintf(churn[w][k], sizeof churn[w][k], "churn-%d-%d", w, k);
        churn_refused += !serve(churn[w][k], window_now[w]);
    }
}

int main(void) {
    size_t expected[64];
    sg_result rc;

    /* 1. Phases at 0 s, 30 s and 90 s. */
    engine = fixed_engine(10000, 1024, 0, 0, 1024);
    rc = sg_scope_resolve(engine, (const uint8_t *)"hot", 3, (const uint8_t *)"m", 1, 0, 0, &scope);
    check(rc == SG_OK && scope != NULL, "sg_scope_resolve");
    admitters = 4, calls = 5000, windows = 3, churning = 0;
    window_now[0] = 0, window_now[1] = 30 * SEC, window_now[2] = 90 * SEC;
    expected[0] = 10000, expected[1] = 5000, expected[2] = 10000;
    check(run(NULL, expected, "phases") == 3, "each phase admits exactly what the limit allows");
    check(remaining("hot", 90 * SEC) == 0, "the handle's own scope is drained at the end");
    sg_scope_free(scope);
    sg_engine_free(engine);

    /* 2. A restore before every window but the first. */
    engine = fixed_engine(200, 64, 0, 0, 1024);
    rc = sg_scope_resolve(engine, (const uint8_t *)"hot", 3, (const uint8_t *)"m", 1, 0, 0, &scope);
    check(rc == SG_OK, "sg_scope_resolve");
    admitters = 4, calls = 100, windows = 20, churning = 0;
    for (int w = 0; w < windows; w++) {
        window_now[w] = (uint64_t)w * MINUTE;
        expected[w] = 200;
    }
    check(run(restore_in_place, expected, "restores") == 20, "every window after a restore admits exactly 200");
    check(restores == 19, "19 restores");
    check(remaining("hot", 19 * MINUTE) == 0, "the handle's own scope is drained at the end");
    sg_scope_free(scope);
    sg_engine_free(engine);

    /* 3. Scopes reclaimed for new keys between windows. */
    engine = fixed_engine(50, 16, 64, 2, 256);
    rc = sg_scope_resolve(engine, (const uint8_t *)"hot", 3, (const uint8_t *)"m", 1, 0, 0, &scope);
    check(rc == SG_OK, "sg_scope_resolve");
    admitters = 2, calls = 50, windows = 40, churning = 1;
    for (int w = 0; w < windows; w++) {
        window_now[w] = (uint64_t)w * 10 * MINUTE;
        expected[w] = 50;
    }
    check(run(churn_keys, expected, "reclaims") == 40, "every window after reclaims admits exactly 50");
    check(churn_refused == 0, "every new key finds a scope");
    check(remaining("hot", 390 * MINUTE) == 0, "the handle's own scope is drained at the end");
    sg_scope_free(scope);
    sg_engine_free(engine);

    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
