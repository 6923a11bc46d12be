// From sampled completions to training rows, the way a Tinker-style RL loop does it.
//
// A prompt of P tokens and a completion of C tokens make one datum: the model reads
// prompt + completion[:-1] (N = P + C - 1 tokens) and position i predicts token i + 1. Only the
// completion positions carry the sampler's logprobs and the advantage; prompt positions get
// logprob 0 and advantage 0, so they add nothing to an importance_sampling loss.

/** Centre a group's rewards on their mean: the advantage of each sample within its group. */
export function groupAdvantages(rewards) {
  const mean = rewards.reduce((sum, reward) => sum + reward, 0) / rewards.length;
  return rewards.map((reward) => reward - mean);
}

/** One training row (column -> values) for a sampled `sequence` ({tokens, logprobs}) of `promptTokens`. */
export function trajectoryRow({ promptTokens, sequence, advantage, reward, samplerVersion, groupId }) {
  const tokens = [...promptTokens, ...sequence.tokens];
  const promptTargets = promptTokens.length - 1;
  return {
    model_input: tokens.slice(0, -1),
    target_tokens: tokens.slice(1),
    logprobs: [...new Array(promptTargets).fill(0), ...sequence.logprobs],
    advantages: [...new Array(promptTargets).fill(0), ...new Array(sequence.tokens.length).fill(advantage)],
    sampler_version: samplerVersion,
    group_id: groupId,
    reward,
  };
}

/**
 * A stand-in environment, computed here in JavaScript: the share of even token ids in a completion.
 * Any deterministic score works; what matters is that the learner moves toward what it rewards.
 */
export function evenTokenReward(tokens) {
  return tokens.length === 0 ? 0 : tokens.filter((token) => token % 2 === 0).length / tokens.length;
}
