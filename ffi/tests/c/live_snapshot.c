/*
 * Snapshots of a serving engine (issue 22): 2 threads admit requests for NEW accounts, one
 * account per request, and settle them, while the main thread takes 1,000 snapshots of the
 * same engine (sg_snapshot_size, then sg_snapshot_write, retrying with the size reported on
 * SG_ERR_BUFFER_TOO_SMALL) and restores each into a second engine built with the same config.
 * Every snapshot must restore.
 *
 * The tables are small (64 scopes) and the admitters share one simulated clock that moves a
 * second per request, so the tables fill within a minute and from then on every new account
 * takes the slot of one idle for a minute, as under a flood of new keys: snapshots see keys
 * created, reclaimed and replaced while they are written. A new account refused with
 * SG_ERR_TABLE_FULL (the slots it could take are held, e.g. by the snapshot being written) is
 * counted, not failed: a full table refusing new keys is the documented behaviour. Anything
 * else that is not SG_OK fails.
 *
 * Ends with the line "N passed, 0 failed" (exit 0), or "N passed, M failed" (exit 1).
 *
 *   cc -std=c11 -pthread -Wall -Wextra -Werror -pedantic -Iinclude ffi/tests/c/live_snapshot.c \
 *      target/debug/libsluicegate.a -lpthread -ldl -lm -o live_snapshot && ./live_snapshot
 */
#define _POSIX_C_SOURCE 200809L

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sluicegate.h"

#define ADMITTERS 2
#define SNAPSHOTS 1000
#define SCOPES 64 /* small tables: they fill, and restores stay fast under ASan */
#define CODES 26   /* one past the highest result code */
#define SEC 1000000000ULL
#define STEP_NS SEC /* simulated time per request: 64 slots span more than a minute */

static sg_engine *live;
static atomic_uint_fast64_t clock_ns; /* the shared simulated clock */
static atomic_int done;
static atomic_int writing; /* non-zero while sg_snapshot_write runs */

typedef struct {
    size_t admitted, table_full, during_write, errors, settle_errors;
} admit_counts;

static admit_counts counts[ADMITTERS];

static void *admitter(void *arg) {
    size_t t = (size_t)(uintptr_t)arg;
    admit_counts *c = &counts[t];
    char account[32];
    sg_usage used;
    memset(&used, 0, sizeof used);
    used.prompt_tokens = 10;
    used.generated_tokens = 10;
    for (unsigned long long i = 0; !atomic_load(&done); i++) {
        int len = snprintf(account, sizeof account, "new-%zu-%llu", t, i);
        sg_request r;
        memset(&r, 0, sizeof r);
        r.account = (const uint8_t *)account;
        r.account_len = (size_t)len;
        r.model = (const uint8_t *)"live-model";
        r.model_len = strlen("live-model");
        r.prompt_tokens = 10;
        r.max_tokens = 10;
        r.n = 1;
        uint64_t now = atomic_fetch_add(&clock_ns, STEP_NS) + STEP_NS;
        sg_decision d;
        sg_result rc = sg_admit(live, &r, now, &d);
        if (rc == SG_ERR_TABLE_FULL) {
            c->table_full++;
            continue;
        }
        if (rc != SG_OK || d.outcome != SG_ADMIT) { /* a new account always fits */
            c->errors++;
            continue;
        }
        c->admitted++;
        c->during_write += atomic_load(&writing) != 0;
        c->settle_errors += sg_settle(live, &d.permit, &used, SG_COMPLETION_SUCCESS, now) != SG_OK;
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
    cfg.scopes = SCOPES;
    /* The other admitter moves the shared clock a second per request: one descheduled between
     * its admit and settle (ASan on a busy machine) could see its permit expire meanwhile, a
     * correct refusal this test is not about. */
    cfg.permit_ttl_ns = SG_PERMIT_TTL_NEVER;
    sg_engine *copy = NULL;
    sg_result rc = sg_engine_new(&cfg, &live);
    if (rc == SG_OK) rc = sg_engine_new(&cfg, &copy);
    if (rc != SG_OK) {
        fprintf(stderr, "sg_engine_new: %s\n", sg_result_str(rc));
        return 1;
    }

    pthread_t threads[ADMITTERS];
    for (size_t t = 0; t < ADMITTERS; t++) {
        pthread_create(&threads[t], NULL, admitter, (void *)(uintptr_t)t);
    }

    size_t cap = 0, written = 0, retries = 0, restored = 0, taken = 0, largest = 0;
    size_t write_errors[CODES] = {0}, restore_errors[CODES] = {0};
    uint8_t *buf = NULL;
    for (int s = 0; s < SNAPSHOTS; s++) {
        size_t size = 0;
        rc = sg_snapshot_size(live, &size);
        if (rc != SG_OK) {
            write_errors[rc < CODES ? rc : 0]++;
            continue;
        }
        int tries = 0;
        for (;;) {
            if (size > cap) {
                uint8_t *bigger = (uint8_t *)realloc(buf, size);
                if (bigger == NULL) {
                    fprintf(stderr, "out of memory\n");
                    return 1;
                }
                buf = bigger;
                cap = size;
            }
            atomic_store(&writing, 1);
            rc = sg_snapshot_write(live, buf, cap, atomic_load(&clock_ns), &written);
            atomic_store(&writing, 0);
            if (rc != SG_ERR_BUFFER_TOO_SMALL || ++tries > 100) break;
            retries++;
            size = written; /* the size needed */
        }
        if (rc != SG_OK) {
            write_errors[rc < CODES ? rc : 0]++;
            continue;
        }
        taken++;
        largest = written > largest ? written : largest;
        rc = sg_restore(copy, buf, written, atomic_load(&clock_ns));
        if (rc == SG_OK) {
            restored++;
        } else {
            restore_errors[rc < CODES ? rc : 0]++;
        }
    }
    atomic_store(&done, 1);
    for (size_t t = 0; t < ADMITTERS; t++) {
        pthread_join(threads[t], NULL);
    }

    admit_counts sum = {0, 0, 0, 0, 0};
    for (size_t t = 0; t < ADMITTERS; t++) {
        sum.admitted += counts[t].admitted;
        sum.table_full += counts[t].table_full;
        sum.during_write += counts[t].during_write;
        sum.errors += counts[t].errors;
        sum.settle_errors += counts[t].settle_errors;
    }
    printf("%zu new accounts admitted and settled (%zu while a snapshot was being written), %zu refused "
           "with a full table\n",
           sum.admitted, sum.during_write, sum.table_full);
    printf("%zu of %d snapshots taken (%zu retries with a bigger buffer, largest %zu bytes), %zu restored\n", taken,
           SNAPSHOTS, retries, largest, restored);
    for (uint32_t code = 0; code < CODES; code++) {
        if (write_errors[code]) printf("  sg_snapshot_size/write: %zu x %s\n", write_errors[code], sg_result_str(code));
        if (restore_errors[code]) printf("  sg_restore: %zu x %s\n", restore_errors[code], sg_result_str(code));
    }
    check(sum.errors == 0, "every admission of a new account is SG_OK and admitted, or SG_ERR_TABLE_FULL");
    check(sum.settle_errors == 0, "every permit settles with SG_OK");
    check(sum.admitted > 0 && sum.during_write > 0, "accounts were created while snapshots were written");
    check(taken == SNAPSHOTS, "every snapshot is written");
    check(restored == taken, "every snapshot restores");

    free(buf);
    sg_engine_free(live);
    sg_engine_free(copy);
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
