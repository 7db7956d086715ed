/* Tests of the C client against a live controller (MESH_ENDPOINT; deployments echo and
 * tinygpt), and of its decoding against the conformance vectors (MESH_VECTORS: lines
 * "KIND CODE HEX" made from docs/protocol-vectors/vectors.json). tests/test_c_client.py
 * starts the controller and writes the file. Exit 0 when every check holds. */
#include "mesh_client.h"

#include <msgpack.h>
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

static int unhex(const char *h, unsigned char *out, size_t cap) {
    size_t n = strlen(h) / 2;
    if (n > cap) return -1;
    for (size_t i = 0; i < n; i++) sscanf(h + 2 * i, "%2hhx", &out[i]);
    return (int)n;
}

static void the_vectors_decode_as_recorded(const char *path) {
    FILE *f = fopen(path, "r");
    CHECK(f != NULL, "no vectors file %s", path);
    if (!f) return;
    char kind[32], code[32], retry[8], hex[20000];
    unsigned char buf[10000];
    int checked = 0;
    while (fscanf(f, "%31s %31s %7s %19999s", kind, code, retry, hex) == 4) {
        int n = unhex(hex, buf, sizeof buf);
        msgpack_unpacked up;
        msgpack_unpacked_init(&up);
        CHECK(n > 0 && msgpack_unpack_next(&up, (const char *)buf, (size_t)n, NULL) ==
              MSGPACK_UNPACK_SUCCESS && up.data.type == MSGPACK_OBJECT_MAP, "undecodable %s", hex);
        const char *want[2] = {kind, code};
        const char *keys[2] = {"kind", "code"};
        for (int k = 0; k < 2; k++) {
            if (!strcmp(want[k], "-")) continue;
            int found = 0;
            for (uint32_t i = 0; i < up.data.via.map.size; i++) {
                msgpack_object key = up.data.via.map.ptr[i].key, val = up.data.via.map.ptr[i].val;
                if (key.type == MSGPACK_OBJECT_STR && key.via.str.size == strlen(keys[k]) &&
                    !memcmp(key.via.str.ptr, keys[k], key.via.str.size) &&
                    val.type == MSGPACK_OBJECT_STR && val.via.str.size == strlen(want[k]) &&
                    !memcmp(val.via.str.ptr, want[k], val.via.str.size)) found = 1;
            }
            CHECK(found, "%s is not %s in %s", keys[k], want[k], hex);
        }
        if (strcmp(retry, "-") != 0) {
            int is = -1;
            for (uint32_t i = 0; i < up.data.via.map.size; i++) {
                msgpack_object key = up.data.via.map.ptr[i].key, val = up.data.via.map.ptr[i].val;
                if (key.type == MSGPACK_OBJECT_STR && key.via.str.size == 9 &&
                    !memcmp(key.via.str.ptr, "retryable", 9) && val.type == MSGPACK_OBJECT_BOOLEAN)
                    is = val.via.boolean;
            }
            CHECK(is == atoi(retry), "retryable is %d, not %s, in %s", is, retry, hex);
        }
        msgpack_unpacked_destroy(&up);
        checked++;
    }
    fclose(f);
    CHECK(checked >= 20, "only %d vectors", checked);
}

int main(void) {
    const char *endpoint = getenv("MESH_ENDPOINT"), *vectors = getenv("MESH_VECTORS");
    if (!endpoint) { fprintf(stderr, "MESH_ENDPOINT is not set\n"); return 2; }
    mesh_client *c = mesh_connect(endpoint, NULL);
    CHECK(c != NULL, "connect");
    if (!c) return 1;
    every_dtype_comes_back_bit_for_bit(c);
    a_tensor_among_the_params_travels_with_the_request(c);
    errors_are_typed_and_deadlines_hold(c);
    a_stream_is_the_infer_chunk_by_chunk_and_cancels(c);
    mesh_close(c);
    if (vectors) the_vectors_decode_as_recorded(vectors);
    printf("%s: %d failure(s)\n", failures ? "FAILED" : "ok", failures);
    return failures ? 1 : 0;
}
