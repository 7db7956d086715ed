/* Tests of the C client against a live controller (MESH_ENDPOINT; deployments echo and
 * tinygpt), and of its own request builder and decoder against the conformance vectors
 * (MESH_VECTORS: docs/protocol-vectors/vectors.json as lines, in the format given below),
 * either or both. tests/test_c_client.py starts the controller and writes the file. Exit 0 when
 * every check holds. */
#include "mesh_client.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures = 0;
#define CHECK(cond, ...) do { if (!(cond)) { failures++; fprintf(stderr, "FAIL %s:%d: ", \
    __FILE__, __LINE__); fprintf(stderr, __VA_ARGS__); fprintf(stderr, "\n"); } } while (0)

static void every_dtype_comes_back_bit_for_bit(mesh_client *c) {
    unsigned char raw[8 * 6];
    for (size_t i = 0; i < sizeof raw; i++) raw[i] = (unsigned char)(i * 37 + 11);
    raw[0] = 1; /* a bool must be 0 or 1 */
    for (int d = 0; d < MESH_DTYPE_COUNT; d++) {
        int64_t shape[2] = {2, 3};
        const unsigned char *data = raw;
        unsigned char bools[6] = {1, 0, 1, 1, 0, 0};
        if (d == MESH_BOOL) data = bools;
        mesh_value in[3] = {mesh_tensor_value("x", d, shape, 2, data),
                            mesh_string_value("s", "text"), mesh_int_value("n", -42)};
        mesh_answer out;
        mesh_error err;
        int rc = mesh_infer(c, "echo", in, 3, NULL, 0, 5000, &out, &err);
        CHECK(rc == 0, "%s: [%s] %s", mesh_dtype_name(d), err.code, err.message);
        if (rc) continue;
        const mesh_value *x = mesh_answer_get(&out, "x"), *s = mesh_answer_get(&out, "s"),
                         *n = mesh_answer_get(&out, "n");
        CHECK(x && x->kind == MESH_VALUE_TENSOR && x->dtype == (mesh_dtype)d && x->ndim == 2 &&
              x->shape[0] == 2 && x->shape[1] == 3 && x->nbytes == in[0].nbytes &&
              memcmp(x->data, data, x->nbytes) == 0, "%s: not the same tensor", mesh_dtype_name(d));
        CHECK(s && s->kind == MESH_VALUE_STRING && !strcmp(s->str, "text"), "string");
        CHECK(n && n->kind == MESH_VALUE_INT && n->i == -42, "int");
        mesh_answer_free(&out);
    }
}

static void errors_are_typed_and_deadlines_hold(mesh_client *c) {
    mesh_answer out;
    mesh_error err;
    mesh_value in = mesh_string_value("prompt", "hi");
    CHECK(mesh_infer(c, "nope", &in, 1, NULL, 0, 5000, &out, &err) == -1 &&
          !strcmp(err.code, "unknown_model") && !err.retryable && strstr(err.message, "serving"),
          "unknown model: [%s] %s", err.code, err.message);
    mesh_value bad = mesh_int_value("prompt", 5);
    CHECK(mesh_infer(c, "tinygpt", &bad, 1, NULL, 0, 5000, &out, &err) == -1 &&
          !strcmp(err.code, "bad_request"), "bad prompt: [%s]", err.code);
    mesh_value many = mesh_int_value("max_tokens", 256);
    CHECK(mesh_infer(c, "tinygpt", &in, 1, &many, 1, 50, &out, &err) == -1 &&
          !strcmp(err.code, "deadline_exceeded") && err.retryable, "deadline: [%s]", err.code);
}

