/*
 * ngx_http_sluicegate_module: sluicegate's admission control in nginx (issue 16).
 *
 * One engine per `sluicegate_zone`, in an nginx shared zone, so that every worker admits against
 * the same limits. In a location with `sluicegate NAME`, each request:
 *
 *   1. has its body read (in memory, within `sluicegate_max_body`: 413 beyond) and scanned by
 *      sg_openai_request_scan (400 for a body that is not a usable request), its account taken
 *      from `sluicegate_account` (401 when empty);
 *   2. is admitted by sg_admit: a refusal is answered with the status, headers and JSON body the
 *      library renders; an engine error with 503 and retry-after (never a 500); an admitted
 *      request waits out its smoothing delay on an nginx timer, then goes on to the content
 *      handler (proxy_pass) with the rate-limit headers added to its response;
 *   3. is settled exactly once: a body filter reads the response's usage as it passes (and
 *      charges a stream's generated text as it goes), the log phase settles with it, and a pool
 *      cleanup settles whatever the log phase did not.
 *
 * Written against include/sluicegate.h only. The clock is CLOCK_MONOTONIC, which every process
 * on the host reads alike (sg_now_ns counts from an origin of its own process).
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <math.h>
#include <time.h>

#include <sluicegate.h>

#define NGX_HTTP_SLUICEGATE_DEFAULT_SCOPES      10000
#define NGX_HTTP_SLUICEGATE_DEFAULT_MAX_TOKENS  256
#define NGX_HTTP_SLUICEGATE_DEFAULT_MAX_BODY    (1024 * 1024)
#define NGX_HTTP_SLUICEGATE_ACCOUNT_MAX         64
#define NGX_HTTP_SLUICEGATE_HEADERS_BUF         2048
#define NGX_HTTP_SLUICEGATE_FAST_SUFFIX         "-fast"
#define NGX_HTTP_SLUICEGATE_FAST_SUFFIX_LEN     (sizeof(NGX_HTTP_SLUICEGATE_FAST_SUFFIX) - 1)

typedef struct {
    ngx_str_t                  name;
    sg_config                  cfg;
    size_t                     region_len;
    void                      *region;
    sg_engine                 *engine;
    ngx_uint_t                 frozen;      /* clock=frozen: every call at one instant (tests) */
    uint64_t                   frozen_ns;
} ngx_http_sluicegate_zone_t;

typedef struct {
    ngx_shm_zone_t            *shm_zone;    /* NULL: off */
    ngx_shm_zone_t            *admin_zone;  /* sluicegate_admin: the zone it administers */
    ngx_shm_zone_t            *metrics_zone; /* sluicegate_metrics: the zone it exposes */
    ngx_http_complex_value_t  *account;
    ngx_http_complex_value_t  *tier;
    ngx_http_complex_value_t  *variant;
    ngx_uint_t                 dialect;
    size_t                     max_body;
    ngx_uint_t                 default_max_tokens;
} ngx_http_sluicegate_loc_conf_t;

typedef enum {
    NGX_HTTP_SLUICEGATE_READING = 1,   /* reading the body */
    NGX_HTTP_SLUICEGATE_ANSWERED,      /* answered by the module (a refusal, a 4xx, a 503) */
    NGX_HTTP_SLUICEGATE_WAITING,       /* admitted, waiting out the smoothing delay */
    NGX_HTTP_SLUICEGATE_ADMITTED       /* admitted and passed on */
} ngx_http_sluicegate_state_e;

typedef struct {
    ngx_uint_t                   state;
    ngx_http_sluicegate_zone_t  *zone;
    sg_engine                   *engine;
    sg_decision                  decision;
    uint64_t                     prompt;        /* the prompt tokens estimated at admission */
    ngx_uint_t                   asked_stream;  /* the body's "stream": true */
    u_char                      *headers;       /* the rendered rate-limit headers */
    size_t                       headers_len;
    sg_usage_scanner            *scanner;
    ngx_uint_t                   status;        /* of the response, as its header passed */
    uint64_t                     charged;       /* generated tokens charged while streaming */

    unsigned                     forwarded:1;   /* passed on to the content handler */
    unsigned                     header_seen:1;
    unsigned                     scanning:1;
    unsigned                     stream:1;
    unsigned                     unreadable:1;
    unsigned                     complete:1;    /* the response's last buffer passed */
    unsigned                     charging:1;
    unsigned                     expired:1;
    unsigned                     settled:1;
    unsigned                     replace:1;     /* nginx's own 413 page, replaced by JSON */
    unsigned                     replaced:1;
} ngx_http_sluicegate_ctx_t;

static ngx_int_t ngx_http_sluicegate_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_sluicegate_send_typed(ngx_http_request_t *r, ngx_uint_t status,
    ngx_str_t *type, u_char *headers, size_t headers_len, u_char *body, size_t body_len);
static void ngx_http_sluicegate_body_handler(ngx_http_request_t *r);
static void ngx_http_sluicegate_delay(ngx_http_request_t *r);
static ngx_int_t ngx_http_sluicegate_log_handler(ngx_http_request_t *r);
static void ngx_http_sluicegate_cleanup(void *data);
static void ngx_http_sluicegate_settle(ngx_http_sluicegate_ctx_t *ctx, ngx_uint_t gone,
    ngx_log_t *log);
static ngx_int_t ngx_http_sluicegate_header_filter(ngx_http_request_t *r);
static ngx_int_t ngx_http_sluicegate_body_filter(ngx_http_request_t *r,
    ngx_chain_t *in);
