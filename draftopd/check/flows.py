"""Every flow of the project, small, on one device: what proves the CUDA paths without (and with) a GPU.

A `Bench` holds a tiny seeded target (Llama-shaped, sharpened so greedy text has structure a drafter can learn) on a
device, a few prompts and a scratch folder; each flow in `FLOWS` runs one command's code path on it (decoding in
every mode, regeneration, the feature cache, SFT online and from the cache, Draft-OPD in each loss mode, evaluation,
greedy replay, export and import) and returns a small summary of plain numbers (token ids, losses, counts).

- `tests/test_device.py` runs every flow on the fake CUDA device (`fake_cuda.py`), where any device mix raises, and
  on the CPU: the arithmetic underneath is the same, so the summaries must be equal, and it bounds the host syncs a
  round and a training step.
- `benchmarks/device_check.py` runs them for real on a GPU (`--device cuda`), where greedy decoding must still equal
  plain decoding and training must run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..config import DecodeConfig, DrafterConfig, EvalConfig, OptimConfig, SFTConfig
from ..data.prompts import Prompt
from ..data.regenerate import SFTExample, load_regenerated, regenerate
from ..decode.speculative import autoregressive_generate, generate
from ..models.drafter import Drafter, load_drafter, new_drafter
from ..models.load import tiny_target
from ..models.target import Target

DRAFT_SHAPE = DrafterConfig(block_size=8, mask_token_id=62)  # MASK: a target row (the reference DFlash format)
SFT = SFTConfig(
    steps=2, batch_size=4, anchors_per_seq=8, save_every=1000, autocast="float32", optim=OptimConfig(lr=2e-3, min_warmup_steps=1)
)


@dataclass
class Bench:
    """A tiny target on `device` (`dtype`), prompts, and `out` for files; drafters built fresh per flow (seeded)."""

    device: str
    out: Path
    dtype: torch.dtype = torch.float32
    target: Target = field(init=False)
    prompts: list[list[int]] = field(init=False)
    PROMPT_LENGTHS = (5, 9, 3, 12, 7, 4, 10, 6)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.target = tiny_target("llama", sharpness=30.0, seed=0)
        self.target.model.to(device=self.device, dtype=self.dtype)
        g = torch.Generator().manual_seed(0)
        self.prompts = [torch.randint(0, 60, (n,), generator=g).tolist() for n in self.PROMPT_LENGTHS]

    def drafter(self, **cfg) -> Drafter:
        """A new drafter (float32 weights, on the target's device)."""
        return new_drafter(self.target, replace(DRAFT_SHAPE, **cfg), seed=1)

    def examples(self, n: int = 8, new_tokens: int = 24) -> list[SFTExample]:
        """The target's own greedy answers to the prompts (what SFT trains on)."""
        traces = autoregressive_generate(self.target, self.prompts[:n], DecodeConfig(max_new_tokens=new_tokens, stop_at_eos=False)).traces
        return [SFTExample(str(i), tuple(t.prompt), tuple(t.output)) for i, t in enumerate(traces)]


def _texts(gen) -> dict:
    return {"outputs": [t.output for t in gen.traces], "rounds": sum(t.rounds for t in gen.traces)}


def _decode(bench: Bench, arch: str = "dflash", row_seeds: bool = False, **cfg) -> dict:
    decode = DecodeConfig(max_new_tokens=24, stop_at_eos=False, **cfg)
    seeds = list(range(100, 100 + len(bench.prompts))) if row_seeds else None
    out = _texts(generate(bench.target, bench.drafter(arch=arch), bench.prompts, decode, seeds))
    if decode.temperature == 0:  # lossless: the same text as plain decoding
        out["plain"] = _texts(autoregressive_generate(bench.target, bench.prompts, decode))["outputs"]
    return out


def _metrics(folder: Path) -> list[dict]:
    keep = ("train/loss", "train/loss_acc", "train/loss_rej", "rollout/tau", "train/grad_norm")
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: round(r[k], 5) for k in keep if k in r} for r in rows]


def _sft(bench: Bench, name: str, arch: str = "dflash", cached: bool = False, vocab: int | None = None, loss: str = "ce") -> dict:
    from ..data.features import FeatureCache, build_feature_cache, frequent_tokens
    from ..train.sft import train_sft

    drafter = bench.drafter(arch=arch, vocab_size=vocab)
    items = bench.examples()
    if cached:
        folder = bench.out / f"{name}-features"
        build_feature_cache(bench.target, items, folder, drafter.spec.target_layer_ids, keep_final=True, shard_tokens=64, progress=False)
        items = FeatureCache.open(folder, bench.target, drafter.spec.target_layer_ids, need_final=True)
    if vocab:
        drafter.set_draft_vocab(frequent_tokens(items, bench.target.vocab_size, vocab, "text"))
    train_sft(
        bench.target, drafter, items, replace(SFT, loss=loss, labels="greedy" if cached else "text"), bench.out / name, progress=False
    )
    return {"metrics": _metrics(bench.out / name)}