static void a_stream_is_the_infer_chunk_by_chunk_and_cancels(mesh_client *c) {
    mesh_value in = mesh_string_value("prompt", "hello");
    mesh_value p = mesh_int_value("max_tokens", 24);
    mesh_stream s;
    mesh_error err;
    char text[64] = "";
    CHECK(mesh_stream_start(c, "tinygpt", &in, 1, &p, 1, 30000, &s, &err) == 0, "start");
    mesh_answer chunk;
    int rc, chunks = 0;
    while ((rc = mesh_stream_next(c, &s, &chunk, &err)) == 0) {
        const mesh_value *t = mesh_answer_get(&chunk, "text");
        if (t && t->kind == MESH_VALUE_STRING && strlen(text) + strlen(t->str) < sizeof text)
            strcat(text, t->str);
        chunks++;
        mesh_answer_free(&chunk);
    }
    CHECK(rc == 1 && chunks == 24, "stream ended with %d after %d chunks", rc, chunks);
    mesh_answer whole;
    CHECK(mesh_infer(c, "tinygpt", &in, 1, &p, 1, 30000, &whole, &err) == 0, "infer");
    const mesh_value *t = mesh_answer_get(&whole, "text");
    CHECK(t && !strcmp(t->str, text), "stream %s != infer %s", text, t ? t->str : "?");
    mesh_answer_free(&whole);
    mesh_value longer = mesh_int_value("max_tokens", 200);
    CHECK(mesh_stream_start(c, "tinygpt", &in, 1, &longer, 1, 30000, &s, &err) == 0, "start 2");
    for (int i = 0; i < 3 && mesh_stream_next(c, &s, &chunk, &err) == 0; i++) mesh_answer_free(&chunk);
    mesh_stream_cancel(c, &s);
    mesh_value n = mesh_int_value("n", 1);
    mesh_answer out;
    CHECK(mesh_infer(c, "echo", &n, 1, NULL, 0, 5000, &out, &err) == 0, "after a cancel");
    mesh_answer_free(&out);
}

static void a_tensor_among_the_params_travels_with_the_request(mesh_client *c) {
    float x[4] = {1, 2, 3, 4};
    int32_t bias[2] = {1, -1};
    int64_t xs[2] = {1, 4}, bs[1] = {2};
    mesh_value in = mesh_tensor_value("x", MESH_FLOAT32, xs, 2, x);
    mesh_value p[2] = {mesh_int_value("max_tokens", 4),
                       mesh_tensor_value("bias", MESH_INT32, bs, 1, bias)};
    mesh_answer out;
    mesh_error err;
    int rc = mesh_infer(c, "echo", &in, 1, p, 2, 5000, &out, &err);  /* echo ignores params */
    CHECK(rc == 0, "a tensor param: [%s] %s", err.code, err.message);
    if (rc) return;
    const mesh_value *back = mesh_answer_get(&out, "x");
    CHECK(back && back->nbytes == sizeof x && !memcmp(back->data, x, sizeof x),
          "x after a tensor param");
    mesh_answer_free(&out);
}

/* -- the conformance vectors through the client's own builder and decoder ------------------
 * tests/test_c_client.py writes one line per vector, tokens separated by spaces; byte
 * strings are "x" and their hex (so an empty one is "x"); a value is NAME t DTYPE NDIM DIMS...
 * DATA, NAME s TEXT or NAME i INTEGER:
 *   encode NAME KIND ID MODEL|- TIMEOUT_MS|- NINPUTS VALUE... NPARAMS VALUE... NFRAMES FRAME...
 *   reply NAME NFRAMES FRAME... KIND (n -|i ID|s ID) CODE|- RETRYABLE|- RETRY_AFTER_MS|-
 *         NOUTPUTS|- VALUE...
 * It prints "vectors: E encoded, D decoded; not built: NAME..." for the test to check. */

typedef struct { char *line, *save; int bad; } tokens;

static const char *tok(tokens *t) {
    char *s = strtok_r(t->line, " \n", &t->save);
    t->line = NULL;
    if (!s) t->bad = 1;
    return s ? s : "";
}

/* A byte string token ("x" + hex), malloc'd (never NULL) with its length in *n. */
static unsigned char *bytes_of(tokens *t, size_t *n) {
    const char *s = tok(t);
    if (s[0] != 'x') t->bad = 1;
    size_t len = s[0] ? strlen(s + 1) / 2 : 0;
    unsigned char *b = malloc(len + 1);
    for (size_t i = 0; i < len; i++) sscanf(s + 1 + 2 * i, "%2hhx", &b[i]);
    b[len] = 0;  /* a string reads as one */
    *n = len;
    return b;
}

