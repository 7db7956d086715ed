/* mesh-infer: one request to a meshserve controller from the shell.
 *
 *   mesh-infer [--endpoint E] [--timeout-ms T] [--stream] [--max-tokens N]
 *              [--heartbeat-ms H] [--controller-timeout-ms C]
 *              [--curve SERVER_KEY PUBLIC_KEY SECRET_KEY] MODEL INPUT...
 *
 * INPUT is NAME=TEXT (a string), NAME:int=N, or NAME:DTYPE[D1,D2,...]=v1,v2,... (a tensor;
 * bool and integer dtypes take integers). Outputs print as NAME: values (tensors) or text. */
#include "mesh_client.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int parse_dtype(const char *s, size_t n) {
    for (int d = 0; d < MESH_DTYPE_COUNT; d++)
        if (strlen(mesh_dtype_name(d)) == n && !strncmp(mesh_dtype_name(d), s, n)) return d;
    return -1;
}

/* Writes one number of dtype d at p. float16/bfloat16 take their raw 16-bit pattern. */
static void put(mesh_dtype d, void *p, const char *text) {
    switch (d) {
    case MESH_FLOAT32: { float v = strtof(text, NULL); memcpy(p, &v, 4); break; }
    case MESH_FLOAT64: { double v = strtod(text, NULL); memcpy(p, &v, 8); break; }
    case MESH_INT64: { long long v = strtoll(text, NULL, 0); memcpy(p, &v, 8); break; }
    case MESH_INT32: { int v = (int)strtol(text, NULL, 0); memcpy(p, &v, 4); break; }
    case MESH_INT16: case MESH_FLOAT16: case MESH_BFLOAT16: {
        short v = (short)strtol(text, NULL, 0); memcpy(p, &v, 2); break; }
    default: { signed char v = (signed char)strtol(text, NULL, 0); memcpy(p, &v, 1); }
    }
}

static void print_value(const mesh_value *v) {
    if (v->kind == MESH_VALUE_STRING) { printf("%s: %s\n", v->name, v->str); return; }
    if (v->kind == MESH_VALUE_INT) { printf("%s: %lld\n", v->name, (long long)v->i); return; }
    printf("%s: %s[", v->name, mesh_dtype_name(v->dtype));
    for (int i = 0; i < v->ndim; i++) printf(i ? ",%lld" : "%lld", (long long)v->shape[i]);
    printf("] =");
    size_t n = v->nbytes / mesh_dtype_size(v->dtype);
    for (size_t i = 0; i < n; i++) {
        const char *p = (const char *)v->data + i * mesh_dtype_size(v->dtype);
        switch (v->dtype) {
        case MESH_FLOAT32: { float x; memcpy(&x, p, 4); printf(" %.9g", x); break; }
        case MESH_FLOAT64: { double x; memcpy(&x, p, 8); printf(" %.17g", x); break; }
        case MESH_INT64: { long long x; memcpy(&x, p, 8); printf(" %lld", x); break; }
        case MESH_INT32: { int x; memcpy(&x, p, 4); printf(" %d", x); break; }
        case MESH_INT16: case MESH_FLOAT16: case MESH_BFLOAT16: {
            short x; memcpy(&x, p, 2); printf(" %d", x); break; }
        case MESH_INT8: printf(" %d", (int)*(const signed char *)p); break;
        default: printf(" %u", (unsigned)*(const unsigned char *)p);
        }
    }
    printf("\n");
}

