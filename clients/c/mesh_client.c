/* meshserve C client (mesh_client.h). */
#include "mesh_client.h"

#include <msgpack.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

#define PROTOCOL_VERSION 1
#define GRACE_MS 2000
#define MAX_FRAMES 64

static const char *DTYPE_NAMES[MESH_DTYPE_COUNT] = {
    "float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
    "bool"};
static const size_t DTYPE_SIZES[MESH_DTYPE_COUNT] = {4, 8, 2, 2, 8, 4, 2, 1, 1, 1};

const char *mesh_dtype_name(mesh_dtype d) { return d < MESH_DTYPE_COUNT ? DTYPE_NAMES[d] : "?"; }
size_t mesh_dtype_size(mesh_dtype d) { return d < MESH_DTYPE_COUNT ? DTYPE_SIZES[d] : 0; }

static int dtype_of(const char *s, size_t n) {
    for (int d = 0; d < MESH_DTYPE_COUNT; d++)
        if (strlen(DTYPE_NAMES[d]) == n && memcmp(DTYPE_NAMES[d], s, n) == 0) return d;
    return -1;
}

struct mesh_client {
    void *ctx;
    void *sock;
    uint64_t next_id;
    /* How to open the socket again (after a lost controller): the endpoint and CURVE keys. */
    char *endpoint;
    int curve;
    char server_key[41], public_key[41], secret_key[41];
    /* Liveness (protocol section 3.7): pings while a call waits, silence, incarnations. */
    int heartbeat_ms;           /* 0: never ping */
    int controller_timeout_ms;
    int64_t heard_ms;           /* the last message of any kind, or the call's start */
    int64_t pinged_ms;
    char incarnation[80];       /* from the last pong; "" before the first */
};

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void set_error(mesh_error *err, const char *code, const char *message, int retryable) {
    if (!err) return;
    snprintf(err->code, sizeof err->code, "%s", code);
    snprintf(err->message, sizeof err->message, "%s", message);
    err->retryable = retryable;
    err->retry_after_ms = 0;
}

mesh_value mesh_tensor_value(const char *name, mesh_dtype dtype, const int64_t *shape, int ndim,
                             const void *data) {
    mesh_value v;
    memset(&v, 0, sizeof v);
    v.name = (char *)name;
    v.kind = MESH_VALUE_TENSOR;
    v.dtype = dtype;
    v.ndim = ndim < MESH_MAX_DIMS ? ndim : MESH_MAX_DIMS;
    size_t count = 1;
    for (int i = 0; i < v.ndim; i++) { v.shape[i] = shape[i]; count *= (size_t)shape[i]; }
    v.data = (void *)data;
    v.nbytes = count * mesh_dtype_size(dtype);
    return v;
}

mesh_value mesh_string_value(const char *name, const char *s) {
    mesh_value v;
    memset(&v, 0, sizeof v);
    v.name = (char *)name;
    v.kind = MESH_VALUE_STRING;
    v.str = (char *)s;
    return v;
}

mesh_value mesh_int_value(const char *name, int64_t i) {
    mesh_value v;
    memset(&v, 0, sizeof v);
    v.name = (char *)name;
    v.kind = MESH_VALUE_INT;
    v.i = i;
    return v;
}

static int open_socket(mesh_client *c) {
    c->sock = zmq_socket(c->ctx, ZMQ_DEALER);
    if (!c->sock) return -1;
    int linger = 0;
    zmq_setsockopt(c->sock, ZMQ_LINGER, &linger, sizeof linger);
    if (c->curve) {
        zmq_setsockopt(c->sock, ZMQ_CURVE_SERVERKEY, c->server_key, 40);
        zmq_setsockopt(c->sock, ZMQ_CURVE_PUBLICKEY, c->public_key, 40);
        zmq_setsockopt(c->sock, ZMQ_CURVE_SECRETKEY, c->secret_key, 40);
    }
    return zmq_connect(c->sock, c->endpoint);
}

