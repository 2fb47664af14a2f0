"""speculators' format (PyPI `speculators==0.9.0`, the folder `vllm serve` and `--speculative-config` load): export.

speculators loads a folder with `SpeculatorModel.from_pretrained(folder)`; its class follows `speculators_model_type`
(`Eagle3DraftModel` for "eagle3", `DFlashDraftModel` for "dflash"). The target ("verifier") is named in the config, and
the loader reads the target's embedding (and, when the checkpoint lacks them, its head rows) from that folder or hub id.

config.json, as speculators writes it: `speculators_model_type`, `architectures` (`Eagle3Speculator` / `DFlashSpeculator`),
`speculators_version`, `draft_vocab_size` (the target's vocabulary when not reduced), `target_hidden_size: null` (same H),
`transformer_layer_config` (the drafter's own layer shape: a Llama config for EAGLE-3, a Qwen3 one for DFlash; every shape
key explicit, `head_dim` included, the drafter's rope theta), and `speculators_config: {algorithm, proposal_methods:
[{proposal_type: greedy, speculative_tokens: block_size - 1, ...}], default_proposal_method, verifier: {name_or_path,
architectures}}`. EAGLE-3 adds `eagle_aux_hidden_state_layer_ids` and its variant switches, all off and written out
(vLLM reads a missing `norm_before_residual` as true); DFlash adds `block_size`, `aux_hidden_state_layer_ids`,
`mask_token_id`, `sample_from_anchor: false`, `sliding_window_non_causal: false`.
model.safetensors, no prefix, our names -> speculators':
  fc, norm, hidden_norm (DFlash), layers.i.{input,post_attention}_layernorm, layers.0.hidden_norm (EAGLE-3)   unchanged
  layers.i.{q,k,v,o}_proj, layers.i.{q,k}_norm (DFlash only)                                                 layers.i.self_attn.*
  layers.i.{gate,up,down}_proj                                                                               layers.i.mlp.*
  d2t (draft id i is target id i + d2t[i]), t2d (bool mask over the target vocabulary)                        unchanged
  the head rows (copied from the target's frozen head at load, not stored by us)                             lm_head.weight
  the target's frozen embedding (EAGLE-3 only)                                                               embed_tokens.weight
EAGLE-3 gets what speculators' own save writes (core.py `_keys_to_ignore_on_save` drops only the verifier's head and
norm): the embedding and `lm_head.weight` (the rows d2t selects, or the whole head). The embedding is needed: loading
under transformers 5.19 materialises a missing one uninitialised rather than as the NaN that `load_verifier_weights`
replaces, so speculators would draft from garbage (vLLM loads it, sees it equals the target's and shares that). DFlash
gets neither embedding nor a full head, as speculators saves it: its loader always takes both from the verifier.

Layer ids: speculators and vLLM count captures (id j = the residual stream entering target layer j, `hidden_states[j]`),
ours count outputs, so capture id = output id + 1. vLLM captures in ascending layer order whatever the config's order, so
the ids are written sorted and fc's input blocks permuted to match (the same sum, in another order).

Only exact exports; one DrafterError line each for: a drafter of another target, the target's last layer as a feature
(its output enters no layer, and vLLM serves a drafter with what enters layers 0..N-1 only), a layer
twice (vLLM captures a layer once), an EAGLE-3 drafter without exactly 3 layers (vLLM's fc takes 3H), a learned DFlash
MASK (speculators embeds the target's row `mask_token_id`), a draft vocabulary never set, a verifier folder of another
shape. Exact means the same computation; eager attention in float32 agrees to rounding
(benchmarks/check_speculators_export.py measures it).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..models.drafter import Drafter, DrafterError, DrafterSpec, check_compatible
from ..models.load import EMBEDDED, embedded_folder
from ..models.target import Target
from .dflash_ref import to_reference_name

SPECULATORS_VERSION = "0.9.0"
ALGORITHMS = {"eagle3": "Eagle3Speculator", "dflash": "DFlashSpeculator"}  # speculators_model_type -> architectures
VLLM_EAGLE3_LAYERS = 3  # vLLM's Eagle3 fc is Linear(3H -> H)


def capture_ids(spec: DrafterSpec) -> list[int]:
    """speculators' target layer ids (capture convention, ascending) for our output ids."""
    return sorted(i + 1 for i in spec.target_layer_ids)


