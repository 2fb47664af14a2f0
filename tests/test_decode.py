"""Tests for the speculative decoder: acceptance rules, greedy identity, lossless sampling, rollout traces,
and the Target's ragged cache and input checks."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import full_logits, hf_greedy, make_drafter, random_prompts

from draftopd.config import DecodeConfig
from draftopd.decode import speculative as S
from draftopd.decode.accept import Acceptance, RowRandom, accept_greedy, accept_sampling, sample
from draftopd.decode.lookup import lookup
from draftopd.decode.speculative import Draft, autoregressive_generate, generate, prompt_following_tokens
from draftopd.models.load import load_target
from draftopd.models.target import Target, TargetError
from draftopd.train.anchors import error_segments

pytestmark = pytest.mark.usefixtures("one_thread")

N_NEW = 32  # new tokens per greedy run: several rounds even with blocks of 16
PROMPT_LENGTHS = [1, 9, 4, 17, 6, 12, 3, 20, 7, 14]  # 10 prompts; ragged batches of 4 mix short and long
RAGGED_GROUPS = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 3]]


# ============================================================================ acceptance rules (hand-made)


def _onehot_logits(tokens: list[list[int]], vocab: int, scale: float = 10.0) -> torch.Tensor:
    return F.one_hot(torch.tensor(tokens), vocab).float() * scale


def test_accept_greedy_all_accepted_takes_bonus_from_last_position() -> None:
    target = _onehot_logits([[3, 1, 4, 2]], 6)  # argmax after anchor, d1, d2, d3
    acc = accept_greedy(target, torch.tensor([[3, 1, 4]]))
    assert acc.accepted.tolist() == [3]
    assert acc.next_token.tolist() == [2]


def test_accept_greedy_first_mismatch_gives_correction_and_ignores_later_matches() -> None:
    target = _onehot_logits([[3, 1, 4, 2], [3, 1, 4, 2], [3, 1, 4, 2]], 6)
    draft = torch.tensor(
        [
            [3, 5, 4],  # mismatch at slot 2 (slot 3 matches, but comes after a rejection)
            [0, 1, 4],  # mismatch at slot 1
            [3, 1, 0],
        ]
    )  # mismatch at slot 3
    acc = accept_greedy(target, draft)
    assert acc.accepted.tolist() == [1, 0, 2]
    assert acc.next_token.tolist() == [1, 3, 4]  # the target's argmax at the first mismatch


def test_accept_sampling_identical_p_q_accepts_everything_and_samples_bonus_from_p() -> None:
    g = torch.Generator().manual_seed(0)
    draft = torch.tensor([[2, 0, 5]] * 64)
    target = _onehot_logits([[2, 0, 5, 4]] * 64, 6, scale=50.0)  # p is (numerically) one-hot
    acc = accept_sampling(target, target[:, :-1], draft, 1.0, g)
    assert acc.accepted.tolist() == [3] * 64
    assert acc.next_token.tolist() == [4] * 64


def test_accept_sampling_rejects_impossible_draft_and_corrects_from_residual() -> None:
    g = torch.Generator().manual_seed(0)
    rows, vocab = 500, 6
    p_logits = torch.tensor([0.0, 1.0, 2.0, -1e9, 0.5, 1.5])  # token 3 impossible under p
    target = p_logits.expand(rows, 3, vocab).clone()
    draft_logits = torch.full((rows, 2, vocab), 0.0)
    draft_logits[:, 0, 3] = 30.0  # q peaked on the impossible token
    draft = torch.full((rows, 2), 3)
    acc = accept_sampling(target, draft_logits, draft, 1.0, g)
    assert acc.accepted.tolist() == [0] * rows
    assert 3 not in acc.next_token.tolist()
    # residual max(p - q, 0) with q ~ one-hot on 3 is p itself on the other tokens
    freq = torch.bincount(acc.next_token, minlength=vocab).float() / rows
    assert (freq - torch.softmax(p_logits, -1)).abs().max() < 0.07


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson chi-square goodness of fit; cells expected below `min_expected` are merged into one."""
    n = counts.sum().double()
    expected = probs.double().flatten() * n
    counts = counts.double().flatten()
    big = expected >= min_expected
    if (~big).any():
        counts = torch.cat([counts[big], counts[~big].sum()[None]])
        expected = torch.cat([expected[big], expected[~big].sum()[None]])
    stat = ((counts - expected) ** 2 / expected).sum()
    df = counts.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def test_accept_sampling_unit_is_lossless_per_slot() -> None:
    """First committed token ~ p_0; given slot 1 accepted, the second ~ p_1 (p fixed per slot here)."""
    g = torch.Generator().manual_seed(1)
    rows, vocab = 40_000, 5
    p_logits = torch.tensor([[0.3, -1.0, 1.2, 0.0, 0.8], [1.0, 0.2, -0.5, 0.9, -2.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    q_logits = torch.tensor([[2.5, -1.0, -1.0, 0.5, 0.0], [-1.0, 0.0, 2.0, 0.0, 1.0]])
    draft = torch.multinomial(torch.softmax(q_logits, -1).repeat(rows, 1), 1, generator=g).view(rows, 2)
    acc = accept_sampling(p_logits.expand(rows, -1, -1), q_logits.expand(rows, -1, -1), draft, 1.0, g)
    first = torch.where(acc.accepted >= 1, draft[:, 0], acc.next_token)
    p = torch.softmax(p_logits, -1)
    assert _chi2_pvalue(torch.bincount(first, minlength=vocab), p[0]) > 1e-4
    kept = acc.accepted >= 1
    second = torch.where(acc.accepted >= 2, draft[:, 1], acc.next_token)[kept]
    assert _chi2_pvalue(torch.bincount(second, minlength=vocab), p[1]) > 1e-4


def test_accept_with_limit_never_accepts_past_it_and_takes_the_bonus_there() -> None:
    """Greedy: row 0 proposes 1 of 3 correct drafts, row 1 all 3; row 0's next token is the target's at slot 1."""
    target = _onehot_logits([[4, 5, 6, 7], [4, 5, 6, 7]], 9)
    draft = torch.tensor([[4, 5, 6], [4, 5, 6]])
    acc = accept_greedy(target, draft, torch.tensor([1, 3]))
    assert acc.accepted.tolist() == [1, 3] and acc.next_token.tolist() == [5, 7]


@pytest.mark.parametrize("rule,lossless", [("top", True), ("drawn", False)])
def test_accept_sampling_with_a_limit_is_lossless_only_when_the_limit_ignores_the_draw(rule, lossless) -> None:
    """Slot 2 is proposed only when the drafter is sure enough. Cutting on slot 2's top probability (a function of q)
    keeps the second committed token ~ p_1; cutting on the drawn token's own probability biases it (caught)."""
    g = torch.Generator().manual_seed(3)
    rows, vocab = 60_000, 5
    p_logits = torch.tensor([[0.3, -1.0, 1.2, 0.0, 0.8], [1.0, 0.2, -0.5, 0.9, -2.0], [0.0, 0.5, 0.0, -0.5, 0.0]])
    q_logits = torch.tensor([[2.5, -1.0, -1.0, 0.5, 0.0], [-1.0, 0.0, 2.0, 0.0, 1.0]]).repeat(rows, 1, 1)
    q_logits[: rows // 2, 1] = torch.tensor([0.0, 3.0, 0.0, 0.0, 0.0])  # half the rows: slot 2 sharper (top q 0.83)
    q = torch.softmax(q_logits, -1)
    draft = torch.multinomial(q.view(-1, vocab), 1, generator=g).view(rows, 2)
    if rule == "top":
        limit = 1 + (q[:, 1].amax(-1) >= 0.6).long()
    else:
        limit = 1 + (q[:, 1].gather(1, draft[:, 1:])[:, 0] >= 0.3).long()
    assert 0.1 < (limit == 2).float().mean() < 0.9
    acc = accept_sampling(p_logits.expand(rows, -1, -1), q_logits, draft, 1.0, g, limit)
    assert (acc.accepted <= limit).all()
    p = torch.softmax(p_logits, -1)
    kept = acc.accepted >= 1
    second = torch.where(acc.accepted >= 2, draft[:, 1], acc.next_token)[kept]
    assert (_chi2_pvalue(torch.bincount(second, minlength=vocab), p[1]) > 1e-4) == lossless


# ============================================================================ greedy: identical to the target


@pytest.fixture(scope="module")
def greedy_refs(llama_target, qwen3_target):
    """Per arch: 10 prompts and their greedy continuations by HF generate (N_NEW + 16 tokens, for oracles)."""
    refs = {}
    for arch, target in (("llama", llama_target), ("qwen3", qwen3_target)):
        prompts = random_prompts(target.vocab_size, PROMPT_LENGTHS, seed=11)
        refs[arch] = [(p, hf_greedy(target, p, N_NEW + 16)) for p in prompts]
    return refs


def _arch(target: Target) -> str:
    return target.name.split("-", 1)[1]


def _perturb(drafter, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _drafter(target: Target, kind: str, block_size: int, arch: str = "dflash"):
    drafter = make_drafter(target, block_size=block_size, seed=0, arch=arch)
    if kind == "perturbed":
        _perturb(drafter, 0.5, seed=7)
    return drafter


class OracleDrafts:
    """Replaces `draft_block`: runs the real drafter (its context plumbing stays exercised) but proposes the
    target's true greedy continuation, corrupted at one random slot per row and round (or not at all), so rows
    accept ragged, often long, prefixes. Records the number of leading correct drafts per (sequence, anchor).
    Finished rows leave the batch, so it also wraps `_active` to know which sequence each batch row is."""

    def __init__(self, sequences: list[list[int]], vocab: int, seed: int):
        self.sequences, self.vocab = sequences, vocab
        self.rng = random.Random(seed)
        self.expected: dict[tuple[int, int], int] = {}
        self.real, self.real_active = S.draft_block, S._active
        self.rows = list(range(len(sequences)))

    def active(self, traces, current):
        rows = self.real_active(traces, current)
        self.rows = rows.traces
        return rows

    def __call__(self, drafter, ctx, anchor, anchor_pos, temperature, gen, num_drafts=None, confidence=0.0) -> Draft:
        real = self.real(drafter, ctx, anchor, anchor_pos, temperature, gen, num_drafts, confidence)
        k = real.tokens.shape[1]
        tokens = real.tokens.clone()
        for b, i in enumerate(self.rows):
            seq, a = self.sequences[i], int(anchor_pos[b])
            if a + 1 + k > len(seq):  # a finished row running past its reference: anything goes
                continue
            assert int(anchor[b]) == seq[a], "anchor is not the target's greedy token at its position"
            truth = seq[a + 1 : a + 1 + k]
            reject = self.rng.choice([k + 1] * k + list(range(1, k + 1)))  # half the time: accept all
            row = list(truth)
            if reject <= k:
                row[reject - 1] = (truth[reject - 1] + self.rng.randrange(1, self.vocab)) % self.vocab
                row[reject:] = [self.rng.randrange(self.vocab) for _ in row[reject:]]
            tokens[b] = torch.tensor(row)
            self.expected[(i, a)] = reject - 1
        return Draft(tokens, F.one_hot(tokens, self.vocab).float() * 20.0)


def _check_greedy(target: Target, drafter, refs, groups: list[list[int]], oracle: bool, monkeypatch) -> list[int]:
    cfg = DecodeConfig(max_new_tokens=N_NEW, stop_at_eos=False)
    accepted: list[int] = []
    for group in groups:
        prompts = [refs[i][0] for i in group]
        if oracle:
            spy = OracleDrafts([refs[i][0] + refs[i][1] for i in group], target.vocab_size, seed=sum(group))
            monkeypatch.setattr(S, "draft_block", spy)
            monkeypatch.setattr(S, "_active", spy.active)
        out = generate(target, drafter, prompts, cfg)
        for b, (i, trace) in enumerate(zip(group, out.traces)):
            assert trace.output == refs[i][1][:N_NEW], f"prompt {i} (len {len(refs[i][0])}) diverges from HF greedy"
            assert trace.finish == "length"
            accepted += trace.accepted
            if oracle:
                assert trace.accepted == [spy.expected[(b, a)] for a in trace.anchors]  # b: index in the group
        if oracle:
            monkeypatch.undo()
    return accepted


@pytest.mark.parametrize("kind", ["untrained", "perturbed", "oracle"])
@pytest.mark.parametrize("block_size", [8, 16])
def test_greedy_ragged_batches_equal_hf_generate(target, greedy_refs, block_size, kind, monkeypatch) -> None:
    refs = greedy_refs[_arch(target)]
    drafter = _drafter(target, "untrained" if kind == "oracle" else kind, block_size)
    accepted = _check_greedy(target, drafter, refs, RAGGED_GROUPS, kind == "oracle", monkeypatch)
    if kind == "oracle":  # long and ragged acceptance really happened
        assert max(accepted) == block_size - 1 and 0 in accepted and len(set(accepted)) > 3


@pytest.mark.parametrize("kind", ["untrained", "perturbed", "oracle"])
def test_eagle3_greedy_ragged_batches_equal_hf_generate(target, greedy_refs, kind, monkeypatch) -> None:
    """The EAGLE-3 chain through the same decoder: its context rows follow holes and corrections exactly."""
    refs = greedy_refs[_arch(target)]
    drafter = _drafter(target, "untrained" if kind == "oracle" else kind, 8, arch="eagle3")
    accepted = _check_greedy(target, drafter, refs, RAGGED_GROUPS, kind == "oracle", monkeypatch)
    if kind == "oracle":
        assert max(accepted) == 7 and 0 in accepted and len(set(accepted)) > 3


@pytest.mark.parametrize("kind", ["untrained", "oracle"])
@pytest.mark.parametrize("block_size", [8, 16])
def test_greedy_batch_of_one_equals_hf_generate(target, greedy_refs, block_size, kind, monkeypatch) -> None:
    refs = greedy_refs[_arch(target)]
    drafter = _drafter(target, "untrained", block_size)
    indices = range(len(refs)) if kind == "untrained" else [0, 3, 7]
    _check_greedy(target, drafter, refs, [[i] for i in indices], kind == "oracle", monkeypatch)


def test_autoregressive_baseline_equals_hf_generate(target, greedy_refs) -> None:
    refs = greedy_refs[_arch(target)]
    for group in RAGGED_GROUPS[:2]:
        out = autoregressive_generate(target, [refs[i][0] for i in group], DecodeConfig(max_new_tokens=N_NEW, stop_at_eos=False))
        assert [t.output for t in out.traces] == [refs[i][1][:N_NEW] for i in group]


@pytest.mark.parametrize("arch", ["dflash", "eagle3"])
def test_greedy_small_vocab_perturbed_drafter_accepts_raggedly(small_vocab_target, arch) -> None:
    """Vocab 8: a perturbed real drafter's drafts match often, rows accept different counts in one round."""
    target = small_vocab_target
    prompts = random_prompts(target.vocab_size, [5, 11, 2, 8], seed=5)
    refs = [hf_greedy(target, p, 40) for p in prompts]
    drafter = _drafter(target, "perturbed", 8, arch)
    out = generate(target, drafter, prompts, DecodeConfig(max_new_tokens=40, stop_at_eos=False))
    assert [t.output for t in out.traces] == refs
    per_round = [[t.accepted[m] for t in out.traces] for m in range(min(t.rounds for t in out.traces))]
    assert any(max(r) > 0 for r in per_round), "no draft token was ever accepted"
    assert any(len(set(r)) > 1 for r in per_round), "rows never accepted different numbers of tokens"


@pytest.mark.parametrize("arch", ["dflash", "eagle3"])
@pytest.mark.parametrize("num_drafts", [1, 3])
def test_fewer_drafts_per_round_stay_lossless(small_vocab_target, arch, num_drafts) -> None:
    """`num_drafts` n < K: the same greedy text, at most n accepted a round, and each round's drafts are the first n
    the full block would have proposed from the same state (DFlash keeps the first n slots of its one forward,
    EAGLE-3 stops its chain after n steps)."""
    target = small_vocab_target
    prompts = random_prompts(target.vocab_size, [5, 11, 2, 8], seed=5)
    drafter = _drafter(target, "perturbed", 8, arch)
    cfg = DecodeConfig(max_new_tokens=40, stop_at_eos=False, num_drafts=num_drafts)
    out = generate(target, drafter, prompts, cfg)
    assert [t.output for t in out.traces] == [hf_greedy(target, p, 40) for p in prompts]
    assert all(len(d) == num_drafts for t in out.traces for d in t.drafts) and max(a for t in out.traces for a in t.accepted) <= num_drafts
    assert any(a > 0 for t in out.traces for a in t.accepted)
    state, first = target.prefill([prompts[0]], drafter.spec.target_layer_ids)
    anchor = first.last_logits.argmax(-1)
    ctx = drafter.project_context(
        first.features, state.positions, state.valid, prompt_following_tokens([prompts[0]], anchor, target.pad_id)
    )
    pick = lambda logits: logits.argmax(-1)  # noqa: E731
    full, _ = drafter.draft(ctx, anchor, state.lengths.clone(), pick)
    short, _ = drafter.draft(ctx, anchor, state.lengths.clone(), pick, num_drafts)
    assert torch.equal(short, full[:, :num_drafts]) and full.shape[1] == drafter.block_size - 1
    with pytest.raises(ValueError, match="at most 7 tokens a round"):
        generate(target, drafter, prompts, replace(cfg, num_drafts=8))


@pytest.mark.parametrize("arch", ["dflash", "eagle3"])
def test_confidence_cut_stays_lossless_and_proposes_only_confident_slots(small_vocab_target, arch) -> None:
    """`draft_confidence`: the same greedy text; each round proposes the slots whose product of drafter top
    probabilities reaches the threshold (at least one), never accepts past them, and leaves the unproposed slots'
    target log-probs NaN. With the threshold at 0 every round proposes the whole block."""
    target = small_vocab_target
    prompts = random_prompts(target.vocab_size, [5, 11, 2, 8], seed=5)
    drafter = _drafter(target, "perturbed", 8, arch)
    whole_cfg = DecodeConfig(max_new_tokens=40, stop_at_eos=False, record_draft_logits=True)
    whole = generate(target, drafter, prompts, whole_cfg)
    assert all(n == 7 for t in whole.traces for n in t.proposed)
    c = _median_top_probability(whole)  # a tiny random drafter is near uniform: the threshold follows its spread
    out = generate(target, drafter, prompts, replace(whole_cfg, draft_confidence=c))
    assert [t.output for t in out.traces] == [hf_greedy(target, p, 40) for p in prompts]
    proposed = [n for t in out.traces for n in t.proposed]
    assert min(proposed) == 1 and max(proposed) > 1 and 1 < len(set(proposed))
    for t in out.traces:
        for m in range(t.rounds):
            top = torch.softmax(t.draft_logits[m], -1).amax(-1)
            n = t.proposed[m]
            assert n == max(1, int((top.cumprod(0) >= c).sum()))
            assert t.accepted[m] <= n and not t.target_logp[m][:n].isnan().any() and t.target_logp[m][n:].isnan().all()
    with pytest.raises(ValueError, match="Draft-OPD needs whole blocks"):
        error_segments(next(t for t in out.traces if min(t.proposed) < 7))
    for prompt in prompts:  # batch of one: an EAGLE-3 chain stops one step past the row's last proposed slot
        one = generate(target, drafter, [prompt], replace(whole_cfg, draft_confidence=c)).traces[0]
        drafted = [int((d >= 0).sum()) for d in one.drafts]
        assert all(d[m:].eq(-1).all() for d, m in zip(one.drafts, drafted))
        if arch == "eagle3":
            assert all(n <= m <= min(7, n + 1) for n, m in zip(one.proposed, drafted)) and min(drafted) < 7
        else:  # DFlash drafts its whole block in one forward either way
            assert set(drafted) == {7}


def test_lookup_finds_the_earliest_earlier_occurrence() -> None:
    assert lookup([1, 2, 3, 9, 1, 2, 4, 1, 2], 2, 3) == [3, 9, 1]  # earliest of two matches
    assert lookup([1, 2, 3, 9, 1, 2], 2, 9) == [3, 9, 1, 2]  # the continuation may run into the tail itself
    assert lookup([5, 1, 2], 2, 3) == [] and lookup([1, 2], 2, 3) == [] and lookup([7, 7], 1, 4) == [7]
    assert lookup([1, 2, 3, 1, 2], 2, 0) == []


@pytest.mark.parametrize("arch", ["dflash", "eagle3"])
def test_prompt_lookup_stays_lossless_and_copies_earlier_text(small_vocab_target, arch) -> None:
    """`lookup_ngram`: the same greedy text; rounds whose text repeats its last n tokens propose what followed the
    earliest occurrence (up to K, whatever `num_drafts`), the others the drafter's n drafts; Draft-OPD refuses them."""
    target = small_vocab_target
    prompts = random_prompts(target.vocab_size, [5, 11, 2, 8], seed=5)
    drafter = _drafter(target, "perturbed", 8, arch)
    cfg = DecodeConfig(max_new_tokens=40, stop_at_eos=False, num_drafts=2, lookup_ngram=3)
    out = generate(target, drafter, prompts, cfg)
    refs = [hf_greedy(target, p, 40) for p in prompts]
    assert [t.output for t in out.traces] == refs
    alone = [generate(target, drafter, [p], cfg).traces[0] for p in prompts]  # batch of one: rounds that skip the drafter
    assert [t.output for t in alone] == refs and any(all(t.looked_up[m : m + 2]) for t in alone for m in range(t.rounds - 1))
    looked = [x for t in out.traces for x in t.looked_up]
    assert any(looked) and not all(looked)
    for t in out.traces:
        for m in range(t.rounds):
            text = t.tokens[: t.anchors[m] + 1]
            copied = lookup(text, 3, 7)
            assert t.looked_up[m] == bool(copied)
            n = len(copied) if copied else 2
            assert t.proposed[m] == n and t.accepted[m] <= n and t.drafts[m][:n].tolist() == (copied or t.drafts[m][:2].tolist())
            assert not t.target_logp[m][:n].isnan().any() and t.target_logp[m][n:].isnan().all()
    assert any(a > 0 for t in out.traces for a, x in zip(t.accepted, t.looked_up) if x)
    with pytest.raises(ValueError, match="prompt-lookup drafts"):
        error_segments(next(t for t in out.traces if any(t.looked_up)))


@pytest.mark.parametrize("arch", ["dflash", "eagle3"])
def test_prompt_lookup_alone_never_runs_the_drafter(small_vocab_target, arch, monkeypatch) -> None:
    """`num_drafts` 0 with lookup: the same greedy text, batched and alone; a round without a match proposes nothing
    and commits the target's one token (a plain step), and the drafter is never asked to draft."""
    target = small_vocab_target
    prompts = random_prompts(target.vocab_size, [5, 11, 2, 8], seed=5)
    drafter = _drafter(target, "perturbed", 8, arch)
    monkeypatch.setattr(drafter, "draft", lambda *a, **k: pytest.fail("the drafter drafted in a lookup-only round"))
    cfg = DecodeConfig(max_new_tokens=40, stop_at_eos=False, num_drafts=0, lookup_ngram=2)
    refs = [hf_greedy(target, p, 40) for p in prompts]
    out = generate(target, drafter, prompts, cfg)
    alone = [generate(target, drafter, [p], cfg).traces[0] for p in prompts]
    assert [t.output for t in out.traces] == refs and [t.output for t in alone] == refs
    for t in out.traces + alone:
        assert any(t.looked_up) and not all(t.looked_up)
        for m in range(t.rounds):
            copied = lookup(t.tokens[: t.anchors[m] + 1], 2, 7)
            assert t.looked_up[m] == bool(copied) and t.proposed[m] == len(copied)
            assert t.drafts[m][: len(copied)].tolist() == copied and t.target_logp[m][len(copied) :].isnan().all()
    assert sum(t.rounds for t in alone) < sum(len(r) for r in refs)  # some lookups were accepted


def _median_top_probability(gen) -> float:
    """The median over a run's rounds of the product of the drafter's top probabilities at slots 1 and 2 (needs
    record_draft_logits): as a `draft_confidence`, about half the rounds then propose one draft, half more."""
    return float(torch.stack([torch.softmax(x[:2], -1).amax(-1).prod() for t in gen.traces for x in t.draft_logits]).median())


def test_greedy_stops_at_eos_per_row(small_vocab_target) -> None:
    """With stop_at_eos, each row is the HF greedy text cut right after its first EOS."""
    target = small_vocab_target
    eos = target.vocab_size - 1
    prompts = random_prompts(target.vocab_size, [3, 6, 9, 4, 7, 2], seed=8)
    refs = [hf_greedy(target, p, 30) for p in prompts]
    assert 0 < sum(eos in r for r in refs) < len(refs)  # both kinds of rows in the batch
    out = generate(target, _drafter(target, "perturbed", 8), prompts, DecodeConfig(max_new_tokens=30))
    for ref, trace in zip(refs, out.traces):
        want = ref[: ref.index(eos) + 1] if eos in ref else ref
        assert trace.output == want
        assert trace.finish == ("eos" if eos in ref else "length")


# ============================================================================ sampling: lossless


SAMPLING_PROMPT = [1, 5, 2, 6, 3]
SAMPLING_ROWS = 4000


@torch.no_grad()
def _exact_joint3(target: Target, prompt: list[int], temperature: float) -> torch.Tensor:
    """Target's exact distribution of the first 3 sampled tokens, (V, V, V), by full forwards."""
    v, n = target.vocab_size, len(prompt)
    seqs = torch.tensor([prompt + [a, b] for a in range(v) for b in range(v)])
    p = torch.softmax(target.model(seqs).logits.float() / temperature, -1)
    p1 = p[0, n - 1]
    p2 = p[::v, n]  # (a, b)
    p3 = p[:, n + 1].view(v, v, v)
    return p1[:, None, None] * p2[:, :, None] * p3


def _sampled_joint3(
    target: Target, drafter, temperature: float, seed: int, confidence: float = 0.0, lookup_ngram: int = 0, num_drafts: int | None = None
) -> torch.Tensor:
    out = generate(
        target,
        drafter,
        [SAMPLING_PROMPT] * SAMPLING_ROWS,
        DecodeConfig(
            max_new_tokens=3,
            temperature=temperature,
            stop_at_eos=False,
            seed=seed,
            draft_confidence=confidence,
            lookup_ngram=lookup_ngram,
            num_drafts=num_drafts,
        ),
    )
    tokens = torch.tensor([t.output for t in out.traces])
    v = target.vocab_size
    return torch.bincount(tokens[:, 0] * v * v + tokens[:, 1] * v + tokens[:, 2], minlength=v**3)


def _poor_drafter(target: Target, arch: str = "dflash"):
    drafter = make_drafter(target, block_size=4, seed=2, arch=arch)
    with torch.no_grad():
        drafter.norm.weight.mul_(3.0)  # sharpen q: peaked, and mostly not where p is
    return drafter


def _always_accept(target_logits, draft_logits, draft, temperature, gen, limit=None) -> Acceptance:
    k = draft.shape[1]
    bonus = torch.multinomial(torch.softmax(target_logits[:, k] / temperature, -1), 1, generator=gen)[:, 0]
    return Acceptance(torch.full((draft.shape[0],), k), bonus)


def _correction_from_p(target_logits, draft_logits, draft, temperature, gen, limit=None) -> Acceptance:
    """Right acceptance test, wrong correction: samples from p instead of the residual max(p - q, 0)."""
    p = torch.softmax(target_logits / temperature, -1)
    q = torch.softmax(draft_logits / temperature, -1)
    p_d = p[:, :-1].gather(2, draft[..., None])[..., 0]
    q_d = q.gather(2, draft[..., None])[..., 0]
    accepted = (torch.rand(p_d.shape, generator=gen) * q_d < p_d).long().cumprod(1).sum(1)
    rows = torch.arange(draft.shape[0])
    return Acceptance(accepted, torch.multinomial(p[rows, accepted], 1, generator=gen)[:, 0])


@pytest.mark.parametrize("arch,temperature", [("dflash", 1.0), ("dflash", 0.6), ("eagle3", 1.0), ("eagle3", 0.6)])
def test_sampling_is_lossless(small_vocab_target, arch, temperature) -> None:
    """4000 rows of one prompt, 3 tokens each: the joint of (t1, t2, t3) fits the target's exact one.
    t2 and t3 always pass through the acceptance rule (block size 4: accepted drafts, corrections, bonus).
    EAGLE-3 samples slot k+1 given its own sampled slot k, so q differs per row: the rule must still hold."""
    target = small_vocab_target
    drafter = _poor_drafter(target, arch)
    counts = _sampled_joint3(target, drafter, temperature, seed=1)
    assert _chi2_pvalue(counts, _exact_joint3(target, SAMPLING_PROMPT, temperature)) > 1e-4


def test_sampling_with_a_confidence_cut_is_lossless(small_vocab_target) -> None:
    """The same joint test with `draft_confidence` cutting some blocks short (rows of one batch propose different
    numbers of drafts)."""
    target = small_vocab_target
    drafter = _poor_drafter(target)
    probe = generate(
        target,
        drafter,
        [SAMPLING_PROMPT] * 50,
        DecodeConfig(max_new_tokens=3, temperature=1.0, stop_at_eos=False, record_draft_logits=True),
    )
    counts = _sampled_joint3(target, drafter, 1.0, seed=2, confidence=_median_top_probability(probe))
    assert _chi2_pvalue(counts, _exact_joint3(target, SAMPLING_PROMPT, 1.0)) > 1e-4


def test_sampling_with_prompt_lookup_is_lossless(small_vocab_target) -> None:
    """The same joint test with prompt lookup (1-grams: with 8 tokens most rows find one, some do not): point-mass
    drafts copied from each row's text, mixed in one batch with the drafter's."""
    target = small_vocab_target
    counts = _sampled_joint3(target, _poor_drafter(target), 1.0, seed=3, lookup_ngram=1)
    assert _chi2_pvalue(counts, _exact_joint3(target, SAMPLING_PROMPT, 1.0)) > 1e-4


def test_sampling_with_prompt_lookup_alone_is_lossless(small_vocab_target) -> None:
    """The same with lookup only (`num_drafts` 0): rows without a match take plain sampling steps beside rows that
    verify a copied block."""
    target = small_vocab_target
    counts = _sampled_joint3(target, _poor_drafter(target), 1.0, seed=4, lookup_ngram=1, num_drafts=0)
    assert _chi2_pvalue(counts, _exact_joint3(target, SAMPLING_PROMPT, 1.0)) > 1e-4


@pytest.mark.parametrize("broken", [_always_accept, _correction_from_p])
def test_sampling_check_catches_broken_acceptance(small_vocab_target, broken, monkeypatch) -> None:
    """The same statistic with a wrong rule plugged into the decoder is rejected outright."""
    target = small_vocab_target
    drafter = _poor_drafter(target)
    monkeypatch.setattr(S, "accept_sampling", broken)
    counts = _sampled_joint3(target, drafter, 1.0, seed=1)
    assert _chi2_pvalue(counts, _exact_joint3(target, SAMPLING_PROMPT, 1.0)) < 1e-8


def test_sampling_is_reproducible_with_seed(small_vocab_target) -> None:
    target = small_vocab_target
    drafter = make_drafter(target, block_size=4)
    prompts = random_prompts(target.vocab_size, [3, 7, 5], seed=2)
    run = lambda seed: [
        t.output for t in generate(target, drafter, prompts, DecodeConfig(max_new_tokens=12, temperature=1.0, seed=seed)).traces
    ]  # noqa: E731
    assert run(3) == run(3)
    assert run(3) != run(4)


def test_per_row_streams_draw_row_by_row() -> None:
    """`RowRandom`: row b's draws equal a lone draw with its own seed, whatever the other rows are."""
    logits = torch.randn(3, 2, 9, generator=torch.Generator().manual_seed(0))
    draft = torch.randint(0, 9, (3, 2), generator=torch.Generator().manual_seed(1))
    target_logits = torch.randn(3, 3, 9, generator=torch.Generator().manual_seed(2))
    gens = lambda: RowRandom.seeded([5, 6, 7], "cpu")  # noqa: E731
    batch = sample(logits, 0.8, gens())
    acc = accept_sampling(target_logits, logits, draft, 0.8, gens())
    for b, seed in enumerate((5, 6, 7)):
        assert torch.equal(batch[b], sample(logits[b : b + 1], 0.8, RowRandom.seeded([seed], "cpu"))[0])
        one = accept_sampling(target_logits[b : b + 1], logits[b : b + 1], draft[b : b + 1], 0.8, RowRandom.seeded([seed], "cpu"))
        assert (acc.accepted[b], acc.next_token[b]) == (one.accepted[0], one.next_token[0])


def test_row_streams_are_uniform_and_follow_their_counters() -> None:
    """Each row's stream is a function of (seed, draw index): drawing 3 then 4 numbers gives the same 7 as drawing 7;
    other seeds give other numbers; and the numbers are uniform (a chi-square over 20 bins, 200K draws)."""
    a = RowRandom.seeded([11, 12], "cpu")
    split = torch.cat([a.uniform((3,)), a.uniform((4,))], 1)
    whole = RowRandom.seeded([11, 12], "cpu").uniform((7,))
    assert torch.equal(split, whole) and not torch.equal(whole[0], whole[1])
    u = RowRandom.seeded(list(range(100)), "cpu").uniform((2000,)).flatten()
    assert 0 <= float(u.min()) and float(u.max()) < 1
    counts = torch.histc(u, bins=20, min=0, max=1)
    expected = u.numel() / 20
    assert float(((counts - expected) ** 2 / expected).sum()) < 43.8  # chi-square, 19 dof, p = 0.001


@pytest.mark.parametrize("speculative", [True, False])
def test_row_seeds_make_each_row_independent_of_its_batch(small_vocab_target, speculative) -> None:
    """With `row_seeds`, a sampled row is the same alone or in any batch (rows finish at different times: EOS on)."""
    target = small_vocab_target
    drafter = make_drafter(target, block_size=4)
    prompts = random_prompts(target.vocab_size, [3, 7, 5, 2], seed=4)
    seeds = [101, 202, 303, 404]
    cfg = DecodeConfig(max_new_tokens=16, temperature=1.0)
    run = lambda ps, ss: [
        t.output for t in (generate(target, drafter, ps, cfg, ss) if speculative else autoregressive_generate(target, ps, cfg, ss)).traces
    ]  # noqa: E731
    together = run(prompts, seeds)
    assert together == [run([p], [s])[0] for p, s in zip(prompts, seeds)]
    assert run(prompts[::-1], seeds[::-1]) == together[::-1]
    assert len({len(t) for t in together}) > 1  # ragged: rows left the batch at different rounds
    with pytest.raises(ValueError, match="row_seeds"):
        run(prompts, seeds[:2])


# ============================================================================ rollout traces


def _trace_runs(request, mode: str):
    """(target, drafter, prompts, cfg, oracle-or-None) for each trace-checking mode."""
    if mode == "greedy-qwen3":
        target = request.getfixturevalue("qwen3_target")
        return (
            target,
            make_drafter(target, 8),
            random_prompts(target.vocab_size, [4, 13, 1, 8], seed=21),
            DecodeConfig(max_new_tokens=30, stop_at_eos=False),
        )
    if mode == "sampling-small-vocab":
        target = request.getfixturevalue("small_vocab_target")
        drafter = _drafter(target, "perturbed", 8)
        return (
            target,
            drafter,
            random_prompts(target.vocab_size, [6, 2, 9, 5], seed=22),
            DecodeConfig(max_new_tokens=30, temperature=1.0, stop_at_eos=False, seed=5),
        )
    target = request.getfixturevalue("llama_target")  # oracle drafts: long ragged acceptance, 31 new tokens
    return (
        target,
        make_drafter(target, 8),
        random_prompts(target.vocab_size, [7, 3, 15, 10], seed=23),
        DecodeConfig(max_new_tokens=31, stop_at_eos=False),
    )


@pytest.mark.parametrize("mode", ["greedy-qwen3", "sampling-small-vocab", "oracle-llama"])
def test_trace_consistency(request, mode, monkeypatch) -> None:
    target, drafter, prompts, cfg = _trace_runs(request, mode)
    if mode == "oracle-llama":
        seqs = [p + hf_greedy(target, p, cfg.max_new_tokens + drafter.block_size) for p in prompts]
        spy = OracleDrafts(seqs, target.vocab_size, seed=4)
        monkeypatch.setattr(S, "draft_block", spy)
        monkeypatch.setattr(S, "_active", spy.active)
    out = generate(target, drafter, prompts, cfg)
    k = drafter.block_size - 1
    layers = drafter.spec.target_layer_ids
    accepted_any = False
    for prompt, trace in zip(prompts, out.traces):
        n = len(prompt)
        m_rounds = trace.rounds
        assert m_rounds == len(trace.drafts) == len(trace.accepted) == len(trace.target_logp) == len(trace.draft_logp) >= 1
        assert trace.tokens == prompt + trace.output
        # lengths: first token from prefill, then accepted + 1 per round; only the last round may be cut
        committed = [r + 1 for r in trace.accepted]
        assert len(trace.output) == cfg.max_new_tokens
        assert 1 + sum(committed[:-1]) < cfg.max_new_tokens <= 1 + sum(committed)
        # anchors
        assert trace.anchors[0] == n
        for m in range(m_rounds - 1):
            assert trace.anchors[m + 1] == trace.anchors[m] + trace.accepted[m] + 1
        for m in range(m_rounds):
            a, r = trace.anchors[m], trace.accepted[m]
            d = trace.drafts[m].tolist()
            assert len(d) == k and 0 <= r <= k
            accepted_any |= r > 0
            # the committed text after the anchor starts with the accepted drafts
            assert trace.tokens[a + 1 : a + 1 + r] == d[:r][: len(trace.tokens) - a - 1]
            # target_logp: one fresh full forward over prefix + all drafts covers every slot (causal)
            seq = trace.tokens[: a + 1] + d
            logp = torch.log_softmax(full_logits(target, seq), -1)
            want = logp[torch.arange(a, a + k), torch.tensor(d)]
            torch.testing.assert_close(trace.target_logp[m], want, atol=1e-4, rtol=0)
            if cfg.temperature == 0 and a + r + 1 < len(trace.tokens):  # the target's own token after the drafts
                assert trace.tokens[a + r + 1] == int(logp[a + r].argmax())
            if mode == "oracle-llama":  # the oracle's drafts do not come from the drafter
                continue
            # draft_logp: the drafter re-run on a fresh, hole-free context of the committed prefix
            fresh = target.score(torch.tensor([trace.tokens[:a]]), torch.ones(1, a, dtype=torch.bool), layers)
            ctx = drafter.project_context(fresh.features, torch.arange(a)[None], torch.ones(1, a, dtype=torch.bool))
            with torch.no_grad():
                q = drafter.draft_logits(ctx, torch.tensor([[trace.tokens[a]]]), torch.tensor([[a]]))[0, 0]
            want_q = torch.log_softmax(q, -1)[torch.arange(k), torch.tensor(d)]
            torch.testing.assert_close(trace.draft_logp[m], want_q, atol=1e-4, rtol=0)
    if mode != "greedy-qwen3":
        assert accepted_any


def test_trace_stacked_shapes(small_vocab_target) -> None:
    target = small_vocab_target
    drafter = make_drafter(target, 4)
    trace = generate(target, drafter, [[1, 2, 3]], DecodeConfig(max_new_tokens=10, stop_at_eos=False)).traces[0]
    s = trace.stacked()
    m = trace.rounds
    assert s["anchors"].shape == (m,) and s["accepted"].shape == (m,)
    assert s["drafts"].shape == s["target_logp"].shape == s["draft_logp"].shape == (m, 3)


# ============================================================================ Target: ragged cache, bad input


def test_prefill_ragged_state_and_logits(llama_target) -> None:
    target = llama_target
    prompts = random_prompts(target.vocab_size, [5, 1, 9, 3], seed=31)
    state, out = target.prefill(prompts)
    assert state.lengths.tolist() == [len(p) for p in prompts]
    assert state.valid.sum(1).tolist() == [len(p) for p in prompts]
    for b, p in enumerate(prompts):
        assert state.positions[b][state.valid[b]].tolist() == list(range(len(p)))
        torch.testing.assert_close(out.last_logits[b], full_logits(target, p)[-1], atol=1e-4, rtol=1e-4)


def test_verify_commit_ragged_matches_full_forward(qwen3_target) -> None:
    """Two blocks verified and committed raggedly (each row's rejected slots are overwritten by its next block); a third
    verify equals fresh full forwards per row."""
    target = qwen3_target
    prompts = random_prompts(target.vocab_size, [4, 10, 2], seed=32)
    g = torch.Generator().manual_seed(0)
    state, _ = target.prefill(prompts)
    texts = [list(p) for p in prompts]
    for keep in ([3, 1, 5], [2, 5, 1]):
        block = torch.randint(0, target.vocab_size, (3, 5), generator=g)
        target.verify(state, block)
        target.commit(state, torch.tensor(keep))
        for b in range(3):
            texts[b] += block[b, : keep[b]].tolist()
        assert state.lengths.tolist() == [len(t) for t in texts]
        assert state.valid.sum(1).tolist() == [len(t) for t in texts]
    block = torch.randint(0, target.vocab_size, (3, 4), generator=g)
    out = target.verify(state, block)
    for b in range(3):
        want = full_logits(target, texts[b] + block[b].tolist())[-4:]
        torch.testing.assert_close(out.logits[b], want, atol=1e-4, rtol=1e-4)


def test_empty_prompt_raises(llama_target) -> None:
    drafter = make_drafter(llama_target, 8)
    with pytest.raises(TargetError, match="empty prompt"):
        generate(llama_target, drafter, [[1, 2], []])
    with pytest.raises(TargetError, match="empty prompt"):
        llama_target.prefill([[]])
    with pytest.raises(TargetError):
        llama_target.prefill([])
    with pytest.raises(TargetError, match="empty prompt"):
        autoregressive_generate(llama_target, [[]])


def test_prompt_longer_than_context_raises(llama_target) -> None:
    limit = llama_target.max_positions
    drafter = make_drafter(llama_target, 8)
    with pytest.raises(TargetError, match="context"):
        llama_target.prefill([[1] * (limit + 1)])
    with pytest.raises(TargetError, match="context"):  # prompt fits, prompt + new tokens does not
        generate(llama_target, drafter, [[1, 2], [1] * (limit - 10)], DecodeConfig(max_new_tokens=20))
    with pytest.raises(TargetError, match="context"):
        autoregressive_generate(llama_target, [[1] * (limit - 10)], DecodeConfig(max_new_tokens=20))


def test_token_outside_vocab_raises(llama_target) -> None:
    with pytest.raises(TargetError, match="vocabulary"):
        llama_target.prefill([[1, llama_target.vocab_size]])
    with pytest.raises(TargetError, match="vocabulary"):
        llama_target.prefill([[-1, 2]])


def test_load_target_errors(tmp_path) -> None:
    with pytest.raises(TargetError, match="no-such-model"):
        load_target("no-such-model")
    with pytest.raises(TargetError, match="config.json"):
        load_target(str(tmp_path))


def test_target_finds_the_cache_argument_of_either_transformers_api(llama_target):
    from draftopd.models.target import cache_kwarg

    class Old(torch.nn.Module):  # transformers 5.17 spells it past_key_values
        def forward(self, input_ids, attention_mask=None, past_key_values=None, **kwargs):
            return None

    assert cache_kwarg(Old()) == "past_key_values"
    assert llama_target.cache_kwarg == "cache"  # the pinned transformers