mesh_client *mesh_connect(const char *endpoint, const mesh_curve *curve) {
    mesh_client *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->ctx = zmq_ctx_new();
    c->endpoint = strdup(endpoint);
    if (curve) {
        c->curve = 1;
        snprintf(c->server_key, sizeof c->server_key, "%s", curve->server_key);
        snprintf(c->public_key, sizeof c->public_key, "%s", curve->public_key);
        snprintf(c->secret_key, sizeof c->secret_key, "%s", curve->secret_key);
    }
    c->heartbeat_ms = 500;
    c->controller_timeout_ms = 5000;
    if (!c->ctx || !c->endpoint || open_socket(c) != 0) { mesh_close(c); return NULL; }
    c->next_id = 1;
    return c;
}

int mesh_set_liveness(mesh_client *c, int heartbeat_ms, int controller_timeout_ms) {
    if (heartbeat_ms < 0 || controller_timeout_ms <= 0 ||
            (heartbeat_ms && controller_timeout_ms < 2 * heartbeat_ms))
        return -1;
    c->heartbeat_ms = heartbeat_ms;
    c->controller_timeout_ms = controller_timeout_ms;
    return 0;
}

void mesh_close(mesh_client *c) {
    if (!c) return;
    if (c->sock) zmq_close(c->sock);
    if (c->ctx) zmq_ctx_term(c->ctx);
    free(c->endpoint);
    free(c);
}

/* The controller is lost: a new socket, so nothing queued for it is delivered later. */
static void reconnect(mesh_client *c) {
    zmq_close(c->sock);
    c->sock = NULL;
    open_socket(c);
}

/* -- encoding -------------------------------------------------------------------------------- */

/* An sbuffer that remembers a failed write, so a message is never sent truncated. */
typedef struct { msgpack_sbuffer sb; int failed; } out_buf;

static int out_write(void *data, const char *buf, size_t len) {
    out_buf *o = data;
    if (!o->failed && msgpack_sbuffer_write(&o->sb, buf, len) != 0) o->failed = 1;
    return o->failed ? -1 : 0;
}

static void pack_str(msgpack_packer *pk, const char *s) {
    size_t n = strlen(s);
    msgpack_pack_str(pk, n);
    msgpack_pack_str_body(pk, s, n);
}

/* Packs a map of values; tensors get a reference to frame *next (then incremented). */
static void pack_values(msgpack_packer *pk, const mesh_value *vs, size_t n, int *next) {
    msgpack_pack_map(pk, n);
    for (size_t i = 0; i < n; i++) {
        pack_str(pk, vs[i].name);
        if (vs[i].kind == MESH_VALUE_TENSOR) {
            msgpack_pack_map(pk, 1);
            pack_str(pk, "$tensor");
            msgpack_pack_array(pk, 3);
            pack_str(pk, mesh_dtype_name(vs[i].dtype));
            msgpack_pack_array(pk, vs[i].ndim);
            for (int d = 0; d < vs[i].ndim; d++) msgpack_pack_int64(pk, vs[i].shape[d]);
            msgpack_pack_int(pk, (*next)++);
        } else if (vs[i].kind == MESH_VALUE_STRING) {
            pack_str(pk, vs[i].str);
        } else {
            msgpack_pack_int64(pk, vs[i].i);
        }
    }
}

static size_t count_tensors(const mesh_value *vs, size_t n) {
    size_t count = 0;
    for (size_t i = 0; i < n; i++) count += vs[i].kind == MESH_VALUE_TENSOR;
    return count;
}

/* The tensors' data as frames, after those already in m, in the order pack_values numbered
 * them. */
static void add_tensor_frames(mesh_message *m, const mesh_value *vs, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (vs[i].kind == MESH_VALUE_TENSOR)
            m->frames[m->count++] = (mesh_frame){vs[i].data, vs[i].nbytes};
}

/* Room for the header and `tensors` frames, and a packer writing the header into *o. */
static int message_start(mesh_message *m, size_t tensors, out_buf *o, msgpack_packer *pk) {
    m->count = 0;
    m->frames = calloc(1 + tensors, sizeof *m->frames);
    if (!m->frames) return -1;
    msgpack_sbuffer_init(&o->sb);
    o->failed = 0;
    msgpack_packer_init(pk, o, out_write);
    m->count = 1;
    return 0;
}

