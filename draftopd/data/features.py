"""Offline target features: run the frozen target once over a dataset, keep what drafter training needs.

Per token of every sequence (prompt + response) the cache keeps, in bf16 safetensors shards:
- `features`: the hidden states of the drafter's target layers, concatenated (`len(layers) * H`), output-id
  convention (id i = output of decoder layer i), exactly what `Target.verify` hands the drafter at inference;
- `greedy`: the target's argmax next token after this position over its *whole* vocabulary (int32): the hard
  label of fixed-text training, and what greedy verification checks a draft against;
- `final` (optional): the target's last hidden state after its final norm, so soft labels (the target's
  distribution) come from the frozen head at the trained positions only, never stored V-wide;
- `loss_mask` (bool): which tokens are trained, only in shards that hold a sequence whose mask is not simply its
  response (multi-turn data: `SFTExample.loss_mask`); the manifest's shard entry then says `"loss_mask": true`.
  Otherwise, and in caches of format v1, a sequence trains from its `response_start` on.

SFT then trains for many epochs without running the target's decoder layers. The prefill runs the base model
(no LM head over every position; the argmax is taken chunk by chunk) on length-sorted batches.

A manifest (`manifest.json`) names the target and a fingerprint of its weights, the tokenizer's hash, layer
ids, dtype and token counts; opening a cache for another target, layer set or tokenizer is an error.
Resumable after kill -9: shards are formed deterministically from the example order, each is written to a
temporary file and renamed, and the manifest lists only finished shards, so a restart redoes at most one.
Under torchrun (`train/distributed.py`) rank r computes shards r, r + W, r + 2W, ... and rank 0 writes the manifest
of every shard once all are written; a restart (any world size) also keeps a shard file the manifest does not list
yet when it holds exactly its planned tokens. The cache is the one a single process writes, byte for byte.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from ..train import distributed as ddp
from .prompts import DataError

FORMAT = "draftopd-features-v2"  # v2: loss masks of multi-turn sequences
READABLE_FORMATS = (FORMAT, "draftopd-features-v1")  # v1 caches read as response masks


@dataclass(frozen=True)
class FeatureManifest:
    """What a cache holds and what it was made from (manifest.json)."""

    target: str
    weights_hash: str
    tokenizer_hash: str | None
    layer_ids: tuple[int, ...]
    hidden_size: int
    keep_final: bool
    dtype: str = "bfloat16"
    shards: tuple[dict, ...] = ()  # {"file", "sequences", "tokens"[, "loss_mask": True]} per finished shard
    format: str = FORMAT

    @property
    def sequences(self) -> int:
        return sum(s["sequences"] for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.hidden_size * (len(self.layer_ids) + int(self.keep_final)) + 4 + 4  # features, final, token, greedy


@dataclass
class CachedSequence:
    """One cached sequence: tokens (T,), response_start, features (T, L*H) bf16, greedy (T,), final (T, H) or None,
    loss_mask (T,) bool or None (trained from response_start on)."""

    tokens: Tensor
    response_start: int
    features: Tensor
    greedy: Tensor
    final: Tensor | None
    loss_mask: Tensor | None = None


def loss_mask(item) -> Tensor:
    """(T,) bool: the tokens an item trains on: its own `loss_mask` (multi-turn data), else its response. Items are
    examples (prompt_ids, response_ids, optional loss_mask), `CachedSequence`s or `SequenceShape`s."""
    own = getattr(item, "loss_mask", None)
    if own is not None:
        return torch.as_tensor(own, dtype=torch.bool)
    if isinstance(item, CachedSequence):
        return torch.arange(len(item.tokens)) >= item.response_start
    if isinstance(item, SequenceShape):
        return torch.arange(item.length) >= item.response_start
    return torch.arange(len(item.prompt_ids) + len(item.response_ids)) >= len(item.prompt_ids)


def weights_hash(model) -> str:
    """Fingerprint of a model's weights: shapes and a strided sample of every tensor (cheap, order-sensitive), rounded
    to bf16 first so the float32 and bfloat16 copies of one model agree."""
    digest = hashlib.sha256()
    for name, p in model.state_dict().items():
        flat = p.detach().flatten()
        sample = flat[:: max(1, flat.numel() // 4096)].to(torch.bfloat16).float().cpu().numpy().tobytes()
        digest.update(f"{name}{tuple(p.shape)}".encode())
        digest.update(sample)
    return digest.hexdigest()[:16]


def tokenizer_hash(tokenizer) -> str | None:
    if tokenizer is None:
        return None
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def expected_manifest(target, layer_ids: tuple[int, ...], keep_final: bool) -> FeatureManifest:
    return FeatureManifest(
        target.name, weights_hash(target.model), tokenizer_hash(target.tokenizer), tuple(layer_ids), target.hidden_size, keep_final
    )


def _check_same(
    found: FeatureManifest,
    want: FeatureManifest,
    folder: Path,
    keys: tuple[str, ...] = ("format", "weights_hash", "tokenizer_hash", "layer_ids", "hidden_size", "keep_final"),
) -> None:
    for key in keys:
        if getattr(found, key) != getattr(want, key):
            raise DataError(
                f"feature cache {folder} was made with {key}={getattr(found, key)!r}, this run needs "
                f"{getattr(want, key)!r} (target '{want.target}'); use another --features folder"
            )


def read_manifest(folder: str | Path) -> FeatureManifest:
    path = Path(folder) / "manifest.json"
    try:
        raw = json.loads(path.read_text())
        return FeatureManifest(**{**raw, "layer_ids": tuple(raw["layer_ids"]), "shards": tuple(raw["shards"])})
    except FileNotFoundError:
        raise DataError(f"no feature cache at {folder} (missing manifest.json): run `draftopd features` first") from None
    except (ValueError, TypeError, KeyError) as err:
        raise DataError(f"corrupt feature cache manifest {path}: {type(err).__name__}: {err}") from None


def _write_manifest(folder: Path, manifest: FeatureManifest) -> None:
    tmp = folder / "manifest.json.tmp"
    tmp.write_text(json.dumps(asdict(manifest), indent=2))
    os.replace(tmp, folder / "manifest.json")


def shard_plan(lengths: list[int], shard_tokens: int) -> list[range]:
    """Consecutive example ranges of about `shard_tokens` tokens each (deterministic, so a resume re-forms them)."""
    plans, start, total = [], 0, 0
    for i, n in enumerate(lengths):
        total += n
        if total >= shard_tokens:
            plans.append(range(start, i + 1))
            start, total = i + 1, 0
    if start < len(lengths):
        plans.append(range(start, len(lengths)))
    return plans


@torch.no_grad()
def prefill_features(
    target, sequences: list[list[int]], layer_ids: tuple[int, ...], keep_final: bool, batch_tokens: int = 4096
) -> list[dict[str, Tensor]]:
    """Run the target over `sequences` (length-sorted batches of about `batch_tokens` padded tokens, `Target.score`:
    no logits over every position; the argmax is taken a chunk of positions at a time)."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out: list[dict[str, Tensor] | None] = [None] * len(sequences)
    i = 0
    while i < len(order):
        j = i + 1
        while j < len(order) and (j - i + 1) * len(sequences[order[j]]) <= batch_tokens:
            j += 1
        batch = [sequences[k] for k in order[i:j]]
        width = max(len(s) for s in batch)
        rows = torch.tensor(
            [[len(s)] + list(s) + [target.pad_id] * (width - len(s)) for s in batch], dtype=torch.long, device=target.device
        )
        valid = torch.arange(width, device=target.device)[None, :] < rows[:, :1]
        scored = target.score(rows[:, 1:], valid, tuple(layer_ids))
        for b, k in enumerate(order[i:j]):
            n = len(batch[b])
            greedy = torch.cat([target.logits(c).argmax(-1) for c in scored.final[b, :n].split(256)])
            out[k] = {
                "features": scored.features[b, :n].to(torch.bfloat16).cpu(),
                "greedy": greedy.int().cpu(),
                **({"final": scored.final[b, :n].to(torch.bfloat16).cpu()} if keep_final else {}),
            }
        i = j
    return out  # type: ignore[return-value]