/* One VALUE, built with the constructors a caller uses; its memory is freed by free_value. */
static mesh_value value_of(tokens *t) {
    char *name = strdup(tok(t));
    const char *type = tok(t);
    size_t n;
    if (!strcmp(type, "s")) return mesh_string_value(name, (char *)bytes_of(t, &n));
    if (!strcmp(type, "i")) return mesh_int_value(name, strtoll(tok(t), NULL, 10));
    const char *dtype = tok(t);
    int d = 0;
    while (d < MESH_DTYPE_COUNT && strcmp(mesh_dtype_name(d), dtype)) d++;
    CHECK(d < MESH_DTYPE_COUNT, "unknown dtype %s", dtype);
    int ndim = atoi(tok(t));
    int64_t shape[MESH_MAX_DIMS];
    for (int i = 0; i < ndim && i < MESH_MAX_DIMS; i++) shape[i] = strtoll(tok(t), NULL, 10);
    return mesh_tensor_value(name, (mesh_dtype)d, shape, ndim, bytes_of(t, &n));
}

static void free_value(mesh_value *v) { free(v->name); free(v->data); free(v->str); }

static void values_of(tokens *t, mesh_value *vs, size_t *n, size_t cap) {
    *n = (size_t)atoi(tok(t));
    CHECK(*n <= cap, "%zu values", *n);
    for (size_t i = 0; i < *n && i < cap; i++) vs[i] = value_of(t);
}

#define MAX_VALUES 16
#define MAX_VECTOR_FRAMES 8

/* An encode line: the frames the client builds for the request are the vector's. 1 when
 * the client builds such a request, else 0 (its kind is not one the client sends). */
static int encodes_as_recorded(tokens *t, char *name, size_t name_cap) {
    char kind[32];
    snprintf(name, name_cap, "%s", tok(t));
    snprintf(kind, sizeof kind, "%s", tok(t));
    uint64_t id = strtoull(tok(t), NULL, 10);
    char *model = strdup(tok(t));
    int timeout_ms = atoi(tok(t));
    mesh_value inputs[MAX_VALUES], params[MAX_VALUES];
    size_t n_inputs, n_params;
    values_of(t, inputs, &n_inputs, MAX_VALUES);
    values_of(t, params, &n_params, MAX_VALUES);
    size_t n_frames = (size_t)atoi(tok(t)), sizes[MAX_VECTOR_FRAMES];
    unsigned char *want[MAX_VECTOR_FRAMES];
    CHECK(n_frames <= MAX_VECTOR_FRAMES, "%s: %zu frames", name, n_frames);
    for (size_t i = 0; i < n_frames && i < MAX_VECTOR_FRAMES; i++)
        want[i] = bytes_of(t, &sizes[i]);
    CHECK(!t->bad, "%s: a malformed line", name);
    mesh_message m = {NULL, 0};
    int built = 1, rc = 0;
    if (!strcmp(kind, "infer") || !strcmp(kind, "stream"))
        rc = mesh_encode_request(kind, id, model, inputs, n_inputs, params, n_params,
                                 timeout_ms, &m);
    else if (!strcmp(kind, "ping") || !strcmp(kind, "cancel"))
        rc = mesh_encode_control(kind, id, &m);
    else
        built = 0;
    if (built) {
        CHECK(rc == 0, "%s: not encoded", name);
        CHECK(m.count == n_frames, "%s: %zu frames, not %zu", name, m.count, n_frames);
        for (size_t i = 0; i < m.count && i < n_frames; i++) {
            int same = m.frames[i].size == sizes[i] &&
                       !memcmp(m.frames[i].data, want[i], sizes[i]);
            CHECK(same, "%s: frame %zu differs", name, i);
            if (!same) {
                fprintf(stderr, "  built: ");
                for (size_t b = 0; b < m.frames[i].size; b++)
                    fprintf(stderr, "%02x", ((const unsigned char *)m.frames[i].data)[b]);
                fprintf(stderr, "\n");
            }
        }
        mesh_message_free(&m);
    }
    for (size_t i = 0; i < n_frames && i < MAX_VECTOR_FRAMES; i++) free(want[i]);
    for (size_t i = 0; i < n_inputs && i < MAX_VALUES; i++) free_value(&inputs[i]);
    for (size_t i = 0; i < n_params && i < MAX_VALUES; i++) free_value(&params[i]);
    free(model);
    return built;
}