/* The packed header becomes frame 0: 0, or -1 (and nothing to free) when a write failed. */
static int message_end(mesh_message *m, out_buf *o) {
    if (o->failed) {
        msgpack_sbuffer_destroy(&o->sb);
        free(m->frames);
        memset(m, 0, sizeof *m);
        return -1;
    }
    m->frames[0].size = o->sb.size;
    m->frames[0].data = msgpack_sbuffer_release(&o->sb);
    return 0;
}

int mesh_encode_request(const char *kind, uint64_t id, const char *model,
                        const mesh_value *inputs, size_t n_inputs, const mesh_value *params,
                        size_t n_params, int timeout_ms, mesh_message *out) {
    if (!params) n_params = 0;
    out_buf o;
    msgpack_packer pk;
    if (message_start(out, count_tensors(inputs, n_inputs) + count_tensors(params, n_params),
                      &o, &pk) < 0)
        return -1;
    msgpack_pack_map(&pk, 6 + (n_params ? 1 : 0));
    pack_str(&pk, "v"); msgpack_pack_int(&pk, PROTOCOL_VERSION);
    pack_str(&pk, "kind"); pack_str(&pk, kind);
    pack_str(&pk, "id"); msgpack_pack_uint64(&pk, id);
    pack_str(&pk, "model"); pack_str(&pk, model);
    int next = 1;
    pack_str(&pk, "inputs"); pack_values(&pk, inputs, n_inputs, &next);
    pack_str(&pk, "timeout_ms"); msgpack_pack_int(&pk, timeout_ms);
    if (n_params) { pack_str(&pk, "params"); pack_values(&pk, params, n_params, &next); }
    add_tensor_frames(out, inputs, n_inputs);
    add_tensor_frames(out, params, n_params);
    return message_end(out, &o);
}

int mesh_encode_control(const char *kind, uint64_t id, mesh_message *out) {
    out_buf o;
    msgpack_packer pk;
    if (message_start(out, 0, &o, &pk) < 0) return -1;
    msgpack_pack_map(&pk, 3);
    pack_str(&pk, "v"); msgpack_pack_int(&pk, PROTOCOL_VERSION);
    pack_str(&pk, "kind"); pack_str(&pk, kind);
    pack_str(&pk, "id"); msgpack_pack_uint64(&pk, id);
    return message_end(out, &o);
}

void mesh_message_free(mesh_message *m) {
    if (m->count) free((void *)m->frames[0].data);
    free(m->frames);
    memset(m, 0, sizeof *m);
}

/* Sends every frame of m (flags added to each): 0, or -1 with zmq's errno. */
static int send_message(mesh_client *c, const mesh_message *m, int flags) {
    for (size_t i = 0; i < m->count; i++)
        if (zmq_send(c->sock, m->frames[i].data, m->frames[i].size,
                     flags | (i + 1 < m->count ? ZMQ_SNDMORE : 0)) < 0)
            return -1;
    return 0;
}

static int send_request(mesh_client *c, const char *kind, uint64_t id, const char *model,
                        const mesh_value *inputs, size_t n_inputs, const mesh_value *params,
                        size_t n_params, int timeout_ms, mesh_error *err) {
    mesh_message m;
    if (mesh_encode_request(kind, id, model, inputs, n_inputs, params, n_params, timeout_ms,
                            &m) < 0) {
        set_error(err, "client", "out of memory", 0);
        return -1;
    }
    int rc = send_message(c, &m, 0);
    if (rc < 0) set_error(err, "client", zmq_strerror(zmq_errno()), 0);
    mesh_message_free(&m);
    return rc;
}

/* A header-only message: a ping or a cancel. */
static void send_control(mesh_client *c, const char *kind, uint64_t id, int flags) {
    mesh_message m;
    if (mesh_encode_control(kind, id, &m) < 0) return;
    send_message(c, &m, flags);
    mesh_message_free(&m);
}