static ngx_int_t ngx_http_sluicegate_init_zone(ngx_shm_zone_t *shm_zone, void *data);
static char *ngx_http_sluicegate_zone(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static char *ngx_http_sluicegate(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static char *ngx_http_sluicegate_serve_zone(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static ngx_int_t ngx_http_sluicegate_admin_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_sluicegate_metrics_handler(ngx_http_request_t *r);
static char *ngx_http_sluicegate_dialect(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static void *ngx_http_sluicegate_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_sluicegate_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child);
static ngx_int_t ngx_http_sluicegate_init(ngx_conf_t *cf);

static ngx_command_t  ngx_http_sluicegate_commands[] = {

    { ngx_string("sluicegate_zone"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_2MORE,
      ngx_http_sluicegate_zone,
      0,
      0,
      NULL },

    { ngx_string("sluicegate"),
      NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_sluicegate,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("sluicegate_admin"),
      NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_sluicegate_serve_zone,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_sluicegate_loc_conf_t, admin_zone),
      (void *) ngx_http_sluicegate_admin_handler },

    { ngx_string("sluicegate_metrics"),
      NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_sluicegate_serve_zone,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_sluicegate_loc_conf_t, metrics_zone),
      (void *) ngx_http_sluicegate_metrics_handler },

    { ngx_string("sluicegate_account"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_set_complex_value_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_sluicegate_loc_conf_t, account),
      NULL },

    { ngx_string("sluicegate_tier"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_set_complex_value_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_sluicegate_loc_conf_t, tier),
      NULL },

    { ngx_string("sluicegate_variant"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_set_complex_value_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_sluicegate_loc_conf_t, variant),
      NULL },

    { ngx_string("sluicegate_dialect"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_sluicegate_dialect,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("sluicegate_max_body"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_size_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_sluicegate_loc_conf_t, max_body),
      NULL },

    { ngx_string("sluicegate_default_max_tokens"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_sluicegate_loc_conf_t, default_max_tokens),
      NULL },

      ngx_null_command
};

static ngx_http_module_t  ngx_http_sluicegate_module_ctx = {
    NULL,                                  /* preconfiguration */
    ngx_http_sluicegate_init,              /* postconfiguration */

    NULL,                                  /* create main configuration */
    NULL,                                  /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_sluicegate_create_loc_conf,   /* create location configuration */
    ngx_http_sluicegate_merge_loc_conf     /* merge location configuration */
};

ngx_module_t  ngx_http_sluicegate_module = {
    NGX_MODULE_V1,
    &ngx_http_sluicegate_module_ctx,       /* module context */
    ngx_http_sluicegate_commands,          /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    NULL,                                  /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    NULL,                                  /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};

static ngx_http_output_header_filter_pt  ngx_http_next_header_filter;
static ngx_http_output_body_filter_pt    ngx_http_next_body_filter;

static ngx_str_t  ngx_http_sluicegate_dialects[] = {
    ngx_string("fireworks"),               /* SG_DIALECT_FIREWORKS */
    ngx_string("together"),                /* SG_DIALECT_TOGETHER */
    ngx_string("openai"),                  /* SG_DIALECT_OPENAI */
    ngx_string("anthropic"),               /* SG_DIALECT_ANTHROPIC */
    ngx_string("ietf"),                    /* SG_DIALECT_IETF */
    ngx_null_string
};

/* ---- the clock ------------------------------------------------------------------------------ */

static uint64_t
ngx_http_sluicegate_monotonic(void)
{
    struct timespec  ts;

    if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0) {
        return 0;
    }

    return (uint64_t) ts.tv_sec * 1000000000 + (uint64_t) ts.tv_nsec;
}


static uint64_t
ngx_http_sluicegate_now(ngx_http_sluicegate_zone_t *zone)
{
    return zone->frozen ? zone->frozen_ns : ngx_http_sluicegate_monotonic();
}


/* ---- the request's context ------------------------------------------------------------------ */

/* The context lives in a pool cleanup of the request, so that it survives an internal redirect
 * (which clears module contexts) and is settled even if the log phase never runs. */
static ngx_http_sluicegate_ctx_t *
ngx_http_sluicegate_get_ctx(ngx_http_request_t *r)
{
    ngx_pool_cleanup_t         *cln;
    ngx_http_sluicegate_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_sluicegate_module);
    if (ctx != NULL || !r->internal) {
        return ctx;     /* only a redirect clears module contexts */
    }

    for (cln = r->pool->cleanup; cln; cln = cln->next) {
        if (cln->handler == ngx_http_sluicegate_cleanup) {
            ctx = cln->data;
            ngx_http_set_ctx(r, ctx, ngx_http_sluicegate_module);
            return ctx;
        }
    }

    return NULL;
}


static ngx_http_sluicegate_ctx_t *
ngx_http_sluicegate_new_ctx(ngx_http_request_t *r)
{
    ngx_pool_cleanup_t         *cln;
    ngx_http_sluicegate_ctx_t  *ctx;

    cln = ngx_pool_cleanup_add(r->pool, sizeof(ngx_http_sluicegate_ctx_t));
    if (cln == NULL) {
        return NULL;
    }

    ctx = cln->data;
    ngx_memzero(ctx, sizeof(ngx_http_sluicegate_ctx_t));
    ctx->charging = 1;

    cln->handler = ngx_http_sluicegate_cleanup;

    ngx_http_set_ctx(r, ctx, ngx_http_sluicegate_module);

    return ctx;
}


/* ---- answers -------------------------------------------------------------------------------- */

static ngx_int_t
ngx_http_sluicegate_add_header(ngx_http_request_t *r, u_char *name, size_t name_len,
    u_char *value, size_t value_len)
{
    ngx_table_elt_t  *h;

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    ngx_memzero(h, sizeof(ngx_table_elt_t));

    h->hash = 1;
    h->key.data = name;
    h->key.len = name_len;
    h->value.data = value;
    h->value.len = value_len;

    h->lowcase_key = ngx_pnalloc(r->pool, name_len);
    if (h->lowcase_key == NULL) {
        return NGX_ERROR;
    }

    ngx_strlow(h->lowcase_key, name, name_len);

    return NGX_OK;
}


static ngx_uint_t
ngx_http_sluicegate_has_header(ngx_http_request_t *r, u_char *name, size_t len)
{
    ngx_uint_t        i;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h;

    part = &r->headers_out.headers.part;
    h = part->elts;

    for (i = 0; /* void */; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                return 0;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (h[i].hash != 0 && h[i].key.len == len
            && ngx_strncasecmp(h[i].key.data, name, len) == 0)
        {
            return 1;
        }
    }
}


/*
 * Adds "name: value\r\n" lines, as sg_render_headers writes them, to the response. With
 * `only_new`, a header the response already has (the upstream's own) is left as it is.
 */
static ngx_int_t
ngx_http_sluicegate_add_rendered(ngx_http_request_t *r, u_char *p, size_t len,
    ngx_uint_t only_new)
{
    u_char  *end, *eol, *colon, *value;

    end = p + len;

    while (p < end) {
        eol = ngx_strlchr(p, end, '\n');
        if (eol == NULL) {
            eol = end;
        }

        colon = ngx_strlchr(p, eol, ':');

        if (colon != NULL && colon > p) {
            value = colon + 1;
            while (value < eol && *value == ' ') {
                value++;
            }

            len = eol - value;
            if (len > 0 && value[len - 1] == '\r') {
                len--;
            }

            if (!only_new || !ngx_http_sluicegate_has_header(r, p, colon - p)) {
                if (ngx_http_sluicegate_add_header(r, p, colon - p, value, len) != NGX_OK) {
                    return NGX_ERROR;
                }
            }
        }

        p = eol + 1;
    }

    return NGX_OK;
}


/* Sends a complete response: status, extra header lines, a JSON body. Returns what
 * ngx_http_output_filter returns, for ngx_http_finalize_request. */
static ngx_int_t
ngx_http_sluicegate_send(ngx_http_request_t *r, ngx_uint_t status, u_char *headers,
    size_t headers_len, u_char *body, size_t body_len)
{
    ngx_str_t  json = ngx_string("application/json");

    return ngx_http_sluicegate_send_typed(r, status, &json, headers, headers_len, body, body_len);
}


/* Answers with `status`, the rendered `headers` and `body` of type `type`. */
static ngx_int_t
ngx_http_sluicegate_send_typed(ngx_http_request_t *r, ngx_uint_t status, ngx_str_t *type,
    u_char *headers, size_t headers_len, u_char *body, size_t body_len)
{
    ngx_int_t    rc;
    ngx_buf_t   *b;
    ngx_chain_t  out;

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    ngx_http_clear_content_length(r);
    ngx_http_clear_accept_ranges(r);
    ngx_http_clear_last_modified(r);
    ngx_http_clear_etag(r);

    r->headers_out.status = status;
    r->headers_out.content_length_n = body_len;
    r->headers_out.content_type = *type;
    r->headers_out.content_type_len = type->len;
    r->headers_out.content_type_lowcase = NULL;

    if (headers_len
        && ngx_http_sluicegate_add_rendered(r, headers, headers_len, 0) != NGX_OK)
    {
        return NGX_ERROR;
    }

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only || body_len == 0) {
        return rc;
    }

    b = ngx_calloc_buf(r->pool);
    if (b == NULL) {
        return NGX_ERROR;
    }

    b->pos = body;
    b->last = body + body_len;
    b->memory = 1;
    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;

    out.buf = b;
    out.next = NULL;

    return ngx_http_output_filter(r, &out);
}


/* The bodies of the module's own errors, in OpenAI's shape. */
static u_char *
ngx_http_sluicegate_error_json(ngx_pool_t *pool, const char *type, const char *message,
    const char *code, size_t *len)
{
    u_char  *p, *last;
    size_t   size;

    size = sizeof("{\"error\": {\"message\": \"\", \"type\": \"\", \"param\": null, "
                  "\"code\": \"\"}}") + ngx_strlen(type) + ngx_strlen(message) + ngx_strlen(code);

    p = ngx_pnalloc(pool, size);
    if (p == NULL) {
        return NULL;
    }

    last = ngx_snprintf(p, size,
                        "{\"error\": {\"message\": \"%s\", \"type\": \"%s\", \"param\": null, "
                        "\"code\": \"%s\"}}", message, type, code);
    *len = last - p;

    return p;
}


/* A 4xx of the module's own (400, 401, 413): the client's mistake, never to be retried. */
static ngx_int_t
ngx_http_sluicegate_reject(ngx_http_request_t *r, ngx_uint_t status, const char *message,
    const char *code)
{
    u_char                     *body;
    size_t                      len;
    ngx_http_sluicegate_ctx_t  *ctx;
    static u_char               no_retry[] = "x-should-retry: false\r\n";

    ctx = ngx_http_sluicegate_get_ctx(r);
    if (ctx != NULL) {
        ctx->state = NGX_HTTP_SLUICEGATE_ANSWERED;
    }

    body = ngx_http_sluicegate_error_json(r->pool, "invalid_request_error", message, code, &len);
    if (body == NULL) {
        return NGX_ERROR;
    }

    return ngx_http_sluicegate_send(r, status, no_retry, sizeof(no_retry) - 1, body, len);
}


/* An engine error: 503 with a retry-after of 1 or 2 s, never a 500 from the limiter. */
static ngx_int_t
ngx_http_sluicegate_unavailable(ngx_http_request_t *r, sg_result rc)
{
    u_char                     *body, *headers, *last;
    size_t                      len;
    const char                 *code, *message;
    ngx_http_sluicegate_ctx_t  *ctx;

    ctx = ngx_http_sluicegate_get_ctx(r);
    if (ctx != NULL) {
        ctx->state = NGX_HTTP_SLUICEGATE_ANSWERED;
    }

    if (rc == SG_ERR_TABLE_FULL) {
        code = "table_full";
        message = "The gateway is tracking as many accounts and models as it can; retry shortly.";

    } else {
        code = "limiter_unavailable";
        message = "The gateway's rate limiter cannot decide this request now; retry shortly.";
    }

    ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                  "sluicegate: admission failed (%s), answering 503", sg_result_str(rc));

    body = ngx_http_sluicegate_error_json(r->pool, "service_unavailable", message, code, &len);
    headers = ngx_pnalloc(r->pool, 64);
    if (body == NULL || headers == NULL) {
        return NGX_HTTP_SERVICE_UNAVAILABLE;
    }

    last = ngx_sprintf(headers, "retry-after: %ui\r\nx-should-retry: true\r\n",
                       (ngx_uint_t) (1 + ngx_random() % 2));

    return ngx_http_sluicegate_send(r, NGX_HTTP_SERVICE_UNAVAILABLE, headers, last - headers,
                                    body, len);
}


static sg_result
ngx_http_sluicegate_render_init(ngx_http_request_t *r, ngx_http_sluicegate_zone_t *zone,
    ngx_http_sluicegate_loc_conf_t *slcf, sg_render *render)
{
    sg_result  rc;

    rc = sg_render_init(zone->engine, (uint32_t) slcf->dialect, render);
    if (rc != SG_OK) {
        return rc;
    }

    /* sg_render_init anchors the wall clock to sg_now_ns(); this module's clock is its own. */
    render->monotonic_at = ngx_http_sluicegate_now(zone);
    render->jitter_seed = ((uint64_t) ngx_random() << 32)
                          ^ (uint64_t) r->connection->number ^ (uint64_t) (uintptr_t) r;

    return SG_OK;
}


/* Renders headers (or, with `body`, the error body) of a decision into the request's pool. */
static sg_result
ngx_http_sluicegate_render(ngx_http_request_t *r, sg_decision *d, sg_render *render,
    uint64_t now, ngx_uint_t body, u_char **out, size_t *out_len)
{
    u_char     *buf;
    size_t      size, written;
    sg_result   rc;
    ngx_uint_t  attempt;

    size = NGX_HTTP_SLUICEGATE_HEADERS_BUF;

    for (attempt = 0; attempt < 2; attempt++) {
        buf = ngx_pnalloc(r->pool, size);
        if (buf == NULL) {
            return SG_ERR_BUFFER_TOO_SMALL;
        }

        written = 0;
        rc = body ? sg_render_error_body(d, render, buf, size, &written)
                  : sg_render_headers(d, render, now, buf, size, &written);

        if (rc == SG_ERR_BUFFER_TOO_SMALL && written > size) {
            size = written;
            continue;
        }

        *out = buf;
        *out_len = (rc == SG_OK) ? written : 0;
        return rc;
    }

    return SG_ERR_BUFFER_TOO_SMALL;
}


/* ---- the request path ----------------------------------------------------------------------- */

