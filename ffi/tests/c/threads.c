/*
 * 4 threads x 100,000 admits on one scope under "fixed": the admitted count equals exactly what
 * the limit allows; every permit is settled by a different thread than the one that admitted it,
 * once, and a second settle of each is refused.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sluicegate.h"

#define THREADS 4
#define ATTEMPTS 100000
#define LIMIT 100000

static sg_engine *engine;
static sg_permit *permits[THREADS];
static size_t admitted[THREADS];

static void *admitter(void *arg) {
    size_t t = (size_t)arg;
    sg_request r;
    memset(&r, 0, sizeof r);
    r.account = (const uint8_t *)"hot";
    r.account_len = 3;
    r.model = (const uint8_t *)"model";
    r.model_len = 5;
    r.n = 1;
    permits[t] = (sg_permit *)malloc(sizeof(sg_permit) * ATTEMPTS);
    for (size_t i = 0; i < ATTEMPTS; i++) {
        sg_decision d;
        if (sg_admit(engine, &r, 0, &d) != SG_OK) {
            fprintf(stderr, "admit failed\n");
            exit(1);
        }
        if (d.outcome == SG_ADMIT) {
            permits[t][admitted[t]++] = d.permit;
        }
    }
    return NULL;
}

static size_t settled_ok[THREADS], settled_twice[THREADS];

static void *settler(void *arg) {
    size_t t = (size_t)arg;
    size_t from = (t + 1) % THREADS; /* settle another thread's permits */
    sg_usage u;
    memset(&u, 0, sizeof u);
    for (size_t i = 0; i < admitted[from]; i++) {
        settled_ok[t] += sg_settle(engine, &permits[from][i], &u, SG_COMPLETION_SUCCESS, 0) == SG_OK;
        settled_twice[t] += sg_settle(engine, &permits[from][i], &u, SG_COMPLETION_SUCCESS, 0) == SG_ERR_ALREADY_SETTLED;
    }
    return NULL;
}

int main(void) {
    sg_config cfg;
    sg_config_default(&cfg);
    cfg.preset = "fixed";
    cfg.floor[SG_METRIC_REQUESTS] = LIMIT;
    cfg.permits = 2 * LIMIT;
    if (sg_engine_new(&cfg, &engine) != SG_OK) {
        return 1;
    }
    pthread_t threads[THREADS];
    for (size_t t = 0; t < THREADS; t++) {
        pthread_create(&threads[t], NULL, admitter, (void *)t);
    }
    for (size_t t = 0; t < THREADS; t++) {
        pthread_join(threads[t], NULL);
    }
    size_t total = 0;
    for (size_t t = 0; t < THREADS; t++) {
        total += admitted[t];
    }
    int failed = 0, passed = 0;
    if (total == LIMIT) {
        passed++;
    } else {
        fprintf(stderr, "admitted %zu, limit %d\n", total, LIMIT);
        failed++;
    }
    for (size_t t = 0; t < THREADS; t++) {
        pthread_create(&threads[t], NULL, settler, (void *)t);
    }
    size_t ok = 0, twice = 0;
    for (size_t t = 0; t < THREADS; t++) {
        pthread_join(threads[t], NULL);
        ok += settled_ok[t];
        twice += settled_twice[t];
    }
    for (size_t t = 0; t < THREADS; t++) {
        free(permits[t]); /* only once no settler reads them */
    }
    if (ok == total && twice == total) {
        passed++;
    } else {
        fprintf(stderr, "settled %zu, refused %zu of %zu\n", ok, twice, total);
        failed++;
    }
    sg_engine_free(engine);
    printf("%d passed, %d failed\n", passed, failed);
    return failed;
}
