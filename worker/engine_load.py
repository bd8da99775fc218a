"""Loading a model for the engine: where it comes from, which device and dtype, its limits.

Runs in a worker thread at start-up (loading and conversion are slow, blocking work). Only
local files are read: HF_HUB_OFFLINE is set and `local_files_only` passed, so a worker never
reaches for the Hugging Face hub.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch

from worker import smollm

log = structlog.get_logger(__name__)

_FALLBACK_CONTEXT = 2048


@dataclass(frozen=True, slots=True)
class LoadedModel:
    model: Any  # a transformers PreTrainedModel (causal LM), in eval mode on its device
    tokenizer: Any  # a transformers tokenizer with a chat template
    context_length: int  # the model's own limit on prompt + completion tokens
    eos_ids: frozenset[int]
    pad_id: int


def resolve_device(setting: str) -> torch.device:
    """auto: CUDA if present, else Apple MPS, else CPU."""
    if setting and setting != "auto":
        return torch.device(setting)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA if supported else fp16; fp16 on MPS; fp32 on CPU (faster there)."""
    if setting and setting != "auto":
        dtype = getattr(torch, setting, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {setting!r} (auto, float32, bfloat16 or float16)")
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def resolve_source(model_path: str, data_dir: str, *, progress: bool = True) -> Path:
    """The checkpoint directory to load: the default SmolLM2 (converted once), a local HF
    directory, the directory of a .safetensors file, or a GGUF file (converted once)."""
    if not model_path:
        return smollm.ensure_default_model(data_dir, progress=progress)
    path = Path(model_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return smollm.convert_gguf(path, smollm.converted_dir(data_dir, path.stem), progress=progress)
    if path.is_file() and path.suffix == ".safetensors":
        path = path.parent
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    return path


def load(path: Path, *, device: torch.device, dtype: torch.dtype, threads: int = 0) -> LoadedModel:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads > 0:
        torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    if device.type == "cuda":
        kwargs["device_map"] = str(device)  # load straight onto the GPU
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if device.type != "cuda":
        model = model.to(device)  # type: ignore[arg-type]  # transformers' stub is too narrow
    model.eval()
    loaded = prepare(model, tokenizer)
    log.info(
        "model.loaded",
        path=str(path),
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        context=loaded.context_length,
        threads=torch.get_num_threads(),
    )
    return loaded


def prepare(model: Any, tokenizer: Any) -> LoadedModel:
    """Derive what the engine needs from a model and tokenizer already in memory."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    context = int(getattr(config, "max_position_embeddings", 0) or 0) or _FALLBACK_CONTEXT
    eos: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        eos.update([value] if isinstance(value, int) else list(value or []))
    if not eos:
        raise ValueError("the model defines no end-of-sequence token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    return LoadedModel(
        model=model, tokenizer=tokenizer, context_length=context, eos_ids=frozenset(eos), pad_id=int(pad)
    )