static ngx_int_t
ngx_http_sluicegate_handler(ngx_http_request_t *r)
{
    ngx_int_t                        rc;
    ngx_str_t                        account;
    ngx_http_sluicegate_ctx_t       *ctx;
    ngx_http_sluicegate_loc_conf_t  *slcf;

    if (r != r->main) {
        return NGX_DECLINED;
    }

    ctx = ngx_http_sluicegate_get_ctx(r);

    if (ctx != NULL) {
        /* Back after the body was read or the delay passed, or after an internal redirect of a
         * request admitted already (admitted once, whatever its locations). */
        switch (ctx->state) {

        case NGX_HTTP_SLUICEGATE_ADMITTED:
            return NGX_DECLINED;

        case NGX_HTTP_SLUICEGATE_READING:
        case NGX_HTTP_SLUICEGATE_WAITING:
            return NGX_DONE;

        default: /* answered */
            return NGX_DECLINED;
        }
    }

    slcf = ngx_http_get_module_loc_conf(r, ngx_http_sluicegate_module);

    if (slcf->shm_zone == NULL || slcf->admin_zone != NULL) {
        return NGX_DECLINED;       /* off, or the admin endpoint: never admitted */
    }

    if (r->method == NGX_HTTP_OPTIONS) {
        return NGX_DECLINED;       /* CORS preflights pass, as in the ASGI middleware */
    }

    ctx = ngx_http_sluicegate_new_ctx(r);
    if (ctx == NULL) {
        return NGX_ERROR;
    }

    ctx->zone = slcf->shm_zone->data;
    ctx->engine = ctx->zone->engine;
    ctx->state = NGX_HTTP_SLUICEGATE_READING;

    if (r->headers_in.content_length_n > (off_t) slcf->max_body) {
        rc = ngx_http_sluicegate_reject(r, NGX_HTTP_REQUEST_ENTITY_TOO_LARGE,
                                        "The request body is too large.", "request_too_large");
        ngx_http_finalize_request(r, rc);
        return NGX_DONE;
    }

    /* The account: 401 when empty; checked before the body is read. Never logged. */
    if (slcf->account == NULL
        || ngx_http_complex_value(r, slcf->account, &account) != NGX_OK
        || account.len == 0)
    {
        ctx->state = NGX_HTTP_SLUICEGATE_ANSWERED;
        r->headers_out.www_authenticate = NULL;
        rc = ngx_http_sluicegate_reject(r, NGX_HTTP_UNAUTHORIZED,
                                        "No API key: send Authorization: Bearer <key>.",
                                        "invalid_api_key");
        ngx_http_finalize_request(r, rc);
        return NGX_DONE;
    }

    if (account.len > NGX_HTTP_SLUICEGATE_ACCOUNT_MAX) {
        rc = ngx_http_sluicegate_reject(r, NGX_HTTP_BAD_REQUEST,
                                        "The account id must be 1 to 64 bytes.",
                                        "invalid_account");
        ngx_http_finalize_request(r, rc);
        return NGX_DONE;
    }

    if (r->method != NGX_HTTP_POST) {
        /* Another method (a GET listing models): counted on the requests metric only, under
         * the model "*", as the ASGI middleware's unknown paths are. Its body is not read. */
        rc = ngx_http_discard_request_body(r);
        if (rc != NGX_OK) {
            return rc;
        }

        /* As if its body had been read: the request is held while it is admitted. */
        r->main->count++;
        ngx_http_sluicegate_body_handler(r);
        ngx_http_finalize_request(r, NGX_DONE);
        return NGX_DONE;
    }

    rc = ngx_http_read_client_request_body(r, ngx_http_sluicegate_body_handler);

    if (rc >= NGX_HTTP_SPECIAL_RESPONSE) {
        /* A chunked body past client_max_body_size (413, answered in JSON by the header
         * filter, as the state is still "reading"), a timeout, an I/O error. */
        return rc;
    }

    ngx_http_finalize_request(r, NGX_DONE);
    return NGX_DONE;
}


/* The whole body, contiguous, or NULL with *too_large set when it is not all in memory or is
 * longer than `max`. */
static u_char *
ngx_http_sluicegate_body(ngx_http_request_t *r, size_t max, size_t *len, ngx_uint_t *too_large)
{
    u_char       *p, *body;
    size_t        size;
    ngx_buf_t    *b;
    ngx_chain_t  *cl;

    *len = 0;
    *too_large = 0;

    if (r->request_body == NULL || r->request_body->bufs == NULL) {
        return (u_char *) "";
    }

    if (r->request_body->temp_file) {
        *too_large = 1;
        return NULL;
    }

    size = 0;

    for (cl = r->request_body->bufs; cl; cl = cl->next) {
        b = cl->buf;

        if (b->in_file && !ngx_buf_in_memory(b)) {
            *too_large = 1;
            return NULL;
        }

        if (ngx_buf_in_memory(b)) {
            size += b->last - b->pos;
        }
    }

    if (size > max) {
        *too_large = 1;
        return NULL;
    }

    cl = r->request_body->bufs;

    if (cl->next == NULL) {
        *len = size;
        return ngx_buf_in_memory(cl->buf) ? cl->buf->pos : (u_char *) "";
    }

    body = ngx_pnalloc(r->pool, size ? size : 1);
    if (body == NULL) {
        return NULL;
    }

    p = body;

    for (/* void */; cl; cl = cl->next) {
        if (ngx_buf_in_memory(cl->buf)) {
            p = ngx_cpymem(p, cl->buf->pos, cl->buf->last - cl->buf->pos);
        }
    }

    *len = size;
    return body;
}


/* An account's granted tier, from sluicegate_tier's value; anything else is default. */
static uint32_t
ngx_http_sluicegate_service_tier(ngx_str_t *name)
{
    if (name->len == sizeof("priority") - 1
        && ngx_strncmp(name->data, "priority", name->len) == 0)
    {
        return SG_SERVICE_TIER_PRIORITY;
    }

    if (name->len == sizeof("flex") - 1 && ngx_strncmp(name->data, "flex", name->len) == 0) {
        return SG_SERVICE_TIER_FLEX;
    }

    return SG_SERVICE_TIER_DEFAULT;
}


static ngx_int_t
ngx_http_sluicegate_scan_error(ngx_http_request_t *r, sg_result rc)
{
    const char  *message, *code;

    switch (rc) {

    case SG_ERR_JSON_TOO_DEEP:
        message = "The JSON body is nested deeper than 64 levels.";
        code = "nesting_too_deep";
        break;

    case SG_ERR_BODY_INVALID_MODEL:
        message = "The model must be 1 to 128 bytes of UTF-8.";
        code = "invalid_model";
        break;

    case SG_ERR_BODY_INVALID_MAX_TOKENS:
        message = "max_tokens must be a positive integer.";
        code = "invalid_max_tokens";
        break;

    case SG_ERR_BODY_INVALID_N:
        message = "n must be a positive integer.";
        code = "invalid_n";
        break;

    default: /* malformed, truncated, not an object, no model */
        message = "The body must be JSON with a model.";
        code = "invalid_json";
        break;
    }

    return ngx_http_sluicegate_reject(r, NGX_HTTP_BAD_REQUEST, message, code);
}


