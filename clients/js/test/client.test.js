// The Node.js client against a live controller started here, and against the protocol's
// conformance vectors offline. Run: npm test (MESHSERVE_PYTHON names the Python that has
// meshserve installed; default python3).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, writeFileSync, readFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { encode, decode } from "@msgpack/msgpack";
import * as zmq from "zeromq";
import {
  Client, controlHeader, decodeAnswer, describeHeader, encodeMessage, errors, requestHeader,
  tensor,
} from "../index.js";

const here = dirname(fileURLToPath(import.meta.url));
const repo = join(here, "..", "..", "..");
const python = process.env.MESHSERVE_PYTHON || "python3";
let controller;
let endpoint;
let client;

function freePort() {
  return new Promise((resolve) => {
    const s = createServer();
    s.listen(0, "127.0.0.1", () => { const { port } = s.address(); s.close(() => resolve(port)); });
  });
}

before(async () => {
  const [clientPort, adminPort, workerPort] = [await freePort(), await freePort(), await freePort()];
  const dir = mkdtempSync(join(tmpdir(), "meshjs-"));
  const config = join(dir, "js.toml");
  writeFileSync(config, `[controller]
client_endpoint = "tcp://127.0.0.1:${clientPort}"
admin_endpoint = "tcp://127.0.0.1:${adminPort}"
worker_endpoint = "tcp://127.0.0.1:${workerPort}"
metrics_port = 0
warm_workers = 0
autoscale = false

[[deployments]]
name = "echo"
model = "worker.models.echo:build"

[[deployments]]
name = "mlp"
model = "worker.models.mlp:build"
factory_kwargs = { hidden = 64 }

[[deployments]]
name = "tinygpt"
model = "worker.models.tinygpt:build"
max_batch_size = 1
`);
  controller = spawn(python, ["-m", "mesh.cli", "up", "--config", config],
    { cwd: repo, stdio: ["ignore", "ignore", "pipe"] });
  let log = "";
  controller.stderr.on("data", (d) => { log += d; });
  endpoint = `tcp://127.0.0.1:${clientPort}`;
  client = new Client(endpoint);
  const deadline = Date.now() + 90000;
  for (;;) {
    try {
      const { models } = await client.describe(undefined, { timeoutMs: 1000 });
      if (models.every((m) => m.ready)) break;
    } catch (e) { /* not up yet */ }
    if (Date.now() > deadline) throw new Error(`controller not ready:\n${log}`);
    await new Promise((r) => setTimeout(r, 200));
  }
});

after(async () => {
  client?.close();
  if (controller && controller.exitCode === null) {
    controller.kill("SIGTERM");
    await new Promise((r) => controller.on("exit", r));
  }
});

test("infer sends a tensor and gets it back bit for bit", async () => {
  const x = tensor("float32", [2, 3], [1.5, -2, 3.25, 0, 1e-7, -0]);
  const out = await client.infer("echo", { x }, { timeoutMs: 5000 });
  assert.equal(out.x.dtype, "float32");
  assert.deepEqual(out.x.shape, [2, 3]);
  assert.deepEqual(Buffer.from(out.x.data.buffer), Buffer.from(x.data.buffer));
  // Every dtype of the spec, and plain msgpack values beside tensors.
  const all = {
    f64: tensor("float64", [2], [Math.PI, -1]), i64: tensor("int64", [2], [2n ** 62n, -5n]),
    i32: tensor("int32", [1], [-7]), i16: tensor("int16", [1], [300]),
    i8: tensor("int8", [1], [-8]), u8: tensor("uint8", [3], [0, 1, 255]),
    b: tensor("bool", [2], [1, 0]), f16: tensor("float16", [1], [0x3c00]),
    bf16: tensor("bfloat16", [1], [0x3f80]), e: tensor("float32", [0, 4], []),
    s: "text", n: 42, nested: { list: [1, "two", null] },
  };
  const back = await client.infer("echo", all, { timeoutMs: 5000 });
  for (const [k, v] of Object.entries(all)) {
    if (v && v.data) {
      assert.equal(back[k].dtype, v.dtype, k);
      assert.deepEqual(back[k].shape, v.shape, k);
      assert.deepEqual(Buffer.from(back[k].data.buffer, back[k].data.byteOffset,
        back[k].data.byteLength), Buffer.from(v.data.buffer, v.data.byteOffset,
        v.data.byteLength), k);
    } else assert.deepEqual(back[k], v, k);
  }
});

test("a stream yields the same text as one infer, and leaving it early cancels it", async () => {
  let text = "";
  for await (const chunk of client.stream("tinygpt", { prompt: "hello" }, { maxTokens: 24 })) {
    text += chunk.text;
  }
  const whole = await client.infer("tinygpt", { prompt: "hello" }, { params: { max_tokens: 24 } });
  assert.equal(text, whole.text);
  assert.equal(text.length, 24);
  let seen = 0;
  for await (const chunk of client.stream("tinygpt", { prompt: "hello" }, { maxTokens: 200 })) {
    assert.equal(typeof chunk.text, "string");
    if (++seen === 3) break; // sends cancel
  }
  // The connection is still good, and answers come in order of their own ids.
  const again = await client.infer("echo", { n: 1 });
  assert.deepEqual(again, { n: 1 });
});

