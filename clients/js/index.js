// meshserve's Node.js client: the wire protocol of docs/protocol.md on zeromq (v6) and
// @msgpack/msgpack. One DEALER socket per client; many requests may be in flight at once.
import * as zmq from "zeromq";
import { encode, decode } from "@msgpack/msgpack";

export const PROTOCOL_VERSION = 1;
const TENSOR = "$tensor";

// -- errors: one class per wire code (protocol section 7) --------------------------------
export class MeshError extends Error {
  constructor(code, message, retryable = false, retryAfterMs = 0) {
    super(`[${code}] ${message}`);
    this.name = "MeshError";
    this.code = code;
    this.retryable = retryable;
    this.retryAfterMs = retryAfterMs;
  }
}
const CODES = {
  bad_request: "BadRequest", unknown_model: "UnknownModel", payload_too_large:
  "PayloadTooLarge", unsupported_version: "UnsupportedVersion", deadline_exceeded:
  "DeadlineExceeded", overloaded: "Overloaded", unavailable: "Unavailable", cancelled:
  "Cancelled", stream_interrupted: "StreamInterrupted", model_error: "ModelError",
  internal: "InternalError", controller_lost: "ControllerLost",
};
export const errors = {};
for (const [code, name] of Object.entries(CODES)) {
  errors[name] = class extends MeshError {
    constructor(message, retryable, retryAfterMs) {
      super(code, message, retryable, retryAfterMs);
      this.name = name;
    }
  };
}
function errorFrom(header) {
  const cls = errors[CODES[header.code]];
  const message = String(header.message ?? header.code);
  return cls ? new cls(message, Boolean(header.retryable), header.retry_after_ms ?? 0)
    : new MeshError(String(header.code), message, Boolean(header.retryable));
}

// -- tensors (protocol section 4): {dtype, shape, data: a typed array} -------------------
const ARRAYS = {
  float32: Float32Array, float64: Float64Array, int64: BigInt64Array, int32: Int32Array,
  int16: Int16Array, int8: Int8Array, uint8: Uint8Array, bool: Uint8Array,
  float16: Uint16Array, bfloat16: Uint16Array, // raw 16-bit patterns
};
export function tensor(dtype, shape, data) {
  const Arr = ARRAYS[dtype];
  if (!Arr) throw new errors.BadRequest(`unsupported dtype ${dtype}`, false, 0);
  const values = data instanceof Arr ? data : Arr.from(data);
  const count = shape.reduce((a, b) => a * b, 1);
  if (values.length !== count) {
    throw new errors.BadRequest(`${values.length} values for shape [${shape}]`, false, 0);
  }
  return { dtype, shape: [...shape], data: values };
}
const isTensor = (v) => v && typeof v === "object" && "dtype" in v && "shape" in v &&
  ArrayBuffer.isView(v.data);

function encodeValue(value, frames) {
  if (isTensor(value)) {
    const d = value.data;
    // Little-endian raw bytes (typed arrays are in host order: every supported host is LE).
    frames.push(Buffer.from(d.buffer, d.byteOffset, d.byteLength));
    return { [TENSOR]: [value.dtype, value.shape, frames.length] }; // frame 0 is the header
  }
  if (Array.isArray(value)) return value.map((v) => encodeValue(v, frames));
  if (value && typeof value === "object" && !(value instanceof Uint8Array)) {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, encodeValue(v, frames)]));
  }
  return value;
}
function decodeValue(value, frames) {
  if (value && typeof value === "object" && !Array.isArray(value) && TENSOR in value &&
      Object.keys(value).length === 1) {
    const [dtype, shape, index] = value[TENSOR];
    const Arr = ARRAYS[dtype];
    const frame = frames[index];
    if (!Arr || !frame) throw new errors.BadRequest(`bad tensor reference ${value[TENSOR]}`);
    const copy = Uint8Array.from(frame); // aligned, owned
    return { dtype, shape, data: new Arr(copy.buffer, 0, copy.byteLength / Arr.BYTES_PER_ELEMENT) };
  }
  if (Array.isArray(value)) return value.map((v) => decodeValue(v, frames));
  if (value && typeof value === "object" && !(value instanceof Uint8Array)) {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, decodeValue(v, frames)]));
  }
  return value;
}

// -- messages: what the client sends, built here and nowhere else (the tests give these the
// conformance vectors' values and compare bytes) ----------------------------------------

/** The header of an `infer` or `stream` request (protocol section 3.2). */
export function requestHeader(kind, id, model, inputs, timeoutMs, params) {
  const header = { v: PROTOCOL_VERSION, kind, id, model, inputs,
    timeout_ms: Math.max(1, Math.round(timeoutMs)) };
  if (params && Object.keys(params).length) header.params = params;
  return header;
}

/** The header of a `ping` or a `cancel`: nothing but the id. */
export function controlHeader(kind, id) {
  return { v: PROTOCOL_VERSION, kind, id };
}