def build_feature_cache(
    target,
    examples: list,
    out_dir: str | Path,
    layer_ids: tuple[int, ...],
    *,
    keep_final: bool = True,
    shard_tokens: int = 65536,
    batch_tokens: int = 4096,
    progress: bool = True,
) -> FeatureManifest:
    """Cache features of `examples` (objects with prompt_ids, response_ids, optional loss_mask) in `out_dir`; resumes a
    partial cache.
    Under torchrun shard i is computed by rank i % world size and rank 0 writes the manifest of every shard."""
    from tqdm import tqdm

    if not examples:
        raise DataError("no examples to cache features for")
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    ddp.init(target.device)
    manifest = ddp.main_first(lambda: _start_manifest(folder, expected_manifest(target, layer_ids, keep_final)))
    seqs = [list(e.prompt_ids) + list(e.response_ids) for e in examples]
    plan = shard_plan([len(s) for s in seqs], shard_tokens)
    entries = [
        {
            "file": f"shard-{index:05d}.safetensors",
            "sequences": len(rows),
            "tokens": sum(len(seqs[i]) for i in rows),
            **({"loss_mask": True} if _masked(examples, rows) else {}),
        }
        for index, rows in enumerate(plan)
    ]
    listed = {s["file"]: s for s in manifest.shards}
    if any(listed.get(e["file"], e) != e for e in entries) or not listed.keys() <= {e["file"] for e in entries}:
        raise DataError(f"feature cache {folder} was made from other examples or another --shard-tokens: use another --out folder")
    done = [e["file"] in listed or _complete_shard(folder / e["file"], [seqs[i] for i in rows]) for e, rows in zip(entries, plan)]
    mine = [i for i in range(len(plan)) if not done[i] and i % ddp.world_size() == ddp.rank()]
    bar = tqdm(
        total=sum(entries[i]["tokens"] for i in mine),
        desc="features",
        unit="tok",
        unit_scale=True,
        disable=not progress or not ddp.is_main(),
        dynamic_ncols=True,
    )
    t0 = time.perf_counter()
    for index in mine:
        _write_shard(folder / entries[index]["file"], target, examples, seqs, plan[index], layer_ids, keep_final, batch_tokens)
        done[index] = True
        if ddp.world_size() == 1:  # the finished shards, in plan order: a kill loses at most the shard in flight
            _write_manifest(folder, replace(manifest, shards=tuple(e for e, d in zip(entries, done) if d)))
        bar.update(entries[index]["tokens"])
        bar.set_postfix(tok_s=f"{bar.n / max(time.perf_counter() - t0, 1e-9):.0f}")
    bar.close()
    manifest = replace(manifest, shards=tuple(entries))
    ddp.barrier()  # every rank's shards are written
    if ddp.is_main():
        _write_manifest(folder, manifest)
    ddp.barrier()
    return manifest


