"""Check a `draftopd.interop.speculators` export with speculators' own loader and forward. Runs in a separate virtual
environment with `speculators==0.9.0` (it pins transformers <= 5.19, so not in draftopd's); imports nothing of draftopd.

    python3 -m venv /work/.spec-venv
    /work/.spec-venv/bin/pip install torch==2.13.0            # first: an unpinned torch pulls a CUDA build
    /work/.spec-venv/bin/pip install speculators==0.9.0
    /work/.spec-venv/bin/pip uninstall -y torchvision torchaudio   # pulled by speculators, never imported, CUDA builds
    /work/.spec-venv/bin/python benchmarks/check_speculators_export.py EXPORT [EXPORT ...] --verifier TARGET_FOLDER

Per export:
1. `SpeculatorModel.from_pretrained(EXPORT)` (attention switched to eager, and the verifier to `--verifier` when
   given): every tensor of the file must be a tensor of the model and loaded bit for bit; the only tensors the file may
   lack are those speculators fills from the verifier (embedding, its frozen head and norm, and a DFlash full head),
   and with a verifier the embedding and heads it fills must equal the verifier's own (transformers 5.19 leaves a missing
   EAGLE-3 embedding uninitialised, which speculators then keeps: exports carry it).
2. With a verifier and `EXPORT.check.safetensors` beside the export (`draftopd.interop.speculators.write_check_file`):
   speculators' forward on the saved features and tokens at our positions (EAGLE-3: `Eagle3DraftModel.forward`'s
   training-time test, K steps teacher-forced on the tokens; DFlash: `_backbone_forward` with the saved anchors), its
   draft-vocabulary logits (read at `lm_head`) against the ones our drafter computed: max |difference| at most --tol
   times the largest |logit| (float32 rounding; a change of computation moves logits by their own size).
Prints one block per export and OK or FAIL; exits 1 when any export fails.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

FROM_VERIFIER = {"embed_tokens.weight", "verifier_lm_head.weight", "verifier_norm.weight"}


def load(folder: Path, verifier: str | None):
    from speculators import SpeculatorModel, SpeculatorModelConfig

    config = SpeculatorModelConfig.from_pretrained(folder)
    config.transformer_layer_config._attn_implementation = "eager"  # speculators' default is flex attention (GPU)
    if verifier is not None:
        config.speculators_config.verifier.name_or_path = verifier
    return SpeculatorModel.from_pretrained(folder, config=config).eval()


def check_tensors(model, folder: Path, verifier: str | None) -> list[str]:
    """Problems with the loaded tensors (none: every tensor used, none missing)."""
    from safetensors.torch import load_file

    saved, loaded = load_file(str(folder / "model.safetensors")), model.state_dict()
    allowed = FROM_VERIFIER | (
        {"lm_head.weight"} if model.config.speculators_model_type == "dflash" and not model.use_draft_vocab else set()
    )
    problems = [f"unexpected tensor {k} (speculators has no such weight)" for k in sorted(saved.keys() - loaded.keys())]
    problems += [f"missing tensor {k} (left as initialised)" for k in sorted(loaded.keys() - saved.keys() - allowed)]
    problems += [
        f"tensor {k} loaded as something else" for k in sorted(saved.keys() & loaded.keys()) if not torch.equal(saved[k], loaded[k])
    ]
    if verifier is not None:
        problems += [
            f"tensor {k} not filled from the verifier"
            for k, want in from_verifier(model, verifier).items()
            if k not in saved and not torch.equal(loaded[k], want)
        ]
    print(
        f"  tensors: {len(saved)} in the file, {len(saved.keys() & loaded.keys())} loaded as saved; from the verifier: "
        f"{', '.join(sorted(allowed & loaded.keys() - saved.keys())) or 'none'}"
    )
    return problems


def from_verifier(model, verifier: str) -> dict[str, torch.Tensor]:
    """What the loader should have taken from the verifier, read with speculators' own name resolution."""
    from speculators.utils.loading import load_model_layers

    weights = load_model_layers(["embed_tokens.weight", "lm_head.weight"], verifier)
    head = weights.get("lm_head.weight", weights["embed_tokens.weight"])  # tied embeddings: no lm_head in the folder
    head = head[model.t2d] if model.use_draft_vocab else head
    return {"embed_tokens.weight": weights["embed_tokens.weight"], "lm_head.weight": head, "verifier_lm_head.weight": head}


