/*
 * What a gateway built on sluicegate answers, request by request.
 *
 * Reads one request per line from stdin:
 *
 *     account model prompt_tokens max_tokens priority(0/1) [at_ms]
 *   (priority 1: the account is granted the priority service tier, and the request asks for it)
 *
 * (whitespace separated; '#' starts a comment). Each request is admitted at simulated time
 * at_ms, or 100 ms after the previous request when the column is left out. For each one this
 * prints the request, the HTTP status line, the rate-limit headers (Fireworks dialect) and, for
 * a refusal, the JSON error body, separated by blank lines. Admitted requests are settled at
 * once with what they reserved, as if the backend had answered instantly.
 *
 * Build and run (from the repository root):
 *
 *     cargo build --release -p sluicegate-ffi
 *     cc -std=c11 -Wall -Wextra -Iinclude examples/c/gateway.c target/release/libsluicegate.a \
 *        -lpthread -ldl -lm -o gateway
 *     ./gateway < examples/c/requests.txt
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sluicegate.h"

static const char *reason_phrase(uint32_t status) {
    switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 402: return "Payment Required";
    case 429: return "Too Many Requests";
    case 503: return "Service Unavailable";
    default: return "";
    }
}

/* Prints the response for a decision: status line, headers, and the error body of a refusal. */
static sg_result print_response(const sg_decision *d, const sg_render *render, uint64_t now_ns) {
    uint32_t status = 0;
    uint8_t headers[2048], body[1024];
    size_t headers_len = 0, body_len = 0;
    sg_result rc = sg_render_status(d, render, &status);
    /* On SG_ERR_BUFFER_TOO_SMALL the length out-parameter holds the size needed. */
    if (rc == SG_OK) rc = sg_render_headers(d, render, now_ns, headers, sizeof headers, &headers_len);
    if (rc == SG_OK) rc = sg_render_error_body(d, render, body, sizeof body, &body_len);
    if (rc != SG_OK) return rc;

    printf("HTTP/1.1 %u %s\r\n", (unsigned)status, reason_phrase(status));
    fwrite(headers, 1, headers_len, stdout); /* "name: value\r\n" lines */
    printf("\r\n");
    if (body_len > 0) { /* empty for admitted requests */
        fwrite(body, 1, body_len, stdout);
        printf("\n");
    }
    return SG_OK;
}

int main(void) {
    sg_config cfg;
    sg_config_default(&cfg); /* fireworks_2024: 60 RPM, over-limit up to 120 */
    sg_engine *engine = NULL;
    sg_result rc = sg_engine_new(&cfg, &engine);
    if (rc != SG_OK) {
        fprintf(stderr, "sg_engine_new: %s\n", sg_result_str(rc));
        return 1;
    }
    sg_render render;
    if (sg_render_init(engine, SG_DIALECT_FIREWORKS, &render) != SG_OK) {
        sg_engine_free(engine);
        return 1;
    }
    /* sg_render_init anchors the real time to sg_now_ns(). This program's clock is simulated and
     * reads 0 now, so it anchors that instead (Anthropic's headers give resets as dates). */
    render.monotonic_at = 0;

    char line[1024];
    int line_no = 0, requests = 0;
    uint64_t now_ns = 0;
    while (fgets(line, sizeof line, stdin)) {
        line_no++;
        char *comment = strchr(line, '#');
        if (comment) *comment = '\0';

        char account[256], model[256];
        unsigned long long prompt = 0, max_tokens = 0, at_ms = 0;
        unsigned priority = 0;
        int fields = sscanf(line, "%255s %255s %llu %llu %u %llu", account, model, &prompt, &max_tokens,
                            &priority, &at_ms);
        if (fields <= 0) continue; /* blank or comment only */
        if (fields < 5) {
            fprintf(stderr, "line %d: expected: account model prompt_tokens max_tokens priority [at_ms]\n", line_no);
            continue;
        }
        if (fields == 6) {
            now_ns = at_ms * 1000000ULL;
        } else if (requests > 0) {
            now_ns += 100000000ULL; /* 100 ms after the previous request */
        }
        requests++;
        printf("> %s %s prompt=%llu max_tokens=%llu priority=%u at %llu ms\n\n", account, model, prompt, max_tokens,
               priority, (unsigned long long)(now_ns / 1000000ULL));

        sg_request r;
        memset(&r, 0, sizeof r);
        r.account = (const uint8_t *)account;
        r.account_len = strlen(account);
        r.model = (const uint8_t *)model;
        r.model_len = strlen(model);
        r.prompt_tokens = prompt;
        r.max_tokens = max_tokens;
        r.n = 1;
        if (priority != 0) {
            /* The operator's grant (SPEC §6): without it, asking for priority is served at default. */
            rc = sg_set_service_tier_grant(engine, r.account, r.account_len, SG_SERVICE_TIER_PRIORITY);
            if (rc != SG_OK) fprintf(stderr, "line %d: granting priority failed: %s\n", line_no, sg_result_str(rc));
            r.service_tier = SG_SERVICE_TIER_PRIORITY;
        }

        sg_decision d;
        rc = sg_admit(engine, &r, now_ns, &d);
        if (rc != SG_OK) { /* e.g. a key too long: the gateway's own 400 */
            printf("HTTP/1.1 400 Bad Request\r\n\r\n(%s)\n\n", sg_result_str(rc));
            continue;
        }
        rc = print_response(&d, &render, now_ns);
        if (rc != SG_OK) fprintf(stderr, "line %d: rendering failed: %s\n", line_no, sg_result_str(rc));
        printf("\n");

        if (d.outcome == SG_ADMIT || d.outcome == SG_ADMIT_OVER_LIMIT) {
            /* A real gateway forwards the request now (after d.wait_ns) and settles when the
             * backend answers, with the usage it reports. Every permit is settled exactly once. */
            sg_usage used;
            memset(&used, 0, sizeof used);
            used.prompt_tokens = prompt;
            used.generated_tokens = max_tokens;
            rc = sg_settle(engine, &d.permit, &used, SG_COMPLETION_SUCCESS, now_ns);
            if (rc != SG_OK) fprintf(stderr, "line %d: settle failed: %s\n", line_no, sg_result_str(rc));
        }
    }
    sg_engine_free(engine);
    return 0;
}