def _masked(examples: list, rows: range) -> bool:
    """Whether a shard of these rows stores loss masks: one of them has its own (not simply its response)."""
    return any(getattr(examples[i], "loss_mask", None) is not None for i in rows)


def _start_manifest(folder: Path, want: FeatureManifest) -> FeatureManifest:
    """The folder's manifest (refused when made for another target or layer set), or `want` with no shards, written
    before any shard so that every shard file in the folder belongs to it."""
    if (folder / "manifest.json").exists():
        manifest = read_manifest(folder)
        _check_same(manifest, want, folder)
        return manifest
    _write_manifest(folder, want)
    return want


def _complete_shard(path: Path, seqs: list[list[int]]) -> bool:
    """A shard file the manifest does not list yet (a multi-process run writes the manifest at its end) is complete
    when it exists (written under a temporary name, then renamed) and holds exactly these sequences' tokens."""
    from safetensors import safe_open

    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            offsets, tokens = handle.get_tensor("offsets"), handle.get_tensor("tokens")
    except Exception:  # unreadable: computed again
        return False
    return offsets.tolist() == [0, *itertools.accumulate(map(len, seqs))] and tokens.tolist() == [t for s in seqs for t in s]


def _write_shard(
    path: Path, target, examples: list, seqs: list[list[int]], rows: range, layer_ids: tuple[int, ...], keep_final: bool, batch_tokens: int
) -> None:
    """One shard file: the target's features of `rows`, written to a temporary file and renamed."""
    from safetensors.torch import save_file

    cached = prefill_features(target, [seqs[i] for i in rows], layer_ids, keep_final, batch_tokens)
    lengths = torch.tensor([len(seqs[i]) for i in rows])
    tensors = {
        "tokens": torch.tensor([t for i in rows for t in seqs[i]], dtype=torch.int32),
        "offsets": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
        "response_start": torch.tensor([len(examples[i].prompt_ids) for i in rows]),
        **{key: torch.cat([c[key] for c in cached]) for key in cached[0]},
    }
    if _masked(examples, rows):
        tensors["loss_mask"] = torch.cat([loss_mask(examples[i]) for i in rows])
    save_file(tensors, str(path.with_name(path.name + ".tmp")))
    os.replace(path.with_name(path.name + ".tmp"), path)


