"""`synthetic`: a small target model of a synthetic language, where drafters get strong in minutes on a CPU.

Drafters for the embedded SmolLM2 stay near tau 1.5 on a CPU budget (its text is hard to predict and supervised data
is the limit), far from the regime Draft-OPD was published in (tau about 6). This target lets the method be tested
where its premise holds, with seeds, in minutes.

The language (`SyntheticLanguage`, all of it drawn from `SyntheticSpec.seed`):
- characters are tokens: the letters a-z, space and full stop, plus `<pad>`, `<eos>` and one token per topic;
- a lexicon of `words` random words of `min_word`..`max_word` letters; a word's letters follow from its first ones;
- a text is a topic token followed by sentences. The next word depends on the topic, the previous word and the
  position in the sentence: among `branching` candidate words (drawn from the topic's half of the lexicon) the
  first has probability `peak`, the others share the rest geometrically; after `min_sentence` words a sentence ends
  with probability rising by `end_step` a word; after a full stop the text ends with probability `eos`.
So greedy text is predictable several tokens ahead (within words, and across them where the top word dominates)
without being a short cycle (the state is topic x previous word x position: greedy text repeats only after many
sentences; `repeated_ngram_share` measures it).

The target is a Llama-shaped causal LM (`layers` x `hidden`) trained with next-token cross-entropy on
`train_sequences` texts of the language for `train_steps` AdamW steps (about 6 minutes on 2 CPU cores), then saved
with a character tokenizer as a plain Hugging Face folder in the user cache, keyed by the spec's hash, so
`load_target("synthetic")` builds it once and loads it in a second after. The named prompt set `synthetic`
(`prompt_set`: `draftopd ... --prompts synthetic`, `load_prompts("synthetic", split=...)`) holds 20,000 starts of
texts (a topic token and 3 to 12 sampled words), split into training and held-out prompts like the other sets.
Measured on the default spec (README of `experiments/synthetic-opd`): greedy texts keep about 98% valid words and
repeat 11% of their 4-grams over 128 tokens; a 1-layer block-8 DFlash drafter trained by SFT on the target's
temperature-1 answers reaches held-out greedy tau above 5.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import string
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..config import ConfigError, check_ints, check_number, require

LETTERS = string.ascii_lowercase
SPACE, STOP = " ", "."


@dataclass(frozen=True)
class SyntheticSpec:
    """The synthetic language and the target trained on it (see the module docstring)."""

    seed: int = 0
    topics: int = 4
    words: int = 200
    min_word: int = 2
    max_word: int = 7
    branching: int = 5  # candidate next words
    peak: float = 0.72  # probability of the first candidate; the others share the rest, each half the one before
    min_sentence: int = 4
    end_step: float = 0.3  # sentence-end probability after min_sentence words, rising by this much a word
    eos: float = 0.04  # probability that a text ends after a full stop
    layers: int = 4
    hidden: int = 128
    heads: int = 4
    max_positions: int = 1024
    train_sequences: int = 6000
    train_tokens: int = 192  # tokens a training text
    train_steps: int = 800
    batch: int = 32
    lr: float = 3e-3

    flag_prefix = "synthetic_"

    def __post_init__(self) -> None:
        check_ints(self, 0, "seed")
        check_ints(self, 1, "topics", "layers", "heads", "train_sequences", "train_steps", "batch")
        check_ints(self, 2, "words", "min_word", "branching", "min_sentence")
        check_ints(self, 16, "train_tokens", "max_positions")
        check_ints(self, 8, "hidden")
        require(
            self,
            "max_word",
            isinstance(self.max_word, int) and self.max_word >= self.min_word,
            f"must be at least min_word ({self.min_word})",
        )
        require(self, "branching", self.branching <= self.words // 2, f"must be at most half the words ({self.words // 2})")
        require(self, "hidden", self.hidden % self.heads == 0, f"must be divisible by heads ({self.heads})")
        check_number(self, "peak", 0, 1, above=True)
        check_number(self, "end_step", 0, 1, above=True)
        check_number(self, "eos", 0, 1)
        check_number(self, "lr", 0, above=True)
        probs = candidate_probs(self.peak, self.branching)
        if abs(sum(probs) - 1) > 1e-9 or min(probs) < 0:
            raise ConfigError(
                f"--synthetic-peak {self.peak} with --synthetic-branching {self.branching}: the candidates' probabilities do not sum to 1"
            )
        if len(LETTERS) ** self.max_word < 2 * self.words:
            raise ConfigError(f"--synthetic-words {self.words}: too many for words of at most {self.max_word} letters")

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def candidate_probs(peak: float, branching: int) -> list[float]:
    """The first candidate `peak`, the others (1 - peak) split so each has half the one before."""
    if branching == 1:
        return [1.0]
    halves = [0.5**i for i in range(branching - 1)]
    return [peak] + [(1 - peak) * h / sum(halves) for h in halves]


class SyntheticLanguage:
    """The language of `spec`: its vocabulary, lexicon and transition rule; samples texts and prompts."""

    def __init__(self, spec: SyntheticSpec = SyntheticSpec()):
        self.spec = spec
        rng = random.Random(spec.seed)
        self.specials = ["<pad>", "<eos>"] + [f"<t{i}>" for i in range(spec.topics)]
        self.chars = list(LETTERS) + [SPACE, STOP]
        self.vocab = {tok: i for i, tok in enumerate(self.specials + self.chars)}
        lexicon: list[str] = []
        seen: set[str] = set()
        while len(lexicon) < spec.words:
            word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(spec.min_word, spec.max_word)))
            if word not in seen:
                seen.add(word)
                lexicon.append(word)
        self.lexicon = lexicon
        self.topic_words = [rng.sample(range(spec.words), spec.words // 2) for _ in range(spec.topics)]
        self.probs = candidate_probs(spec.peak, spec.branching)
        self._table: dict[tuple[int, int, int], list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def topic_token(self, topic: int) -> int:
        return self.vocab[f"<t{topic}>"]

    def candidates(self, topic: int, previous: int, position: int) -> list[int]:
        """The `branching` candidate next words (lexicon indices, the most likely first) after word `previous` (-1 at a
        text's start) at `position` in the sentence (capped at 8)."""
        key = (topic, previous, min(position, 8))
        if key not in self._table:
            rng = random.Random(hash_ints(self.spec.seed, *key))
            self._table[key] = rng.sample(self.topic_words[topic], self.spec.branching)
        return self._table[key]

    def end_probability(self, position: int) -> float:
        return 0.0 if position < self.spec.min_sentence else min(1.0, self.spec.end_step * (position - self.spec.min_sentence + 1))

    def sample_words(self, topic: int, rng: random.Random, n_words: int, greedy: bool = False) -> list[str]:
        """A text of about `n_words` words: its words and punctuation as strings (" " and "." between words)."""
        out, previous, position = [], -1, 0
        while len(out) < n_words:
            if position > 0 and (self.end_probability(position) >= 0.5 if greedy else rng.random() < self.end_probability(position)):
                out.append(STOP)
                if not greedy and rng.random() < self.spec.eos:
                    break
                position = 0
            options = self.candidates(topic, previous, position)
            word = options[0] if greedy else rng.choices(options, self.probs)[0]
            out.append(self.lexicon[word])
            previous, position = word, position + 1
        return out

    def render(self, topic: int, pieces: list[str]) -> list[int]:
        """Token ids of a text: the topic token, then the words separated by spaces, each full stop after its word."""
        text = ""
        for piece in pieces:
            text += piece if piece == STOP or not text else SPACE + piece
        return [self.topic_token(topic)] + [self.vocab[c] for c in text]

    def sample(self, rng: random.Random, tokens: int) -> list[int]:
        """A text of at most `tokens` tokens from a random topic (ending with `<eos>` when it ended early)."""
        topic = rng.randrange(self.spec.topics)
        words = self.sample_words(topic, rng, tokens)
        ids = self.render(topic, words)
        ended = len(ids) < tokens
        return ids[: tokens - 1] + [self.vocab["<eos>"]] if ended else ids[:tokens]

    def prompt_texts(self, n: int, seed: int = 0) -> list[str]:
        """`n` prompts as text: a topic token and 3 to 12 sampled words, the start of a text (`prompt_set`)."""
        rng = random.Random(hash_ints(self.spec.seed, seed, 1))
        out = []
        for _ in range(n):
            topic = rng.randrange(self.spec.topics)
            out.append(self.decode(self.render(topic, self.sample_words(topic, rng, rng.randint(3, 12)))))
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of a text written in this language (topic tokens written as `<tN>`)."""
        ids, i = [], 0
        while i < len(text):
            if text[i] == "<":
                end = text.index(">", i) + 1
                ids.append(self.vocab[text[i:end]])
                i = end
            else:
                ids.append(self.vocab[text[i]])
                i += 1
        return ids

    def decode(self, ids: list[int]) -> str:
        names = list(self.vocab)
        return "".join(names[i] for i in ids)

    def tokenizer(self):
        """A character tokenizer over this vocabulary (Hugging Face, saved with the target)."""
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        core = Tokenizer(models.WordLevel(self.vocab, unk_token="<pad>"))
        core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
        core.decoder = decoders.Fuse()
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", additional_special_tokens=self.specials[2:]
        )
        return tokenizer


def hash_ints(*values: int) -> int:
    return int.from_bytes(hashlib.sha256(",".join(map(str, values)).encode()).digest()[:8], "little")


def repeated_ngram_share(tokens: list[int], n: int = 4) -> float:
    """The share of a text's n-grams that repeat an earlier n-gram of the same text."""
    seen, repeats, total = set(), 0, 0
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i : i + n])
        repeats += gram in seen
        total += 1
        seen.add(gram)
    return repeats / max(total, 1)


