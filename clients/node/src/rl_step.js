#!/usr/bin/env node
// One RL step over anvil.v1, driven entirely from JavaScript:
//
//   Sample (rollout, version v) -> reward and group advantages in JS -> Arrow batch built in JS ->
//   Forward (logprobs before) -> ForwardBackward(importance_sampling) -> OptimStep -> PublishWeights
//   -> Forward (logprobs after) -> Sample again (the rollout now serves the published version)
//
// and the contract's edges: calls without the API key get UNAUTHENTICATED; batches with a wrong
// column type or ragged columns get INVALID_ARGUMENT naming the column, and the learner keeps
// serving unchanged. Every check throws on failure, so the exit code is the verdict; --report writes
// what was measured as JSON (tests/clients/test_node_client.py recomputes it independently).
//
//   node src/rl_step.js --learner 127.0.0.1:50051 --rollout 127.0.0.1:50052 --api-key KEY \
//       [--report report.json] [--batch-out batch.arrows]

import { writeFileSync } from 'node:fs';
import { parseArgs } from 'node:util';

import { Float64, Int64 } from 'apache-arrow';

import { describeSchema, encodeBatch, listOf } from './batch.js';
import { check, expectStatus, logprobShift, maxAbsDifference } from './checks.js';
import { connect } from './client.js';
import { loadAnvilV1 } from './contract.js';
import { LearnerSession } from './session.js';
import { evenTokenReward, groupAdvantages, trajectoryRow } from './trajectory.js';

const OPTIONS = {
  learner: { type: 'string' },
  rollout: { type: 'string' },
  'api-key': { type: 'string' },
  'base-model': { type: 'string', default: 'anvil-tiny' },
  prompt: { type: 'string', default: '4,295,289,226,22,23,16,28,36,2,5' },
  samples: { type: 'string', default: '4' },
  'max-tokens': { type: 'string', default: '8' },
  'learning-rate': { type: 'string', default: '0.001' },
  seed: { type: 'string', default: '7' },
  report: { type: 'string' },
  'batch-out': { type: 'string' },
};

const LOSS = 'importance_sampling';

async function main() {
  const { values: args } = parseArgs({ options: OPTIONS });
  const apiKey = args['api-key'] ?? process.env.ANVIL_API_KEY;
  check(args.learner && args.rollout, 'pass --learner HOST:PORT and --rollout HOST:PORT');
  check(apiKey, 'pass --api-key KEY (or set ANVIL_API_KEY): this script checks auth too');
  const anvil = loadAnvilV1();
  const report = { learner: args.learner, rollout: args.rollout, loss_fn: LOSS };

  report.auth = await checkAuthIsRequired(anvil, args, apiKey);
  const learner = connect(anvil.LearnerService, args.learner, { apiKey });
  const rollout = connect(anvil.RolloutService, args.rollout, { apiKey });
  let session = null;
  try {
    session = await LearnerSession.create(learner, { baseModel: args['base-model'], seed: Number(args.seed) });
    report.session_id = session.sessionId;
    const served = await rollout.GetInfo({});
    report.version_before = served.weight_version;
    report.prompt_tokens = sampleRequest(args).prompt_tokens;

    const rows = await sampleGroup(rollout, args, served);
    const batch = encodeBatch(rows);
    Object.assign(report, { rows, batch_schema: describeSchema(batch) });
    if (args['batch-out']) writeFileSync(args['batch-out'], batch);

    const step = await trainAndPublish(session, batch, args, served.weight_version);
    Object.assign(report, step);
    report.shift = checkLogprobsFollowTheAdvantages(rows, step.logprobs_before, step.logprobs_after);

    const resampled = await rollout.Sample(sampleRequest(args));
    report.version_after = resampled.weight_version;
    check(
      resampled.weight_version === step.publish.version && resampled.weight_version > report.version_before,
      `rollout samples from version ${resampled.weight_version}; expected the published ${step.publish.version}`,
    );

    report.rejections = await checkBadBatchesAreRejected(session, rows);
    report.step_after_rejections = await checkLearnerUnchanged(session, batch, step);
  } finally {
    if (session !== null) await session.close(); // frees the learner's model and optimizer
    learner.close();
    rollout.close();
  }
  if (args.report) writeFileSync(args.report, JSON.stringify(report, null, 1));
  printSummary(report);
}

