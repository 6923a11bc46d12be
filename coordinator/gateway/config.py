"""GatewayConfig: `anvil serve`'s one typed config (TOML file + `--set` overrides)."""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from coordinator.cluster.config import ClusterConfig
from coordinator.config import ServicesConfig
from coordinator.models import model_name_of, same_model
from protos.errors import InvalidArgument

API_KEYS_ENV = "ANVIL_TINKER_API_KEYS"


class SamplingModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    model: str
    """A built-in name or a Hugging Face directory; clients sample it by this name."""
    rollout_addresses: list[str] = Field(default_factory=list)
    """Running rollout replicas serving it (host:port); empty starts `replicas` of them on loopback, with
    the engine settings of `services.rollout_engine`."""
    replicas: int = Field(default=1, ge=1)
    """How many replicas to start when no addresses are given."""


class GatewayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    host: str = "127.0.0.1"
    """Interface the REST API listens on ("0.0.0.0" for every interface)."""
    port: int = Field(default=8000, ge=0, le=65535)
    """TCP port; 0 picks a free one (printed as `LISTENING host:port`)."""
    api_keys: list[str] = Field(default_factory=list)
    """Accepted `X-API-Key` values; empty (and no $ANVIL_TINKER_API_KEYS, no `api_keys_file`) turns auth
    off. Each key is a tenant that sees only its own sessions, runs, checkpoints, samplers and jobs. The
    tinker SDK only sends keys that start with `tml-`."""
    api_keys_file: Path | None = None
    """A file of more accepted keys, one per line ('#' comments), so keys need not sit in a config."""
    tls_cert: Path | None = None
    """PEM certificate chain: the REST API is served over HTTPS only (gRPC services: protos.tls)."""
    tls_key: Path | None = None
    """PEM private key of `tls_cert`."""
    tls_client_ca: Path | None = None
    """With it, HTTPS clients must present a certificate signed by this CA (mutual TLS)."""
    model: str = "anvil-tiny"
    """The base model served: a built-in name or a Hugging Face directory. `create_model` takes this name."""
    sampling_models: list[SamplingModelConfig] = Field(default_factory=list)
    """Sampling-only base models served beside `model` (a teacher, a grader): sampled by name, never
    trained (coordinator.gateway.sampling_models)."""
    services: ServicesConfig = Field(default_factory=ServicesConfig)
    """Learner and rollout services: addresses of running ones, or how to start them on loopback."""
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    """Which machines the services this gateway starts are placed on: this one, or a Ray cluster's nodes."""
    lora_max_rank: int = Field(default=0, ge=0)
    """0: training clients are full-parameter only (a LoRA rank is refused, as Anvil's default). > 0: opt in
    to LoRA: `create_lora_training_client` with a rank up to this trains a PEFT adapter on the frozen base
    (the learner started here gets allow_lora; vLLM replicas started here serve adapters up to this rank,
    so use one of vLLM's sizes: 8, 16, 32, 64, ...). Service-mode trainer jobs stay full-parameter."""
    learner_max_sessions: int = Field(default=4, ge=1)
    """Training clients open at once on a learner this gateway starts (each holds a model and AdamW)."""
    state_dir: Path = Path("runs/serve")
    """Training-run and checkpoint records, and the checkpoints of a learner this gateway starts."""
    session_timeout_s: float = Field(default=120.0, gt=0)
    """A session without a heartbeat for this long is closed (the SDK sends one every 10 s)."""
    long_poll_s: float = Field(default=20.0, gt=0)
    """How long retrieve_future holds a poll before answering try_again (the SDK waits up to 45 s)."""
    sequence_gap_timeout_s: float = Field(default=300.0, gt=0)
    """How long a training request waits for a missing earlier seq_id before that one is declared lost."""
    max_request_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    """Largest request body accepted; a larger one is refused with 413 before it is read."""
    fwdbwd_max_chunk_len: int = Field(default=1024, ge=1)
    """Datums per forward_backward request the SDK sends (it splits larger calls into chunks)."""
    default_max_tokens: int = Field(default=512, ge=1)
    """Completion cap when a sample request leaves max_tokens unset (never past the model's context)."""
    sampler_snapshots_kept: int = Field(default=4, ge=1)
    """Unnamed sampler snapshots (save_weights_and_get_sampling_client) kept per training client: the most
    recently *used* ones (made or sampled from), so a reference or teacher snapshot sampled at least once
    between every `sampler_snapshots_kept` new snapshots stays however many follow; the least recently
    used beyond this are deleted, and their sampling clients answer NOT_FOUND."""
    durable_state_every_steps: int = Field(default=1, ge=1)
    """A training client's state (weights and AdamW) is saved in the background after every this many
    optim_steps, so a restart of `anvil serve` restores it: from the newest such state plus a replay of
    the requests after it (more steps between saves: less disk traffic, a longer replay)."""
    dialect: Literal["tinker", "fireworks"] = "tinker"
    """Which Tinker client `/api/v1` answers. `tinker`: the official SDK (0.38), checkpoint paths are
    `tinker://` paths. `fireworks`: the Tinker 0.23 fork inside Fireworks' training SDK, which refuses
    `tinker://` paths, so save_state and load_state answer bare checkpoint names. Service mode sets
    `fireworks` on the gateway of every RLOR trainer job it creates (only Fireworks' SDK reaches those);
    set it here only to point Fireworks' `FiretitanServiceClient` at this server's own `/api/v1`. Both
    dialects accept either form as input."""

    def uvicorn_tls(self) -> dict[str, Any]:
        """uvicorn's TLS settings for `tls_*` ({} for plain HTTP); a half-given pair is a config error."""
        if self.tls_cert is None and self.tls_key is None:
            if self.tls_client_ca is not None:
                raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key too")
            return {}
        if self.tls_cert is None or self.tls_key is None:
            raise ValueError("HTTPS needs both tls_cert and tls_key")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name} {path} is not a readable file")
        settings: dict[str, Any] = {"ssl_certfile": str(self.tls_cert), "ssl_keyfile": str(self.tls_key)}
        if self.tls_client_ca is not None:
            settings |= {"ssl_ca_certs": str(self.tls_client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
        return settings

    def resolved_api_keys(self) -> list[str]:
        """Every accepted key: `api_keys`, $ANVIL_TINKER_API_KEYS (comma-separated) and `api_keys_file`."""
        from_env = [key.strip() for key in os.environ.get(API_KEYS_ENV, "").split(",") if key.strip()]
        from_file = []
        if self.api_keys_file is not None:
            try:
                lines = self.api_keys_file.read_text().splitlines()
            except OSError as exc:
                raise ValueError(f"api_keys_file {self.api_keys_file} cannot be read: {exc.strerror}") from None
            from_file = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        return [*self.api_keys, *from_env, *from_file]

    def check_base_model(self, base_model: str | None, model_dir: Path) -> str:
        """The served model's name for a request's `base_model` (unset, or any form coordinator.models
        accepts: the name, `accounts/<account>/models/<name>`, its directory);
        InvalidArgument for any other model: one gateway trains one base model."""
        if base_model and not same_model(base_model, self.model, model_dir):
            extra = next(
                (m.model for m in self.sampling_models if model_name_of(m.model) == model_name_of(base_model)), None
            )
            if extra is not None:
                raise InvalidArgument(
                    f"{extra!r} is a sampling-only model on this server (sampling_models): sample it with "
                    f"create_sampling_client(base_model={extra!r}); the model trained here is {self.model!r}"
                )
            raise InvalidArgument(
                f"base_model {base_model!r} is not served here; this server serves {self.model!r} "
                f"(also accepted as accounts/<account>/models/{model_name_of(self.model)})"
            )
        return self.model
