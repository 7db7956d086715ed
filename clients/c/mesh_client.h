/* meshserve C client: the wire protocol of docs/protocol.md on libzmq and msgpack-c.
 *
 *   mesh_client *c = mesh_connect("tcp://127.0.0.1:5555", NULL);
 *   mesh_value in = mesh_tensor_value("x", MESH_FLOAT32, shape, 2, data);
 *   mesh_answer out; mesh_error err;
 *   if (mesh_infer(c, "mlp", &in, 1, NULL, 5000, &out, &err) == 0) { ... mesh_answer_free(&out); }
 *   mesh_close(c);
 *
 * Not thread-safe: one client per thread. Every call has a deadline, and a lost or restarted
 * controller fails it sooner (mesh_set_liveness). */
#ifndef MESH_CLIENT_H
#define MESH_CLIENT_H

#include <stddef.h>
#include <stdint.h>

typedef enum {
    MESH_FLOAT32, MESH_FLOAT64, MESH_FLOAT16, MESH_BFLOAT16, MESH_INT64, MESH_INT32,
    MESH_INT16, MESH_INT8, MESH_UINT8, MESH_BOOL, MESH_DTYPE_COUNT
} mesh_dtype;

const char *mesh_dtype_name(mesh_dtype d);
size_t mesh_dtype_size(mesh_dtype d);

typedef enum { MESH_VALUE_TENSOR, MESH_VALUE_STRING, MESH_VALUE_INT } mesh_kind;

#define MESH_MAX_DIMS 32
typedef struct {
    char *name;
    mesh_kind kind;
    /* MESH_VALUE_TENSOR: little-endian raw data, prod(shape) * mesh_dtype_size(dtype) bytes */
    mesh_dtype dtype;
    int ndim;
    int64_t shape[MESH_MAX_DIMS];
    void *data;
    size_t nbytes;
    /* MESH_VALUE_STRING / MESH_VALUE_INT */
    char *str;
    int64_t i;
} mesh_value;

/* Values for requests; they point at the caller's memory (nothing is copied or freed). */
mesh_value mesh_tensor_value(const char *name, mesh_dtype dtype, const int64_t *shape, int ndim,
                             const void *data);
mesh_value mesh_string_value(const char *name, const char *s);
mesh_value mesh_int_value(const char *name, int64_t i);

typedef struct {
    char code[32];        /* the wire code: "bad_request", "unknown_model", ...; or "client" */
    char message[512];
    int retryable;
    int retry_after_ms;
} mesh_error;

typedef struct {
    mesh_value *values;   /* owned: free with mesh_answer_free */
    size_t count;
} mesh_answer;

void mesh_answer_free(mesh_answer *a);
const mesh_value *mesh_answer_get(const mesh_answer *a, const char *name);

typedef struct {
    const char *server_key;  /* Z85 (40 chars): the controller's public key */
    const char *public_key;  /* Z85: this client's pair */
    const char *secret_key;
} mesh_curve;

typedef struct mesh_client mesh_client;

mesh_client *mesh_connect(const char *endpoint, const mesh_curve *curve);
void mesh_close(mesh_client *c);

/* A lost controller is noticed before a call's deadline (protocol section 3.7): while a call
 * waits, the client pings every heartbeat_ms (default 500; 0: never); nothing at all heard
 * for controller_timeout_ms (default 5000) fails the call with code "controller_lost"
 * (retryable) and reconnects on a new socket; so does a pong from a restarted controller (a
 * new incarnation) for a call sent before that ping. 0, or -1 for values out of range
 * (controller_timeout_ms must be at least twice heartbeat_ms). */
int mesh_set_liveness(mesh_client *c, int heartbeat_ms, int controller_timeout_ms);

/* 0 and *out filled, or -1 and *err filled. params may be NULL. */
int mesh_infer(mesh_client *c, const char *model, const mesh_value *inputs, size_t n_inputs,
               const mesh_value *params, size_t n_params, int timeout_ms, mesh_answer *out,
               mesh_error *err);

/* Streams: start, then next until it returns 1 (the end) or -1 (an error); 0 gives a chunk
 * in *chunk (free it). mesh_stream_cancel abandons it (the server stops decoding). */
typedef struct { uint64_t id; int deadline_ms; int64_t started_ms; int done; } mesh_stream;
int mesh_stream_start(mesh_client *c, const char *model, const mesh_value *inputs,
                      size_t n_inputs, const mesh_value *params, size_t n_params,
                      int timeout_ms, mesh_stream *s, mesh_error *err);
int mesh_stream_next(mesh_client *c, mesh_stream *s, mesh_answer *chunk, mesh_error *err);
void mesh_stream_cancel(mesh_client *c, mesh_stream *s);

#endif
