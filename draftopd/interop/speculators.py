"""speculators' format (PyPI `speculators==0.9.0`, the folder `vllm serve` and `--speculative-config` load): export and import.

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

What differs between drafter families (class names, the layer config's type and keys, the family's own top-level keys,
which tensors besides ours are written, which options import checks) is the family's `registry.Speculators` adapter,
in its module (`models/dflash.py`, `models/eagle3.py`); this module is the same for every family.

Import (`import_speculators`, `draftopd import --format speculators`) is the inverse, and as strict: config.json is read
as plain JSON with every shape key wanted; `architectures` may be the config class's (as the export writes it) or the
model class's (`Eagle3DraftModel` / `DFlashDraftModel`, what speculators' own save_pretrained writes); the spec's target layer ids are the capture ids - 1, ascending (the order of
fc's input blocks in the file, so nothing is permuted); the names are mapped back, d2t/t2d set through
`set_draft_vocab` and checked to be what it sets; a saved embedding or head must equal the target's (ours are the
target's, frozen) and is then dropped. One DrafterError line each for: a folder that is not a speculators EAGLE-3 or
DFlash drafter, a missing or corrupt file, a missing key, an option our drafter does not compute (a variant switch on,
a missing norm_before_residual, which vLLM reads as true, a Qwen3 EAGLE-3 layer, sliding or non-silu layers, rope
scaling, sample_from_anchor), a config for another target (vocabulary, hidden size, target_hidden_size, capture ids
outside 1..N-1, a local verifier folder of another shape), what the export refuses, and missing, unexpected or
wrong-shape weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..models.drafter import Drafter, DrafterError, DrafterSpec, check_compatible, drafter_for
from ..models.load import EMBEDDED, embedded_folder
from ..models.registry import Family, Speculators, families, family, titles
from ..models.target import Target
from .dflash_ref import to_reference_name

SPECULATORS_VERSION = "0.9.0"


def adapter(arch: str) -> Speculators:
    """The speculators pieces of the family `arch` (refused, one line, for a family speculators has no format for)."""
    found = families().get(arch)
    if found is None or found.speculators is None:
        raise DrafterError(f"speculators has no format for a drafter of arch {arch!r}")
    return found.speculators


def capture_ids(spec: DrafterSpec) -> list[int]:
    """speculators' target layer ids (capture convention, ascending) for our output ids."""
    return sorted(i + 1 for i in spec.target_layer_ids)


def check_exportable(spec: DrafterSpec, target: Target) -> None:
    """Refuse a drafter speculators or vLLM would run differently from us on `target` (one line)."""
    fmt, fam = adapter(spec.arch), family(spec.arch)
    check_compatible(spec, target)
    ids, last = list(spec.target_layer_ids), spec.num_target_layers - 1
    if any(not 0 <= i <= last for i in ids):
        raise DrafterError(f"target_layer_ids {ids} outside the target's {spec.num_target_layers} layers")
    if last in ids:
        raise DrafterError(
            f"target layer id {last} is the target's last layer: its output enters no layer, and vLLM feeds a drafter "
            f"only what enters layers 0..{last} (capture ids), so the drafter would not get it"
        )
    if len(set(ids)) != len(ids):
        raise DrafterError(f"target_layer_ids {ids} name a layer twice: vLLM captures each layer once")
    if fmt.num_features is not None and len(ids) != fmt.num_features:
        raise DrafterError(
            f"{fam.named} drafter fed {len(ids)} target layers cannot be served: vLLM's {fam.title} fc takes exactly "
            f"{fmt.num_features} (--draft-target-layer-ids with {fmt.num_features} ids)"
        )
    if fam.has_mask and spec.mask_token_id is None:
        raise DrafterError(
            f"{fam.named} drafter with a learned MASK vector cannot be exported exactly: speculators embeds a target token "
            "row as MASK (train with --draft-mask-token-id)"
        )


def check_draft_vocab(drafter: Drafter) -> None:
    """A reduced vocabulary must be set: t2d marks exactly the target ids d2t maps to."""
    size = drafter.spec.draft_vocab_size
    if size is None:
        return
    ids = drafter.draft_to_target(torch.arange(size, device=drafter.d2t.device))
    marked, in_range = int(drafter.t2d.sum()), bool((ids >= 0).all() and (ids < drafter.spec.vocab_size).all())
    if marked != size or not in_range or not bool((ids[1:] > ids[:-1]).all()) or not bool(drafter.t2d[ids].all()):
        raise DrafterError(
            f"the draft vocabulary is not set (t2d marks {marked} target ids for {size} draft ids): "
            "call set_draft_vocab or load a trained drafter"
        )