/** The header of a `describe`: every model, or only `model` (protocol section 3.8). */
export function describeHeader(id, model) {
  const header = { v: PROTOCOL_VERSION, kind: "describe", id };
  if (model !== undefined) header.model = model;
  return header;
}

/**
 * A message's frames as the client sends them: the msgpack header, each tensor in it made a
 * reference, then the tensors' data, one frame each, in the order the header names them
 * (protocol section 4: the inputs' before the params').
 */
export function encodeMessage(header) {
  const frames = [];
  const full = encodeValue(header, frames);
  return [Buffer.from(encode(full)), ...frames];
}

/** One answer as frames (Buffers): {kind, id, error?: MeshError, outputs?}. */
export function decodeAnswer(frames) {
  const h = decode(frames[0]);
  const out = { kind: h.kind, id: h.id };
  if (h.kind === "error") out.error = errorFrom(h);
  if (h.kind === "result" || h.kind === "chunk") out.outputs = decodeValue(h.outputs ?? {}, frames);
  return out;
}

// -- the client ----------------------------------------------------------------------------
export class Client {
  /**
   * @param {string} endpoint  the controller's client endpoint, e.g. tcp://127.0.0.1:5555
   * @param {{defaultTimeoutMs?: number, graceMs?: number, heartbeatMs?: number,
   *          controllerTimeoutMs?: number, curve?: {publicKey: string, secretKey: string,
   *          serverKey: string}}} [options]  curve: Z85 keys
   *
   * A lost controller is noticed without waiting out each request's deadline (protocol
   * section 3.7): while requests are in flight the client pings every `heartbeatMs` (500;
   * 0: never); nothing at all heard for `controllerTimeoutMs` (5000) fails them with
   * `errors.ControllerLost` (retryable) and reconnects on a new socket, so that nothing queued
   * for the lost controller is delivered later. A pong from a restarted controller (another
   * `incarnation`) fails what was sent before that ping the same way.
   */
  constructor(endpoint = "tcp://127.0.0.1:5555", options = {}) {
    this.endpoint = endpoint;
    this.defaultTimeoutMs = options.defaultTimeoutMs ?? 30000;
    this.graceMs = options.graceMs ?? 2000;
    this.heartbeatMs = options.heartbeatMs ?? 500;
    this.controllerTimeoutMs = options.controllerTimeoutMs ?? 5000;
    if (this.heartbeatMs && this.controllerTimeoutMs < 2 * this.heartbeatMs) {
      throw new RangeError("controllerTimeoutMs must be at least twice heartbeatMs");
    }
    this.socketOptions = { linger: 0 };
    if (options.curve) {
      this.socketOptions.curveServerKey = options.curve.serverKey;
      this.socketOptions.curvePublicKey = options.curve.publicKey;
      this.socketOptions.curveSecretKey = options.curve.secretKey;
    }
    this.nextId = 1; // ids stay far below 2^53: exact as JavaScript numbers
    this.waiting = new Map(); // id -> {onMessage(header, frames), sent: the send's number}
    this.sends = 0; // requests sent so far: which were sent before a given ping
    this.incarnation = null; // the controller's, from its first pong
    this.heardMs = Date.now();
    this.closed = false;
    this.outbox = Promise.resolve(); // the send queue (see send)
    this.unsent = 0;
    this.connect();
    if (this.heartbeatMs) {
      this.heartbeat = setInterval(() => this.tick(), this.heartbeatMs);
      this.heartbeat.unref(); // an idle client does not keep the process alive
    }
  }

  connect() {
    this.socket = new zmq.Dealer(this.socketOptions);
    this.socket.connect(this.endpoint);
    this.receiving = this.receive(this.socket);
  }

  async receive(socket) {
    try {
      for await (const frames of socket) {
        this.heardMs = Date.now(); // any message at all: the controller is there
        let header;
        try { header = decode(frames[0]); } catch { continue; }
        const entry = this.waiting.get(header.id);
        if (entry) entry.onMessage(header, frames);
      }
    } catch (err) {
      if (!this.closed && socket === this.socket) throw err;
    }
  }

  /** The heartbeat: ping while requests are in flight; declare the controller lost. */
  tick() {
    if (this.closed) return;
    const now = Date.now();
    if (![...this.waiting.values()].some((e) => !e.ping)) {
      this.heardMs = now; // silence while nothing is asked of it means nothing
      return;
    }
    if (now - this.heardMs > this.controllerTimeoutMs) {
      this.lost(`no answer from the controller at ${this.endpoint} for ` +
        `${now - this.heardMs} ms`);
      return;
    }
    if (this.unsent) return; // a send still waits for a connection: a ping would queue behind
    const id = `ping-${this.nextId++}`;
    const before = this.sends;
    this.waiting.set(id, { ping: true, onMessage: (h) => {
      this.waiting.delete(id);
      if (h.kind !== "pong") return; // an old controller's bad_request: alive all the same
      const previous = this.incarnation;
      this.incarnation = h.incarnation;
      if (previous !== null && h.incarnation !== previous) {
        this.fail((e) => e.sent < before, "the controller restarted (a new incarnation): " +
          "requests sent to the previous one are lost");
      }
    } });
    this.send(controlHeader("ping", id)).catch(() => {});
  }