/* A reply line: mesh_decode_reply gives the recorded fields, outputs included. */
static void decodes_as_recorded(tokens *t) {
    char name[64];
    snprintf(name, sizeof name, "%s", tok(t));
    size_t n_frames = (size_t)atoi(tok(t));
    mesh_frame frames[MAX_VECTOR_FRAMES];
    unsigned char *bufs[MAX_VECTOR_FRAMES];
    CHECK(n_frames <= MAX_VECTOR_FRAMES, "%s: %zu frames", name, n_frames);
    for (size_t i = 0; i < n_frames && i < MAX_VECTOR_FRAMES; i++) {
        bufs[i] = bytes_of(t, &frames[i].size);
        frames[i].data = bufs[i];
    }
    mesh_reply r;
    mesh_error err;
    int rc = mesh_decode_reply(frames, n_frames, &r, &err);
    CHECK(rc == 0, "%s: not decoded: %s", name, err.message);
    const char *kind = tok(t), *id_kind = tok(t);
    size_t n;
    if (!strcmp(id_kind, "n")) {
        tok(t);
        CHECK(rc || r.id_kind == MESH_ID_NIL, "%s: the id is not nil", name);
    } else if (!strcmp(id_kind, "i")) {
        uint64_t id = strtoull(tok(t), NULL, 10);
        CHECK(rc || (r.id_kind == MESH_ID_INT && r.id == id), "%s: the id is not %llu", name,
              (unsigned long long)id);
    } else {
        char *id = (char *)bytes_of(t, &n);
        CHECK(rc || (r.id_kind == MESH_ID_STRING && !strcmp(r.id_str, id)),
              "%s: the id is not %s", name, id);
        free(id);
    }
    const char *code = tok(t), *retryable = tok(t), *after = tok(t), *outputs = tok(t);
    if (!rc) {
        CHECK(!strcmp(r.kind, kind), "%s: kind %s, not %s", name, r.kind, kind);
        if (strcmp(code, "-"))
            CHECK(!strcmp(r.error.code, code), "%s: code %s, not %s", name, r.error.code, code);
        if (strcmp(retryable, "-"))
            CHECK(r.error.retryable == atoi(retryable), "%s: retryable %d", name,
                  r.error.retryable);
        CHECK(r.error.retry_after_ms == (strcmp(after, "-") ? atoi(after) : 0),
              "%s: retry_after_ms %d", name, r.error.retry_after_ms);
    }
    size_t n_outputs = strcmp(outputs, "-") ? (size_t)atoi(outputs) : 0;
    CHECK(rc || r.outputs.count == n_outputs, "%s: %zu outputs, not %zu", name, r.outputs.count,
          n_outputs);
    for (size_t i = 0; i < n_outputs && i < MAX_VALUES; i++) {
        mesh_value want = value_of(t);
        const mesh_value *got = rc ? NULL : mesh_answer_get(&r.outputs, want.name);
        CHECK(rc || (got && got->kind == want.kind), "%s: output %s missing or of another kind",
              name, want.name);
        if (got && got->kind == want.kind && want.kind == MESH_VALUE_STRING)
            CHECK(!strcmp(got->str, want.str), "%s: %s is %s", name, want.name, got->str);
        if (got && got->kind == want.kind && want.kind == MESH_VALUE_INT)
            CHECK(got->i == want.i, "%s: %s is %lld", name, want.name, (long long)got->i);
        if (got && got->kind == want.kind && want.kind == MESH_VALUE_TENSOR)
            CHECK(got->dtype == want.dtype && got->ndim == want.ndim &&
                  got->nbytes == want.nbytes &&
                  !memcmp(got->shape, want.shape, sizeof(int64_t) * (size_t)want.ndim) &&
                  !memcmp(got->data, want.data, want.nbytes),
                  "%s: tensor %s is not %s with its shape and data", name, want.name,
                  mesh_dtype_name(want.dtype));
        free_value(&want);
    }
    CHECK(!t->bad, "%s: a malformed line", name);
    if (!rc) mesh_reply_free(&r);
    for (size_t i = 0; i < n_frames && i < MAX_VECTOR_FRAMES; i++) free(bufs[i]);
}

