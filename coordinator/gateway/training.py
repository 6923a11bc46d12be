"""The sequenced operations of one training client, each a learner call: forward / forward_backward,
optim_step, save_state (`save_weights`), load_state (`load_weights`) and save_weights_external (a
Hugging Face model directory to download, through URLs coordinator.gateway.external_weights signs).

They run through the client's OrderedExecutor (seq_id order, exactly once), so they see one consistent
model. Two things here are Fireworks' additions to Tinker: optim_step's `grad_accumulation_normalization`
(gradients accumulated since the last step are divided by the loss tokens or sequences counted here, in
the learner, before clipping) and, in the `fireworks` dialect, bare checkpoint names in the answers of
save_state and load_state (its SDK refuses `tinker://` paths).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from coordinator.gateway.bodies import OptimStep, SaveWeights, SaveWeightsExternal, parse
from coordinator.gateway.checkpoints import CheckpointStore
from coordinator.gateway.results import ForwardResult
from coordinator.gateway.sessions import TrainingModel
from coordinator.gateway.wire import ForwardCall, numeric_loss_config
from protos.adam import WIRE_FIELDS, adam_params
from protos.errors import AlreadyExists, InvalidArgument

UNSUPPORTED_LOSSES = {
    "stable_reinforce": "loss_fn 'stable_reinforce' is Tinker's proprietary loss (its maths is unpublished) and "
    "Anvil does not implement it; use loss_fn='importance_sampling' (or ppo, cispo, gspo)",
    "custom": "server-side custom losses are off on this server; call forward_backward_custom, which runs "
    "your loss on the client",
}


def _token_weights(row: dict[str, Any]) -> np.ndarray:
    """The per-token weights that make a token count as a loss token (weights, else advantages)."""
    for key in ("weights", "advantages"):
        if key in row:
            return np.asarray(row[key])
    return np.ones(len(row["target_tokens"]))


class TrainingOps:
    def __init__(self, checkpoints: CheckpointStore, bare_checkpoint_names: bool) -> None:
        self.checkpoints = checkpoints
        self.bare_checkpoint_names = bare_checkpoint_names
        """Answer save_state / load_state with the checkpoint's name, not its tinker:// path (Fireworks)."""

    async def forward(self, model: TrainingModel, request: ForwardCall) -> ForwardResult:
        if request.loss_fn in UNSUPPORTED_LOSSES:
            raise InvalidArgument(UNSUPPORTED_LOSSES[request.loss_fn])
        rows, shapes = request.rows()
        config = numeric_loss_config(request.loss_fn_config)
        logprobs, metrics, output_type = await model.learner.forward_rows(
            rows, request.loss_fn, config, backward=not request.forward_only
        )
        if not request.forward_only:
            model.loss_sequences += len(rows)
            model.loss_tokens += sum(int(np.count_nonzero(_token_weights(row))) for row in rows)
        return ForwardResult(logprobs, shapes, metrics, output_type)

    async def optim_step(self, model: TrainingModel, body: dict[str, Any]) -> dict[str, Any]:
        request = parse(OptimStep, body)
        if request.optimizer_params:
            raise InvalidArgument("only Adam is available; pass adam_params (AdamParams)")
        given = dict(request.adam_params or {})
        given.pop("emit_grad_norm_metrics", None)  # Fireworks: grad_norm:mean is always reported
        unknown = sorted(set(given) - set(WIRE_FIELDS))
        if unknown:
            raise InvalidArgument(f"adam_params has unknown field(s) {unknown}; allowed: {sorted(WIRE_FIELDS)}")
        mode = request.grad_accumulation_normalization or "none"
        counts = {"none": 0, "num_loss_tokens": model.loss_tokens, "num_sequences": model.loss_sequences}
        if mode not in counts:
            raise InvalidArgument(f"grad_accumulation_normalization {mode!r}; choose one of {sorted(counts)}")
        scale = 1.0 / counts[mode] if counts[mode] else 1.0
        reply = await model.learner.optim_step(adam_params(**given, grad_scale=scale))
        model.loss_tokens = model.loss_sequences = 0
        return {"metrics": dict(reply.metrics), "type": "optim_step"}

    async def save_state(self, model: TrainingModel, body: dict[str, Any]) -> dict[str, Any]:
        request = parse(SaveWeights, body)
        name = request.path or ""
        self.checkpoints.expiry(request.ttl_seconds)  # a bad TTL is refused before the learner writes
        try:
            reply = await model.learner.save_state(name, overwrite=request.overwrite)
        except AlreadyExists:  # the learner's message names its directory; the client knows the name
            raise AlreadyExists(
                f"checkpoint {name!r} of this training run already exists; choose another name or pass overwrite=true"
            ) from None
        record = self.checkpoints.add(
            model.model_id, "weights", name, reply.path, model.base_model, model.owner,
            request.ttl_seconds, request.user_metadata,
        )  # fmt: skip
        return {"path": name if self.bare_checkpoint_names else record.path, "type": "save_weights"}

    async def save_external(self, model: TrainingModel, body: dict[str, Any]) -> dict[str, Any]:
        """`save_weights_external`: the model's weights as a Hugging Face directory (config, tokenizer,
        safetensors), downloadable file by file through signed URLs (get_external_weights_urls)."""
        request = parse(SaveWeightsExternal, body)
        if request.age_encryption_recipients:
            raise InvalidArgument(
                "age encryption of exported weights is not offered by this server; omit age_encryption_recipients "
                "(downloads are served by the gateway itself, over its own TLS when configured)"
            )
        self.checkpoints.expiry(request.ttl_seconds)
        try:
            reply = await model.learner.save_weights(f"external-{request.path}")
        except AlreadyExists:
            raise AlreadyExists(
                f"external weights {request.path!r} of this training run already exist; choose another name"
            ) from None
        record = self.checkpoints.add(
            model.model_id, "external_weights", request.path, reply.path, model.base_model, model.owner,
            request.ttl_seconds,
        )  # fmt: skip
        return {"path": record.path, "size_bytes": record.size_bytes, "type": "save_weights_external"}

    async def load(self, model: TrainingModel, body: dict[str, Any]) -> dict[str, Any]:
        """`load_weights` into an existing training client."""
        request = parse(SaveWeights, body)
        if not request.path:
            raise InvalidArgument("the request needs 'path': a tinker://…/weights/… path or a checkpoint name")
        return await self.load_state(model, request.path, request.optimizer)

    async def load_state(self, model: TrainingModel, path: str, with_optimizer: bool) -> dict[str, Any]:
        path = self.checkpoints.resolve_state(path, model.model_id)
        record = self.checkpoints.get(path)
        if record.kind != "weights":
            raise InvalidArgument(
                f"{path} holds sampler weights only; load a training state saved by save_state (tinker://…/weights/…)"
            )
        await model.learner.load_state(record.local_path, with_optimizer=with_optimizer)
        model.loss_tokens = model.loss_sequences = 0
        answered = record.name if self.bare_checkpoint_names else path
        return {"path": answered, "model_id": model.model_id, "type": "load_weights"}