  /** Fail everything in flight with ControllerLost and start over on a new socket. */
  lost(why) {
    this.fail(() => true, why);
    const old = this.socket;
    this.heardMs = Date.now();
    this.connect();
    old.close();
  }

  fail(which, why) {
    for (const [id, entry] of [...this.waiting]) {
      if (entry.ping) { this.waiting.delete(id); continue; }
      if (which(entry)) {
        entry.onMessage({ kind: "error", code: "controller_lost", message: why,
          retryable: true }, []);
      }
    }
  }

  /**
   * Queue a message; the promise settles once it is sent. A zeromq socket takes one send at
   * a time (a second one while the first waits, as it does until a connection is up, throws
   * EBUSY), so sends go out one after another, in order.
   */
  send(header) {
    if (this.closed) throw new errors.Cancelled("client is closed", true, 0);
    const message = encodeMessage(header);
    const socket = this.socket;
    this.unsent++;
    const sent = this.outbox.then(() => socket.send(message));
    const done = () => { this.unsent--; };
    this.outbox = sent.then(done, done);
    return sent;
  }

  /** Register what answers request `id` (numbered in send order for `fail`). */
  expect(id, onMessage) {
    this.waiting.set(id, { onMessage, sent: this.sends++ });
  }

  /** One request, one answer: the named outputs (tensors as {dtype, shape, data}). */
  async infer(model, inputs, { timeoutMs, params } = {}) {
    const t = timeoutMs ?? this.defaultTimeoutMs;
    const header = requestHeader("infer", this.nextId++, model, inputs, t, params);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiting.delete(header.id);
        reject(new errors.DeadlineExceeded("no answer from the controller in time", true, 0));
      }, t + this.graceMs);
      this.expect(header.id, (h, frames) => {
        if (h.kind !== "result" && h.kind !== "error") return;
        clearTimeout(timer);
        this.waiting.delete(header.id);
        if (h.kind === "error") reject(errorFrom(h));
        else {
          try { resolve(decodeValue(h.outputs ?? {}, frames)); } catch (e) { reject(e); }
        }
      });
      this.send(header).catch((e) => { clearTimeout(timer); this.waiting.delete(header.id); reject(e); });
    });
  }

  /**
   * One request, a sequence of chunks: an async iterator. Leaving it early (break, an
   * exception) sends `cancel`, so the world stops decoding.
   */
  async *stream(model, inputs, { timeoutMs, params, maxTokens } = {}) {
    const t = timeoutMs ?? this.defaultTimeoutMs;
    const p = { ...(params ?? {}) };
    if (maxTokens !== undefined) p.max_tokens = maxTokens;
    const header = requestHeader("stream", this.nextId++, model, inputs, t, p);
    const queue = [];
    let wake = null;
    const push = (item) => { queue.push(item); if (wake) { wake(); wake = null; } };
    this.expect(header.id, (h, frames) => {
      if (h.kind === "chunk") {
        try { push({ chunk: decodeValue(h.outputs ?? {}, frames) }); } catch (e) { push({ error: e }); }
      } else if (h.kind === "end") push({ end: true });
      else if (h.kind === "error") push({ error: errorFrom(h) });
    });
    const timer = setTimeout(() => push({ error: new errors.DeadlineExceeded(
      `no end of stream within ${t} ms`, true, 0) }), t + this.graceMs);
    let finished = false;
    try {
      await this.send(header);
      while (true) {
        if (!queue.length) await new Promise((r) => { wake = r; });
        const item = queue.shift();
        if (item.end) { finished = true; return; }
        if (item.error) { finished = true; throw item.error; }
        yield item.chunk;
      }
    } finally {
      clearTimeout(timer);
      this.waiting.delete(header.id);
      if (!finished && !this.closed) {
        await this.send(controlHeader("cancel", header.id)).catch(() => {});
      }
    }
  }

  /** What the controller serves (protocol section 3.8). */
  async describe(model, { timeoutMs = 5000 } = {}) {
    const header = describeHeader(this.nextId++, model);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiting.delete(header.id);
        reject(new errors.DeadlineExceeded("no description from the controller in time", true, 0));
      }, timeoutMs);
      this.expect(header.id, (h) => {
        clearTimeout(timer);
        this.waiting.delete(header.id);
        if (h.kind === "error") reject(errorFrom(h));
        else resolve({ protocolVersion: h.protocol_version, models: h.models });
      });
      this.send(header).catch(reject);
    });
  }

  close() {
    this.closed = true;
    if (this.heartbeat) clearInterval(this.heartbeat);
    for (const entry of this.waiting.values()) {
      entry.onMessage({ kind: "error", code: "cancelled", message: "client closed", retryable: true }, []);
    }
    this.waiting.clear();
    this.socket.close();
  }
}
