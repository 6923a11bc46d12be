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
 * How a learner step moved the batch's logprobs: per row, the advantage-weighted change
 * sum_t A_t * (after_t - before_t), and the mean change over the positions that carry an advantage.
 * An importance_sampling step ascends sum_t A_t * ratio_t, so the total must be positive, and each
 * row with a positive (negative) advantage must become more (less) likely.
 */
export function logprobShift(rows, before, after) {
  return rows.map((row, index) => {
    let weighted = 0;
    let changed = 0;
    let counted = 0;
    row.advantages.forEach((advantage, t) => {
      const delta = after[index][t] - before[index][t];
      weighted += advantage * delta;
      if (advantage !== 0) {
        changed += delta;
        counted += 1;
      }
    });
    const advantage = row.advantages.find((value) => value !== 0) ?? 0;
    return { advantage, weightedChange: weighted, meanChange: counted ? changed / counted : 0 };
  });
}

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