def check_exportable(spec: DrafterSpec, target: Target) -> None:
    """Refuse a drafter speculators or vLLM would run differently from us on `target` (one line)."""
    if spec.arch not in ALGORITHMS:
        raise DrafterError(f"speculators has no format for a drafter of arch {spec.arch!r}")
    check_compatible(spec, target)
    ids, last = list(spec.target_layer_ids), spec.num_target_layers - 1
    if any(not 0 <= i <= last for i in ids):
        raise DrafterError(f"target_layer_ids {ids} outside the target's {spec.num_target_layers} layers")
    if last in ids:
        raise DrafterError(f"target layer id {last} is the target's last layer: its output enters no layer, and vLLM feeds a drafter "
                           f"only what enters layers 0..{last} (capture ids), so the drafter would not get it")
    if len(set(ids)) != len(ids):
        raise DrafterError(f"target_layer_ids {ids} name a layer twice: vLLM captures each layer once")
    if spec.arch == "eagle3" and len(ids) != VLLM_EAGLE3_LAYERS:
        raise DrafterError(f"an EAGLE-3 drafter fed {len(ids)} target layers cannot be served: vLLM's EAGLE-3 fc takes exactly "
                           f"{VLLM_EAGLE3_LAYERS} (--draft-target-layer-ids with 3 ids)")
    if spec.arch == "dflash" and spec.mask_token_id is None:
        raise DrafterError("a DFlash drafter with a learned MASK vector cannot be exported exactly: speculators embeds a target token "
                           "row as MASK (train with --draft-mask-token-id)")


def check_draft_vocab(drafter: Drafter) -> None:
    """A reduced vocabulary must be set: t2d marks exactly the target ids d2t maps to."""
    size = drafter.spec.draft_vocab_size
    if size is None:
        return
    ids = drafter.draft_to_target(torch.arange(size, device=drafter.d2t.device))
    marked, in_range = int(drafter.t2d.sum()), bool((ids >= 0).all() and (ids < drafter.spec.vocab_size).all())
    if marked != size or not in_range or not bool((ids[1:] > ids[:-1]).all()) or not bool(drafter.t2d[ids].all()):
        raise DrafterError(f"the draft vocabulary is not set (t2d marks {marked} target ids for {size} draft ids): "
                           "call set_draft_vocab or load a trained drafter")


def verifier_entry(target: Target, verifier_path: str | Path | None) -> dict:
    """speculators_config.verifier: the target's folder or hub id (checked against `target` when it is a local folder)."""
    name = str(verifier_path) if verifier_path is not None else default_verifier(target.name)
    if verifier_path is not None and not Path(name).exists() and not is_hub_id(name):
        raise DrafterError(f"verifier {name}: no such folder (give the target's local folder or its hub id)")
    architectures = list(target.model.config.architectures or [type(target.model).__name__])
    if name is not None and Path(name).exists():
        config = read_verifier_config(Path(name))
        want = {"hidden_size": target.hidden_size, "num_hidden_layers": target.num_layers, "vocab_size": target.vocab_size}
        diff = ", ".join(f"{k} {config.get(k)} vs target {v}" for k, v in want.items() if config.get(k) != v)
        if diff:
            raise DrafterError(f"verifier {name} is not the drafter's target: {diff}")
        architectures = list(config.get("architectures") or architectures)
        name = str(Path(name).resolve())
    return {"name_or_path": name, "architectures": architectures}


def default_verifier(target_name: str) -> str | None:
    """How speculators and `vllm serve` can find the target: the embedded target's converted folder (the weights the
    drafter was trained on), a local folder, a hub id; None for targets built in memory (tests)."""
    if target_name in EMBEDDED:
        return str(embedded_folder(target_name))
    if Path(target_name).is_dir() or is_hub_id(target_name):
        return target_name
    return None


def is_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/"))


def read_verifier_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise DrafterError(f"verifier {folder} has no readable config.json: {type(err).__name__}: {err}") from None
    if not isinstance(config, dict):
        raise DrafterError(f"verifier {folder}/config.json is not a JSON object")
    return config.get("text_config") or config  # multimodal targets keep the language model's shape there


def layer_config(spec: DrafterSpec, target: Target, dtype: str) -> dict:
    """transformer_layer_config: a Llama layer (no q/k norm) for EAGLE-3, Qwen3 layers (q/k norm) for DFlash."""
    rope = {"rope_type": "default", "rope_theta": spec.rope_theta}
    config = {
        "model_type": "llama" if spec.arch == "eagle3" else "qwen3", "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size, "num_hidden_layers": spec.num_layers, "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads, "head_dim": spec.head_dim, "hidden_act": "silu", "rms_norm_eps": spec.rms_norm_eps,
        "max_position_embeddings": target.max_positions, "attention_bias": False, "attention_dropout": 0.0,
        "rope_parameters": rope, "rope_theta": spec.rope_theta, "tie_word_embeddings": False, "pad_token_id": None, "dtype": dtype,
    }
    if spec.arch == "eagle3":
        return {**config, "mlp_bias": False}
    return {**config, "use_sliding_window": False, "sliding_window": None, "layer_types": ["full_attention"] * spec.num_layers}


