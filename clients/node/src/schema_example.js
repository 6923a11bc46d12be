#!/usr/bin/env node
// Write a one-row batch that uses every column of BATCH_COLUMNS, as Arrow IPC stream bytes, to the
// file named by the first argument. tests/clients/test_node_client.py reads it with pyarrow and
// compares it with protos/arrow_schemas.BATCH_SCHEMA, so the JavaScript column table cannot drift
// from the contract unnoticed.

import { writeFileSync } from 'node:fs';

import { BATCH_COLUMNS, encodeBatch } from './batch.js';

const perToken = [0.5, 0.25];
const example = {
  model_input: [1, 2],
  target_tokens: [2, 3],
  weights: perToken,
  logprobs: perToken,
  advantages: perToken,
  sequence_ratio_mask: [1, 1],
  targets_per_position: 1,
  sampler_version: 1,
  sampler_versions: [-1, 1],
  routed_experts: [0, 1, 2, 3],
  group_id: 0,
  reward: 1,
};
const missing = Object.keys(BATCH_COLUMNS).filter((name) => !(name in example));
if (missing.length) throw new Error(`schema_example.js has no value for column(s) ${missing}`);
writeFileSync(process.argv[2], encodeBatch([example]));
