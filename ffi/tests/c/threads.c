/*
 * Concurrency from C: 4 admitting threads x 100,000 sg_admit calls on ONE scope of a "fixed"
 * engine (100,000 requests a minute), while 4 other threads settle the permits.
 *
 * Simulated time is shared and advances in phases; a barrier starts all admitters of a phase
 * together, and a phase ends only when all of them have finished it:
 *
 *   phase 0, now =  0 s: a fresh bucket holds exactly 100,000 requests   (160,000 attempts)
 *   phase 1, now = 30 s: half a minute refills exactly  50,000           (120,000 attempts)
 *   phase 2, now = 90 s: a whole minute refills exactly 100,000          (120,000 attempts)
 *
 * The admitted count of each phase must be exactly that: never one more (the limit holds under
 * contention) and never one fewer (no lost updates). Every other decision must be a 429 on
 * requests. Admitted permits go through a lock-protected queue to the settling threads, so each
 * is settled by a different thread than the one that admitted it, while admits continue; every
 * first settle must be SG_OK and every second one SG_ERR_ALREADY_SETTLED.
 *
 * Ends with the line "N passed, 0 failed" (exit 0), or "N passed, M failed" (exit 1).
 *
 *   cc -std=c11 -pthread -Wall -Wextra -Werror -pedantic -Iinclude ffi/tests/c/threads.c \
 *      target/debug/libsluicegate.a -lpthread -ldl -lm -o threads && ./threads
 */
#define _POSIX_C_SOURCE 200809L /* pthread_barrier_t */

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sluicegate.h"

#define ADMITTERS 4
#define SETTLERS 4
#define CALLS 100000 /* sg_admit calls per admitting thread, over all phases */
#define LIMIT 100000 /* requests per minute */
#define PHASES 3
#define SEC 1000000000ULL

static const uint64_t phase_now[PHASES] = {0, 30 * SEC, 90 * SEC};
static const int phase_calls[PHASES] = {40000, 30000, 30000}; /* per thread; sums to CALLS */
static const size_t phase_expected[PHASES] = {LIMIT, LIMIT / 2, LIMIT};

static sg_engine *engine;
static pthread_barrier_t phase_start;

/* What an admitter learned, per phase; read by main after the join. */
static size_t admitted[ADMITTERS][PHASES];
static size_t unexpected[ADMITTERS]; /* errors, or outcomes other than admit / 429 on requests */

/* ---- A bounded, lock-protected queue of permits (the test's own locking, not the engine's). */

typedef struct {
    sg_permit permit;
    uint64_t now_ns;
    pthread_t admitter;
} item;

#define QUEUE 4096
static item queue[QUEUE];
static size_t head, tail; /* tail - head items are queued */
static int admitters_done;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t not_empty = PTHREAD_COND_INITIALIZER;
static pthread_cond_t not_full = PTHREAD_COND_INITIALIZER;

static void push(const item *batch, size_t n) {
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < n; i++) {
        while (tail - head == QUEUE) {
            pthread_cond_wait(&not_full, &lock);
        }
        queue[tail++ % QUEUE] = batch[i];
    }
    pthread_cond_broadcast(&not_empty);
    pthread_mutex_unlock(&lock);
}

/* Takes up to `max` items; 0 once the admitters are done and the queue is empty. */
static size_t pop(item *out, size_t max) {
    pthread_mutex_lock(&lock);
    while (tail == head && !admitters_done) {
        pthread_cond_wait(&not_empty, &lock);
    }
    size_t n = 0;
    while (n < max && head != tail) {
        out[n++] = queue[head++ % QUEUE];
    }
    pthread_cond_broadcast(&not_full);
    pthread_mutex_unlock(&lock);
    return n;
}

/* ---- Threads. */

#define BATCH 64

static void *admitter(void *arg) {
    size_t t = (size_t)(uintptr_t)arg;
    sg_request r;
    memset(&r, 0, sizeof r);
    r.account = (const uint8_t *)"hot-account";
    r.account_len = strlen("hot-account");
    r.model = (const uint8_t *)"hot-model";
    r.model_len = strlen("hot-model");
    r.n = 1; /* costs 1 request, no tokens */
    item batch[BATCH];
    size_t queued = 0;
    for (int p = 0; p < PHASES; p++) {
        pthread_barrier_wait(&phase_start);
        for (int i = 0; i < phase_calls[p]; i++) {
            sg_decision d;
            sg_result rc = sg_admit(engine, &r, phase_now[p], &d);
            if (rc != SG_OK) {
                unexpected[t]++;
            } else if (d.outcome == SG_ADMIT) {
                admitted[t][p]++;
                batch[queued].permit = d.permit;
                batch[queued].now_ns = phase_now[p];
                batch[queued].admitter = pthread_self();
                if (++queued == BATCH) {
                    push(batch, queued);
                    queued = 0;
                }
            } else if (d.outcome != SG_REJECT_RATE_LIMITED || d.metric != SG_METRIC_REQUESTS ||
                       d.retry_after_ns == 0) {
                unexpected[t]++;
            }
        }
        push(batch, queued);
        queued = 0;
    } /* the next phase starts only when every admitter has finished this one */
    return NULL;
}

