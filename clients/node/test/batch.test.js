// Unit checks of the JavaScript side alone: the batch builder writes the contract's Arrow types,
// int64 columns survive as BigInt, output logprobs decode per row, and rows line up token by token.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { tableFromIPC } from 'apache-arrow';

import { decodeOutputLogprobs, encodeBatch } from '../src/batch.js';
import { evenTokenReward, groupAdvantages, trajectoryRow } from '../src/trajectory.js';

test('encodeBatch writes the contract types in schema order', () => {
  const bytes = encodeBatch([
    { reward: 0.5, model_input: [1, 2, 3], target_tokens: [2, 3, 4], advantages: [0, 1, 1], sampler_version: 3 },
  ]);
  const table = tableFromIPC(bytes);
  assert.deepEqual(
    table.schema.fields.map((field) => `${field.name}: ${field.type}`),
    [
      'model_input: List<Int32>',
      'target_tokens: List<Int32>',
      'advantages: List<Float32>',
      'sampler_version: Int64',
      'reward: Float32',
    ],
  );
  assert.equal(table.getChild('sampler_version').get(0), 3n);
  assert.deepEqual(Array.from(table.getChild('target_tokens').get(0).toArray()), [2, 3, 4]);
});

test('encodeBatch refuses columns the contract does not have', () => {
  assert.throws(() => encodeBatch([{ model_input: [1], target_tokens: [2], advantage: [1] }]), /advantage/);
});

test('decodeOutputLogprobs returns one Float32Array per row', () => {
  const bytes = encodeBatch([
    { model_input: [1], target_tokens: [2], logprobs: [-0.5] },
    { model_input: [1, 2], target_tokens: [2, 3], logprobs: [-1, -2] },
  ]);
  // An outputs payload is a one-column logprobs table; this one has extra columns, which decoding ignores.
  const rows = decodeOutputLogprobs(bytes);
  assert.deepEqual(
    rows.map((row) => Array.from(row)),
    [[-0.5], [-1, -2]],
  );
});

test('trajectoryRow shifts tokens by one and puts the advantage on completion positions only', () => {
  const row = trajectoryRow({
    promptTokens: [10, 11, 12],
    sequence: { tokens: [20, 21], logprobs: [-0.1, -0.2] },
    advantage: 0.25,
    reward: 1,
    samplerVersion: 4,
    groupId: 9,
  });
  assert.deepEqual(row.model_input, [10, 11, 12, 20]);
  assert.deepEqual(row.target_tokens, [11, 12, 20, 21]);
  assert.deepEqual(row.logprobs, [0, 0, -0.1, -0.2]);
  assert.deepEqual(row.advantages, [0, 0, 0.25, 0.25]);
});

test('group advantages are rewards minus their mean', () => {
  assert.deepEqual(groupAdvantages([1, 0, 0.5]), [0.5, -0.5, 0]);
  assert.equal(evenTokenReward([2, 3, 4, 5]), 0.5);
});
