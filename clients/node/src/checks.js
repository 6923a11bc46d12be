// Small checks the end-to-end script makes, kept apart so each says what it proves.

import { statusName } from './client.js';

/** Await a call that must fail with `expected` (a status name); return {status, details} for the report. */
export async function expectStatus(call, expected, what) {
  try {
    await call;
  } catch (error) {
    const status = statusName(error.code);
    if (status !== expected) {
      throw new Error(`${what}: expected ${expected}, got ${status}: ${error.details}`);
    }
    return { status, details: error.details };
  }
  throw new Error(`${what}: expected ${expected}, but the call succeeded`);
}

/** Throw unless `condition` holds; `message` says what went wrong in the contract's terms. */
export function check(condition, message) {
  if (!condition) throw new Error(message);
}

/**
 * How a learner step moved the batch's logprobs, measured against the advantages:
 * - objectiveChange = sum over tokens of A_t * (after_t - before_t). An importance_sampling step
 *   ascends sum_t A_t * ratio_t, and to first order (ratio ~ 1 + delta logprob) that is exactly
 *   this sum, so it must come out positive.
 * - meanChangeWherePositive / meanChangeWhereNegative: the mean logprob change over the tokens
 *   with a positive (negative) advantage. Rewarded tokens must gain relative to penalised ones.
 * - rows: per row, its advantage and mean change, for the report. A single row may move against
 *   its own advantage (rows share parameters, and a small advantage can lose to a large one), so
 *   rows are reported, not asserted on one by one.
 */
export function logprobShift(rows, before, after) {
  let objectiveChange = 0;
  const changes = { positive: [], negative: [] };
  const perRow = rows.map((row, index) => {
    const deltas = row.advantages.map((_, t) => after[index][t] - before[index][t]);
    const scored = deltas.filter((_, t) => row.advantages[t] !== 0);
    row.advantages.forEach((advantage, t) => {
      objectiveChange += advantage * deltas[t];
      if (advantage > 0) changes.positive.push(deltas[t]);
      if (advantage < 0) changes.negative.push(deltas[t]);
    });
    const advantage = row.advantages.find((value) => value !== 0) ?? 0;
    return { advantage, meanChange: mean(scored) };
  });
  return {
    objectiveChange,
    meanChangeWherePositive: mean(changes.positive),
    meanChangeWhereNegative: mean(changes.negative),
    rows: perRow,
  };
}

const mean = (values) => (values.length ? values.reduce((sum, value) => sum + value, 0) / values.length : 0);

/** Largest absolute difference between two lists of per-row logprob arrays. */
export function maxAbsDifference(left, right) {
  let largest = 0;
  left.forEach((row, index) => {
    row.forEach((value, t) => {
      largest = Math.max(largest, Math.abs(value - right[index][t]));
    });
  });
  return largest;
}