def frequent_tokens(items, vocab_size: int, n: int, labels: str = "greedy") -> Tensor:
    """The `n` most frequent label tokens over the trained positions (`loss_mask`) of `items` (a FeatureCache,
    CachedSequences, or examples): the draft vocabulary. `labels` "greedy" counts the target's argmax before each
    trained token (fixed-text training), "text" the trained tokens themselves (regenerated answers). A FeatureCache is
    read a shard at a time (`FeatureCache.labels`), never its features."""
    if n > vocab_size:
        raise DataError(f"draft vocabulary of {n} is larger than the target's {vocab_size}")
    counts = torch.zeros(vocab_size, dtype=torch.long)
    if isinstance(items, FeatureCache):
        chunks = (items.labels(s, labels) for s in range(len(items.manifest.shards)))
    else:
        chunks = (_item_labels(item, labels) for item in items)
    for ids in chunks:
        counts += torch.bincount(ids.long(), minlength=vocab_size)
    return counts.topk(n).indices.sort().values


def _item_labels(item, labels: str) -> Tensor:
    """The label tokens at one sequence's trained positions (see `frequent_tokens`)."""
    mask = loss_mask(item)
    if isinstance(item, CachedSequence):
        return item.greedy[:-1][mask[1:]] if labels == "greedy" else item.tokens[mask]
    return torch.tensor(list(item.prompt_ids) + list(item.response_ids), dtype=torch.long)[mask]


@dataclass(frozen=True)
class SequenceShape:
    """What a batch needs of a cached sequence another rank trains: its length, where its response starts, and its loss
    mask when it has its own (None: trained from response_start on)."""

    length: int
    response_start: int
    loss_mask: Tensor | None = None