int main(int argc, char **argv) {
    const char *endpoint = "tcp://127.0.0.1:5555", *model = NULL;
    int timeout_ms = 30000, stream = 0, max_tokens = -1;
    int heartbeat_ms = 500, controller_timeout_ms = 5000;
    mesh_curve curve, *use_curve = NULL;
    mesh_value inputs[64];
    size_t n = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--endpoint") && i + 1 < argc) endpoint = argv[++i];
        else if (!strcmp(a, "--timeout-ms") && i + 1 < argc) timeout_ms = atoi(argv[++i]);
        else if (!strcmp(a, "--heartbeat-ms") && i + 1 < argc) heartbeat_ms = atoi(argv[++i]);
        else if (!strcmp(a, "--controller-timeout-ms") && i + 1 < argc)
            controller_timeout_ms = atoi(argv[++i]);
        else if (!strcmp(a, "--stream")) stream = 1;
        else if (!strcmp(a, "--max-tokens") && i + 1 < argc) max_tokens = atoi(argv[++i]);
        else if (!strcmp(a, "--curve") && i + 3 < argc) {
            curve.server_key = argv[++i]; curve.public_key = argv[++i]; curve.secret_key = argv[++i];
            use_curve = &curve;
        } else if (!model) model = a;
        else if (n < 64) {
            char *eq = strchr(a, '=');
            if (!eq) { fprintf(stderr, "mesh-infer: input %s: expected NAME=VALUE\n", a); return 2; }
            char *name = strndup(a, (size_t)(eq - a)), *colon = strchr(name, ':');
            const char *value = eq + 1;
            if (!colon) { inputs[n++] = mesh_string_value(name, value); continue; }
            *colon = 0;
            char *type = colon + 1, *bracket = strchr(type, '[');
            if (!strcmp(type, "int")) { inputs[n++] = mesh_int_value(name, strtoll(value, NULL, 0)); continue; }
            int d = parse_dtype(type, bracket ? (size_t)(bracket - type) : strlen(type));
            if (d < 0 || !bracket) { fprintf(stderr, "mesh-infer: input %s: unknown type %s\n", name, type); return 2; }
            int64_t shape[MESH_MAX_DIMS];
            int ndim = 0;
            for (char *p = bracket + 1; *p && *p != ']' && ndim < MESH_MAX_DIMS;) {
                shape[ndim++] = strtoll(p, &p, 10);
                if (*p == ',') p++;
            }
            size_t count = 1;
            for (int k = 0; k < ndim; k++) count *= (size_t)shape[k];
            char *data = calloc(count ? count : 1, mesh_dtype_size(d));
            char *copy = strdup(value), *save = NULL, *tok = strtok_r(copy, ",", &save);
            for (size_t k = 0; k < count && tok; k++, tok = strtok_r(NULL, ",", &save))
                put(d, data + k * mesh_dtype_size(d), tok);
            inputs[n++] = mesh_tensor_value(name, d, shape, ndim, data);
        }
    }
    if (!model) { fprintf(stderr, "usage: mesh-infer [--endpoint E] [--timeout-ms T] [--stream] "
                  "[--max-tokens N] [--heartbeat-ms H] [--controller-timeout-ms C] "
                  "[--curve S P K] MODEL INPUT...\n"); return 2; }
    mesh_client *c = mesh_connect(endpoint, use_curve);
    if (!c) { fprintf(stderr, "mesh-infer: cannot connect to %s\n", endpoint); return 1; }
    if (mesh_set_liveness(c, heartbeat_ms, controller_timeout_ms) < 0) {
        fprintf(stderr, "mesh-infer: --controller-timeout-ms must be at least twice --heartbeat-ms\n");
        mesh_close(c);
        return 2;
    }
    mesh_value params[1];
    size_t n_params = 0;
    if (max_tokens >= 0) params[n_params++] = mesh_int_value("max_tokens", max_tokens);
    mesh_error err;
    int rc = 0;
    if (!stream) {
        mesh_answer out;
        if (mesh_infer(c, model, inputs, n, params, n_params, timeout_ms, &out, &err) == 0) {
            for (size_t i = 0; i < out.count; i++) print_value(&out.values[i]);
            mesh_answer_free(&out);
        } else rc = 1;
    } else {
        mesh_stream s;
        if (mesh_stream_start(c, model, inputs, n, params, n_params, timeout_ms, &s, &err) < 0) rc = 1;
        mesh_answer chunk;
        int r;
        while (!rc && (r = mesh_stream_next(c, &s, &chunk, &err)) == 0) {
            const mesh_value *text = mesh_answer_get(&chunk, "text");
            if (text && text->kind == MESH_VALUE_STRING) { fputs(text->str, stdout); fflush(stdout); }
            else for (size_t i = 0; i < chunk.count; i++) print_value(&chunk.values[i]);
            mesh_answer_free(&chunk);
        }
        if (!rc && r < 0) rc = 1;
        if (!rc) printf("\n");
    }
    if (rc) fprintf(stderr, "mesh-infer: [%s] %s%s\n", err.code, err.message,
                    err.retryable ? " (retryable)" : "");
    mesh_close(c);
    return rc;
}
