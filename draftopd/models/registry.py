"""Drafter families: one module per family holds everything that is that family's, and this registry finds it.

A family (`Family`) is the drafter class, its config rules (default target layers, a fixed depth, whether it has a
MASK), the `architecture` name its checkpoints carry, and its export adapters: the speculators pieces
(`Speculators`), whether z-lab's reference DFlash format holds it, and how llama.cpp takes it (`GGUF`). Generic code
(`drafter.py`, `decode/`, `train/`, `eval/`, `interop/`) looks a family up here by `DrafterSpec.arch` and never
branches on its name. The built-in families are `models/dflash.py` and `models/eagle3.py`, each module named as its
family and loaded on first use: this module imports neither torch nor them, so `config.py` takes the `--draft-arch`
values from it (`NAMES`) without loading a model.

How to add a drafter family
1. Write `models/<name>.py` with a `Drafter` subclass (`drafter.py`) implementing the seam: `project_context`
   (target features -> a `DraftContext`: per-layer keys/values, and/or `fused` features), `hidden` (the K slots'
   final hidden states after each anchor, which the target's frozen head reads) and, for a sequential drafter,
   `draft`. Give it a final RMSNorm named `norm` (`new_drafter` starts it at `--draft-final-norm-init`).
2. In the same module, `FAMILY = Family(...)`: its name (the `--draft-arch` value, saved in every checkpoint:
   never rename it), its title and article for messages, the class, the checkpoint `architecture`, its
   `default_layers(num_target_layers, num_draft_layers)` rule, `num_layers` if its depth is fixed, `has_mask`,
   and an adapter per export format it can be written in exactly (None: that format refuses it with one line).
3. Add the module's name (= the family's name) to `BUILTIN` below (outside the package: `register(FAMILY)`).
4. Tests: decode stays lossless (greedy equals `autoregressive_generate`), the training forward equals the
   decoding one, SFT runs, save/load and each export round-trip. tests/test_families.py does all of that for a toy
   family defined inside the test, with nothing in decode/ or train/ changed for it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .drafter import Drafter, DrafterSpec

BUILTIN = ("dflash", "eagle3")  # modules of this package defining a FAMILY of their name, in the order messages list them
DEFAULT = "dflash"  # the family of a new drafter when --draft-arch is not given, and of a saved spec without "arch"


@dataclass(frozen=True)
class Speculators:
    """A family's pieces of speculators' format (`interop/speculators.py` writes and reads the rest)."""

    model_type: str  # speculators_model_type, speculators_config.algorithm and vLLM's `method`
    config_class: str  # `architectures` as the export writes it (the config class)
    model_class: str  # `architectures` as speculators' own save_pretrained writes it (import takes either)
    layer_type: str  # transformer_layer_config.model_type
    layer_keys: Callable[[DrafterSpec], dict]  # transformer_layer_config keys after the shared ones
    config_keys: Callable[[DrafterSpec, list[int]], dict]  # top-level keys after the shared ones, given the capture ids
    layer_ids_key: str  # the top-level key holding the capture ids
    options: Callable[[dict, dict], dict]  # (config, layer config) -> {option: (found, the value our drafter computes)}
    check_anchors: Callable[[int, int], int]  # (tokens T, block size) -> end of the check file's anchors (where speculators picks them)
    default_captures: Callable[[int], list[int]] | None = None  # capture ids when the key is missing (N target layers)
    block_size: Callable[[dict], int] | None = None  # from config.json; None: the default proposal's tokens + 1
    num_features: int | None = None  # target layers vLLM's fc takes, when fixed
    saves_embedding: bool = False  # write the target's embedding as embed_tokens.weight
    saves_full_head: bool = False  # write lm_head.weight even when the head is the target's whole one


@dataclass(frozen=True)
class GGUF:
    """How llama.cpp's converter takes a family: from which of our exports, and how llama-server runs it."""

    spec_type: str  # llama-server --spec-type
    via: str  # the export format the converter reads ("dflash": the reference format, or "speculators")
    reads_d2t: bool  # whether that converter keeps a reduced draft vocabulary


@dataclass(frozen=True)
class Family:
    """One drafter family: its class, its config rules, its checkpoint name and its export adapters."""

    name: str  # DrafterSpec.arch, the --draft-arch value
    title: str  # "DFlash", as messages name it
    article: str  # "a" / "an" before the title
    drafter: type[Drafter]
    architecture: str  # config.json "architecture" of a saved checkpoint
    default_layers: Callable[[int, int], tuple[int, ...]]  # (target layers N, drafter layers L) -> output ids
    num_layers: int | None = None  # a fixed drafter depth
    has_mask: bool = False  # a MASK token fills the block's slots (a target row, or a learned vector)
    copy_layers: Callable | None = None  # (drafter, target decoder layers, ids): layers start as target copies
    speculators: Speculators | None = None
    reference_dflash: bool = False  # z-lab's reference DFlash format holds it
    gguf: GGUF | None = None

    @property
    def named(self) -> str:
        return f"{self.article} {self.title}"

    @property
    def depth(self) -> str:
        return "one decoder layer" if self.num_layers == 1 else f"{self.num_layers} decoder layers"


_builtin: dict[str, Family] = {}
_added: dict[str, Family] = {}


def families() -> dict[str, Family]:
    """name -> Family, the built-in ones first."""
    if not _builtin:
        for module in BUILTIN:
            family = importlib.import_module(f"{__package__}.{module}").FAMILY
            assert family.name == module, f"models/{module}.py defines the family {family.name!r}"
            _builtin[family.name] = family
    return {**_builtin, **_added}


def names() -> tuple[str, ...]:
    """The registered family names (loads no family module)."""
    return BUILTIN + tuple(_added)


class Names:
    """`names()` read when asked: a container for `in` and listing (the `choices` of `--draft-arch`), so a family
    registered after `config.py` was imported is one of them."""

    def __contains__(self, name: object) -> bool:
        return name in names()

    def __iter__(self):
        return iter(names())

    def __len__(self) -> int:
        return len(names())


NAMES = Names()


def family(name: str) -> Family:
    found = families().get(name)
    if found is None:
        raise ValueError(f"no drafter family {name!r} (one of {', '.join(names())})")
    return found


def titles(having: Callable[[Family], bool]) -> str:
    """The titles of the families `having` holds for, as a message lists them ("DFlash or EAGLE-3")."""
    found = [f.title for f in families().values() if having(f)]
    return " or ".join(found) if len(found) < 3 else ", ".join(found[:-1]) + " or " + found[-1]


def register(family: Family) -> Family:
    """Add a family defined outside the package (a plug-in, a test)."""
    if family.name in names():
        raise ValueError(f"drafter family {family.name!r} is already registered")
    _added[family.name] = family
    return family


def unregister(name: str) -> None:
    _added.pop(name, None)
