/*
 * What sluicegate would have a gateway answer, request by request.
 *
 * Reads lines "account model prompt_tokens max_tokens priority [ms]" from stdin (# starts a
 * comment), admits each at its time (the 6th column, else 100 ms after the previous line) and
 * prints the status line, the Fireworks-dialect headers and, for refusals, the JSON error body.
 *
 *   cc -std=c11 -Iinclude examples/c/gateway.c target/release/libsluicegate.a -lpthread -ldl -lm -o gateway
 *   ./gateway < examples/c/requests.txt
 */
#include <stdio.h>
#include <string.h>

#include "sluicegate.h"

int main(void) {
    sg_config cfg;
    sg_config_default(&cfg); /* fireworks_2024: 60 RPM, over-limit up to 120 */
    sg_engine *engine = NULL;
    if (sg_engine_new(&cfg, &engine) != SG_OK) {
        return 1;
    }
    sg_render render;
    sg_render_init(engine, SG_DIALECT_FIREWORKS, &render);

    char line[512];
    uint64_t now_ns = 0;
    while (fgets(line, sizeof line, stdin)) {
        char account[65], model[129];
        unsigned long long prompt, max_tokens, at_ms;
        int priority;
        if (line[0] == '#' || line[0] == '\n') {
            continue;
        }
        int fields = sscanf(line, "%64s %128s %llu %llu %d %llu", account, model, &prompt, &max_tokens, &priority, &at_ms);
        if (fields < 5) {
            fprintf(stderr, "skipping malformed line: %s", line);
            continue;
        }
        now_ns = fields == 6 ? at_ms * 1000000ULL : now_ns + 100000000ULL;

        sg_request r;
        memset(&r, 0, sizeof r);
        r.account = (const uint8_t *)account;
        r.account_len = strlen(account);
        r.model = (const uint8_t *)model;
        r.model_len = strlen(model);
        r.prompt_tokens = prompt;
        r.max_tokens = max_tokens;
        r.n = 1;
        r.priority = (uint32_t)priority;

        sg_decision d;
        sg_result res = sg_admit(engine, &r, now_ns, &d);
        if (res != SG_OK) {
            printf("HTTP/1.1 500 Internal Server Error\n(%s)\n\n", sg_result_str(res));
            continue;
        }
        uint32_t status = 0;
        sg_render_status(&d, &render, &status);
        printf("HTTP/1.1 %u\n", status);
        char buf[4096];
        size_t n = 0;
        if (sg_render_headers(&d, &render, now_ns, (uint8_t *)buf, sizeof buf, &n) == SG_OK) {
            fwrite(buf, 1, n, stdout);
        }
        if (sg_render_error_body(&d, &render, (uint8_t *)buf, sizeof buf, &n) == SG_OK && n > 0) {
            printf("\n%.*s\n", (int)n, buf);
        }
        printf("\n");
        if (d.outcome == SG_ADMIT || d.outcome == SG_ADMIT_OVER_LIMIT) {
            /* Forward upstream here; then settle with what the backend reports. */
            sg_usage used;
            memset(&used, 0, sizeof used);
            used.prompt_tokens = prompt;
            used.generated_tokens = max_tokens;
            sg_settle(engine, &d.permit, &used, SG_COMPLETION_SUCCESS, now_ns);
        }
    }
    sg_engine_free(engine);
    return 0;
}
