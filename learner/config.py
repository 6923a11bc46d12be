"""LearnerConfig: the learner process's one typed config (TOML file + `--set` overrides)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from protos.rpc import ServerConfig


class TorchBackendConfig(BaseModel):
    """The plain-PyTorch backend: one device, float32 parameters (bf16 autocast on CUDA)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    type: Literal["torch"] = "torch"
    """Backend selector."""
    device: str = "auto"
    """"auto" (CUDA when present, else CPU), "cpu", or a torch device string such as "cuda:1"."""


class LearnerConfig(BaseModel):
    """Everything the learner process needs; every field has a default so a bare `python -m learner` runs."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    server: ServerConfig = Field(default_factory=ServerConfig)
    """Where the LearnerService listens and its auth."""
    backend: TorchBackendConfig = Field(default_factory=TorchBackendConfig)
    """Model/optimizer backend."""
    models: dict[str, Path] = Field(default_factory=dict)
    """Named base models this learner serves (name -> Hugging Face directory); any directory path works too."""
    max_sessions: int = Field(default=1, ge=1)
    """Open sessions allowed at once; each holds a full model and AdamW state in memory."""
    checkpoint_dir: Path = Path("runs/learner")
    """Root of SaveState and SaveWeights outputs: <checkpoint_dir>/<session_id>/{state,weights}/<name>."""
    sequence_gap_timeout_s: float = Field(default=120.0, gt=0)
    """How long a request waits for an earlier seq_id before failing with DEADLINE_EXCEEDED."""
    dedup_cache_size: int = Field(default=64, ge=1)
    """Completed requests per session whose results are kept to answer retries without re-executing."""
