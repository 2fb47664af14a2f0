"""z-lab's reference DFlash format (PyPI `dflash==0.1.0`, `dflash.model.DFlashDraftModel`): export and import.

The reference loads a folder with `DFlashDraftModel.from_pretrained(folder)` and decodes with
`drafter.spec_generate(target, input_ids, max_new_tokens, stop_token_ids, temperature)`, where `target` is the
Hugging Face causal LM whose embedding (MASK and anchor rows) and `lm_head` the drafter borrows at run time.

config.json, a Qwen3 config of the drafter's own shape:
- `architectures: ["DFlashDraftModel"]`, `model_type: "qwen3"`; every shape key explicit (Qwen3Config would fill a
  missing `head_dim` with 128), `num_hidden_layers` = drafter layers, `hidden_act: "silu"`, no attention bias;
- the drafter's own rope theta, written both as `rope_parameters` (transformers 5) and `rope_theta` (4.x);
- every layer `full_attention`: the reference's block attention is non-causal only then;
- `num_target_layers` at the top level (the constructor fails without it), `block_size` (16 if absent), and
  `dflash_config: {target_layer_ids, mask_token_id}`; the reference reads id i as `hidden_states[i + 1]`.
model.safetensors, drafter weights only (no embedding, no head), no prefix. Names, ours -> reference:
  fc, hidden_norm, norm, layers.i.{input,post_attention}_layernorm          unchanged
  layers.i.{q,k,v,o}_proj, layers.i.{q,k}_norm                              layers.i.self_attn.*
  layers.i.{gate,up,down}_proj                                              layers.i.mlp.*

Choices: only exact conversions, both ways. Refused, one DrafterError line each: a drafter of a family whose
registration (`models/registry.py`) does not say this format holds it (EAGLE-3: only DFlash's does); a learned MASK
(the reference embeds the target's row `mask_token_id`); a reduced draft vocabulary (the reference always applies
the target's whole `lm_head`; `export --widen-vocab` widens the drafter first, `models.drafter.widen_vocab`); the
target's last layer as a feature (transformers returns `hidden_states[N]` after the final norm, our Target reads the
layer's raw output). Import reads config.json as plain JSON and wants every
shape key rather than Qwen3Config's defaults, refuses reference options our drafter does not compute (sliding or
causal layers, rope scaling, embedding scale, logit multiplier or softcap), and wants every tensor used, none missing.

Running the reference (tests, `benchmarks/reference_tau.py`): `load_reference` loads a folder with its own loader and
checks its loading report, `reference_run` decodes one prompt with its accepted lengths, `whole_block_rounds` says
how many of its rounds are comparable with ours. `dflash` is imported only by these.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from ..models.dflash import DFlashDrafter, default_layers
from ..models.drafter import Drafter, DrafterError, DrafterSpec, check_compatible, drafter_for
from ..models.registry import families
from ..models.target import Target

SUBLAYER = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "q_norm": "self_attn",
    "k_norm": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


def to_reference_name(name: str) -> str:
    """`layers.0.q_proj.weight` -> `layers.0.self_attn.q_proj.weight`; other names are the same in both."""
    parts = name.split(".")
    if parts[0] == "layers" and len(parts) > 2 and parts[2] in SUBLAYER:
        parts.insert(2, SUBLAYER[parts[2]])
    return ".".join(parts)


def check_exact(spec: DrafterSpec, target: Target) -> None:
    """Refuse a drafter the reference would run differently from us on `target` (one line)."""
    fam = families().get(spec.arch)
    if fam is None or not fam.reference_dflash:
        held = " or ".join(f.named for f in families().values() if f.reference_dflash)
        raise DrafterError(f"only {held} drafter has a reference DFlash format, not {fam.named if fam else spec.arch} one")
    if spec.mask_token_id is None:
        raise DrafterError(
            "a drafter with a learned MASK vector cannot be exported exactly: the reference DFlash format embeds "
            "a target token row as MASK (train with --draft-mask-token-id)"
        )
    if spec.draft_vocab_size is not None:
        raise DrafterError(
            f"the reference DFlash format has no reduced vocabulary (this drafter drafts over {spec.draft_vocab_size} "
            "tokens; the reference always applies the target's whole lm_head: export with --widen-vocab, the same weights "
            "drafting over the whole vocabulary)"
        )
    check_compatible(spec, target)
    last = spec.num_target_layers - 1
    if any(not 0 <= i <= last for i in spec.target_layer_ids):
        raise DrafterError(f"target_layer_ids {list(spec.target_layer_ids)} outside the target's {spec.num_target_layers} layers")
    if last in spec.target_layer_ids:
        raise DrafterError(
            f"target layer id {last} is the target's last layer: the reference reads it after the final norm "
            f"(hidden_states[{last + 1}]), draftopd before it, so the drafter would see other features"
        )
    if not 0 <= spec.mask_token_id < spec.vocab_size:
        raise DrafterError(f"mask_token_id {spec.mask_token_id} outside the target's vocabulary of {spec.vocab_size}")


def reference_config(spec: DrafterSpec, target: Target, dtype: str) -> dict:
    rope = {"rope_type": "default", "rope_theta": spec.rope_theta}
    return {
        "architectures": ["DFlashDraftModel"],
        "model_type": "qwen3",
        "dtype": dtype,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": spec.rms_norm_eps,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": target.max_positions,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "rope_parameters": rope,
        "rope_theta": spec.rope_theta,
        "use_sliding_window": False,
        "sliding_window": None,
        "layer_types": ["full_attention"] * spec.num_layers,
        "tie_word_embeddings": False,
        "num_target_layers": spec.num_target_layers,
        "block_size": spec.block_size,
        "dflash_config": {"target_layer_ids": list(spec.target_layer_ids), "mask_token_id": spec.mask_token_id},
    }


def export_dflash(drafter: Drafter, folder: str | Path, target: Target) -> None:
    """Write `drafter` (trained on `target`) as a folder `DFlashDraftModel.from_pretrained` loads."""
    from safetensors.torch import save_file

    check_exact(drafter.spec, target)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {to_reference_name(k): v.detach().contiguous().cpu() for k, v in drafter.state_dict().items()}
    dtype = str(drafter.weight_dtype).removeprefix("torch.")
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(reference_config(drafter.spec, target, dtype), indent=2))


def import_dflash(folder: str | Path, target: Target) -> DFlashDrafter:
    """The reference-format drafter at `folder` as our DFlashDrafter on `target` (float32)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
        weights = load_file(str(folder / "model.safetensors"))
    except FileNotFoundError as err:
        raise DrafterError(f"no reference DFlash drafter at {folder}: missing {Path(err.filename or 'model.safetensors').name}") from None
    except Exception as err:  # json and safetensors header errors both mean a corrupt folder
        raise DrafterError(f"corrupt reference DFlash drafter at {folder}: {type(err).__name__}: {err}") from None
    spec = spec_from_config(config, folder)
    check_exact(spec, target)
    drafter = drafter_for(spec, target)
    ours = {to_reference_name(k): k for k in drafter.state_dict()}  # reference name -> ours; names are checked in the reference's form
    missing, unexpected = sorted(ours.keys() - weights.keys()), sorted(weights.keys() - ours.keys())
    if missing or unexpected:
        raise DrafterError(f"reference DFlash drafter at {folder} has wrong weights: missing {missing[:3]}, unexpected {unexpected[:3]}")
    try:
        drafter.load_state_dict({ours[k]: v for k, v in weights.items()})
    except RuntimeError as err:
        raise DrafterError(
            f"reference DFlash drafter at {folder} has weights of the wrong shape: {str(err).splitlines()[-1].strip()}"
        ) from None
    return drafter