/* Admits a request whose body (if any) has been read; answers it, delays it or passes it on. */
static void
ngx_http_sluicegate_body_handler(ngx_http_request_t *r)
{
    u_char                          *body, *error, *headers;
    size_t                           len, error_len;
    uint32_t                         status;
    uint64_t                         now, delay;
    sg_result                        rc;
    sg_render                        render;
    sg_request                       req;
    ngx_str_t                        account, tier, variant;
    ngx_uint_t                       too_large;
    sg_openai_request                scan;
    ngx_http_sluicegate_ctx_t       *ctx;
    ngx_http_sluicegate_loc_conf_t  *slcf;

    ctx = ngx_http_sluicegate_get_ctx(r);
    slcf = ngx_http_get_module_loc_conf(r, ngx_http_sluicegate_module);

    if (ctx == NULL || ctx->state != NGX_HTTP_SLUICEGATE_READING || slcf->shm_zone == NULL) {
        /* Cannot happen; if it did, a 503 rather than a 500 from the limiter. */
        ngx_http_finalize_request(r, ngx_http_sluicegate_unavailable(r, SG_ERR_INVALID_ARGUMENT));
        return;
    }

    r->preserve_body = 1;

    if (ngx_http_complex_value(r, slcf->account, &account) != NGX_OK || account.len == 0
        || account.len > NGX_HTTP_SLUICEGATE_ACCOUNT_MAX)
    {
        ngx_http_finalize_request(r,
            ngx_http_sluicegate_reject(r, NGX_HTTP_UNAUTHORIZED,
                                       "No API key: send Authorization: Bearer <key>.",
                                       "invalid_api_key"));
        return;
    }

    ngx_memzero(&req, sizeof(sg_request));
    ngx_memzero(&scan, sizeof(sg_openai_request));

    req.account = account.data;
    req.account_len = account.len;
    req.n = 1;

    if (r->method == NGX_HTTP_POST) {
        body = ngx_http_sluicegate_body(r, slcf->max_body, &len, &too_large);

        if (body == NULL) {
            ngx_http_finalize_request(r, too_large
                ? ngx_http_sluicegate_reject(r, NGX_HTTP_REQUEST_ENTITY_TOO_LARGE,
                                             "The request body is too large.",
                                             "request_too_large")
                : ngx_http_sluicegate_unavailable(r, SG_ERR_BUFFER_TOO_SMALL));
            return;
        }

        rc = sg_openai_request_scan(len ? body : NULL, len, &scan);
        if (rc != SG_OK) {
            ngx_http_finalize_request(r, ngx_http_sluicegate_scan_error(r, rc));
            return;
        }

        req.model = scan.model;
        req.model_len = scan.model_len;

        /* "<model>-fast" is <model>'s fast variant, with its own limits (SPEC §1). */
        if (scan.model_len > NGX_HTTP_SLUICEGATE_FAST_SUFFIX_LEN
            && ngx_strncmp(scan.model + scan.model_len - NGX_HTTP_SLUICEGATE_FAST_SUFFIX_LEN,
                           NGX_HTTP_SLUICEGATE_FAST_SUFFIX,
                           NGX_HTTP_SLUICEGATE_FAST_SUFFIX_LEN) == 0)
        {
            req.model_len -= NGX_HTTP_SLUICEGATE_FAST_SUFFIX_LEN;
            req.fast = 1;
        }

        req.prompt_tokens = scan.prompt_tokens;
        req.max_tokens = scan.max_tokens ? scan.max_tokens : slcf->default_max_tokens;
        req.n = scan.n ? scan.n : 1;
        ctx->asked_stream = scan.stream ? 1 : 0;

    } else {
        req.model = (const uint8_t *) "*";
        req.model_len = 1;
    }

    if (slcf->variant != NULL
        && ngx_http_complex_value(r, slcf->variant, &variant) == NGX_OK
        && variant.len == sizeof("fast") - 1
        && ngx_strncmp(variant.data, "fast", variant.len) == 0)
    {
        req.fast = 1;
    }

    /*
     * The account's grant lives in the engine, which caps every request at it (SPEC §6); a body
     * may ask for a lower tier, and one that asks for none is served at the grant.
     */
    if (slcf->tier != NULL && ngx_http_complex_value(r, slcf->tier, &tier) == NGX_OK) {
        rc = sg_set_service_tier_grant(ctx->engine, account.data, account.len,
                                       ngx_http_sluicegate_service_tier(&tier));
        if (rc != SG_OK) {
            ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                          "sluicegate: granting \"%V\" its service tier failed: %s",
                          &account, sg_result_str(rc));
        }
    }
    req.service_tier = scan.service_tier_given ? scan.service_tier : SG_SERVICE_TIER_PRIORITY;

    ctx->prompt = req.prompt_tokens;

    now = ngx_http_sluicegate_now(ctx->zone);

    rc = sg_admit(ctx->engine, &req, now, &ctx->decision);
    if (rc == SG_OK) {
        rc = ngx_http_sluicegate_render_init(r, ctx->zone, slcf, &render);
    }

    if (rc != SG_OK) {
        ngx_http_finalize_request(r, ngx_http_sluicegate_unavailable(r, rc));
        return;
    }

    if (ctx->decision.outcome != SG_ADMIT && ctx->decision.outcome != SG_ADMIT_OVER_LIMIT) {
        /* Refused: exactly the status, headers and body the library renders. */
        rc = sg_render_status(&ctx->decision, &render, &status);
        if (rc == SG_OK) {
            rc = ngx_http_sluicegate_render(r, &ctx->decision, &render, now, 0, &headers, &len);
        }
        if (rc == SG_OK) {
            rc = ngx_http_sluicegate_render(r, &ctx->decision, &render, now, 1, &error,
                                            &error_len);
        }

        if (rc != SG_OK) {
            ngx_http_finalize_request(r, ngx_http_sluicegate_unavailable(r, rc));
            return;
        }

        ctx->state = NGX_HTTP_SLUICEGATE_ANSWERED;
        ngx_http_finalize_request(r,
            ngx_http_sluicegate_send(r, status, headers, len, error, error_len));
        return;
    }

    /* Admitted: from here the permit is settled exactly once (log phase, or pool cleanup). */
    rc = ngx_http_sluicegate_render(r, &ctx->decision, &render, now, 0, &ctx->headers,
                                    &ctx->headers_len);
    if (rc != SG_OK) {
        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "sluicegate: rendering the rate-limit headers failed: %s",
                      sg_result_str(rc));
        ctx->headers_len = 0;
    }

    delay = ctx->decision.wait_ns;

    if (delay > 0) {
        ctx->state = NGX_HTTP_SLUICEGATE_WAITING;

        r->read_event_handler = ngx_http_test_reading;
        r->write_event_handler = ngx_http_sluicegate_delay;

        r->connection->write->delayed = 1;
        ngx_add_timer(r->connection->write, (ngx_msec_t) ((delay + 999999) / 1000000));
        return;
    }

    ctx->state = NGX_HTTP_SLUICEGATE_ADMITTED;
    ctx->forwarded = 1;

    r->write_event_handler = ngx_http_core_run_phases;
    ngx_http_core_run_phases(r);
}


/* The smoothing wait, as limit_req's delay: the worker goes on serving others meanwhile. */
static void
ngx_http_sluicegate_delay(ngx_http_request_t *r)
{
    ngx_event_t                *wev;
    ngx_http_sluicegate_ctx_t  *ctx;

    wev = r->connection->write;

    if (wev->delayed) {
        if (ngx_handle_write_event(wev, 0) != NGX_OK) {
            ngx_http_finalize_request(r, NGX_HTTP_SERVICE_UNAVAILABLE);
        }

        return;
    }

    if (ngx_handle_read_event(r->connection->read, 0) != NGX_OK) {
        ngx_http_finalize_request(r, NGX_HTTP_SERVICE_UNAVAILABLE);
        return;
    }

    ctx = ngx_http_sluicegate_get_ctx(r);
    if (ctx != NULL) {
        ctx->state = NGX_HTTP_SLUICEGATE_ADMITTED;
        ctx->forwarded = 1;
    }

    r->read_event_handler = ngx_http_block_reading;
    r->write_event_handler = ngx_http_core_run_phases;

    ngx_http_core_run_phases(r);
}


/* ---- filters -------------------------------------------------------------------------------- */

static ngx_int_t
ngx_http_sluicegate_header_filter(ngx_http_request_t *r)
{
    size_t                           len;
    ngx_table_elt_t                 *ce;
    ngx_http_sluicegate_ctx_t       *ctx;
    ngx_http_sluicegate_loc_conf_t  *slcf;
    static u_char                    no_retry[] = "x-should-retry: false\r\n";

    if (r != r->main) {
        return ngx_http_next_header_filter(r);
    }

    ctx = ngx_http_sluicegate_get_ctx(r);

    if (ctx == NULL || ctx->state == NGX_HTTP_SLUICEGATE_READING) {
        /* nginx's own 413 (client_max_body_size) in a limited location: the same JSON error
         * as the module's, instead of nginx's HTML page. */
        slcf = ngx_http_get_module_loc_conf(r, ngx_http_sluicegate_module);

        if (slcf->shm_zone == NULL
            || r->headers_out.status != NGX_HTTP_REQUEST_ENTITY_TOO_LARGE)
        {
            return ngx_http_next_header_filter(r);
        }

        if (ctx == NULL) {
            ctx = ngx_http_sluicegate_new_ctx(r);
            if (ctx == NULL) {
                return NGX_ERROR;
            }
        }

        ctx->state = NGX_HTTP_SLUICEGATE_ANSWERED;
        ctx->replace = 1;

        if (ngx_http_sluicegate_error_json(r->pool, "invalid_request_error",
                                           "The request body is too large.",
                                           "request_too_large", &len) == NULL)
        {
            return NGX_ERROR;
        }

        ngx_http_clear_content_length(r);
        r->headers_out.content_length_n = len;
        ngx_str_set(&r->headers_out.content_type, "application/json");
        r->headers_out.content_type_len = r->headers_out.content_type.len;
        r->headers_out.content_type_lowcase = NULL;
        r->headers_out.charset.len = 0;

        if (ngx_http_sluicegate_add_rendered(r, no_retry, sizeof(no_retry) - 1, 0) != NGX_OK) {
            return NGX_ERROR;
        }

        return ngx_http_next_header_filter(r);
    }

    if (ctx->state != NGX_HTTP_SLUICEGATE_ADMITTED || ctx->header_seen) {
        return ngx_http_next_header_filter(r);
    }

    ctx->header_seen = 1;
    ctx->status = r->headers_out.status;

    if (ctx->headers_len
        && ngx_http_sluicegate_add_rendered(r, ctx->headers, ctx->headers_len, 1) != NGX_OK)
    {
        return NGX_ERROR;
    }

    ctx->stream = (r->headers_out.content_type.len >= sizeof("text/event-stream") - 1
                   && ngx_strlcasestrn(r->headers_out.content_type.data,
                                       r->headers_out.content_type.data
                                       + r->headers_out.content_type.len,
                                       (u_char *) "text/event-stream",
                                       sizeof("text/event-stream") - 2)
                      != NULL);

    ce = r->headers_out.content_encoding;

    if (ce != NULL && ce->hash != 0 && ce->value.len != 0
        && !(ce->value.len == sizeof("identity") - 1
             && ngx_strncasecmp(ce->value.data, (u_char *) "identity", ce->value.len) == 0))
    {
        /* A compressed response cannot be read: settled with what was reserved. */
        ctx->unreadable = 1;
        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "sluicegate: a response with content-encoding \"%V\" cannot be read; "
                      "settling what was reserved (proxy_set_header Accept-Encoding \"\";)",
                      &ce->value);
        return ngx_http_next_header_filter(r);
    }

    ctx->scanner = ngx_palloc(r->pool, sizeof(sg_usage_scanner));

    if (ctx->scanner != NULL
        && sg_usage_scanner_init(ctx->scanner, ctx->stream ? true : false) == SG_OK)
    {
        ctx->scanning = 1;

        /* The copy filter, above this one, reads buffered files into memory for it. */
        r->filter_need_in_memory = 1;

    } else {
        ctx->unreadable = 1;
    }

    return ngx_http_next_header_filter(r);
}