def verifier_entry(target: Target, verifier_path: str | Path | None) -> dict:
    """speculators_config.verifier: the target's folder or hub id (checked against `target` when it is a local folder)."""
    name = str(verifier_path) if verifier_path is not None else default_verifier(target.name)
    if verifier_path is not None and not Path(name).exists() and not is_hub_id(name):
        raise DrafterError(f"verifier {name}: no such folder (give the target's local folder or its hub id)")
    architectures = list(target.model.config.architectures or [type(target.model).__name__])
    if name is not None and Path(name).exists():
        config = check_verifier(Path(name), target)
        architectures = list(config.get("architectures") or architectures)
        name = str(Path(name).resolve())
    return {"name_or_path": name, "architectures": architectures}


def check_verifier(folder: Path, target: Target) -> dict:
    """The verifier folder's (language model) config, refused unless its shape is `target`'s."""
    config = read_verifier_config(folder)
    want = {"hidden_size": target.hidden_size, "num_hidden_layers": target.num_layers, "vocab_size": target.vocab_size}
    diff = ", ".join(f"{k} {config.get(k)} vs target {v}" for k, v in want.items() if config.get(k) != v)
    if diff:
        raise DrafterError(f"verifier {folder} is not the drafter's target: {diff}")
    return config


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
    """transformer_layer_config: the family's layer type (a Llama layer, no q/k norm, for EAGLE-3; Qwen3 layers, q/k
    norm, for DFlash) with every shape key, then the family's own keys."""
    fmt = adapter(spec.arch)
    rope = {"rope_type": "default", "rope_theta": spec.rope_theta}
    config = {
        "model_type": fmt.layer_type,
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": spec.rms_norm_eps,
        "max_position_embeddings": target.max_positions,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "rope_parameters": rope,
        "rope_theta": spec.rope_theta,
        "tie_word_embeddings": False,
        "pad_token_id": None,
        "dtype": dtype,
    }
    return {**config, **fmt.layer_keys(spec)}


def speculators_config(spec: DrafterSpec, target: Target, verifier: dict, dtype: str) -> dict:
    fmt = adapter(spec.arch)
    proposal = {"proposal_type": "greedy", "speculative_tokens": spec.block_size - 1, "verifier_accept_k": 1, "accept_tolerance": 0.0}
    config = {
        "architectures": [fmt.config_class],
        "speculators_model_type": fmt.model_type,
        "speculators_version": SPECULATORS_VERSION,
        "transformer_layer_config": layer_config(spec, target, dtype),
        "draft_vocab_size": spec.draft_vocab_size or spec.vocab_size,
        "target_hidden_size": None,
        "dtype": dtype,
        "speculators_config": {
            "algorithm": fmt.model_type,
            "proposal_methods": [proposal],
            "default_proposal_method": "greedy",
            "verifier": verifier,
        },
    }
    return {**config, **fmt.config_keys(spec, capture_ids(spec))}