def spec_from_config(config: dict, folder: Path) -> DrafterSpec:
    """Our DrafterSpec of a reference config.json; the reference looks keys up in `dflash_config` first."""
    if not isinstance(config, dict) or config.get("architectures") != ["DFlashDraftModel"]:
        found = config.get("architectures") if isinstance(config, dict) else None
        raise DrafterError(f"{folder} is not a reference DFlash drafter: architectures {found!r}, expected ['DFlashDraftModel']")
    dflash = config.get("dflash_config") or {}
    value = lambda key, default=None: dflash.get(key, config.get(key, default))  # noqa: E731
    try:
        unsupported = [key for key, ok in supported(config, value).items() if not ok]
        layers, mask_id = int(config["num_hidden_layers"]), value("mask_token_id")
        theta = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta"))
        ids = value("target_layer_ids") or default_layers(int(config["num_target_layers"]), layers)  # the reference's rule
        spec = DrafterSpec(
            hidden_size=int(config["hidden_size"]),
            vocab_size=int(config["vocab_size"]),
            num_target_layers=int(config["num_target_layers"]),
            target_layer_ids=tuple(int(i) for i in ids),
            num_layers=layers,
            block_size=int(value("block_size", 16)),
            num_heads=int(config["num_attention_heads"]),
            num_kv_heads=int(config["num_key_value_heads"]),
            head_dim=int(config["head_dim"]),
            intermediate_size=int(config["intermediate_size"]),
            rope_theta=float(theta),
            rms_norm_eps=float(config["rms_norm_eps"]),
            mask_token_id=None if mask_id is None else int(mask_id),
        )
    except KeyError as err:
        raise DrafterError(f"{folder}/config.json lacks {err} (the reference format wants every shape key)") from None
    except (TypeError, ValueError) as err:
        raise DrafterError(f"{folder}/config.json has a bad value: {type(err).__name__}: {err}") from None
    if unsupported:
        raise DrafterError(f"{folder} uses reference DFlash options draftopd's drafter does not compute: {', '.join(unsupported)}")
    if spec.mask_token_id is None:
        raise DrafterError(f"{folder}/config.json has no dflash_config.mask_token_id (the reference cannot decode without one)")
    return spec