static void send_ping(mesh_client *c, uint64_t id) { send_control(c, "ping", id, ZMQ_DONTWAIT); }
static void send_cancel(mesh_client *c, uint64_t id) { send_control(c, "cancel", id, 0); }

/* -- decoding -------------------------------------------------------------------------------- */

typedef struct { zmq_msg_t msgs[MAX_FRAMES]; int n; } frames_t;

static void frames_close(frames_t *f) { for (int i = 0; i < f->n; i++) zmq_msg_close(&f->msgs[i]); f->n = 0; }

/* One whole message, waiting up to wait_ms: 1, 0 on timeout, -1 on error. */
static int recv_frames(mesh_client *c, frames_t *f, int wait_ms) {
    zmq_pollitem_t item = {c->sock, 0, ZMQ_POLLIN, 0};
    int rc = zmq_poll(&item, 1, wait_ms < 0 ? 0 : wait_ms);
    if (rc <= 0) return rc;
    f->n = 0;
    int more = 1;
    while (more) {
        zmq_msg_t scratch;
        zmq_msg_t *m = f->n < MAX_FRAMES ? &f->msgs[f->n] : &scratch;
        zmq_msg_init(m);
        if (zmq_msg_recv(m, c->sock, 0) < 0) { zmq_msg_close(m); frames_close(f); return -1; }
        more = zmq_msg_more(m);
        if (m == &scratch) zmq_msg_close(m); else f->n++;
    }
    return 1;
}

static const msgpack_object *map_get(const msgpack_object *map, const char *key) {
    if (map->type != MSGPACK_OBJECT_MAP) return NULL;
    size_t n = strlen(key);
    for (uint32_t i = 0; i < map->via.map.size; i++) {
        const msgpack_object *k = &map->via.map.ptr[i].key;
        if (k->type == MSGPACK_OBJECT_STR && k->via.str.size == n &&
            memcmp(k->via.str.ptr, key, n) == 0)
            return &map->via.map.ptr[i].val;
    }
    return NULL;
}

static char *dup_str(const msgpack_object *o) {
    char *s = malloc(o->via.str.size + 1);
    memcpy(s, o->via.str.ptr, o->via.str.size);
    s[o->via.str.size] = 0;
    return s;
}

/* A string field into buf (truncated to fit), or fallback when absent or not a string. */
static void str_field(const msgpack_object *h, const char *key, char *buf, size_t cap,
                      const char *fallback) {
    const msgpack_object *o = map_get(h, key);
    if (o && o->type == MSGPACK_OBJECT_STR)
        snprintf(buf, cap, "%.*s", (int)o->via.str.size, o->via.str.ptr);
    else
        snprintf(buf, cap, "%s", fallback);
}

static int tensor_error(mesh_error *err) {
    set_error(err, "client", "a tensor reference the client cannot read", 0);
    return -1;
}