typedef struct {
    size_t settled, refused_twice, bad, same_thread;
} settle_counts;

static settle_counts settled[SETTLERS];

static void *settler(void *arg) {
    settle_counts *c = &settled[(size_t)(uintptr_t)arg];
    sg_usage none;
    memset(&none, 0, sizeof none);
    item batch[BATCH];
    size_t n;
    while ((n = pop(batch, BATCH)) > 0) {
        for (size_t i = 0; i < n; i++) {
            c->same_thread += pthread_equal(batch[i].admitter, pthread_self()) != 0;
            sg_result first = sg_settle(engine, &batch[i].permit, &none, SG_COMPLETION_SUCCESS, batch[i].now_ns);
            sg_result second = sg_settle(engine, &batch[i].permit, &none, SG_COMPLETION_SUCCESS, batch[i].now_ns);
            c->settled += first == SG_OK;
            c->refused_twice += second == SG_ERR_ALREADY_SETTLED;
            c->bad += first != SG_OK || second != SG_ERR_ALREADY_SETTLED;
        }
    }
    return NULL;
}

static int passed, failed;

static void check(int ok, const char *what) {
    if (ok) {
        passed++;
    } else {
        failed++;
        fprintf(stderr, "check failed: %s\n", what);
    }
}

int main(void) {
    sg_config cfg;
    if (sg_config_default(&cfg) != SG_OK) return 1;
    cfg.preset = "fixed";
    cfg.floor[SG_METRIC_REQUESTS] = LIMIT;
    cfg.scopes = 1024;
    cfg.permits = 4 * LIMIT; /* room for every permit of a phase, settled or not */
    cfg.max_in_flight = UINT64_MAX; /* one account holds them all */
    sg_result rc = sg_engine_new(&cfg, &engine);
    if (rc != SG_OK) {
        fprintf(stderr, "sg_engine_new: %s\n", sg_result_str(rc));
        return 1;
    }
    pthread_barrier_init(&phase_start, NULL, ADMITTERS);

    pthread_t admitters[ADMITTERS], settlers[SETTLERS];
    for (size_t t = 0; t < SETTLERS; t++) {
        pthread_create(&settlers[t], NULL, settler, (void *)(uintptr_t)t);
    }
    for (size_t t = 0; t < ADMITTERS; t++) {
        pthread_create(&admitters[t], NULL, admitter, (void *)(uintptr_t)t);
    }
    for (size_t t = 0; t < ADMITTERS; t++) {
        pthread_join(admitters[t], NULL);
    }
    pthread_mutex_lock(&lock);
    admitters_done = 1;
    pthread_cond_broadcast(&not_empty);
    pthread_mutex_unlock(&lock);
    for (size_t t = 0; t < SETTLERS; t++) {
        pthread_join(settlers[t], NULL);
    }

    size_t total = 0, odd = 0;
    for (int p = 0; p < PHASES; p++) {
        size_t in_phase = 0;
        for (size_t t = 0; t < ADMITTERS; t++) {
            in_phase += admitted[t][p];
        }
        printf("phase %d (now = %2llu s): %zu admitted of %d calls, %zu expected; by thread:", p,
               (unsigned long long)(phase_now[p] / SEC), in_phase, ADMITTERS * phase_calls[p], phase_expected[p]);
        for (size_t t = 0; t < ADMITTERS; t++) {
            printf(" %zu", admitted[t][p]);
        }
        printf("\n");
        check(in_phase == phase_expected[p], "each phase admits exactly what the limit allows");
        total += in_phase;
    }
    for (size_t t = 0; t < ADMITTERS; t++) {
        odd += unexpected[t];
    }
    check(odd == 0, "every call returned SG_OK with an admit or a 429 on requests");

    settle_counts sum = {0, 0, 0, 0};
    for (size_t t = 0; t < SETTLERS; t++) {
        sum.settled += settled[t].settled;
        sum.refused_twice += settled[t].refused_twice;
        sum.bad += settled[t].bad;
        sum.same_thread += settled[t].same_thread;
    }
    printf("settled %zu of %zu permits on other threads; %zu second settles refused\n", sum.settled, total,
           sum.refused_twice);
    check(sum.settled == total && sum.bad == 0, "every permit settles once with SG_OK");
    check(sum.refused_twice == total, "every second settle is SG_ERR_ALREADY_SETTLED");
    check(sum.same_thread == 0, "every permit is settled by a thread other than its admitter");

    /* The bucket is empty at the end of the last phase. */
    sg_levels l;
    rc = sg_limits(engine, (const uint8_t *)"hot-account", strlen("hot-account"), (const uint8_t *)"hot-model",
                   strlen("hot-model"), 0, phase_now[PHASES - 1], &l);
    check(rc == SG_OK && l.limit[SG_METRIC_REQUESTS] == LIMIT && l.remaining[SG_METRIC_REQUESTS] == 0,
          "the scope is drained at the end");

    pthread_barrier_destroy(&phase_start);
    sg_engine_free(engine);
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
