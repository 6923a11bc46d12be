"""SaveWeights for the Megatron backend: the same Hugging Face directory the torch backend writes.

Weights are gathered to rank 0 under their HF names (float32, vocabulary padding dropped, tied
embeddings once), written as safetensors the way `save_pretrained` names them (`model.safetensors`, or
numbered shards plus `model.safetensors.index.json` above 5 GB), next to the base model's config,
tokenizer and generation files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
WEIGHT_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def write_hf_directory(tensors: dict[str, torch.Tensor], model_path: Path, directory: Path) -> None:
    """Write `tensors` (HF names) as a model directory whose config and tokenizer come from `model_path`."""
    from huggingface_hub import save_torch_state_dict

    save_torch_state_dict(tensors, directory, max_shard_size="5GB", metadata={"format": "pt"})
    config = json.loads((model_path / "config.json").read_text())
    config["dtype"] = "float32"  # what the tensors are, whatever the base model was stored in
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for source in model_path.iterdir():
        is_weights = source.name.endswith(WEIGHT_FILE_SUFFIXES) or source.name in WEIGHT_INDEX_FILES
        target = directory / source.name
        if source.is_file() and not is_weights and not target.exists():
            shutil.copyfile(source, target)  # tokenizer files, chat template, generation config