@torch.no_grad()
def eagle3_logits(model, check: dict, steps: int) -> torch.Tensor:
    """Step k of TTT row s = anchor s + 1, slot k + 1 (row s pairs the feature of s with token s + 1, position s)."""
    tokens, features, anchors = check["tokens"], check["features"], check["anchors"]
    length = features.shape[1]
    outputs = []
    handle = model.lm_head.register_forward_hook(lambda _m, _i, out: outputs.append(out))
    try:
        model(
            hidden_states=features,
            input_ids=tokens[None, 1 : length + 1],
            document_ids=torch.zeros(1, length, dtype=torch.long),
            position_ids=torch.arange(length)[None],
            ttt_steps=steps,
        )
    finally:
        handle.remove()
    return torch.stack(outputs, 2)[0, anchors - 1].float()  # (n, K, V_draft)


@torch.no_grad()
def dflash_logits(model, check: dict) -> torch.Tensor:
    """speculators' training forward with exactly the saved anchors (its loss mask picks them, sorted)."""
    tokens, features, anchors = check["tokens"], check["features"], check["anchors"]
    length, block = features.shape[1], model.block_size
    loss_mask = torch.zeros(1, length, dtype=torch.long)
    loss_mask[0, anchors] = 1
    _, logits, *_ = model._backbone_forward(
        features,
        tokens[None, :length],
        loss_mask,
        torch.zeros(1, length, model.hidden_size),
        torch.zeros(1, length, dtype=torch.long),
        torch.arange(length)[None],
        max_anchors=len(anchors),
    )
    return logits[0].view(len(anchors), block, -1)[:, 1:].float()  # slot 0 is the anchor


def check_forward(model, check_path: Path, tol: float) -> list[str]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    check = load_file(str(check_path))
    with safe_open(str(check_path), "pt") as f:
        arch = f.metadata()["arch"]
    if arch != model.config.speculators_model_type:
        return [f"{check_path.name} holds {arch} logits, the export is {model.config.speculators_model_type}"]
    ours = check["logits"]
    theirs = eagle3_logits(model, check, ours.shape[1]) if arch == "eagle3" else dflash_logits(model, check)
    if theirs.shape != ours.shape:
        return [f"speculators' logits have shape {tuple(theirs.shape)}, ours {tuple(ours.shape)}"]
    diff, scale = (theirs - ours).abs().max().item(), ours.abs().max().item()
    agree = (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item()
    print(
        f"  forward: {ours.shape[0]} anchors x {ours.shape[1]} slots x {ours.shape[2]} draft tokens; max |logit difference| "
        f"{diff:.3g} (logits up to {scale:.3g}); argmax agrees on {100 * agree:.1f}%"
    )
    return [] if diff <= tol * max(scale, 1.0) else [f"logits differ by {diff:.3g} > --tol {tol} x {max(scale, 1.0):.3g}"]


def check_export(folder: Path, verifier: str | None, tol: float) -> bool:
    import speculators  # noqa: F401  (registers the model classes)
    import transformers

    print(f"{folder} (torch {torch.__version__}, transformers {transformers.__version__})")
    try:
        model = load(folder, verifier)
    except Exception as err:  # whatever speculators raises is the finding
        print(f"  load failed: {type(err).__name__}: {' '.join(str(err).split())[:400]}\nFAIL")
        return False
    verifier = model.config.speculators_config.verifier.name_or_path
    print(f"  loaded as {type(model).__name__}; verifier {verifier}")
    problems = check_tensors(model, folder, verifier)
    check_path = folder.with_name(folder.name + ".check.safetensors")
    if verifier is None:
        print("  forward: skipped (no verifier, so no embedding: pass --verifier)")
    elif not check_path.exists():
        print(f"  forward: skipped (no {check_path.name} beside the export)")
    elif not problems:
        problems += check_forward(model, check_path, tol)
    for problem in problems:
        print(f"  {problem}")
    print("FAIL" if problems else "OK")
    return not problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("exports", nargs="+", type=Path, help="folders written by draftopd.interop.speculators.export_speculators")
    parser.add_argument("--verifier", help="the target's local folder (default: the one the export's config names)")
    parser.add_argument(
        "--tol",
        type=float,
        default=1e-5,
        help="largest |logit difference| accepted, as a fraction of the largest |logit| (float32 exports)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = [check_export(folder, args.verifier, args.tol) for folder in args.exports]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