async function checkAuthIsRequired(anvil, args, apiKey) {
  // GetInfo of an unknown session: NOT_FOUND if auth were off, so UNAUTHENTICATED proves the key is checked.
  const probe = { session_id: 'no-such-session' };
  const withoutKey = connect(anvil.LearnerService, args.learner);
  const wrongKey = connect(anvil.LearnerService, args.learner, { apiKey: `${apiKey}-wrong` });
  const rolloutWithoutKey = connect(anvil.RolloutService, args.rollout);
  try {
    return {
      learner_without_key: await expectStatus(withoutKey.GetInfo(probe), 'UNAUTHENTICATED', 'learner, no key'),
      learner_wrong_key: await expectStatus(wrongKey.GetInfo(probe), 'UNAUTHENTICATED', 'learner, wrong key'),
      rollout_without_key: await expectStatus(rolloutWithoutKey.GetInfo({}), 'UNAUTHENTICATED', 'rollout, no key'),
    };
  } finally {
    [withoutKey, wrongKey, rolloutWithoutKey].forEach((client) => client.close());
  }
}

function sampleRequest(args) {
  return {
    prompt_tokens: args.prompt.split(',').map(Number),
    num_samples: Number(args.samples),
    sampling_params: { max_tokens: Number(args['max-tokens']), seed: Number(args.seed), temperature: 1 },
  };
}

/** Sample a group, score it in JS, and turn it into training rows with group-centred advantages. */
async function sampleGroup(rollout, args, served) {
  const request = sampleRequest(args);
  check(
    request.prompt_tokens.every((token) => token >= 0 && token < served.vocab_size),
    `--prompt token ids must be in [0, ${served.vocab_size})`,
  );
  const reply = await rollout.Sample(request);
  check(reply.weight_version === served.weight_version, 'Sample answered from an unexpected weight version');
  const rewards = reply.sequences.map((sequence) => evenTokenReward(sequence.tokens));
  const advantages = groupAdvantages(rewards);
  check(
    advantages.some((advantage) => advantage > 0) && advantages.some((advantage) => advantage < 0),
    `all ${rewards.length} samples got the same reward ${rewards[0]}: nothing to learn (try another --seed)`,
  );
  return reply.sequences.map((sequence, index) =>
    trajectoryRow({
      promptTokens: request.prompt_tokens,
      sequence,
      advantage: advantages[index],
      reward: rewards[index],
      samplerVersion: reply.weight_version,
      groupId: 0,
    }),
  );
}

/** Forward -> ForwardBackward -> OptimStep -> PublishWeights -> Forward, checking each answer. */
async function trainAndPublish(session, batch, args, servedVersion) {
  const before = await session.forward(batch, LOSS);
  const trained = await session.forwardBackward(batch, LOSS);
  check(maxAbsDifference(before.logprobs, trained.logprobs) < 1e-5, 'Forward and ForwardBackward saw other weights');
  const stepped = await session.optimStep({ learning_rate: Number(args['learning-rate']) });
  const expectedStep = session.info.step + 1;
  check(stepped.step === expectedStep, `OptimStep returned step ${stepped.step}, expected ${expectedStep}`);
  // The version is the step, unless the rollout already serves a newer one (another session
  // published to it): versions there must keep increasing.
  const version = Math.max(stepped.step, servedVersion + 1);
  const published = await session.publishWeights([args.rollout], { version });
  check(published.version === version, `published version ${published.version}, asked for ${version}`);
  const after = await session.forward(batch, LOSS);
  return {
    logprobs_before: before.logprobs,
    logprobs_after: after.logprobs,
    forward_backward_metrics: trained.metrics,
    optim_step: { step: stepped.step, metrics: stepped.metrics },
    publish: { version: published.version, num_bytes: published.num_bytes },
  };
}