def build_target(spec: SyntheticSpec, folder: Path, progress: bool = True) -> dict:
    """Train the target of `spec` and save it (model, tokenizer, `synthetic.json` with the spec and training log) at
    `folder`, atomically."""
    from transformers import LlamaConfig, LlamaForCausalLM

    language = SyntheticLanguage(spec)
    rng = random.Random(hash_ints(spec.seed, 3))
    corpus = torch.tensor(_pad([language.sample(rng, spec.train_tokens) for _ in range(spec.train_sequences)], spec.train_tokens))
    config = LlamaConfig(
        vocab_size=language.vocab_size,
        hidden_size=spec.hidden,
        intermediate_size=4 * spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=spec.max_positions,
        bos_token_id=None,
        eos_token_id=language.vocab["<eos>"],
        pad_token_id=language.vocab["<pad>"],
        tie_word_embeddings=False,
        rope_theta=10000.0,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, spec.train_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / spec.train_steps)))
    )
    order = torch.Generator().manual_seed(spec.seed)
    log, t0 = [], time.perf_counter()
    model.train()
    for step in range(spec.train_steps):
        batch = corpus[torch.randint(0, len(corpus), (spec.batch,), generator=order)]
        labels = batch.masked_fill(batch == language.vocab["<pad>"], -100)
        loss = model(input_ids=batch, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step()
        if step % 100 == 0 or step == spec.train_steps - 1:
            log.append({"step": step, "loss": round(float(loss.detach()), 4), "seconds": round(time.perf_counter() - t0, 1)})
            if progress:
                print(f"[draftopd] synthetic target: step {step}/{spec.train_steps} loss {log[-1]['loss']:.3f}", flush=True)
    model.eval()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    language.tokenizer().save_pretrained(tmp)
    info = {"spec": asdict(spec), "log": log, "entropy_bits_per_token": language_entropy(language, rng)}
    (tmp / "synthetic.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return info


def _pad(rows: list[list[int]], width: int) -> list[list[int]]:
    return [row + [0] * (width - len(row)) for row in rows]


def language_entropy(language: SyntheticLanguage, rng: random.Random, samples: int = 200) -> float:
    """Cross-entropy (nats a token) an ideal model of the language would reach on its texts, estimated over sampled texts:
    word choices carry the entropy (letters within a word are determined once the word is)."""
    spec, probs = language.spec, language.probs
    word_h = -sum(p * math.log(p) for p in probs)
    tokens = 0
    words = 0
    for _ in range(samples):
        pieces = language.sample_words(rng.randrange(spec.topics), rng, spec.train_tokens)
        words += sum(p != STOP for p in pieces)
        tokens += len(language.render(0, pieces))
    return word_h * words / max(tokens, 1)


DEFAULT_SPEC = SyntheticSpec()
PROMPT_POOL = 20_000


def prompt_set(spec: SyntheticSpec | None = None):
    """The named prompt set `synthetic`: PROMPT_POOL prompts of the language, ids `synthetic/<i>`, raw text only (the
    target has no chat template)."""
    from ..data.prompts import Prompt, PromptSet

    texts = SyntheticLanguage(spec or DEFAULT_SPEC).prompt_texts(PROMPT_POOL)
    return PromptSet([Prompt(f"synthetic/{i}", "synthetic", (("user", t),), raw=t) for i, t in enumerate(texts)], 0)


def synthetic_folder(spec: SyntheticSpec | None = None, progress: bool = True) -> Path:
    """The cached folder of the target of `spec` (default: `DEFAULT_SPEC`), built on first use."""
    from .load import cache_dir

    spec = spec or DEFAULT_SPEC
    folder = cache_dir() / "targets" / f"synthetic-{spec.key()}"
    if not (folder / "config.json").exists():
        if progress:
            print(f"[draftopd] building the synthetic target once into {folder} (a few minutes on 2 cores)", flush=True)
        build_target(spec, folder, progress)
    return folder
