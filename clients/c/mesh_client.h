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

/* -- the wire without a socket --------------------------------------------------------------
 * The code the calls above send and read with, callable alone: a program can check the
 * client against the conformance vectors (docs/protocol-vectors) offline, as test_client.c
 * does, or speak the protocol over a transport of its own. */

/* One frame: bytes and their length. */
typedef struct { const void *data; size_t size; } mesh_frame;

/* A message as the client sends it: frames[0] is the msgpack header (owned by the message),
 * then one frame per tensor in the order the header references them, the inputs' first and
 * then the params' (protocol section 4); those point at the mesh_values' data, which must
 * outlive the message. Free it with mesh_message_free. */
typedef struct { mesh_frame *frames; size_t count; } mesh_message;

/* The message mesh_infer (kind "infer") or mesh_stream_start ("stream") sends as request id:
 * 0, or -1 when out of memory. params may be NULL. */
int mesh_encode_request(const char *kind, uint64_t id, const char *model,
                        const mesh_value *inputs, size_t n_inputs, const mesh_value *params,
                        size_t n_params, int timeout_ms, mesh_message *out);
/* A header-only message {v, kind, id}: the client's "ping" and "cancel". 0, or -1. */
int mesh_encode_control(const char *kind, uint64_t id, mesh_message *out);
void mesh_message_free(mesh_message *m);

/* An answer's id as sent: nil (or absent), a non-negative integer (the client's own ids), a
 * string, or anything else (a negative integer, a float, ...). */
typedef enum { MESH_ID_NIL, MESH_ID_INT, MESH_ID_STRING, MESH_ID_OTHER } mesh_id_kind;

/* One answer (protocol section 3.4) as the client reads it. */
typedef struct {
    char kind[32];          /* "result", "chunk", "end", "error", "pong", ... as sent (at most
                             * 31 characters kept); "" when the header has none */
    mesh_id_kind id_kind;
    uint64_t id;            /* MESH_ID_INT */
    char *id_str;           /* MESH_ID_STRING (owned) */
    mesh_error error;       /* kind "error": its code ("internal" if none), message,
                             * retryable, retry_after_ms; else all zero */
    mesh_answer outputs;    /* kind "result" or "chunk": the named outputs (owned) */
} mesh_reply;

/* Decodes an answer from its frames exactly as mesh_infer and mesh_stream_next read theirs:
 * header keys the client does not know are ignored. 0 and *out filled (free it with
 * mesh_reply_free), or -1 and *err filled: frame 0 is not a msgpack map, or a tensor
 * reference cannot be read (an unknown dtype, no such frame, a frame whose size is not its
 * shape's). On -1 *out needs no freeing. */
int mesh_decode_reply(const mesh_frame *frames, size_t n_frames, mesh_reply *out,
                      mesh_error *err);
void mesh_reply_free(mesh_reply *r);

#endif
