// Type declarations for meshserve-client (index.js).
export const PROTOCOL_VERSION: 1;

export type DType = "float32" | "float64" | "float16" | "bfloat16" | "int64" | "int32" |
  "int16" | "int8" | "uint8" | "bool";
export interface Tensor {
  dtype: DType;
  shape: number[];
  data: Float32Array | Float64Array | BigInt64Array | Int32Array | Int16Array | Int8Array |
    Uint8Array | Uint16Array;
}
export function tensor(dtype: DType, shape: number[], data: ArrayLike<number | bigint>): Tensor;

export type Value = Tensor | string | number | boolean | null | Uint8Array | Value[] |
  { [key: string]: Value };
export type Outputs = Record<string, Value>;

export class MeshError extends Error {
  code: string;
  retryable: boolean;
  retryAfterMs: number;
}
export const errors: {
  BadRequest: typeof MeshError; UnknownModel: typeof MeshError;
  PayloadTooLarge: typeof MeshError; UnsupportedVersion: typeof MeshError;
  DeadlineExceeded: typeof MeshError; Overloaded: typeof MeshError;
  Unavailable: typeof MeshError; Cancelled: typeof MeshError;
  StreamInterrupted: typeof MeshError; ModelError: typeof MeshError;
  InternalError: typeof MeshError; ControllerLost: typeof MeshError;
};

/** The header of an `infer` or `stream` request, as the client sends it. */
export function requestHeader(kind: "infer" | "stream", id: number, model: string,
                              inputs: Record<string, Value>, timeoutMs: number,
                              params?: Record<string, Value>): Record<string, Value>;
/** The header of a `ping` or a `cancel`. */
export function controlHeader(kind: "ping" | "cancel", id: number | string): Record<string, Value>;
/** The header of a `describe` (every model, or `model` only). */
export function describeHeader(id: number, model?: string): Record<string, Value>;
/** A message's frames as the client sends them: the msgpack header, then each tensor's data. */
export function encodeMessage(header: Record<string, Value>): Uint8Array[];

/** One answer (its frames) as the client reads it. */
export function decodeAnswer(frames: Uint8Array[]): {
  kind: string; id: number | string | null; error?: MeshError; outputs?: Outputs;
};

export interface ModelMetadata {
  name: string; ready: boolean; stages: number; streaming: boolean; described: boolean;
  inputs: { name: string; datatype: string; shape: number[] }[];
  outputs: { name: string; datatype: string; shape: number[] }[];
  parameters: Record<string, unknown>;
}

export interface ClientOptions {
  defaultTimeoutMs?: number;
  graceMs?: number;
  /** Ping every this while requests are in flight (500; 0: never). */
  heartbeatMs?: number;
  /** Nothing heard this long with requests in flight: ControllerLost, reconnect (5000). */
  controllerTimeoutMs?: number;
  /** CURVE (Z85 keys): this client's pair and the controller's public key. */
  curve?: { publicKey: string; secretKey: string; serverKey: string };
}

export class Client {
  constructor(endpoint?: string, options?: ClientOptions);
  infer(model: string, inputs: Record<string, Value>,
        options?: { timeoutMs?: number; params?: Record<string, Value> }): Promise<Outputs>;
  stream(model: string, inputs: Record<string, Value>,
         options?: { timeoutMs?: number; params?: Record<string, Value>; maxTokens?: number }
  ): AsyncGenerator<Outputs, void, undefined>;
  describe(model?: string, options?: { timeoutMs?: number }):
    Promise<{ protocolVersion: number; models: ModelMetadata[] }>;
  close(): void;
}