def speculators_weights(drafter: Drafter) -> dict[str, torch.Tensor]:
    """Our weights under speculators' names, fc's input blocks in ascending layer order, plus the head rows (and, as the
    family's adapter asks, the whole head and the embedding: EAGLE-3)."""
    spec, fmt = drafter.spec, adapter(drafter.spec.arch)
    weights = {to_reference_name(k): v.detach() for k, v in drafter.state_dict().items()}
    order = sorted(range(len(spec.target_layer_ids)), key=lambda j: spec.target_layer_ids[j])
    fc = weights["fc.weight"]
    weights["fc.weight"] = fc.view(fc.shape[0], len(order), -1)[:, order].reshape(fc.shape)
    if spec.draft_vocab_size is not None:
        drafter.refresh_head()
        weights["lm_head.weight"] = drafter.head_weight.detach()
    elif fmt.saves_full_head:
        weights["lm_head.weight"] = drafter.lm_head_weight.detach()
    if fmt.saves_embedding:
        weights["embed_tokens.weight"] = drafter.embed_weight.detach()
    dtype = drafter.weight_dtype
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
    dtype = str(drafter.weight_dtype).removeprefix("torch.")
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
    (n_anchors, K, V_draft), [a, k-1] predicting x_{a+k}. A sequential drafter (EAGLE-3) is teacher-forced on the tokens
    (speculators' TTT; DFlash ignores them); the anchors end where the family's adapter says speculators picks them
    (DFlash: below T - B)."""
    from safetensors.torch import save_file

    spec, steps, device = drafter.spec, drafter.spec.block_size - 1, target.device
    if length < 2 * spec.block_size + 2:
        raise DrafterError(f"a check of block size {spec.block_size} needs at least {2 * spec.block_size + 2} tokens, got {length}")
    tokens = torch.randint(0, spec.vocab_size, (length + 1,), generator=torch.Generator().manual_seed(seed)).to(device)
    sequence, valid = tokens[None, :length], torch.ones(1, length, dtype=torch.bool, device=device)
    features = target.score(sequence, valid, spec.target_layer_ids).features
    exported = target.score(sequence, valid, tuple(sorted(spec.target_layer_ids))).features
    positions = torch.arange(length, device=device)[None]
    anchors = torch.arange(1, adapter(spec.arch).check_anchors(length, spec.block_size), device=device)
    ctx = drafter.project_context(features, positions, valid, tokens[None, 1:])
    block = tokens[anchors[:, None] + torch.arange(1, steps, device=device)]  # (n, K-1): slots 1..K-1
    logits = drafter(ctx, tokens[anchors][None], anchors[None], block[None])[0]
    path = check_file(folder)
    save_file(
        {
            "tokens": tokens.cpu(),
            "features": exported.float().contiguous().cpu(),
            "anchors": anchors.cpu(),
            "logits": logits.float().contiguous().cpu(),
        },
        str(path),
        metadata={"arch": spec.arch},
    )
    return path


# ---- import -------------------------------------------------------------------------------------------------------------
FROZEN = {"embed_tokens.weight": "embedding", "lm_head.weight": "head"}  # the target's own, checked and dropped


def import_speculators(folder: str | Path, target: Target) -> Drafter:
    """The speculators-format drafter at `folder` as our drafter on `target` (float32, eval mode)."""
    folder = Path(folder)
    config, weights = read_folder(folder)
    drafter = drafter_for(spec_from_speculators(config, target, folder), target)
    frozen = {name: weights.pop(name) for name in FROZEN if name in weights}
    load_weights(drafter, weights, folder)
    check_frozen(drafter, frozen, folder)
    return drafter.eval()


def read_folder(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    try:
        return json.loads((folder / "config.json").read_text()), load_file(str(folder / "model.safetensors"))
    except FileNotFoundError as err:
        raise DrafterError(f"no speculators drafter at {folder}: missing {Path(err.filename or 'model.safetensors').name}") from None
    except Exception as err:  # json and safetensors header errors both mean a corrupt folder
        raise DrafterError(f"corrupt speculators drafter at {folder}: {type(err).__name__}: {err}") from None


def spec_from_speculators(config: dict, target: Target, folder: Path) -> DrafterSpec:
    """Our DrafterSpec of a speculators config.json, refused (one line) unless our drafter computes what it describes
    on `target`. `architectures` is the config class's (as the export writes it) or the model class's (as speculators'
    own save writes it). Every shape key is wanted (speculators would fill a missing one from another model's
    defaults); the capture ids become sorted output ids, the order of fc's input blocks in the file."""
    kind = config.get("speculators_model_type") if isinstance(config, dict) else None
    found = config.get("architectures") if isinstance(config, dict) else None
    fam = by_model_type().get(kind) if isinstance(kind, str) else None
    if fam is None or found not in ([fam.speculators.config_class], [fam.speculators.model_class]):
        raise DrafterError(
            f"{folder} is not a speculators {titles(lambda f: f.speculators is not None)} drafter: "
            f"speculators_model_type {kind!r}, architectures {found!r}"
        )
    fmt = fam.speculators
    try:
        layer = config["transformer_layer_config"]
        unsupported = unsupported_options(config, layer, fmt)
        theta = (layer.get("rope_parameters") or {}).get("rope_theta") or layer["rope_theta"]
        captures = [int(i) for i in layer_ids(config, target, fmt)]
        vocab, draft_vocab, layers = int(layer["vocab_size"]), int(config["draft_vocab_size"]), int(layer["num_hidden_layers"])
        spec = DrafterSpec(
            hidden_size=int(layer["hidden_size"]),
            vocab_size=vocab,
            num_target_layers=target.num_layers,
            target_layer_ids=tuple(sorted(c - 1 for c in captures)),
            num_layers=layers,
            block_size=block_size(config, fmt),
            num_heads=int(layer["num_attention_heads"]),
            num_kv_heads=int(layer["num_key_value_heads"]),
            head_dim=int(layer["head_dim"]),
            intermediate_size=int(layer["intermediate_size"]),
            rope_theta=float(theta),
            rms_norm_eps=float(layer["rms_norm_eps"]),
            mask_token_id=None if not fam.has_mask or config["mask_token_id"] is None else int(config["mask_token_id"]),
            draft_vocab_size=None if draft_vocab == vocab else draft_vocab,
            arch=fam.name,
        )
    except KeyError as err:
        raise DrafterError(f"{folder}/config.json lacks {err} (draftopd wants every shape key)") from None
    except (TypeError, ValueError, AttributeError) as err:
        raise DrafterError(f"{folder}/config.json has a bad value: {type(err).__name__}: {err}") from None
    if unsupported:
        raise DrafterError(f"{folder} uses speculators options draftopd's drafter does not compute: {', '.join(unsupported)}")
    check_for_target(config, captures, spec, target, folder)
    return spec


def by_model_type() -> dict[str, Family]:
    """speculators_model_type -> the family whose adapter writes it."""
    return {f.speculators.model_type: f for f in families().values() if f.speculators is not None}


def unsupported_options(config: dict, layer: dict, fmt: Speculators) -> list[str]:
    """`name=value` for each option that changes the computation and is not at the setting our drafter computes: the
    shared ones, then the family's (`fmt.options`; EAGLE-3 reads a missing norm_before_residual as true, as vLLM does)."""
    scaling = {d.get("rope_type", d.get("type", "default")) for d in (layer.get("rope_parameters") or {}, layer.get("rope_scaling") or {})}
    checks = {
        "hidden_act": (layer.get("hidden_act", "silu"), "silu"),
        "attention_bias": (layer.get("attention_bias", False), False),
        "rope_scaling": (sorted(scaling - {"default"}) or None, None),
        **fmt.options(config, layer),
    }
    return [f"{k}={got!r}" for k, (got, want) in checks.items() if got != want]


def layer_ids(config: dict, target: Target, fmt: Speculators) -> list:
    """The capture ids; a missing list means the family's default on the target (EAGLE-3: speculators' and vLLM's
    [2, N/2, N-3]), where it has one."""
    key = fmt.layer_ids_key
    if config.get(key) is not None:
        return config[key]
    if fmt.default_captures is None:
        raise KeyError(key)
    return fmt.default_captures(target.num_layers)


def block_size(config: dict, fmt: Speculators) -> int:
    """The family's own key where it has one (DFlash: `block_size`), else the default proposal method's
    speculative_tokens + 1 (the anchor; EAGLE-3)."""
    if fmt.block_size is not None:
        return fmt.block_size(config)
    proposals, name = config["speculators_config"]["proposal_methods"], config["speculators_config"].get("default_proposal_method")
    chosen = [p for p in proposals if p.get("proposal_type") == name] if name else proposals[:1]
    if not chosen:
        raise KeyError(f"speculators_config.proposal_methods[proposal_type={name}]")
    return int(chosen[0]["speculative_tokens"]) + 1


def check_for_target(config: dict, captures: list[int], spec: DrafterSpec, target: Target, folder: Path) -> None:
    """Refuse a config for another target (hidden size: ours is the target's; vocabulary; capture ids; a local verifier
    folder of another shape) or one our drafter does not run the same (the export's own refusals)."""
    check_compatible(spec, target)
    fam, n = family(spec.arch), target.num_layers
    if config.get("target_hidden_size") not in (None, target.hidden_size):
        raise DrafterError(f"{folder} is for a target of hidden size {config['target_hidden_size']}, not {target.hidden_size}")
    if any(not 1 <= c < n for c in captures):
        raise DrafterError(
            f"{folder} feeds the drafter capture ids {captures}: draftopd feeds target layer outputs, capture ids "
            f"1..{n - 1} of this {n}-layer target (0 is the embedding, {n} the output after the final norm)"
        )
    if fam.num_layers is not None and spec.num_layers != fam.num_layers:
        raise DrafterError(f"{folder} is {fam.named} drafter of {spec.num_layers} decoder layers: draftopd's has {fam.depth}")
    size, mask = spec.draft_vocab_size, spec.mask_token_id
    if size is not None and not 1 <= size <= spec.vocab_size:
        raise DrafterError(f"{folder} has draft_vocab_size {size} outside [1, {spec.vocab_size}]")
    if fam.has_mask and (mask is None or not 0 <= mask < spec.vocab_size):
        raise DrafterError(f"{folder} has mask_token_id {mask}: {fam.title} needs a row of the target's {spec.vocab_size}-token vocabulary")
    if spec.block_size < 2:
        raise DrafterError(f"{folder} drafts {spec.block_size - 1} tokens per block: draftopd drafts at least one")
    verifier = verifier_folder(config)
    if verifier is not None:
        check_verifier(verifier, target)
    check_exportable(spec, target)


def verifier_folder(config: dict) -> Path | None:
    """speculators_config.verifier.name_or_path when it names a local folder with config.json (a hub id, a folder on
    another machine or no entry: nothing to check)."""
    try:
        name = config["speculators_config"]["verifier"]["name_or_path"]
        return Path(name) if (Path(name) / "config.json").is_file() else None
    except (KeyError, TypeError, AttributeError):
        return None


def load_weights(drafter: Drafter, weights: dict[str, torch.Tensor], folder: Path) -> None:
    """The file's tensors under our names (the export's renaming undone); d2t/t2d go through `set_vocab`."""
    ours = {to_reference_name(k): k for k in drafter.state_dict()}
    missing, unexpected = sorted(ours.keys() - weights.keys()), sorted(weights.keys() - ours.keys())
    if missing or unexpected:
        raise DrafterError(f"speculators drafter at {folder} has wrong weights: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if drafter.spec.draft_vocab_size is not None:
        set_vocab(drafter, weights.pop("d2t"), weights.pop("t2d"), folder)
    try:
        drafter.load_state_dict({ours[k]: v for k, v in weights.items()}, strict=False)  # strict: names checked above
    except RuntimeError as err:
        raise DrafterError(f"speculators drafter at {folder} has weights of the wrong shape: {str(err).splitlines()[-1].strip()}") from None


def set_vocab(drafter: Drafter, d2t: torch.Tensor, t2d: torch.Tensor, folder: Path) -> None:
    """Set the draft vocabulary with `set_draft_vocab` (buffers and head rows consistent), then require the file's maps
    to be what it sets: d2t mapping draft ids to ascending target ids, t2d marking exactly those."""
    size, vocab = drafter.spec.draft_vocab_size, drafter.spec.vocab_size
    if tuple(d2t.shape) != (size,) or tuple(t2d.shape) != (vocab,) or d2t.is_floating_point():
        raise DrafterError(
            f"speculators drafter at {folder} has weights of the wrong shape: d2t {tuple(d2t.shape)} {d2t.dtype}, "
            f"t2d {tuple(t2d.shape)}, for {size} draft ids over {vocab} target ids"
        )
    d2t, t2d = d2t.long().to(drafter.d2t.device), t2d.bool().to(drafter.t2d.device)
    drafter.set_draft_vocab(torch.arange(size, device=d2t.device) + d2t)
    if not (torch.equal(drafter.d2t, d2t) and torch.equal(drafter.t2d, t2d)):
        raise DrafterError(
            f"speculators drafter at {folder} has d2t and t2d that disagree: d2t must map draft ids to ascending "
            "target ids and t2d mark exactly those"
        )


def check_frozen(drafter: Drafter, frozen: dict[str, torch.Tensor], folder: Path) -> None:
    """A saved embedding or head must be the target's (the head: the rows the drafter draws from it), compared at the
    coarser of the file's and the target's dtypes (a float32 export imported on a bfloat16 target, or the reverse):
    draftopd's drafters take both frozen from the target and neither is loaded."""
    own = {
        "embed_tokens.weight": drafter.embed_weight,
        "lm_head.weight": drafter.lm_head_weight if drafter.spec.draft_vocab_size is None else drafter.head_weight,
    }
    for name, saved in frozen.items():
        mine = own[name]
        if saved.shape != mine.shape:
            raise DrafterError(
                f"speculators drafter at {folder} has weights of the wrong shape: {name} {tuple(saved.shape)}, "
                f"the target's {FROZEN[name]} {tuple(mine.shape)}"
            )
        dtype = max(saved.dtype, mine.dtype, key=lambda t: torch.finfo(t).eps)
        if not torch.equal(saved.to(dtype), mine.detach().to(device=saved.device, dtype=dtype)):
            raise DrafterError(
                f"speculators drafter at {folder} has its own {FROZEN[name]} ({name} is not the target's): draftopd's "
                f"drafters use the target's, frozen, and do not train one (a drafter trained elsewhere with an untied "
                f"{FROZEN[name]} would need it)"
            )