def _opd(bench: Bench, name: str, **cfg) -> dict:
    from ..train.losses import LossConfig
    from ..train.opd import OPDConfig, train_opd

    loss = LossConfig(mode=cfg.pop("mode", "estimate"))
    rollout = DecodeConfig(max_new_tokens=16, temperature=cfg.pop("temperature", 0.0))
    opd = OPDConfig(
        steps=2,
        prompts_per_rollout=4,
        rollouts_per_step=1,
        replay_batch=2,
        rollout=rollout,
        autocast="float32",
        loss=loss,
        optim=OptimConfig(lr=2e-3, min_warmup_steps=1),
        **cfg,
    )
    train_opd(bench.target, bench.drafter(), bench.prompts, opd, bench.out / name, progress=False)
    return {"metrics": _metrics(bench.out / name)}


def _regenerate(bench: Bench) -> dict:
    prompts = [Prompt(str(i), "bench", (("user", "x"),)) for i in range(len(bench.prompts))]
    cfg = DecodeConfig(max_new_tokens=16, temperature=0.8, seed=3)
    regenerate(
        bench.target,
        prompts,
        bench.out / "regen.jsonl",
        cfg,
        drafter=bench.drafter(),
        batch_size=4,
        prompt_ids=bench.prompts,
        progress=False,
    )
    return {"responses": [list(e.response_ids) for e in load_regenerated(bench.out / "regen.jsonl").examples]}


def _features(bench: Bench) -> dict:
    from ..data.features import FeatureCache, build_feature_cache

    layers = bench.drafter().spec.target_layer_ids
    build_feature_cache(bench.target, bench.examples(), bench.out / "features", layers, keep_final=True, shard_tokens=64, progress=False)
    cache = FeatureCache.open(bench.out / "features", bench.target, layers, need_final=True)
    return {
        "sequences": len(cache),
        "greedy": [cache[i].greedy.tolist() for i in range(len(cache))],
        "feature_sum": round(sum(float(cache[i].features.float().sum()) for i in range(len(cache))), 2),
    }


def _eval(bench: Bench) -> dict:
    from ..eval.evaluate import evaluate

    report = evaluate(
        bench.target,
        bench.drafter().to(bench.dtype),
        EvalConfig(num_prompts=4, bootstrap_resamples=50, decode=DecodeConfig(max_new_tokens=16)),
        prompt_sets={"bench": bench.prompts[:4]},
        progress=False,
    )
    row = report.row("all")
    return {"tau": round(row.tau, 6), "rounds": row.rounds, "mismatches": row.mismatches}


def _replay(bench: Bench) -> dict:
    from ..eval.replay import replay_tau

    outputs = [
        t.output for t in autoregressive_generate(bench.target, bench.prompts, DecodeConfig(max_new_tokens=24, stop_at_eos=False)).traces
    ]
    drafter = bench.drafter()
    replayed = replay_tau(bench.target, drafter, bench.prompts, outputs)
    decoded = generate(bench.target, drafter, bench.prompts, DecodeConfig(max_new_tokens=24, stop_at_eos=False))
    return {"replay_rounds": [t.rounds for t in replayed.texts], "decoded_rounds": [t.rounds for t in decoded.traces]}


def _interop(bench: Bench) -> dict:
    from ..interop.dflash_ref import export_dflash, import_dflash
    from ..interop.speculators import export_speculators, import_speculators

    drafter, out = bench.drafter(), {}
    for name, export, load in (("dflash", export_dflash, import_dflash), ("speculators", export_speculators, import_speculators)):
        export(drafter, bench.out / name, bench.target)
        back = load(bench.out / name, bench.target)
        out[name] = all(
            torch.equal(a.cpu().float(), b.cpu().float()) for a, b in zip(drafter.state_dict().values(), back.state_dict().values())
        )
    from ..models.drafter import save_drafter

    save_drafter(drafter, bench.out / "saved")
    out["saved"] = all(
        torch.equal(a.cpu(), b.cpu())
        for a, b in zip(drafter.state_dict().values(), load_drafter(bench.out / "saved", bench.target).state_dict().values())
    )
    return out


FLOWS: dict[str, Callable[[Bench], dict]] = {
    "generate-greedy": lambda b: _decode(b),
    "generate-greedy-eagle3": lambda b: _decode(b, "eagle3"),
    "generate-sampled-row-seeds": lambda b: _decode(b, temperature=1.0, row_seeds=True),
    "generate-sampled-eagle3": lambda b: _decode(b, "eagle3", temperature=0.7, seed=2),
    "generate-lookup": lambda b: _decode(b, lookup_ngram=2),
    "generate-num-drafts": lambda b: _decode(b, num_drafts=2),
    "generate-confidence": lambda b: _decode(b, draft_confidence=0.05),
    "generate-confidence-eagle3": lambda b: _decode(b, "eagle3", draft_confidence=0.05),
    "regenerate": _regenerate,
    "features": _features,
    "sft-online": lambda b: _sft(b, "sft-online"),
    "sft-online-eagle3-kl": lambda b: _sft(b, "sft-online-eagle3", arch="eagle3", loss="kl"),
    "sft-cache-reduced-vocab-kl": lambda b: _sft(b, "sft-cache", cached=True, vocab=32, loss="kl"),
    "sft-cache-eagle3": lambda b: _sft(b, "sft-cache-eagle3", arch="eagle3", cached=True),
    "opd-estimate": lambda b: _opd(b, "opd-estimate"),
    "opd-exact": lambda b: _opd(b, "opd-exact", mode="exact"),
    "opd-random-anchors": lambda b: _opd(b, "opd-random", anchors="random"),
    "opd-sampled": lambda b: _opd(b, "opd-sampled", temperature=1.0),
    "eval": _eval,
    "replay": _replay,
    "export-import": _interop,
}