static ngx_int_t
ngx_http_sluicegate_body_filter(ngx_http_request_t *r, ngx_chain_t *in)
{
    u_char                     *body;
    size_t                      len;
    ngx_buf_t                  *b;
    ngx_chain_t                *cl, out;
    ngx_uint_t                  last;
    ngx_http_sluicegate_ctx_t  *ctx;
    uint64_t                    chars, tokens;
    sg_result                   rc;

    if (r != r->main || in == NULL) {
        return ngx_http_next_body_filter(r, in);
    }

    ctx = ngx_http_sluicegate_get_ctx(r);

    if (ctx == NULL) {
        return ngx_http_next_body_filter(r, in);
    }

    if (ctx->replace) {
        /* nginx's 413 page: swallowed, and the JSON sent once its last buffer comes. */
        last = 0;

        for (cl = in; cl; cl = cl->next) {
            b = cl->buf;
            if (b->last_buf || b->last_in_chain) {
                last = 1;
            }

            b->pos = b->last;
            if (b->in_file) {
                b->file_pos = b->file_last;
            }
        }

        if (!last || ctx->replaced) {
            return NGX_OK;
        }

        ctx->replaced = 1;

        body = ngx_http_sluicegate_error_json(r->pool, "invalid_request_error",
                                              "The request body is too large.",
                                              "request_too_large", &len);
        b = ngx_calloc_buf(r->pool);
        if (body == NULL || b == NULL) {
            return NGX_ERROR;
        }

        b->pos = body;
        b->last = body + len;
        b->memory = 1;
        b->last_buf = 1;
        b->last_in_chain = 1;

        out.buf = b;
        out.next = NULL;

        return ngx_http_next_body_filter(r, &out);
    }

    if (ctx->state != NGX_HTTP_SLUICEGATE_ADMITTED || !ctx->header_seen) {
        return ngx_http_next_body_filter(r, in);
    }

    for (cl = in; cl; cl = cl->next) {
        b = cl->buf;

        if (b->last_buf) {
            ctx->complete = 1;
        }

        if (!ctx->scanning) {
            continue;
        }

        if (ngx_buf_in_memory(b)) {
            if (b->last > b->pos
                && sg_usage_scanner_feed(ctx->scanner, b->pos, b->last - b->pos) != SG_OK)
            {
                ctx->scanning = 0;
                ctx->unreadable = 1;
            }

        } else if (b->in_file && b->file_last > b->file_pos) {
            /* Should not happen (filter_need_in_memory): a part it cannot see. */
            ctx->scanning = 0;
            ctx->unreadable = 1;
        }
    }

    /* A stream is charged its generated text as it goes (four characters a token). */
    if (ctx->scanning && ctx->stream && ctx->charging && !ctx->expired
        && ctx->status >= 200 && ctx->status < 300
        && sg_usage_scanner_generated_chars(ctx->scanner, &chars) == SG_OK)
    {
        tokens = chars / 4;

        if (tokens > ctx->charged) {
            rc = sg_charge(ctx->engine, &ctx->decision.permit, tokens - ctx->charged,
                           ngx_http_sluicegate_now(ctx->zone));

            if (rc == SG_OK) {
                ctx->charged = tokens;

            } else if (rc == SG_ERR_PERMIT_EXPIRED) {
                ctx->expired = 1;

            } else {
                ctx->charging = 0;
                ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                              "sluicegate: a stream's charge was refused: %s",
                              sg_result_str(rc));
            }
        }
    }

    return ngx_http_next_body_filter(r, in);
}


/* ---- settle --------------------------------------------------------------------------------- */

static ngx_int_t
ngx_http_sluicegate_log_handler(ngx_http_request_t *r)
{
    ngx_uint_t                  gone;
    ngx_http_sluicegate_ctx_t  *ctx;

    if (r != r->main) {
        return NGX_OK;
    }

    ctx = ngx_http_sluicegate_get_ctx(r);

    if (ctx == NULL || ctx->settled
        || (ctx->state != NGX_HTTP_SLUICEGATE_ADMITTED
            && ctx->state != NGX_HTTP_SLUICEGATE_WAITING))
    {
        return NGX_OK;
    }

    if (r->header_only) {
        ctx->complete = 1;
    }

    gone = r->connection->error
           || r->headers_out.status == NGX_HTTP_CLIENT_CLOSED_REQUEST;

    ngx_http_sluicegate_settle(ctx, gone, r->connection->log);

    return NGX_OK;
}


static void
ngx_http_sluicegate_cleanup(void *data)
{
    ngx_http_sluicegate_ctx_t  *ctx = data;

    if (ctx->settled
        || (ctx->state != NGX_HTTP_SLUICEGATE_ADMITTED
            && ctx->state != NGX_HTTP_SLUICEGATE_WAITING))
    {
        return;
    }

    /* The log phase never ran: the request ended without being logged (shutdown, an
     * allocation failure): what it used, as a cancellation. */
    ngx_http_sluicegate_settle(ctx, 1, ngx_cycle->log);
}


/*
 * Exactly once, by the ASGI middleware's rules:
 * - never passed on (the client left during the smoothing wait): cancelled, nothing used;
 * - a non-2xx response (the upstream's, or nginx's 502/504 when it failed), or a response that
 *   broke off with the client still there: upstream failure, refunded (a stream keeps what it
 *   streamed);
 * - the client left before the end: cancelled, with what was read (else what was reserved);
 * - otherwise success, with the response's usage: prompt tokens from it (else the estimate),
 *   generated from it (else its text at four characters a token); a response that could not
 *   be read is charged what was reserved.
 */
static void
ngx_http_sluicegate_settle(ngx_http_sluicegate_ctx_t *ctx, ngx_uint_t gone, ngx_log_t *log)
{
    uint64_t           now, generated;
    sg_usage           usage, reserved;
    sg_result          rc;
    ngx_uint_t         read, failed, left, completion;
    sg_response_usage  found;

    ctx->settled = 1;

    if (ctx->expired) {
        return;     /* past the permit TTL: its reservation stays charged */
    }

    now = ngx_http_sluicegate_now(ctx->zone);

    /* What was reserved: the conservative settle of a response that cannot be read. */
    reserved.prompt_tokens = ctx->decision.cost[SG_METRIC_PROMPT_TOKENS];
    reserved.cached_tokens = ctx->decision.cost[SG_METRIC_PROMPT_TOKENS]
                             - ngx_min(ctx->decision.cost[SG_METRIC_PROMPT_TOKENS],
                                       ctx->decision.cost[SG_METRIC_UNCACHED_PROMPT_TOKENS]);
    reserved.generated_tokens = ctx->decision.cost[SG_METRIC_GENERATED_TOKENS];

    ngx_memzero(&usage, sizeof(sg_usage));
    read = 0;

    if (ctx->scanning) {
        ctx->scanning = 0;

        if (sg_usage_scanner_finish(ctx->scanner, &found) == SG_OK) {
            if (found.has_usage) {
                read = 1;
                usage.prompt_tokens = found.has_prompt_tokens ? found.prompt_tokens
                                                              : ctx->prompt;
                usage.cached_tokens = ngx_min(found.cached_tokens, usage.prompt_tokens);
                usage.generated_tokens = found.completion_tokens;

            } else if (found.objects > 0) {
                read = 1;
                usage.prompt_tokens = ctx->prompt;
                usage.generated_tokens = found.generated_chars / 4;
            }

            if (found.malformed_usage) {
                ngx_log_error(NGX_LOG_INFO, log, 0,
                              "sluicegate: a response's usage has the wrong shape; "
                              "reading its text instead");
            }
        }
    }

    if (!ctx->forwarded) {
        ngx_memzero(&usage, sizeof(sg_usage));
        completion = SG_COMPLETION_CANCELLED;

    } else {
        failed = ctx->header_seen && (ctx->status < 200 || ctx->status >= 300);
        left = !ctx->complete && gone;

        if (failed || !(ctx->complete || left)) {
            /* Refused or failed by the backend (nginx's own 502/504 included), or broken off
             * with the client still there: refunded, not billed (a stream keeps what it
             * streamed). */
            completion = SG_COMPLETION_UPSTREAM_FAILURE;
            generated = (read && ctx->stream) ? usage.generated_tokens : 0;
            ngx_memzero(&usage, sizeof(sg_usage));
            usage.generated_tokens = generated;

        } else if (left) {
            completion = SG_COMPLETION_CANCELLED;

            if (!read) {
                if (ctx->asked_stream && !ctx->header_seen) {
                    usage.prompt_tokens = ctx->prompt;
                    usage.cached_tokens = 0;
                    usage.generated_tokens = ctx->charged;

                } else {
                    /* A non-streamed request the backend may well finish: its reservation. */
                    usage = reserved;
                }
            }

        } else {
            completion = SG_COMPLETION_SUCCESS;

            if (!read) {
                ngx_log_error(NGX_LOG_INFO, log, 0,
                              "sluicegate: charging the reservation of a response it cannot "
                              "read");
                usage = reserved;
            }
        }
    }

    rc = sg_settle(ctx->engine, &ctx->decision.permit, &usage, (uint32_t) completion, now);

    if (rc == SG_ERR_INVALID_USAGE) {
        rc = sg_settle(ctx->engine, &ctx->decision.permit, &reserved, (uint32_t) completion,
                       now);
    }

    if (rc != SG_OK && rc != SG_ERR_PERMIT_EXPIRED) {
        ngx_log_error(NGX_LOG_WARN, log, 0, "sluicegate: settle failed: %s", sg_result_str(rc));
    }
}


/* ---- the admin endpoint (sluicegate_admin) -------------------------------------------------- */

/*
 * A location's content handler, for operators (behind `allow 127.0.0.1; deny all;`):
 *   PUT|POST ?model=M&load=PERMILLE[&capacity=N][&fast=1]   sg_set_load / sg_set_model_capacity,
 *                                                            204
 *   GET      ?account=A&model=M[&fast=1]                     200, the scope's levels (sg_limits)
 * A bad request is 400 with a JSON error; an engine error 503. It never admits.
 */

static ngx_int_t
ngx_http_sluicegate_admin_error(ngx_http_request_t *r, ngx_uint_t status, const char *message,
    const char *code)
{
    u_char  *body;
    size_t   len;

    body = ngx_http_sluicegate_error_json(r->pool,
                                          status == NGX_HTTP_BAD_REQUEST
                                          ? "invalid_request_error" : "service_unavailable",
                                          message, code, &len);
    if (body == NULL) {
        return NGX_HTTP_SERVICE_UNAVAILABLE;
    }

    return ngx_http_sluicegate_send(r, status, NULL, 0, body, len);
}


/* A query argument, percent-decoded into the pool: NGX_DECLINED when absent. */
static ngx_int_t
ngx_http_sluicegate_admin_arg(ngx_http_request_t *r, const char *name, ngx_str_t *value)
{
    u_char     *dst, *src;
    ngx_str_t   raw;

    if (ngx_http_arg(r, (u_char *) name, ngx_strlen(name), &raw) != NGX_OK) {
        return NGX_DECLINED;
    }

    dst = ngx_pnalloc(r->pool, raw.len + 1);
    if (dst == NULL) {
        return NGX_ERROR;
    }

    value->data = dst;
    src = raw.data;
    ngx_unescape_uri(&dst, &src, raw.len, 0);
    value->len = dst - value->data;

    return NGX_OK;
}


