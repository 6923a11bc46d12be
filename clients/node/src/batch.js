// Trajectory batches as Arrow IPC streams, built and read in JavaScript.
//
// A DataBatch carries the bytes of one Arrow IPC *stream* (not the file format), one row per datum.
// The column types below are the contract (protos/arrow_schemas.py owns it; docs/grpc.md has the
// table): list<int32> token ids, list<float32> per-token values, int64 versions and groups. The
// server ignores list child names and nullability, so plain apache-arrow vectors work as they are.

import { Field, Float32, Int32, Int64, List, Table, tableFromIPC, tableToIPC, vectorFromArray } from 'apache-arrow';

/** A list<type> Arrow type, as every per-token column uses. */
export const listOf = (type) => new List(new Field('item', type, true));

/** Every column a trajectory batch may carry, in schema order, with its Arrow type. */
export const BATCH_COLUMNS = {
  model_input: () => listOf(new Int32()), // N tokens fed to the model (required)
  target_tokens: () => listOf(new Int32()), // N*K targets; position i predicts target i (required)
  weights: () => listOf(new Float32()), // N*K per-target weights (cross_entropy)
  logprobs: () => listOf(new Float32()), // N sampler logprobs of the targets (RL losses)
  advantages: () => listOf(new Float32()), // N per-token advantages (RL losses)
  sequence_ratio_mask: () => listOf(new Float32()), // N, 1 where a token forms gspo's sequence ratio
  targets_per_position: () => new Int32(), // K, default 1
  sampler_version: () => new Int64(), // weight version that sampled the row (its oldest token's)
  sampler_versions: () => listOf(new Int64()), // N, the version that sampled each target; -1 on prompt positions
  routed_experts: () => listOf(new Int32()), // N*L*k, the experts each position was routed to (routing replay)
  group_id: () => new Int64(), // rollout group of the row
  reward: () => new Float32(), // scalar reward of the row
};

/**
 * Build a batch from row objects ({model_input: [...], advantages: [...], ...}) and return the IPC
 * stream bytes for `DataBatch.arrow_ipc_stream`. `typeOverrides` ({column: () => ArrowType}) exists
 * to build deliberately wrong batches; nothing here checks lengths, so ragged rows go out as given and
 * the server is the one that must reject them.
 */
export function encodeBatch(rows, typeOverrides = {}) {
  if (rows.length === 0) throw new Error('a batch needs at least one row');
  const present = new Set(rows.flatMap((row) => Object.keys(row)));
  const unknown = [...present].filter((name) => !(name in BATCH_COLUMNS) && !(name in typeOverrides));
  if (unknown.length) throw new Error(`unknown column(s) ${unknown.join(', ')}`);
  const columns = {};
  for (const name of [...Object.keys(BATCH_COLUMNS), ...Object.keys(typeOverrides)]) {
    if (!present.has(name) || name in columns) continue;
    const type = (typeOverrides[name] ?? BATCH_COLUMNS[name])();
    const values = rows.map((row) => row[name]);
    columns[name] = vectorFromArray(holdsInt64(type) ? values.map(asBigInts) : values, type);
  }
  return tableToIPC(new Table(columns), 'stream');
}

// Arrow stores int64 as BigInt in JavaScript; plain numbers must be converted first.
const holdsInt64 = (type) => type instanceof Int64 || (type instanceof List && type.valueType instanceof Int64);
const asBigInts = (value) => (Array.isArray(value) ? value.map(BigInt) : BigInt(value));

/** Decode Forward/ForwardBackward outputs: one Float32Array of learner logprobs per datum. */
export function decodeOutputLogprobs(ipcStreamBytes) {
  const table = tableFromIPC(ipcStreamBytes);
  const column = table.getChild('logprobs');
  if (column === null) throw new Error(`outputs have columns [${table.schema.names}]; expected logprobs`);
  return Array.from({ length: table.numRows }, (_, row) => column.get(row).toArray());
}

/** The Arrow schema of a batch as "name: type" strings, for reports and error messages. */
export function describeSchema(ipcStreamBytes) {
  return tableFromIPC(ipcStreamBytes).schema.fields.map((field) => `${field.name}: ${field.type}`);
}