def supported(config: dict, value) -> dict[str, bool]:
    """Each reference option that changes the computation -> whether it is at the setting our DFlashDrafter computes."""
    rope = config.get("rope_parameters") or {}
    return {
        "hidden_act": config.get("hidden_act", "silu") == "silu",
        "attention_bias": not config.get("attention_bias", False),
        "is_causal": not config.get("is_causal"),
        "use_sliding_window": not config.get("use_sliding_window"),
        "layer_types": all(t == "full_attention" for t in config.get("layer_types") or []),
        "rope_scaling": not config.get("rope_scaling") and rope.get("rope_type", "default") == "default",
        "input_embedding_scale": float(value("input_embedding_scale", 1.0)) == 1.0,
        "output_multiplier": float(value("output_multiplier", 1.0)) == 1.0,
        "final_logit_softcapping": not value("final_logit_softcapping"),
    }


# ---- running the reference -------------------------------------------------------------------------------------------
def load_reference(folder: str | Path, dtype: torch.dtype = torch.float32):
    """`DFlashDraftModel.from_pretrained(folder)` in eval mode. Transformers only warns about a missing, unexpected or
    misnamed tensor, so its loading report is checked and anything in it refused."""
    from dflash.model import DFlashDraftModel

    model, info = DFlashDraftModel.from_pretrained(str(folder), dtype=dtype, output_loading_info=True)
    if any(info.values()):
        raise DrafterError(f"the reference loaded {folder} incompletely: { {k: v for k, v in info.items() if v} }")
    return model.eval()


@contextmanager
def _host_clock(module):
    """The reference's stats timer calls torch.cuda.synchronize() unconditionally; without CUDA use a plain clock."""
    saved = module._cuda_time
    if not torch.cuda.is_available():
        module._cuda_time = time.perf_counter
    try:
        yield
    finally:
        module._cuda_time = saved


@torch.no_grad()
def reference_run(reference, target: Target, prompt: list[int], max_new_tokens: int, stop_ids: list[int] | None, temperature: float = 0.0):
    """One prompt through the loop `spec_generate` runs (`dflash_generate`), with `return_stats=True`, which only adds
    timers and the accepted lengths: `.output_ids` (1, prompt + new) and `.acceptance_lengths`, per round the tokens
    it committed (accepted drafts + the target's token, cut at max_new_tokens or a stop token). The first new token
    comes from the prefill and is in no round."""
    import dflash.model as module

    reference.eval()
    with _host_clock(module):
        return module.dflash_generate(
            reference,
            target=target.model,
            input_ids=torch.tensor([prompt], device=target.device),
            max_new_tokens=max_new_tokens,
            stop_token_ids=stop_ids,
            temperature=temperature,
            return_stats=True,
        )


def whole_block_rounds(lengths: list[int], max_new_tokens: int, block_size: int) -> int:
    """How many leading rounds the reference ran with a whole block and did not cut. Near the end it shrinks the block
    to fit max_new_tokens (a shorter block drafts differently: its slots attend to each other), and it cuts its last
    round at max_new_tokens or a stop token; ours always drafts whole blocks and reports uncut lengths."""
    done = rounds = 0  # tokens committed after the first (prefill) token when the round starts
    for produced in lengths[:-1]:
        if done + block_size > max_new_tokens:
            break
        done, rounds = done + produced, rounds + 1
    return rounds