static int decode_outputs(const msgpack_object *outputs, const mesh_frame *frames,
                          size_t n_frames, mesh_answer *out, mesh_error *err) {
    memset(out, 0, sizeof *out);
    if (!outputs || outputs->type != MSGPACK_OBJECT_MAP) return 0;
    out->values = calloc(outputs->via.map.size ? outputs->via.map.size : 1, sizeof(mesh_value));
    for (uint32_t i = 0; i < outputs->via.map.size; i++) {
        const msgpack_object *k = &outputs->via.map.ptr[i].key;
        const msgpack_object *v = &outputs->via.map.ptr[i].val;
        if (k->type != MSGPACK_OBJECT_STR) continue;
        mesh_value *mv = &out->values[out->count++];
        mv->name = dup_str(k);
        const msgpack_object *ref = map_get(v, "$tensor");
        if (ref && ref->type == MSGPACK_OBJECT_ARRAY && ref->via.array.size == 3) {
            const msgpack_object *dt = &ref->via.array.ptr[0], *sh = &ref->via.array.ptr[1],
                                 *ix = &ref->via.array.ptr[2];
            int d = dt->type == MSGPACK_OBJECT_STR ? dtype_of(dt->via.str.ptr, dt->via.str.size) : -1;
            if (d < 0 || sh->type != MSGPACK_OBJECT_ARRAY || sh->via.array.size > MESH_MAX_DIMS ||
                ix->type != MSGPACK_OBJECT_POSITIVE_INTEGER || ix->via.u64 < 1 ||
                ix->via.u64 >= n_frames) {
                mesh_answer_free(out);
                return tensor_error(err);
            }
            mv->kind = MESH_VALUE_TENSOR;
            mv->dtype = (mesh_dtype)d;
            mv->ndim = (int)sh->via.array.size;
            size_t count = 1;  /* elements; bounded so that count * a dtype's size cannot wrap */
            for (int j = 0; j < mv->ndim; j++) {
                const msgpack_object *dim = &sh->via.array.ptr[j];
                if (dim->type != MSGPACK_OBJECT_POSITIVE_INTEGER || dim->via.u64 > INT64_MAX ||
                        (dim->via.u64 && count > SIZE_MAX / 16 / dim->via.u64)) {
                    mesh_answer_free(out);
                    return tensor_error(err);
                }
                mv->shape[j] = (int64_t)dim->via.u64;
                count *= (size_t)dim->via.u64;
            }
            /* A frame that is not its shape's size would have a caller read past it. */
            const mesh_frame *fr = &frames[ix->via.u64];
            if (fr->size != count * mesh_dtype_size(mv->dtype)) {
                mesh_answer_free(out);
                return tensor_error(err);
            }
            mv->nbytes = fr->size;
            mv->data = malloc(mv->nbytes ? mv->nbytes : 1);
            memcpy(mv->data, fr->data, mv->nbytes);
        } else if (v->type == MSGPACK_OBJECT_STR) {
            mv->kind = MESH_VALUE_STRING;
            mv->str = dup_str(v);
        } else if (v->type == MSGPACK_OBJECT_POSITIVE_INTEGER || v->type == MSGPACK_OBJECT_NEGATIVE_INTEGER) {
            mv->kind = MESH_VALUE_INT;
            mv->i = v->via.i64;
        } else {
            mv->kind = MESH_VALUE_STRING;
            mv->str = strdup("(a msgpack value this client does not decode)");
        }
    }
    return 0;
}

void mesh_answer_free(mesh_answer *a) {
    for (size_t i = 0; i < a->count; i++) {
        free(a->values[i].name);
        free(a->values[i].data);
        free(a->values[i].str);
    }
    free(a->values);
    memset(a, 0, sizeof *a);
}

const mesh_value *mesh_answer_get(const mesh_answer *a, const char *name) {
    for (size_t i = 0; i < a->count; i++)
        if (strcmp(a->values[i].name, name) == 0) return &a->values[i];
    return NULL;
}

/* Frame 0 unpacked into *up (the caller destroys it, whatever the result) and read into *r:
 * kind, id and an error's fields, not the outputs. 0, or -1 when it is not a msgpack map. */
static int decode_header(const mesh_frame *frames, size_t n_frames, msgpack_unpacked *up,
                         mesh_reply *r) {
    memset(r, 0, sizeof *r);
    msgpack_unpacked_init(up);
    if (n_frames < 1 || msgpack_unpack_next(up, frames[0].data, frames[0].size, NULL) !=
            MSGPACK_UNPACK_SUCCESS || up->data.type != MSGPACK_OBJECT_MAP)
        return -1;
    const msgpack_object *h = &up->data;
    str_field(h, "kind", r->kind, sizeof r->kind, "");
    const msgpack_object *id = map_get(h, "id");
    if (!id || id->type == MSGPACK_OBJECT_NIL) r->id_kind = MESH_ID_NIL;
    else if (id->type == MSGPACK_OBJECT_POSITIVE_INTEGER) {
        r->id_kind = MESH_ID_INT;
        r->id = id->via.u64;
    } else if (id->type == MSGPACK_OBJECT_STR) {
        r->id_kind = MESH_ID_STRING;
        r->id_str = dup_str(id);
    } else {
        r->id_kind = MESH_ID_OTHER;
    }
    if (strcmp(r->kind, "error") == 0) {
        str_field(h, "code", r->error.code, sizeof r->error.code, "internal");
        str_field(h, "message", r->error.message, sizeof r->error.message, "");
        const msgpack_object *retry = map_get(h, "retryable");
        const msgpack_object *after = map_get(h, "retry_after_ms");
        r->error.retryable = retry && retry->type == MSGPACK_OBJECT_BOOLEAN && retry->via.boolean;
        r->error.retry_after_ms = after && after->type == MSGPACK_OBJECT_POSITIVE_INTEGER &&
            after->via.u64 <= INT32_MAX ? (int)after->via.u64 : 0;
    }
    return 0;
}