function checkLogprobsFollowTheAdvantages(rows, before, after) {
  const shift = logprobShift(rows, before, after);
  check(
    shift.objectiveChange > 0,
    `sum of A * (logprob after - before) is ${shift.objectiveChange}; the step moved against the advantages`,
  );
  check(
    shift.meanChangeWherePositive > shift.meanChangeWhereNegative,
    `tokens with a positive advantage moved by ${shift.meanChangeWherePositive} on average, those with a ` +
      `negative one by ${shift.meanChangeWhereNegative}: the rewarded tokens did not gain on the penalised ones`,
  );
  return shift;
}

/** ForwardBackward with malformed batches built in JS: INVALID_ARGUMENT, naming the column. */
async function checkBadBatchesAreRejected(session, rows) {
  const ragged = rows.map((row, index) => (index === 1 ? { ...row, advantages: row.advantages.slice(1) } : row));
  const cases = [
    {
      name: 'advantages as list<float64>',
      column: 'advantages',
      bytes: encodeBatch(rows, { advantages: () => listOf(new Float64()) }),
    },
    {
      name: 'model_input as list<int64>',
      column: 'model_input',
      bytes: encodeBatch(rows, { model_input: () => listOf(new Int64()) }),
    },
    { name: 'ragged advantages in row 1', column: 'advantages', bytes: encodeBatch(ragged) },
  ];
  const results = [];
  for (const { name, column, bytes } of cases) {
    const outcome = await expectStatus(session.forwardBackward(bytes, LOSS), 'INVALID_ARGUMENT', name);
    check(outcome.details.includes(`'${column}'`), `${name}: the message does not name ${column}: ${outcome.details}`);
    results.push({ case: name, column, ...outcome });
  }
  return results;
}

/** After the rejections the learner still serves, with the same weights and step. */
async function checkLearnerUnchanged(session, batch, step) {
  const still = await session.forward(batch, LOSS);
  const drift = maxAbsDifference(still.logprobs, step.logprobs_after);
  check(drift < 1e-6, `rejected batches changed the model: logprobs moved by ${drift}`);
  const { step: stepNow } = await session.describe();
  check(stepNow === step.optim_step.step, `rejected batches changed the step to ${stepNow}`);
  return stepNow;
}

function printSummary(report) {
  const { shift } = report;
  const perRow = shift.rows.map((row) => `${row.advantage.toFixed(3)}:${row.meanChange.toExponential(2)}`);
  const lines = [
    `auth: no key -> ${report.auth.learner_without_key.status}, wrong key -> ${report.auth.learner_wrong_key.status}`,
    `sampled ${report.rows.length} completions at version ${report.version_before}`,
    `batch schema: ${report.batch_schema.join(', ')}`,
    `ForwardBackward(${report.loss_fn}) loss:sum=${report.forward_backward_metrics['loss:sum']}`,
    `OptimStep -> step ${report.optim_step.step}; PublishWeights -> version ${report.publish.version} ` +
      `(${report.publish.num_bytes} bytes)`,
    `sum A*(logprob after - before) = ${shift.objectiveChange.toExponential(3)}`,
    `mean logprob change where A > 0: ${shift.meanChangeWherePositive.toExponential(3)}, ` +
      `where A < 0: ${shift.meanChangeWhereNegative.toExponential(3)}`,
    `per row, advantage:mean logprob change = ${perRow.join(' ')}`,
    `rollout now samples from version ${report.version_after}`,
    ...report.rejections.map((rejection) => `rejected (${rejection.case}): ${rejection.status}: ${rejection.details}`),
    `learner still serving: step ${report.step_after_rejections}, logprobs unchanged`,
    'OK',
  ];
  console.log(lines.join('\n'));
}

main().catch((error) => {
  console.error(`FAILED: ${error.stack ?? error}`);
  process.exitCode = 1;
});
