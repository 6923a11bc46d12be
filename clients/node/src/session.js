// A learner training session as a client holds it: the session id and the next seq_id.
//
// Training RPCs carry a per-session seq_id starting at 1, and the learner runs them strictly in that
// order; a rejected request still uses up its id. Keeping the counter here, next to the calls, means
// no caller can skip or reuse an id by accident.

import { decodeOutputLogprobs } from './batch.js';

export class LearnerSession {
  constructor(learner, sessionId, info) {
    this.learner = learner;
    this.sessionId = sessionId;
    /** ModelInfo at creation: vocab_size, max_context_length, step, ... */
    this.info = info;
    this.lastSeqId = 0;
  }

  /** CreateSession (lora_rank is always 0: Anvil trains full parameters). */
  static async create(learner, { baseModel, seed = 0 }) {
    const reply = await learner.CreateSession({ base_model: baseModel, lora_rank: 0, seed });
    return new LearnerSession(learner, reply.session_id, reply.info);
  }

  nextSeqId() {
    this.lastSeqId += 1;
    return this.lastSeqId;
  }

  /** Forward (no gradients): {logprobs: one number[] per datum, metrics}. */
  forward(batchBytes, lossFn, lossFnConfig = {}) {
    return this.#lossCall('Forward', batchBytes, lossFn, lossFnConfig);
  }

  /** ForwardBackward: like forward, and adds the loss's gradient to the accumulated gradients. */
  forwardBackward(batchBytes, lossFn, lossFnConfig = {}) {
    return this.#lossCall('ForwardBackward', batchBytes, lossFn, lossFnConfig);
  }

  /** OptimStep with AdamParams ({learning_rate, ...}); resolves to {step, metrics}. */
  optimStep(adamParams) {
    return this.learner.OptimStep({ session_id: this.sessionId, seq_id: this.nextSeqId(), adam_params: adamParams });
  }

  /** PublishWeights to rollout addresses; version 0 means "the current step". Resolves to {version, num_bytes, ...}. */
  publishWeights(rolloutAddresses, { version = 0, transport = 'stream' } = {}) {
    return this.learner.PublishWeights({
      session_id: this.sessionId,
      seq_id: this.nextSeqId(),
      targets: rolloutAddresses.map((address) => ({ address })),
      transport,
      version,
    });
  }

  /** The session's ModelInfo now (step included). */
  async describe() {
    return (await this.learner.GetInfo({ session_id: this.sessionId })).info;
  }

  close() {
    return this.learner.CloseSession({ session_id: this.sessionId });
  }

  async #lossCall(rpc, batchBytes, lossFn, lossFnConfig) {
    const reply = await this.learner[rpc]({
      session_id: this.sessionId,
      seq_id: this.nextSeqId(),
      batch: { arrow_ipc_stream: batchBytes },
      loss_fn: lossFn,
      loss_fn_config: lossFnConfig,
    });
    const logprobs = decodeOutputLogprobs(reply.outputs.arrow_ipc_stream).map((row) => Array.from(row));
    return { logprobs, metrics: reply.metrics };
  }
}