static int has_outputs(const mesh_reply *r) {
    return strcmp(r->kind, "result") == 0 || strcmp(r->kind, "chunk") == 0;
}

int mesh_decode_reply(const mesh_frame *frames, size_t n_frames, mesh_reply *out,
                      mesh_error *err) {
    msgpack_unpacked up;
    int rc = decode_header(frames, n_frames, &up, out);
    if (rc < 0) set_error(err, "client", "frame 0 is not a msgpack map", 0);
    else if (has_outputs(out))
        rc = decode_outputs(map_get(&up.data, "outputs"), frames, n_frames, &out->outputs, err);
    msgpack_unpacked_destroy(&up);
    if (rc < 0) mesh_reply_free(out);
    return rc;
}

void mesh_reply_free(mesh_reply *r) {
    free(r->id_str);
    mesh_answer_free(&r->outputs);
    memset(r, 0, sizeof *r);
}

/* A pong: 1 when it comes from a restarted controller and its ping was sent after request
 * id (so the request went to the previous one), else 0 (its incarnation noted). */
static int restarted(mesh_client *c, const msgpack_object *h, uint64_t ping_id, uint64_t id) {
    const msgpack_object *inc = map_get(h, "incarnation");
    if (!inc || inc->type != MSGPACK_OBJECT_STR) return 0;
    char now[sizeof c->incarnation];
    snprintf(now, sizeof now, "%.*s", (int)inc->via.str.size, inc->via.str.ptr);
    int changed = c->incarnation[0] && strcmp(now, c->incarnation) != 0;
    memcpy(c->incarnation, now, sizeof now);
    return changed && ping_id > id;
}

/* The next answer to request id, decoded as mesh_decode_reply does (outputs only for ours):
 * 0 and *r filled (free it), or -1 and *err filled. Pongs and answers to other ids are read
 * and dropped on the way. */
static int await_answer(mesh_client *c, uint64_t id, int64_t deadline, mesh_reply *r,
                        mesh_error *err) {
    for (;;) {
        int64_t now = now_ms();
        int64_t wait = deadline - now;
        if (wait <= 0) { set_error(err, "deadline_exceeded", "no answer from the controller in time", 1); return -1; }
        if (c->heartbeat_ms) {
            if (now - c->pinged_ms >= c->heartbeat_ms) {
                send_ping(c, c->next_id++);
                c->pinged_ms = now;
            }
            int64_t until_ping = c->pinged_ms + c->heartbeat_ms - now;
            int64_t until_lost = c->heard_ms + c->controller_timeout_ms + 1 - now;
            if (until_ping < wait) wait = until_ping;
            if (until_lost < wait) wait = until_lost;
        }
        frames_t f = {.n = 0};
        int rc = recv_frames(c, &f, (int)(wait > 0 ? wait : 0));
        if (rc == 0) {
            int64_t silent = now_ms() - c->heard_ms;
            if (c->heartbeat_ms && silent > c->controller_timeout_ms) {
                char why[200];
                snprintf(why, sizeof why, "no answer from the controller at %s for %lld ms",
                         c->endpoint, (long long)silent);
                set_error(err, "controller_lost", why, 1);
                reconnect(c);
                return -1;
            }
            continue;
        }
        if (rc < 0) { set_error(err, "client", zmq_strerror(zmq_errno()), 0); return -1; }
        c->heard_ms = now_ms();  /* any message at all: the controller is there */
        mesh_frame views[MAX_FRAMES];
        for (int i = 0; i < f.n; i++)
            views[i] = (mesh_frame){zmq_msg_data(&f.msgs[i]), zmq_msg_size(&f.msgs[i])};
        msgpack_unpacked up;
        rc = decode_header(views, (size_t)f.n, &up, r);
        int ours = 0, lost = 0;
        if (rc == 0 && r->id_kind == MESH_ID_INT && !strcmp(r->kind, "pong")) {
            lost = restarted(c, &up.data, r->id, id);
        } else if (rc == 0 && r->id_kind == MESH_ID_INT && r->id == id) {
            ours = 1;
            if (has_outputs(r))
                rc = decode_outputs(map_get(&up.data, "outputs"), views, (size_t)f.n,
                                    &r->outputs, err);
        }
        msgpack_unpacked_destroy(&up);
        frames_close(&f);
        if (ours && rc == 0) return 0;
        mesh_reply_free(r);
        if (ours) return -1;  /* ours, but its outputs cannot be read: *err says why */
        if (lost) {
            set_error(err, "controller_lost", "the controller restarted (a new incarnation): "
                      "the request went to the previous one", 1);
            return -1;
        }
        /* a pong, an answer to another id, or not a msgpack map: ignored */
    }
}