@dataclass
class FeatureCache:
    """Read side: sequences by index, shards memory-mapped on first use (safetensors `safe_open`)."""

    folder: Path
    manifest: FeatureManifest
    _index: list[tuple[int, int]] = field(default_factory=list)  # sequence -> (shard, row)
    _open: dict[int, object] = field(default_factory=dict)
    _offsets: dict[int, Tensor] = field(default_factory=dict)
    _starts: dict[int, Tensor] = field(default_factory=dict)  # response starts of the shards `shape` has read
    _masks: dict[int, Tensor] = field(default_factory=dict)  # loss masks of the shards `shape` has read (those that hold them)
    columns: tuple[int, ...] | None = None  # the cached layers a drafter reads, when it reads a subset of them

    @staticmethod
    def open(folder: str | Path, target, layer_ids: tuple[int, ...], need_final: bool = False) -> FeatureCache:
        """A cache of `target` holding (at least) `layer_ids`: a drafter may read any subset of the cached layers, so
        drafters fed different layers (DFlash and EAGLE-3) train from one cache."""
        folder = Path(folder)
        manifest = read_manifest(folder)
        if manifest.format in READABLE_FORMATS:  # an older format this version reads
            manifest = replace(manifest, format=FORMAT)
        _check_same(
            manifest,
            expected_manifest(target, layer_ids, manifest.keep_final),
            folder,
            ("format", "weights_hash", "tokenizer_hash", "hidden_size", "keep_final"),
        )
        missing = [i for i in layer_ids if i not in manifest.layer_ids]
        if missing:
            raise DataError(
                f"feature cache {folder} holds target layers {list(manifest.layer_ids)}, this drafter also reads "
                f"{missing}: use another --features folder or build one with those layers"
            )
        if need_final and not manifest.keep_final:
            raise DataError(f"feature cache {folder} has no final hidden states (soft labels need them): rebuild it with them")
        if manifest.sequences == 0:
            raise DataError(f"feature cache {folder} is empty")
        columns = None if tuple(layer_ids) == manifest.layer_ids else tuple(manifest.layer_ids.index(i) for i in layer_ids)
        cache = FeatureCache(folder, manifest, columns=columns)
        cache._index = [(s, r) for s, shard in enumerate(manifest.shards) for r in range(shard["sequences"])]
        return cache

    def __len__(self) -> int:
        return len(self._index)

    def _shard(self, s: int):
        if s not in self._open:
            from safetensors import safe_open

            path = self.folder / self.manifest.shards[s]["file"]
            try:
                handle = safe_open(str(path), framework="pt")
                offsets = handle.get_tensor("offsets")
            except Exception as err:  # missing or truncated shard
                raise DataError(f"feature cache shard {path} is unreadable ({type(err).__name__}: {err}): rebuild the cache") from None
            if int(offsets[-1]) != self.manifest.shards[s]["tokens"]:
                raise DataError(f"feature cache shard {path} does not match the manifest: rebuild the cache")
            self._open[s], self._offsets[s] = handle, offsets
        return self._open[s], self._offsets[s]

    def _tensor(self, s: int, key: str) -> Tensor:
        handle, _ = self._shard(s)
        try:
            return handle.get_tensor(key)
        except Exception as err:
            raise DataError(
                f"feature cache shard {self.manifest.shards[s]['file']} is truncated ({type(err).__name__}): rebuild the cache"
            ) from None

    def shape(self, i: int) -> SequenceShape:
        """Sequence i's length, response start and (a shard that holds them) loss mask, read from its shard's offsets,
        response starts and loss masks (kept once the shard is open), without touching its features."""
        s, row = self._index[i]
        _, offsets = self._shard(s)
        if s not in self._starts:
            self._starts[s] = self._tensor(s, "response_start")
            if self._has_masks(s):
                self._masks[s] = self._tensor(s, "loss_mask")
        a, b = int(offsets[row]), int(offsets[row + 1])
        return SequenceShape(b - a, int(self._starts[s][row]), self._masks[s][a:b] if s in self._masks else None)

    def _has_masks(self, s: int) -> bool:
        return bool(self.manifest.shards[s].get("loss_mask"))

    def labels(self, s: int, labels: str = "greedy") -> Tensor:
        """Shard s's label tokens at every trained position (`frequent_tokens`): the text itself ("text") or the
        target's argmax at the position before ("greedy"). Reads the shard's tokens or greedy, offsets and response
        starts (or loss masks, in a shard that holds them), no features."""
        _, offsets = self._shard(s)
        lengths = offsets[1:] - offsets[:-1]
        row = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        local = torch.arange(int(offsets[-1])) - offsets[row]  # each position's index within its sequence
        mask = self._tensor(s, "loss_mask") if self._has_masks(s) else local >= self._tensor(s, "response_start")[row]
        if labels == "greedy":  # the argmax at position p labels the token at p + 1, within one sequence
            return self._tensor(s, "greedy")[(local < lengths[row] - 1) & torch.cat([mask[1:], mask.new_zeros(1)])]
        return self._tensor(s, "tokens")[mask]

    def __getitem__(self, i: int) -> CachedSequence:
        s, row = self._index[i]
        handle, offsets = self._shard(s)
        a, b = int(offsets[row]), int(offsets[row + 1])
        get = lambda key: handle.get_slice(key)[a:b]  # noqa: E731
        try:
            features = get("features")
            if self.columns is not None:
                features = features.view(b - a, len(self.manifest.layer_ids), -1)[:, list(self.columns)].reshape(b - a, -1)
            return CachedSequence(
                get("tokens").long(),
                int(handle.get_slice("response_start")[row : row + 1][0]),
                features,
                get("greedy").long(),
                get("final") if self.manifest.keep_final else None,
                get("loss_mask") if self._has_masks(s) else None,
            )
        except Exception as err:
            raise DataError(
                f"feature cache shard {self.manifest.shards[s]['file']} is truncated ({type(err).__name__}): rebuild the cache"
            ) from None
