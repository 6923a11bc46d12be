// The measure the end-to-end script asserts on: how logprobs moved, weighted by the advantages.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { logprobShift, maxAbsDifference } from '../src/checks.js';

test('logprobShift weighs each token change by its advantage and splits by sign', () => {
  const rows = [{ advantages: [0, 0.5, 0.5] }, { advantages: [0, -0.5, -0.5] }];
  const before = [
    [-1, -2, -3],
    [-1, -2, -3],
  ];
  const after = [
    [-9, -1.5, -2.5], // the prompt position (advantage 0) moved too, and must not count
    [-1, -2.25, -3.25],
  ];
  const shift = logprobShift(rows, before, after);
  assert.equal(shift.objectiveChange, 0.5 * 0.5 * 2 + -0.5 * -0.25 * 2);
  assert.equal(shift.meanChangeWherePositive, 0.5);
  assert.equal(shift.meanChangeWhereNegative, -0.25);
  assert.deepEqual(shift.rows, [
    { advantage: 0.5, meanChange: 0.5 },
    { advantage: -0.5, meanChange: -0.25 },
  ]);
});

test('maxAbsDifference compares row by row', () => {
  assert.equal(maxAbsDifference([[1, 2], [3]], [[1, 2.5], [2]]), 1);
});