def speculators_config(spec: DrafterSpec, target: Target, verifier: dict, dtype: str) -> dict:
    proposal = {"proposal_type": "greedy", "speculative_tokens": spec.block_size - 1, "verifier_accept_k": 1, "accept_tolerance": 0.0}
    config = {
        "architectures": [ALGORITHMS[spec.arch]], "speculators_model_type": spec.arch, "speculators_version": SPECULATORS_VERSION,
        "transformer_layer_config": layer_config(spec, target, dtype), "draft_vocab_size": spec.draft_vocab_size or spec.vocab_size,
        "target_hidden_size": None, "dtype": dtype,
        "speculators_config": {"algorithm": spec.arch, "proposal_methods": [proposal], "default_proposal_method": "greedy",
                               "verifier": verifier},
    }
    if spec.arch == "eagle3":
        return {**config, "eagle_aux_hidden_state_layer_ids": capture_ids(spec), "norm_before_residual": False, "norm_before_fc": False,
                "fc_norm": False, "norm_output": False, "embed_requires_grad": False}
    return {**config, "block_size": spec.block_size, "aux_hidden_state_layer_ids": capture_ids(spec), "mask_token_id": spec.mask_token_id,
            "sample_from_anchor": False, "sliding_window_non_causal": False}


def speculators_weights(drafter: Drafter) -> dict[str, torch.Tensor]:
    """Our weights under speculators' names, fc's input blocks in ascending layer order, plus the head rows (and the
    embedding for EAGLE-3)."""
    spec = drafter.spec
    weights = {to_reference_name(k): v.detach() for k, v in drafter.state_dict().items()}
    order = sorted(range(len(spec.target_layer_ids)), key=lambda j: spec.target_layer_ids[j])
    fc = weights["fc.weight"]
    weights["fc.weight"] = fc.view(fc.shape[0], len(order), -1)[:, order].reshape(fc.shape)
    if spec.draft_vocab_size is not None:
        drafter.refresh_head()
        weights["lm_head.weight"] = drafter.head_weight.detach()
    elif spec.arch == "eagle3":
        weights["lm_head.weight"] = drafter.lm_head_weight.detach()
    if spec.arch == "eagle3":
        weights["embed_tokens.weight"] = drafter.embed_weight.detach()
    dtype = drafter.fc.weight.dtype
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous().cpu() for k, v in weights.items()}


def export_speculators(drafter: Drafter, folder: str | Path, target: Target, verifier_path: str | Path | None = None) -> None:
    """Write `drafter` (trained on `target`) as a folder speculators 0.9.0 loads and vLLM serves. `verifier_path`: the
    target's local folder or hub id, recorded as speculators_config.verifier.name_or_path (default: how `target` was
    loaded; null for a target built in memory, whose DFlash export speculators' loader then cannot give an embedding)."""
    from safetensors.torch import save_file

    check_exportable(drafter.spec, target)
    check_draft_vocab(drafter)
    verifier = verifier_entry(target, verifier_path)
    weights = speculators_weights(drafter)
    dtype = str(drafter.fc.weight.dtype).removeprefix("torch.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(speculators_config(drafter.spec, target, verifier, dtype), indent=2))


def check_file(folder: str | Path) -> Path:
    """Where `write_check_file` puts its tensors: beside the export, never inside it."""
    folder = Path(folder)
    return folder.with_name(folder.name + ".check.safetensors")


@torch.no_grad()
def write_check_file(drafter: Drafter, target: Target, folder: str | Path, length: int = 32, seed: int = 0) -> Path:
    """Inputs and our logits for benchmarks/check_speculators_export.py: random target tokens x_0..x_T (T = `length`),
    the target's features of positions 0..T-1 in the export's layer order, anchors a, and our draft-vocabulary logits
    (n_anchors, K, V_draft), [a, k-1] predicting x_{a+k}. EAGLE-3 is teacher-forced on the tokens (speculators' TTT);
    DFlash anchors stay below T - B, where speculators picks them."""
    from safetensors.torch import save_file

    spec, steps, device = drafter.spec, drafter.spec.block_size - 1, target.device
    if length < 2 * spec.block_size + 2:
        raise DrafterError(f"a check of block size {spec.block_size} needs at least {2 * spec.block_size + 2} tokens, got {length}")
    tokens = torch.randint(0, spec.vocab_size, (length + 1,), generator=torch.Generator().manual_seed(seed)).to(device)
    sequence, valid = tokens[None, :length], torch.ones(1, length, dtype=torch.bool, device=device)
    features = target.score(sequence, valid, spec.target_layer_ids).features
    exported = target.score(sequence, valid, tuple(sorted(spec.target_layer_ids))).features
    positions = torch.arange(length, device=device)[None]
    if spec.arch == "eagle3":
        anchors = torch.arange(1, length - steps + 2, device=device)
        ctx = drafter.project_context(features, positions, valid, tokens[None, 1:])
        block = tokens[anchors[:, None] + torch.arange(1, steps, device=device)]  # (n, K-1): slots 1..K-1
        logits = drafter(ctx, tokens[anchors][None], anchors[None], block[None])[0]
    else:
        anchors = torch.arange(1, length - spec.block_size, device=device)
        logits = drafter(drafter.project_context(features, positions, valid), tokens[anchors][None], anchors[None])[0]
    path = check_file(folder)
    save_file({"tokens": tokens.cpu(), "features": exported.float().contiguous().cpu(), "anchors": anchors.cpu(),
               "logits": logits.float().contiguous().cpu()}, str(path), metadata={"arch": spec.arch})
    return path