test("errors come back typed, and deadlines hold", async () => {
  await assert.rejects(client.infer("nope", {}), (e) => e instanceof errors.UnknownModel &&
    e.code === "unknown_model" && !e.retryable && /serving/.test(e.message));
  await assert.rejects(client.infer("tinygpt", { prompt: 5 }), errors.BadRequest);
  await assert.rejects(client.infer("tinygpt", { prompt: "hi" }, { params: { max_tokens: 1.5 } }),
    errors.BadRequest);
  const started = Date.now();
  await assert.rejects(client.infer("tinygpt", { prompt: "hi" },
    { params: { max_tokens: 256 }, timeoutMs: 50 }), (e) => e instanceof errors.DeadlineExceeded &&
    e.retryable);
  assert.ok(Date.now() - started < 3000);
});

test("describe says what each deployment takes and gives", async () => {
  const { protocolVersion, models } = await client.describe();
  assert.equal(protocolVersion, 1);
  const gpt = models.find((m) => m.name === "tinygpt");
  assert.equal(gpt.streaming, true);
  assert.deepEqual(gpt.parameters.max_tokens, { type: "int", min: 1, max: 256, default: 16 });
  await assert.rejects(client.describe("nope"), errors.UnknownModel);
});

test("a request built from describe alone is valid", async () => {
  const [mlp] = (await client.describe("mlp")).models;
  const inputs = {};
  for (const spec of mlp.inputs) {
    const shape = spec.shape.map((d) => (d === -1 ? 1 : d)); // one row
    const count = shape.reduce((a, b) => a * b, 1);
    inputs[spec.name] = tensor(spec.datatype, shape, new Array(count).fill(0.25));
  }
  const out = await client.infer("mlp", inputs);
  for (const spec of mlp.outputs) {
    assert.equal(out[spec.name].dtype, spec.datatype);
    assert.deepEqual(out[spec.name].shape, spec.shape.map((d) => (d === -1 ? 1 : d)));
  }
});

// -- the conformance vectors (docs/protocol-vectors), through the client's own code --------
const vectors = JSON.parse(readFileSync(join(repo, "docs", "protocol-vectors", "vectors.json")));
const hex = (frames) => frames.map((f) => Buffer.from(f).toString("hex"));
const TYPED = {
  float32: Float32Array, float64: Float64Array, int64: BigInt64Array, int32: Int32Array,
  int16: Int16Array, int8: Int8Array, uint8: Uint8Array, bool: Uint8Array,
  float16: Uint16Array, bfloat16: Uint16Array,
};

/** A vector's value as a caller gives it: each tensor reference made a tensor of its frame. */
function callerValue(value, frames) {
  if (value && typeof value === "object" && !Array.isArray(value)) {
    if ("$tensor" in value) {
      const [dtype, shape, index] = value.$tensor;
      const bytes = Uint8Array.from(Buffer.from(frames[index], "hex"));
      return tensor(dtype, shape, new TYPED[dtype](bytes.buffer));
    }
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, callerValue(v, frames)]));
  }
  return Array.isArray(value) ? value.map((v) => callerValue(v, frames)) : value;
}

test("the client's own request builders give every encoder vector byte for byte", () => {
  const kinds = new Set();
  for (const c of vectors.cases.filter((c) => c.value)) {
    const { kind, id, model, inputs, timeout_ms: timeoutMs, params } =
      callerValue(c.value, c.frames);
    let header;
    if (kind === "infer" || kind === "stream") {
      header = requestHeader(kind, id, model, inputs, timeoutMs, params);
    } else if (kind === "ping" || kind === "cancel") header = controlHeader(kind, id);
    else if (kind === "describe") header = describeHeader(id, model);
    else assert.fail(`${c.name}: the client builds no ${kind}`);
    assert.deepEqual(hex(encodeMessage(header)), c.frames, c.name);
    kinds.add(kind);
  }
  assert.deepEqual([...kinds].sort(), ["cancel", "describe", "infer", "ping", "stream"]);
});

/** The fields of docs/protocol-vectors/README.md, from what decodeAnswer gives. */
function fieldsOf(answer) {
  const out = { kind: answer.kind, id: answer.id ?? null };
  if (answer.error) {
    out.code = answer.error.code;
    out.retryable = answer.error.retryable;
    if (answer.error.retryAfterMs) out.retry_after_ms = answer.error.retryAfterMs;
  }
  if (answer.outputs) {
    out.outputs = Object.fromEntries(Object.entries(answer.outputs).map(([k, v]) =>
      [k, v && v.data ? { dtype: v.dtype, shape: v.shape, data: Array.from(v.data, Number) } : v]));
  }
  return out;
}