static void a_tensor_whose_frame_is_not_its_shape_is_refused(void) {
    /* {"v": 1, "kind": "result", "id": 1, "outputs": {"y": {"$tensor": ["float32", [2], 1]}}} */
    static const unsigned char head[] = {
        0x84, 0xa1, 'v', 0x01, 0xa4, 'k', 'i', 'n', 'd', 0xa6, 'r', 'e', 's', 'u', 'l', 't',
        0xa2, 'i', 'd', 0x01, 0xa7, 'o', 'u', 't', 'p', 'u', 't', 's', 0x81, 0xa1, 'y', 0x81,
        0xa7, '$', 't', 'e', 'n', 's', 'o', 'r', 0x93, 0xa7, 'f', 'l', 'o', 'a', 't', '3', '2',
        0x91, 0x02, 0x01};
    float data[2] = {1, 2};
    mesh_reply r;
    mesh_error err;
    mesh_frame whole[2] = {{head, sizeof head}, {data, sizeof data}};
    CHECK(mesh_decode_reply(whole, 2, &r, &err) == 0 && r.outputs.count == 1 &&
          r.outputs.values[0].nbytes == sizeof data, "a well-formed result: %s", err.message);
    mesh_reply_free(&r);
    mesh_frame short_frame[2] = {{head, sizeof head}, {data, sizeof data - 1}};
    CHECK(mesh_decode_reply(short_frame, 2, &r, &err) == -1 && !strcmp(err.code, "client"),
          "a frame shorter than its shape was accepted");
    CHECK(mesh_decode_reply(whole, 1, &r, &err) == -1,
          "a reference to a missing frame was accepted");
    mesh_frame garbage = {"\xc1", 1};
    CHECK(mesh_decode_reply(&garbage, 1, &r, &err) == -1, "frame 0 not msgpack was accepted");
}

static void the_vectors_hold(const char *path) {
    FILE *f = fopen(path, "r");
    CHECK(f != NULL, "no vectors file %s", path);
    if (!f) return;
    char *line = NULL;
    size_t cap = 0;
    int encoded = 0, decoded = 0;
    char unbuilt[512] = "";
    while (getline(&line, &cap, f) > 0) {
        tokens t = {line, NULL, 0};
        const char *what = tok(&t);
        if (!strcmp(what, "encode")) {
            char name[64];
            if (encodes_as_recorded(&t, name, sizeof name)) encoded++;
            else if (strlen(unbuilt) + strlen(name) + 2 < sizeof unbuilt) {
                strcat(unbuilt, " ");
                strcat(unbuilt, name);
            }
        } else if (!strcmp(what, "reply")) {
            decodes_as_recorded(&t);
            decoded++;
        } else {
            CHECK(0, "a line that is neither encode nor reply: %s", what);
        }
    }
    free(line);
    fclose(f);
    printf("vectors: %d encoded, %d decoded; not built:%s\n", encoded, decoded, unbuilt);
}

int main(void) {
    const char *endpoint = getenv("MESH_ENDPOINT"), *vectors = getenv("MESH_VECTORS");
    if (!endpoint && !vectors) {
        fprintf(stderr, "set MESH_ENDPOINT (a live controller), MESH_VECTORS (a file), or both\n");
        return 2;
    }
    if (vectors) {
        the_vectors_hold(vectors);
        a_tensor_whose_frame_is_not_its_shape_is_refused();
    }
    if (endpoint) {
        mesh_client *c = mesh_connect(endpoint, NULL);
        CHECK(c != NULL, "connect");
        if (!c) return 1;
        every_dtype_comes_back_bit_for_bit(c);
        a_tensor_among_the_params_travels_with_the_request(c);
        errors_are_typed_and_deadlines_hold(c);
        a_stream_is_the_infer_chunk_by_chunk_and_cancels(c);
        mesh_close(c);
    }
    printf("%s: %d failure(s)\n", failures ? "FAILED" : "ok", failures);
    return failures ? 1 : 0;
}
