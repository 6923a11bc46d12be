"""The JSON bodies of Tinker's `/api/v1` routes as pydantic models, and the one function that checks one.

Every field the gateway reads from a body is declared here with its type, so a malformed field is an
InvalidArgument naming it (`seq_id must be an integer, got 'abc'`) instead of a ValueError or
AttributeError deep in a handler (a 500, or a future failed with category `server`). Where the check runs
decides how the caller sees it: the fields that say *which* request this is (session, model, seq_id) are
checked by the route, so a bad one is a 400; the rest of a training or sampling request is checked
inside its future, so a bad datum fails that future with category `user` and the client's seq_id
sequence does not stall on a request the gateway never queued. Fields the gateway does not read are
allowed and ignored (the SDKs send more than Anvil uses).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protos.errors import InvalidArgument

B = TypeVar("B", bound=BaseModel)
Token = Annotated[int, Field(ge=0, lt=2**31)]

_PHRASES = {
    "int_parsing": "must be an integer",
    "int_type": "must be an integer",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "string_type": "must be a string",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "list_type": "must be a list",
}
_UNION_TAGS = {"str", "int", "float", "bool", "none"}
"""Location parts pydantic adds for the members of a union; they are types, not fields."""


class Body(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


# --- routing fields: checked by the route (a bad one is a 4xx) ----------------------------------------


class SessionRef(Body):
    session_id: str


class ModelRef(Body):
    model_id: str


class Sequenced(ModelRef):
    seq_id: int


class NewModel(SessionRef):
    model_seq_id: int


class NewSampler(SessionRef):
    """create_sampling_session (answered at once, so all of it is checked by the route)."""

    sampling_session_seq_id: int
    base_model: str | None = None
    model_path: str | None = None


class FutureRef(Body):
    request_id: str


class CheckpointRef(Body):
    tinker_path: str


class NewSession(Body):
    user_metadata: dict[str, Any] | None = None


class ForwardEnvelope(Sequenced):
    """The JSON forward / forward_backward body without its input (checked in its future)."""

    forward_input: dict[str, Any] | None = None
    forward_backward_input: dict[str, Any] | None = None


class SampleEnvelope(Body):
    sampling_session_id: str
    seq_id: int = 0
    num_samples: int = Field(default=1, ge=1)
    record_stability_info: bool | None = None
    """Tinker's StableReinforce bookkeeping: refused at once (coordinator/gateway/sampling.py)."""


# --- payloads: checked inside the request's future (a bad one fails it with category `user`) ----------


class TextChunk(Body):
    type: str = "encoded_text"
    tokens: list[Token] = Field(default_factory=list)


class ModelInput(Body):
    chunks: list[TextChunk] = Field(default_factory=list)


class TensorJson(Body):
    data: list[Any] = Field(default_factory=list)
    dtype: str
    shape: list[int] | None = None


class DatumJson(Body):
    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorJson] = Field(default_factory=dict)


class ForwardInput(Body):
    data: list[DatumJson] = Field(default_factory=list)
    loss_fn: str = ""
    loss_fn_config: dict[str, Any] | None = None


class LoraConfig(Body):
    rank: int = 0
    seed: int | None = None
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True
    alpha: float | None = None


class OptimizerConfig(Body):
    type: str = "adamw"


class ModelSettings(Body):
    """create_model and create-from-state (load_weights with a session_id)."""

    base_model: str | None = None
    lora_config: LoraConfig | None = None
    optimizer_config: OptimizerConfig | None = None
    user_metadata: dict[str, Any] | None = None
    path: str = ""
    optimizer: bool = False


class OptimStep(Body):
    adam_params: dict[str, Any] | None = None
    optimizer_params: Any = None
    grad_accumulation_normalization: str | None = None


class SaveWeights(Body):
    """save_weights, load_weights and save_weights_for_sampler."""

    path: str | None = None
    overwrite: bool = False
    optimizer: bool = False
    checkpoint_type: str | None = None
    sampling_session_seq_id: int | None = None
    ttl_seconds: int | None = None
    user_metadata: dict[str, str] | None = None


class SaveWeightsExternal(Body):
    path: str = Field(min_length=1)
    ttl_seconds: int | None = None
    age_encryption_recipients: list[str] | None = None


class CopyWeights(Body):
    source_path: str
    session_id: str | None = None
    model_seq_id: int | None = Field(default=None, ge=0)
    destination_project_id: str | None = None
    ttl_seconds: int | None = None
    weights_access_token: str | None = None


class CheckpointTtl(Body):
    ttl_seconds: int | None


class SamplingParams(Body):
    """Ranges are the wire's (anvil.v1.SamplingParams), so a value the proto cannot hold is named here."""

    max_tokens: int | None = Field(default=None, ge=0, lt=2**31)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | list[Token] | None = None
    temperature: float | None = Field(default=None, ge=0)
    top_k: int | None = Field(default=None, ge=-1, lt=2**31)
    top_p: float | None = Field(default=None, gt=0, le=1)


class Sample(SampleEnvelope):
    prompt: ModelInput
    sampling_params: SamplingParams | None = None
    prompt_logprobs: bool | None = None
    prompt_logprobs_last_n: int | None = Field(default=None, ge=0)
    topk_prompt_logprobs: int | None = None
    topk_sample_logprobs: int | None = None
    prompt_alt_tokens_k: int | None = None
    target_prompt_logprobs: Any = None


def parse(model: type[B], body: Any, where: str = "") -> B:
    """`body` checked as `model`; InvalidArgument naming the bad field(s) (`where` prefixes the names)."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise InvalidArgument(describe(exc.errors(), where)) from None


def describe(errors: list[Any], where: str = "") -> str:
    """One sentence per bad field (at most three): `<field> must be <what>, got <value>`."""
    grouped: dict[str, list[Any]] = {}
    for error in errors:
        grouped.setdefault(_location(where, error["loc"]), []).append(error)
    return "; ".join(_sentence(name, group) for name, group in list(grouped.items())[:3])


def _location(where: str, loc: tuple[Any, ...]) -> str:
    name = where
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part not in _UNION_TAGS and "[" not in str(part):
            name += f".{part}" if name else str(part)
    return name or "the body"


def _sentence(name: str, errors: list[Any]) -> str:
    if errors[0]["type"] == "missing":
        return f"the request needs {name!r}"
    phrases = []
    for error in errors:
        phrase = _PHRASES.get(error["type"]) or "must be " + error["msg"].removeprefix("Input should be ").lower()
        phrase = phrase.removeprefix("must be ") if phrases else phrase
        if phrase not in phrases:
            phrases.append(phrase)
    shown = repr(errors[0].get("input"))
    return f"{name} {' or '.join(phrases)}, got {shown if len(shown) <= 80 else shown[:77] + '...'}"


def json_object(raw: bytes) -> dict[str, Any]:
    """`raw` as a JSON object ({} when empty); InvalidArgument otherwise."""
    try:
        body = json.loads(raw or b"{}")
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        raise InvalidArgument(f"the body is not JSON ({exc}); send a JSON object") from None
    if not isinstance(body, dict):
        raise InvalidArgument("the body must be a JSON object")
    return body