/* An unsigned 32-bit number: NGX_ERROR when it is not one. */
static ngx_int_t
ngx_http_sluicegate_admin_u32(ngx_str_t *value, uint32_t *out)
{
    ngx_int_t  n;

    if (value->len == 0 || value->len > 10) {
        return NGX_ERROR;
    }

    n = ngx_atoi(value->data, value->len);
    if (n == NGX_ERROR || (uint64_t) n > 0xffffffffULL) {
        return NGX_ERROR;
    }

    *out = (uint32_t) n;
    return NGX_OK;
}


/* A JSON number, or null for SG_UNLIMITED (a metric not enforced). */
static u_char *
ngx_http_sluicegate_admin_number(u_char *p, u_char *last, uint64_t n)
{
    if (n == SG_UNLIMITED) {
        return ngx_slprintf(p, last, "null");
    }

    return ngx_slprintf(p, last, "%uL", n);
}


static ngx_int_t
ngx_http_sluicegate_admin_handler(ngx_http_request_t *r)
{
    u_char                          *body, *p, *last;
    uint32_t                         fast, load = 0, capacity = 0;
    sg_result                        rc;
    sg_levels                        levels;
    ngx_str_t                        model, account, v;
    ngx_int_t                        has_load, has_capacity;
    ngx_uint_t                       m;
    ngx_http_sluicegate_zone_t      *zone;
    ngx_http_sluicegate_loc_conf_t  *slcf;

    static const char  *metrics[] = {
        "requests", "prompt_tokens", "uncached_prompt_tokens", "generated_tokens"
    };

    slcf = ngx_http_get_module_loc_conf(r, ngx_http_sluicegate_module);

    if (slcf->admin_zone == NULL || slcf->admin_zone->data == NULL) {
        return NGX_DECLINED;
    }

    zone = slcf->admin_zone->data;

    if (zone->engine == NULL) {
        return ngx_http_sluicegate_admin_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                               "The zone has no engine.",
                                               "limiter_unavailable");
    }

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_PUT|NGX_HTTP_POST))) {
        if (ngx_http_discard_request_body(r) != NGX_OK) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        if (ngx_http_sluicegate_add_header(r, (u_char *) "Allow", 5,
                                           (u_char *) "GET, PUT, POST", 14) != NGX_OK)
        {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        return NGX_HTTP_NOT_ALLOWED;
    }

    fast = 0;

    switch (ngx_http_sluicegate_admin_arg(r, "fast", &v)) {
    case NGX_OK:
        if (v.len == 1 && (v.data[0] == '0' || v.data[0] == '1')) {
            fast = v.data[0] - '0';
            break;
        }
        return ngx_http_sluicegate_admin_error(r, NGX_HTTP_BAD_REQUEST,
                                               "fast must be 0 or 1.", "invalid_fast");
    case NGX_DECLINED:
        break;
    default:
        return NGX_HTTP_SERVICE_UNAVAILABLE;
    }

    switch (ngx_http_sluicegate_admin_arg(r, "model", &model)) {
    case NGX_OK:
        if (model.len > 0 && model.len <= SG_MODEL_MAX) {
            break;
        }
        /* fall through */
    case NGX_DECLINED:
        return ngx_http_sluicegate_admin_error(r, NGX_HTTP_BAD_REQUEST,
                                               "model= must be 1 to 128 bytes.",
                                               "invalid_model");
    default:
        return NGX_HTTP_SERVICE_UNAVAILABLE;
    }

    if (r->method == NGX_HTTP_GET) {
        switch (ngx_http_sluicegate_admin_arg(r, "account", &account)) {
        case NGX_OK:
            if (account.len > 0 && account.len <= NGX_HTTP_SLUICEGATE_ACCOUNT_MAX) {
                break;
            }
            /* fall through */
        case NGX_DECLINED:
            return ngx_http_sluicegate_admin_error(r, NGX_HTTP_BAD_REQUEST,
                                                   "account= must be 1 to 64 bytes.",
                                                   "invalid_account");
        default:
            return NGX_HTTP_SERVICE_UNAVAILABLE;
        }

        rc = sg_limits(zone->engine, account.data, account.len, model.data, model.len, fast,
                       ngx_http_sluicegate_now(zone), &levels);

        if (rc != SG_OK) {
            return ngx_http_sluicegate_admin_error(r,
                       (rc == SG_ERR_EMPTY_KEY || rc == SG_ERR_KEY_TOO_LONG
                        || rc == SG_ERR_INVALID_ARGUMENT)
                       ? NGX_HTTP_BAD_REQUEST : NGX_HTTP_SERVICE_UNAVAILABLE,
                       sg_result_str(rc), "limits_failed");
        }

        body = ngx_pnalloc(r->pool, 1024);
        if (body == NULL) {
            return NGX_HTTP_SERVICE_UNAVAILABLE;
        }

        p = body;
        last = body + 1024;
        p = ngx_slprintf(p, last, "{\"fast\": %s", fast ? "true" : "false");

        for (m = 0; m < 4; m++) {
            p = ngx_slprintf(p, last, ", \"%s\": {\"limit\": ", metrics[m]);
            p = ngx_http_sluicegate_admin_number(p, last, levels.limit[m]);
            p = ngx_slprintf(p, last, ", \"remaining\": ");
            p = ngx_http_sluicegate_admin_number(p, last, levels.remaining[m]);
            p = ngx_slprintf(p, last, ", \"reset_ms\": %uL}",
                             (levels.reset_ns[m] + 999999) / 1000000);
        }

        p = ngx_slprintf(p, last, "}\n");

        return ngx_http_sluicegate_send(r, NGX_HTTP_OK, NULL, 0, body, p - body);
    }

    /* PUT or POST: the load, the capacity or both. */
    has_load = ngx_http_sluicegate_admin_arg(r, "load", &v);

    if (has_load == NGX_OK && ngx_http_sluicegate_admin_u32(&v, &load) != NGX_OK) {
        return ngx_http_sluicegate_admin_error(r, NGX_HTTP_BAD_REQUEST,
                                               "load= must be an integer from 0 to 4294967295 "
                                               "(per mille of capacity).", "invalid_load");
    }

    has_capacity = ngx_http_sluicegate_admin_arg(r, "capacity", &v);

    if (has_capacity == NGX_OK && ngx_http_sluicegate_admin_u32(&v, &capacity) != NGX_OK) {
        return ngx_http_sluicegate_admin_error(r, NGX_HTTP_BAD_REQUEST,
                                               "capacity= must be an integer from 0 to "
                                               "4294967295 (0: off).", "invalid_capacity");
    }

    if (has_load == NGX_ERROR || has_capacity == NGX_ERROR) {
        return NGX_HTTP_SERVICE_UNAVAILABLE;
    }

    if (has_load != NGX_OK && has_capacity != NGX_OK) {
        return ngx_http_sluicegate_admin_error(r, NGX_HTTP_BAD_REQUEST,
                                               "Name load= or capacity= (or both).",
                                               "nothing_to_set");
    }

    rc = SG_OK;

    if (has_capacity == NGX_OK) {
        rc = sg_set_model_capacity(zone->engine, model.data, model.len, fast, capacity);
    }

    if (rc == SG_OK && has_load == NGX_OK) {
        rc = sg_set_load(zone->engine, model.data, model.len, fast, load);
    }

    if (rc != SG_OK) {
        return ngx_http_sluicegate_admin_error(r,
                   (rc == SG_ERR_EMPTY_KEY || rc == SG_ERR_KEY_TOO_LONG
                    || rc == SG_ERR_INVALID_ARGUMENT || rc == SG_ERR_BAD_CAPACITY)
                   ? NGX_HTTP_BAD_REQUEST : NGX_HTTP_SERVICE_UNAVAILABLE,
                   sg_result_str(rc), "set_failed");
    }

    ngx_log_error(NGX_LOG_NOTICE, r->connection->log, 0,
                  "sluicegate_admin \"%V\": model \"%V\"%s: load %s, capacity %s",
                  &zone->name, &model, fast ? " (fast)" : "",
                  has_load == NGX_OK ? "set" : "kept",
                  has_capacity == NGX_OK ? "set" : "kept");

    return ngx_http_sluicegate_send(r, NGX_HTTP_NO_CONTENT, NULL, 0, NULL, 0);
}


/*
 * sluicegate_admin and sluicegate_metrics: the location serves zone NAME (stored at the
 * command's offset) with the content handler in the command's `post`.
 */
static char *
ngx_http_sluicegate_serve_zone(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_str_t                 *value;
    ngx_shm_zone_t           **zone;
    ngx_http_core_loc_conf_t  *clcf;

    zone = (ngx_shm_zone_t **) ((u_char *) conf + cmd->offset);

    if (*zone != NGX_CONF_UNSET_PTR) {
        return "is duplicate";
    }

    value = cf->args->elts;

    *zone = ngx_shared_memory_add(cf, &value[1], 0, &ngx_http_sluicegate_module);
    if (*zone == NULL) {
        return NGX_CONF_ERROR;
    }

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
    clcf->handler = (ngx_http_handler_pt) cmd->post;

    return NGX_CONF_OK;
}


/* ---- metrics -------------------------------------------------------------------------------- */

/*
 * GET: the zone's counters in the Prometheus text format (SPEC §12), as sg_metrics_render writes
 * them. They live in the shared zone, so any worker answers for all of them.
 */
static ngx_int_t
ngx_http_sluicegate_metrics_handler(ngx_http_request_t *r)
{
    u_char                          *text;
    size_t                           size, written;
    ngx_str_t                        type = ngx_string("text/plain; version=0.0.4; charset=utf-8");
    ngx_uint_t                       tries;
    sg_result                        result;
    ngx_http_sluicegate_zone_t      *zone;
    ngx_http_sluicegate_loc_conf_t  *slcf;

    slcf = ngx_http_get_module_loc_conf(r, ngx_http_sluicegate_module);

    if (slcf->metrics_zone == NULL || slcf->metrics_zone->data == NULL) {
        return NGX_DECLINED;
    }

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return NGX_HTTP_NOT_ALLOWED;
    }

    zone = slcf->metrics_zone->data;

    if (zone->engine == NULL) {
        return NGX_HTTP_SERVICE_UNAVAILABLE;
    }

    /* Counters move between the sizing call and the rendering: room to spare, and retries. */
    size = 0;
    written = 0;
    text = NULL;
    result = sg_metrics_render(zone->engine, NULL, 0, &size);

    for (tries = 0; tries < 4 && result == SG_ERR_BUFFER_TOO_SMALL; tries++) {
        size += size / 4 + 4096;
        text = ngx_pnalloc(r->pool, size);
        if (text == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        result = sg_metrics_render(zone->engine, text, size, &written);
        size = written;
    }

    if (result != SG_OK) {
        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "sluicegate: rendering the metrics failed: %s", sg_result_str(result));
        return NGX_HTTP_SERVICE_UNAVAILABLE;
    }

    return ngx_http_sluicegate_send_typed(r, NGX_HTTP_OK, &type, NULL, 0, text, written);
}