int mesh_infer(mesh_client *c, const char *model, const mesh_value *inputs, size_t n_inputs,
               const mesh_value *params, size_t n_params, int timeout_ms, mesh_answer *out,
               mesh_error *err) {
    uint64_t id = c->next_id++;
    c->heard_ms = c->pinged_ms = now_ms();  /* silence while idle means nothing */
    if (send_request(c, "infer", id, model, inputs, n_inputs, params, n_params, timeout_ms,
                     err) < 0)
        return -1;
    int64_t deadline = now_ms() + timeout_ms + GRACE_MS;
    for (;;) {
        mesh_reply r;
        if (await_answer(c, id, deadline, &r, err) < 0) return -1;
        int rc = -2;
        if (!strcmp(r.kind, "error")) {
            if (err) *err = r.error;
            rc = -1;
        } else if (!strcmp(r.kind, "result")) {
            *out = r.outputs;
            memset(&r.outputs, 0, sizeof r.outputs);
            rc = 0;
        }
        mesh_reply_free(&r);
        if (rc != -2) return rc;
    }
}

int mesh_stream_start(mesh_client *c, const char *model, const mesh_value *inputs,
                      size_t n_inputs, const mesh_value *params, size_t n_params,
                      int timeout_ms, mesh_stream *s, mesh_error *err) {
    s->id = c->next_id++;
    s->deadline_ms = timeout_ms;
    s->started_ms = now_ms();
    s->done = 0;
    c->heard_ms = c->pinged_ms = now_ms();
    return send_request(c, "stream", s->id, model, inputs, n_inputs, params, n_params,
                        timeout_ms, err);
}

int mesh_stream_next(mesh_client *c, mesh_stream *s, mesh_answer *chunk, mesh_error *err) {
    if (s->done) return 1;
    /* Nothing was asked of the controller between calls: silence then means nothing. */
    c->heard_ms = now_ms();
    int64_t deadline = s->started_ms + s->deadline_ms + GRACE_MS;
    for (;;) {
        mesh_reply r;
        if (await_answer(c, s->id, deadline, &r, err) < 0) { s->done = 1; return -1; }
        int rc = -2;
        if (!strcmp(r.kind, "error")) {
            if (err) *err = r.error;
            rc = -1;
        } else if (!strcmp(r.kind, "end")) {
            rc = 1;
        } else if (!strcmp(r.kind, "chunk")) {
            *chunk = r.outputs;
            memset(&r.outputs, 0, sizeof r.outputs);
            rc = 0;
        }
        mesh_reply_free(&r);
        if (rc == -1 || rc == 1) s->done = 1;
        if (rc != -2) return rc;
    }
}

void mesh_stream_cancel(mesh_client *c, mesh_stream *s) {
    if (!s->done) send_cancel(c, s->id);
    s->done = 1;
}