test("the client's decoder reads every recorded answer and reply as its fields", () => {
  const answers = [
    ...vectors.cases.filter((c) => c.answer).map((c) => ({ name: c.name, ...c.answer })),
    ...vectors.replies,
  ];
  const names = new Set();
  for (const r of answers) {
    const a = decodeAnswer(r.frames.map((f) => Buffer.from(f, "hex")));
    const want = { ...r.fields };
    delete want.models; // a description's models: describe() reads them, not decodeAnswer
    assert.deepEqual(fieldsOf(a), want, r.name);
    if (a.error) {
      assert.ok(a.error instanceof errors[a.error.name], r.name); // typed by its code
      names.add(a.error.name);
    }
  }
  assert.ok(answers.length >= 35, `only ${answers.length} answers`);
  // Every error code of the taxonomy decodes to its typed error; ControllerLost is the
  // client's own (protocol section 3.7): never on the wire.
  assert.equal(names.size, Object.keys(errors).filter((n) => n !== "ControllerLost").length);
});

// -- a lost or restarted controller (protocol section 3.7), against a fake one ------------
async function fakeController({ incarnations, answer }) {
  const router = new zmq.Router({ linger: 0 });
  const port = await freePort();
  await router.bind(`tcp://127.0.0.1:${port}`);
  const seen = { pings: 0, infers: 0 };
  (async () => {
    for await (const [peer, head] of router) {
      const h = decode(head);
      if (h.kind === "ping") {
        const incarnation = incarnations[Math.min(seen.pings++, incarnations.length - 1)];
        if (incarnation !== null) {
          await router.send([peer, Buffer.from(encode({ v: 1, kind: "pong", id: h.id,
            incarnation }))]);
        }
      } else if (h.kind === "infer") {
        seen.infers++;
        if (answer()) {
          await router.send([peer, Buffer.from(encode({ v: 1, kind: "result", id: h.id,
            outputs: { n: 2 } }))]);
        }
      }
    }
  })().catch(() => {});
  return { endpoint: `tcp://127.0.0.1:${port}`, seen, close: () => router.close() };
}

test("a silent controller fails what is in flight with ControllerLost, long before its deadline", async () => {
  const fake = await fakeController({ incarnations: [null], answer: () => false });
  const c = new Client(fake.endpoint, { heartbeatMs: 100, controllerTimeoutMs: 400 });
  try {
    const started = Date.now();
    await assert.rejects(c.infer("echo", { n: 1 }, { timeoutMs: 30000 }),
      (e) => e instanceof errors.ControllerLost && e.retryable && e.code === "controller_lost");
    assert.ok(Date.now() - started < 3000, `took ${Date.now() - started} ms`);
    assert.ok(fake.seen.pings >= 2 && fake.seen.infers === 1);
  } finally {
    c.close();
    fake.close();
  }
});

test("a pong from a restarted controller fails what was sent before it, not what comes after", async () => {
  let answering = false;
  const fake = await fakeController({ incarnations: ["one", "two"], answer: () => answering });
  const c = new Client(fake.endpoint, { heartbeatMs: 100, controllerTimeoutMs: 5000 });
  try {
    const started = Date.now();
    await assert.rejects(c.infer("echo", { n: 1 }, { timeoutMs: 30000 }), errors.ControllerLost);
    assert.ok(Date.now() - started < 3000);
    assert.equal(c.incarnation, "two");
    answering = true;
    assert.deepEqual(await c.infer("echo", { n: 1 }, { timeoutMs: 5000 }), { n: 2 });
  } finally {
    c.close();
    fake.close();
  }
});

test("without requests in flight the client sends no pings", async () => {
  const fake = await fakeController({ incarnations: ["one"], answer: () => true });
  const c = new Client(fake.endpoint, { heartbeatMs: 50, controllerTimeoutMs: 200 });
  try {
    await new Promise((r) => setTimeout(r, 400));
    assert.equal(fake.seen.pings, 0);
    assert.deepEqual(await c.infer("echo", { n: 1 }, { timeoutMs: 5000 }), { n: 2 });
  } finally {
    c.close();
    fake.close();
  }
});

test("calls to a controller whose handshake fails queue their sends and fail as lost", async () => {
  // A CURVE client against a plain socket: the handshake never completes, so the first send
  // waits for a connection. A zeromq socket takes one send at a time: the other calls and
  // the pings must queue behind it, not throw EBUSY out of a timer (that killed the process).
  const fake = await fakeController({ incarnations: ["one"], answer: () => true });
  const server = zmq.curveKeyPair();
  const mine = zmq.curveKeyPair();
  const c = new Client(fake.endpoint, { heartbeatMs: 100, controllerTimeoutMs: 400,
    curve: { serverKey: server.publicKey, publicKey: mine.publicKey, secretKey: mine.secretKey } });
  try {
    const started = Date.now();
    const calls = [1, 2, 3].map((n) => c.infer("echo", { n }, { timeoutMs: 30000 }));
    for (const call of calls) await assert.rejects(call, errors.ControllerLost);
    assert.ok(Date.now() - started < 3000, `took ${Date.now() - started} ms`);
    assert.equal(fake.seen.infers, 0);
  } finally {
    c.close();
    fake.close();
  }
});