/* ---- the zone ------------------------------------------------------------------------------- */

static ngx_int_t
ngx_http_sluicegate_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_http_sluicegate_zone_t  *ozone = data;

    u_char                      *p;
    sg_result                    rc;
    ngx_slab_pool_t             *shpool;
    ngx_http_sluicegate_zone_t  *zone;

    zone = shm_zone->data;

    if (zone->frozen) {
        zone->frozen_ns = ngx_http_sluicegate_monotonic();
    }

    if (ozone != NULL) {
        /* A reload that kept the zone: attach to the engine that is there, limits and all. */
        zone->region = ozone->region;

        rc = sg_engine_in_region(zone->region, zone->region_len, &zone->cfg, 0,
                                 &zone->engine);
        if (rc != SG_OK) {
            ngx_log_error(NGX_LOG_EMERG, shm_zone->shm.log, 0,
                          "sluicegate_zone \"%V\" cannot keep its engine across this reload: "
                          "%s (a new policy needs a new zone name, or a restart)",
                          &shm_zone->shm.name, sg_result_str(rc));
            return NGX_ERROR;
        }

        return NGX_OK;
    }

    shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    if (shm_zone->shm.exists) {
        zone->region = shpool->data;

        rc = sg_engine_in_region(zone->region, zone->region_len, &zone->cfg, 0,
                                 &zone->engine);
        if (rc != SG_OK) {
            ngx_log_error(NGX_LOG_EMERG, shm_zone->shm.log, 0,
                          "sluicegate_zone \"%V\": %s", &shm_zone->shm.name,
                          sg_result_str(rc));
            return NGX_ERROR;
        }

        return NGX_OK;
    }

    p = ngx_slab_calloc(shpool, zone->region_len + 128);
    if (p == NULL) {
        ngx_log_error(NGX_LOG_EMERG, shm_zone->shm.log, 0,
                      "sluicegate_zone \"%V\" is too small for its engine of %uz bytes",
                      &shm_zone->shm.name, zone->region_len);
        return NGX_ERROR;
    }

    zone->region = (void *) ngx_align_ptr(p, 128);
    shpool->data = zone->region;

    rc = sg_engine_in_region(zone->region, zone->region_len, &zone->cfg, 1, &zone->engine);
    if (rc != SG_OK) {
        ngx_log_error(NGX_LOG_EMERG, shm_zone->shm.log, 0,
                      "sluicegate_zone \"%V\": %s", &shm_zone->shm.name, sg_result_str(rc));
        return NGX_ERROR;
    }

    return NGX_OK;
}


static void
ngx_http_sluicegate_free_engine(void *data)
{
    ngx_http_sluicegate_zone_t  *zone = data;

    /* The handle only: the memory stays, as the zone's. */
    sg_engine_free(zone->engine);
    zone->engine = NULL;
}


/* A per-minute limit: an integer, or "off" (INFINITY: the metric or ceiling turned off). */
static ngx_int_t
ngx_http_sluicegate_limit(ngx_str_t *value, double *out)
{
    ngx_int_t  n;

    if (value->len == 3 && ngx_strncmp(value->data, "off", 3) == 0) {
        *out = INFINITY;
        return NGX_OK;
    }

    n = ngx_atoi(value->data, value->len);
    if (n == NGX_ERROR || n < 1) {
        return NGX_ERROR;
    }

    *out = (double) n;
    return NGX_OK;
}


static char *
ngx_http_sluicegate_zone(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    size_t                       size, need, slab;
    ssize_t                      ssize;
    uint64_t                     lo, hi, mid;
    ngx_str_t                   *value, name, s;
    ngx_int_t                    n;
    ngx_uint_t                   i, m, scopes_set;
    ngx_msec_t                   ms;
    ngx_shm_zone_t              *shm_zone;
    ngx_pool_cleanup_t          *cln;
    ngx_http_sluicegate_zone_t  *zone;

    static const char  *metrics[] = {
        "requests", "prompt_tokens", "uncached_prompt_tokens", "generated_tokens"
    };

    /* sg_config.shed_permille's order. */
    static const char  *shed_classes[] = {
        "shed_over_limit_flex", "shed_in_limit_flex", "shed_over_limit_default",
        "shed_over_limit_priority", "shed_in_limit_default", "shed_in_limit_priority"
    };

    value = cf->args->elts;
    name = value[1];

    if (name.len == 0 || ngx_strchr(name.data, '=') != NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "sluicegate_zone needs a name first, as in "
                           "\"sluicegate_zone llm policy=fireworks_2024;\"");
        return NGX_CONF_ERROR;
    }

    zone = ngx_pcalloc(cf->pool, sizeof(ngx_http_sluicegate_zone_t));
    if (zone == NULL) {
        return NGX_CONF_ERROR;
    }

    zone->name = name;
    size = 0;
    scopes_set = 0;

    for (i = 2; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "size=", 5) == 0) {
            s.data = value[i].data + 5;
            s.len = value[i].len - 5;
            ssize = ngx_parse_size(&s);
            if (ssize == NGX_ERROR || ssize < 1) {
                goto invalid;
            }
            size = (size_t) ssize;
            continue;
        }

        if (ngx_strncmp(value[i].data, "policy=", 7) == 0) {
            s.data = value[i].data + 7;
            s.len = value[i].len - 7;

            if (s.len == 14 && ngx_strncmp(s.data, "fireworks_2024", 14) == 0) {
                zone->cfg.preset = "fireworks_2024";
            } else if (s.len == 14 && ngx_strncmp(s.data, "fireworks_2026", 14) == 0) {
                zone->cfg.preset = "fireworks_2026";
            } else if (s.len == 8 && ngx_strncmp(s.data, "together", 8) == 0) {
                zone->cfg.preset = "together";
            } else if (s.len == 5 && ngx_strncmp(s.data, "fixed", 5) == 0) {
                zone->cfg.preset = "fixed";
            } else {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "sluicegate_zone: unknown policy "
                                   "\"%V\" (fireworks_2024, fireworks_2026, together or fixed)",
                                   &s);
                return NGX_CONF_ERROR;
            }
            continue;
        }

        if (ngx_strncmp(value[i].data, "clock=", 6) == 0) {
            if (value[i].len == 12 && ngx_strncmp(value[i].data + 6, "frozen", 6) == 0) {
                zone->frozen = 1;
            } else if (value[i].len == 15
                       && ngx_strncmp(value[i].data + 6, "monotonic", 9) == 0)
            {
                zone->frozen = 0;
            } else {
                goto invalid;
            }
            continue;
        }

        if (ngx_strncmp(value[i].data, "max_wait=", 9) == 0) {
            s.data = value[i].data + 9;
            s.len = value[i].len - 9;
            if (s.len == 3 && ngx_strncmp(s.data, "off", 3) == 0) {
                zone->cfg.max_wait_ns = SG_MAX_WAIT_OFF;
                continue;
            }
            ms = ngx_parse_time(&s, 0);
            if (ms == (ngx_msec_t) NGX_ERROR || ms == 0) {
                goto invalid;
            }
            zone->cfg.max_wait_ns = (uint64_t) ms * 1000000;
            continue;
        }

        if (ngx_strncmp(value[i].data, "permit_ttl=", 11) == 0) {
            s.data = value[i].data + 11;
            s.len = value[i].len - 11;
            if (s.len == 5 && ngx_strncmp(s.data, "never", 5) == 0) {
                zone->cfg.permit_ttl_ns = SG_PERMIT_TTL_NEVER;
                continue;
            }
            ms = ngx_parse_time(&s, 0);
            if (ms == (ngx_msec_t) NGX_ERROR || ms == 0) {
                goto invalid;
            }
            zone->cfg.permit_ttl_ns = (uint64_t) ms * 1000000;
            continue;
        }

        if (ngx_strncmp(value[i].data, "hard_factor=", 12) == 0) {
            n = ngx_atofp(value[i].data + 12, value[i].len - 12, 3);
            if (n == NGX_ERROR || n < 1000) {
                goto invalid;
            }
            zone->cfg.hard_factor = (double) n / 1000.0;
            continue;
        }

        if (ngx_strncmp(value[i].data, "scopes=", 7) == 0
            || ngx_strncmp(value[i].data, "accounts=", 9) == 0
            || ngx_strncmp(value[i].data, "models=", 7) == 0
            || ngx_strncmp(value[i].data, "permits=", 8) == 0
            || ngx_strncmp(value[i].data, "max_in_flight=", 14) == 0)
        {
            s.data = ngx_strlchr(value[i].data, value[i].data + value[i].len, '=') + 1;
            s.len = value[i].data + value[i].len - s.data;
            n = ngx_atoi(s.data, s.len);
            if (n == NGX_ERROR || n < 1) {
                goto invalid;
            }

            switch (value[i].data[0]) {
            case 's': zone->cfg.scopes = (uint64_t) n; scopes_set = 1; break;
            case 'a': zone->cfg.accounts = (uint64_t) n; break;
            case 'p': zone->cfg.permits = (uint64_t) n; break;
            default:
                if (value[i].data[1] == 'o') {
                    zone->cfg.models = (uint64_t) n;
                } else {
                    zone->cfg.max_in_flight = (uint64_t) n;
                }
            }
            continue;
        }

        /* The load (1 = at capacity) at which each class is shed, in shedding order (SPEC §6). */
        for (m = 0; m < 6; m++) {
            size_t  l = ngx_strlen(shed_classes[m]);

            if (value[i].len > l + 1 && ngx_strncmp(value[i].data, shed_classes[m], l) == 0
                && value[i].data[l] == '=')
            {
                n = ngx_atofp(value[i].data + l + 1, value[i].len - l - 1, 3);
                if (n == NGX_ERROR || n < 1 || n > 4000000) {
                    goto invalid;
                }
                zone->cfg.shed_permille[m] = (uint32_t) n;
                break;
            }
        }

        if (m < 6) {
            continue;
        }

        /* Per-minute floors (the limits under "fixed") and ceilings, by metric. */
        for (m = 0; m < 4; m++) {
            size_t  l = ngx_strlen(metrics[m]);

            if (value[i].len > l + 1 && ngx_strncmp(value[i].data, metrics[m], l) == 0
                && value[i].data[l] == '=')
            {
                s.data = value[i].data + l + 1;
                s.len = value[i].len - l - 1;
                if (ngx_http_sluicegate_limit(&s, &zone->cfg.floor[m]) != NGX_OK) {
                    goto invalid;
                }
                break;
            }

            if (value[i].len > l + 9 && ngx_strncmp(value[i].data, "ceiling_", 8) == 0
                && ngx_strncmp(value[i].data + 8, metrics[m], l) == 0
                && value[i].data[l + 8] == '=')
            {
                s.data = value[i].data + l + 9;
                s.len = value[i].len - l - 9;
                if (ngx_http_sluicegate_limit(&s, &zone->cfg.ceiling[m]) != NGX_OK) {
                    goto invalid;
                }
                break;
            }
        }

        if (m < 4) {
            continue;
        }

        goto invalid;
    }

    if (zone->cfg.preset == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "sluicegate_zone \"%V\" needs policy=fireworks_2024|fireworks_2026|"
                           "together|fixed", &name);
        return NGX_CONF_ERROR;
    }

    /* The slab allocator's own bookkeeping: a page struct per page, its header, and a page of
     * slack for the 128-byte alignment. */
#define SG_SLAB_OVERHEAD(len)  ((len) / 64 + 16 * ngx_pagesize)

    if (!scopes_set && size != 0) {
        /* As many scopes as the zone holds. */
        lo = 0;
        hi = (uint64_t) 1 << 32;

        while (lo < hi) {
            mid = lo + (hi - lo + 1) / 2;
            zone->cfg.scopes = mid;

            if (sg_region_size(&zone->cfg, &need) == SG_OK
                && need + SG_SLAB_OVERHEAD(need) <= size)
            {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }

        if (lo == 0) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "sluicegate_zone \"%V\": size=%uz holds no engine", &name, size);
            return NGX_CONF_ERROR;
        }

        zone->cfg.scopes = lo;

    } else if (!scopes_set) {
        zone->cfg.scopes = NGX_HTTP_SLUICEGATE_DEFAULT_SCOPES;
    }

    if (sg_region_size(&zone->cfg, &zone->region_len) != SG_OK) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "sluicegate_zone \"%V\": a capacity is zero or too large", &name);
        return NGX_CONF_ERROR;
    }

    slab = zone->region_len + SG_SLAB_OVERHEAD(zone->region_len);
    slab = ngx_align(slab, ngx_pagesize);

    if (size == 0) {
        size = slab;

    } else if (size < slab) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "sluicegate_zone \"%V\": size=%uz is too small for %uL scopes: it "
                           "needs at least %uz (or leave size= out)",
                           &name, size, zone->cfg.scopes, slab);
        return NGX_CONF_ERROR;
    }

    if (size < 8 * ngx_pagesize) {
        size = 8 * ngx_pagesize;
    }

    shm_zone = ngx_shared_memory_add(cf, &name, size, &ngx_http_sluicegate_module);
    if (shm_zone == NULL) {
        return NGX_CONF_ERROR;
    }

    if (shm_zone->data) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "duplicate sluicegate_zone \"%V\"", &name);
        return NGX_CONF_ERROR;
    }

    shm_zone->init = ngx_http_sluicegate_init_zone;
    shm_zone->data = zone;

    cln = ngx_pool_cleanup_add(cf->cycle->pool, 0);
    if (cln == NULL) {
        return NGX_CONF_ERROR;
    }

    cln->handler = ngx_http_sluicegate_free_engine;
    cln->data = zone;

    return NGX_CONF_OK;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "sluicegate_zone: invalid parameter \"%V\"",
                       &value[i]);
    return NGX_CONF_ERROR;
}


static char *
ngx_http_sluicegate(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_sluicegate_loc_conf_t  *slcf = conf;

    ngx_str_t  *value;

    if (slcf->shm_zone != NGX_CONF_UNSET_PTR) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (value[1].len == 3 && ngx_strncmp(value[1].data, "off", 3) == 0) {
        slcf->shm_zone = NULL;
        return NGX_CONF_OK;
    }

    /* A reference (size 0): the zone may be defined further down; nginx refuses to start if
     * it never is ("zero size shared memory zone"). */
    slcf->shm_zone = ngx_shared_memory_add(cf, &value[1], 0, &ngx_http_sluicegate_module);
    if (slcf->shm_zone == NULL) {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_sluicegate_dialect(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_sluicegate_loc_conf_t  *slcf = conf;

    ngx_str_t   *value;
    ngx_uint_t   i;

    if (slcf->dialect != NGX_CONF_UNSET_UINT) {
        return "is duplicate";
    }

    value = cf->args->elts;

    for (i = 0; ngx_http_sluicegate_dialects[i].len; i++) {
        if (ngx_http_sluicegate_dialects[i].len == value[1].len
            && ngx_strncmp(ngx_http_sluicegate_dialects[i].data, value[1].data,
                           value[1].len) == 0)
        {
            slcf->dialect = i;
            return NGX_CONF_OK;
        }
    }

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "sluicegate_dialect: unknown dialect \"%V\" "
                       "(fireworks, together, openai, anthropic or ietf)", &value[1]);
    return NGX_CONF_ERROR;
}


static void *
ngx_http_sluicegate_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_sluicegate_loc_conf_t  *conf;

    conf = ngx_pcalloc(cf->pool, sizeof(ngx_http_sluicegate_loc_conf_t));
    if (conf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     conf->account = NULL;
     *     conf->tier = NULL;
     *     conf->variant = NULL;
     */

    conf->shm_zone = NGX_CONF_UNSET_PTR;
    conf->admin_zone = NGX_CONF_UNSET_PTR;
    conf->metrics_zone = NGX_CONF_UNSET_PTR;
    conf->dialect = NGX_CONF_UNSET_UINT;
    conf->max_body = NGX_CONF_UNSET_SIZE;
    conf->default_max_tokens = NGX_CONF_UNSET_UINT;

    return conf;
}


static char *
ngx_http_sluicegate_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_http_sluicegate_loc_conf_t *prev = parent;
    ngx_http_sluicegate_loc_conf_t *conf = child;

    ngx_http_core_loc_conf_t  *clcf;

    ngx_conf_merge_ptr_value(conf->shm_zone, prev->shm_zone, NULL);

    if (conf->metrics_zone == NGX_CONF_UNSET_PTR) {
        conf->metrics_zone = NULL;  /* not inherited, as sluicegate_admin */
    }

    if (conf->admin_zone == NGX_CONF_UNSET_PTR) {
        conf->admin_zone = NULL;    /* not inherited: only the location that names it */
    }
    ngx_conf_merge_uint_value(conf->dialect, prev->dialect, SG_DIALECT_FIREWORKS);
    ngx_conf_merge_size_value(conf->max_body, prev->max_body,
                              NGX_HTTP_SLUICEGATE_DEFAULT_MAX_BODY);
    ngx_conf_merge_uint_value(conf->default_max_tokens, prev->default_max_tokens,
                              NGX_HTTP_SLUICEGATE_DEFAULT_MAX_TOKENS);

    if (conf->account == NULL) {
        conf->account = prev->account;
    }

    if (conf->tier == NULL) {
        conf->tier = prev->tier;
    }

    if (conf->variant == NULL) {
        conf->variant = prev->variant;
    }

    if (conf->default_max_tokens == 0 || conf->default_max_tokens > ((ngx_uint_t) 1 << 32)) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "sluicegate_default_max_tokens must be from 1 to 4294967296");
        return NGX_CONF_ERROR;
    }

    if (conf->max_body == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "sluicegate_max_body must not be 0");
        return NGX_CONF_ERROR;
    }

    if (conf->shm_zone != NULL && conf->admin_zone == NULL) {
        if (conf->account == NULL) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "\"sluicegate\" needs \"sluicegate_account\" (a variable naming "
                               "the account, never the raw credential)");
            return NGX_CONF_ERROR;
        }

        /* A body within the cap is kept in memory, where the scanner reads it: one that nginx
         * would spill to a temporary file is answered 413. */
        clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);

        if (clcf != NULL && clcf->client_body_buffer_size < conf->max_body) {
            clcf->client_body_buffer_size = conf->max_body;
        }
    }

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_sluicegate_init(ngx_conf_t *cf)
{
    ngx_http_handler_pt        *h;
    ngx_http_core_main_conf_t  *cmcf;

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);

    /* After the access phase (auth_request's variables are set) and before the content
     * handler (proxy_pass). */
    h = ngx_array_push(&cmcf->phases[NGX_HTTP_PRECONTENT_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_sluicegate_handler;

    /* First in the log phase: settled before the access log line is written, so a client that
     * sees a request logged sees it settled. */
    h = ngx_array_push(&cmcf->phases[NGX_HTTP_LOG_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h = cmcf->phases[NGX_HTTP_LOG_PHASE].handlers.elts;
    ngx_memmove(&h[1], &h[0],
                (cmcf->phases[NGX_HTTP_LOG_PHASE].handlers.nelts - 1) * sizeof(ngx_http_handler_pt));
    h[0] = ngx_http_sluicegate_log_handler;

    ngx_http_next_header_filter = ngx_http_top_header_filter;
    ngx_http_top_header_filter = ngx_http_sluicegate_header_filter;

    ngx_http_next_body_filter = ngx_http_top_body_filter;
    ngx_http_top_body_filter = ngx_http_sluicegate_body_filter;

    return NGX_OK;
}
