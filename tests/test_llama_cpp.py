"""llama.cpp interop (draftopd/interop/llama_cpp.py): GGUF drafters made by llama.cpp's own converter, and llama-server.

Without llama.cpp: the round counting and the refusals. With its sources (`./run llama-cpp`, or `python -m
draftopd.interop.llama_cpp sources`): a tiny target with the embedded target's tokenizer and its EAGLE-3 and DFlash
drafters convert, and the GGUF holds the architecture, layer ids, d2t and weights we wrote. With llama-server built:
it decodes with each drafter (trained a little, so drafts get accepted) exactly as without it, and the rounds its own
counts give equal our replay's, prompt by prompt, when it drafts the drafter's block_size - 1 tokens a round (on the
prompts where no drafter decision was a near-tie, which ggml's arithmetic may settle the other way).
Skipped with the reason where llama.cpp is absent (`./run test` does not build it: about 5 minutes on 2 cores)."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import make_drafter

from draftopd.cli import main as cli_main
from draftopd.eval.replay import accepted_at_anchors, anchor_logits, replay_scored, score_texts
from draftopd.interop.llama_cpp import (
    Completion,
    LlamaServer,
    ServerConfig,
    check_gguf_exportable,
    export_gguf,
    server_binary,
    source_dir,
    spec_type,
    target_gguf,
)
from draftopd.models.drafter import DrafterError, save_drafter, widen_vocab
from draftopd.models.load import load_target, tiny_target

pytestmark = pytest.mark.usefixtures("one_thread")
needs_sources = pytest.mark.skipif(
    not (source_dir() / "convert_hf_to_gguf.py").is_file(), reason=f"llama.cpp sources not in {source_dir()} (./run llama-cpp)"
)
needs_server = pytest.mark.skipif(not server_binary().is_file(), reason=f"llama-server not built at {server_binary()} (./run llama-cpp)")


def test_rounds_and_committed_from_llama_counts():
    # 10 new tokens: 1 from the prefill, then rounds committing (accepted + 1): 6 accepted over 3 rounds = 9 committed
    c = Completion(tokens=list(range(10)), predicted_ms=1.0, prompt_ms=1.0, draft_n=21, draft_accepted=6)
    assert (c.committed, c.rounds) == (9, 3)
    assert Completion(tokens=[], predicted_ms=0, prompt_ms=0, draft_n=0, draft_accepted=0).rounds == 0


def test_reduced_vocabulary_dflash_refused(llama_target):
    drafter = make_drafter(llama_target, block_size=4, vocab_size=16, mask_token_id=3)
    drafter.set_draft_vocab(torch.arange(16))
    with pytest.raises(DrafterError, match="reads no d2t"):
        check_gguf_exportable(drafter)
    check_gguf_exportable(make_drafter(llama_target, block_size=4, arch="eagle3", target_layer_ids=(0, 1, 2), vocab_size=16))


def test_export_gguf_without_llama_cpp_is_one_line(llama_target, tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "ckpt"
    save_drafter(make_drafter(llama_target, block_size=4, arch="eagle3", target_layer_ids=(0, 1, 2)), ckpt)
    monkeypatch.setenv("DRAFTOPD_LLAMA_CPP", str(tmp_path / "nowhere"))
    out = tmp_path / "d.gguf"
    assert cli_main(["export", "--format", "gguf", "--drafter", str(ckpt), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "llama.cpp sources not found" in err[0] and "./run llama-cpp" in err[0]
    assert not out.exists()
    assert cli_main(["export", "--format", "gguf", "--drafter", str(ckpt), "--out", str(tmp_path / "d.bin")]) == 2
    assert "name it *.gguf" in capsys.readouterr().err


# ---- with llama.cpp: a tiny target that has a real tokenizer on disk ---------------------------------------------------
@pytest.fixture(scope="module")
def folder_target(tmp_path_factory):
    """A tiny random Llama with SmolLM2's vocabulary and tokenizer, saved as an HF folder and loaded from it (the
    converter reads the tokenizer and config.json there)."""
    from transformers import AutoTokenizer

    from draftopd.models.load import embedded_folder

    folder = tmp_path_factory.mktemp("tiny-smol")
    tokenizer = AutoTokenizer.from_pretrained(embedded_folder("smollm2-135m"))
    tiny = tiny_target("llama", vocab_size=len(tokenizer), hidden_size=64, num_layers=4, seed=3)
    tiny.model.config.eos_token_id = tokenizer.eos_token_id
    tiny.model.config.bos_token_id = tokenizer.bos_token_id
    tiny.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return load_target(str(folder), dtype=torch.float32)


def drafters(target) -> dict:
    g = torch.Generator().manual_seed(0)
    e3 = make_drafter(target, block_size=5, arch="eagle3", target_layer_ids=(0, 1, 2), vocab_size=512, seed=1)
    e3.set_draft_vocab(torch.sort(torch.randperm(target.vocab_size, generator=g)[:512]).values)
    df = make_drafter(target, block_size=5, num_layers=1, target_layer_ids=(1,), mask_token_id=target.vocab_size - 2, seed=2)
    # a reduced-vocabulary DFlash drafter (as the committed one), served widened (`export --widen-vocab`)
    narrow = make_drafter(
        target, block_size=5, num_layers=1, target_layer_ids=(1,), mask_token_id=target.vocab_size - 2, vocab_size=512, seed=4
    )
    return {"eagle3": e3, "dflash": df, "dflash-wide": narrow}


@pytest.fixture(scope="module")
def trained(folder_target, tmp_path_factory):
    """Each drafter after 40 SFT steps on the tiny target's own greedy text (which loops), so llama-server accepts some
    of its drafts and the counts compared below are not all zero; with the prompts it trained on."""
    from draftopd.config import DecodeConfig, OptimConfig, SFTConfig
    from draftopd.data.regenerate import SFTExample
    from draftopd.decode.speculative import autoregressive_generate
    from draftopd.train.sft import train_sft

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, folder_target.vocab_size - 100, (8,), generator=g).tolist() for _ in range(16)]
    outputs = [t.output for t in autoregressive_generate(folder_target, prompts, DecodeConfig(max_new_tokens=40)).traces]
    examples = [SFTExample(str(i), tuple(p), tuple(o)) for i, (p, o) in enumerate(zip(prompts, outputs))]
    cfg = SFTConfig(steps=40, batch_size=8, anchors_per_seq=16, save_every=1000, optim=OptimConfig(lr=3e-3, min_warmup_steps=1))
    out, made = {}, drafters(folder_target)
    seen = sorted({t for o in outputs for t in o})  # the draft vocabulary must hold the looping tokens to accept them
    rest = [i for i in range(folder_target.vocab_size) if i not in set(seen)][: 512 - len(seen)]
    made["eagle3"].set_draft_vocab(torch.tensor(sorted(seen + rest)))
    made["dflash-wide"].set_draft_vocab(torch.tensor(sorted(seen + rest)))
    for arch, drafter in made.items():
        train_sft(folder_target, drafter.train().requires_grad_(True), examples, cfg, tmp_path_factory.mktemp(arch), progress=False)
        out[arch] = drafter.eval().requires_grad_(False)
    out["dflash-wide"] = widen_vocab(out["dflash-wide"])
    return out, prompts


def read_gguf(path):
    sys.path.insert(0, str(source_dir() / "gguf-py"))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.pop(0)
    reader = GGUFReader(str(path))
    fields = {name: f.contents() for name, f in reader.fields.items()}
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    return fields, tensors


@pytest.mark.slow
@needs_sources
@pytest.mark.parametrize("arch", ["eagle3", "dflash"])
def test_gguf_holds_what_we_wrote(arch, folder_target, tmp_path):
    drafter = drafters(folder_target)[arch]
    path = export_gguf(drafter, tmp_path / f"{arch}.gguf", folder_target)
    fields, tensors = read_gguf(path)
    assert fields["general.architecture"] == arch
    capture = sorted(i + 1 for i in drafter.spec.target_layer_ids)  # llama.cpp counts hidden_states[j], as speculators
    assert list(fields[f"{arch}.target_layers"]) == capture
    assert torch.equal(tensors["fc.weight"].float().reshape(drafter.fc.weight.shape), drafter.fc.weight.float())
    if arch == "eagle3":
        assert torch.equal(tensors["d2t"].long(), drafter.draft_to_target(torch.arange(512)))
    else:
        assert fields["tokenizer.ggml.mask_token_id"] == drafter.spec.mask_token_id
        assert fields["dflash.block_size"] == drafter.block_size


def served(arch: str, folder_target, trained, tmp_path):
    """(drafter, 8 prompts, the drafter's GGUF, the target's f32 GGUF) for a llama-server test (`dflash-wide`: a
    reduced-vocabulary DFlash drafter trained as such, widened to the whole vocabulary for export)."""
    drafter = trained[0][arch]
    draft = export_gguf(drafter, tmp_path / f"{arch}.gguf", folder_target)
    return drafter, trained[1][:8], draft, target_gguf(folder_target, "f32", root=None)


def closest_call_on_path(drafter, texts) -> list[float]:
    """Per text (`score_texts`), how near the closest drafter decision on the path our replay walks (each round's
    accepted drafts and its first rejected one) came to going the other way: the drafter's top logit minus the
    runner-up for an accepted draft, minus the text's token for a rejected one (inf for a token outside the draft
    vocabulary)."""
    out = []
    for scored in texts:
        logits, truth, inside = anchor_logits(drafter, scored)
        top = logits.topk(2, -1).values
        wanted = drafter.target_to_draft(truth)
        truth_logit = logits.gather(-1, wanted.clamp(min=0)[..., None])[..., 0]
        hit = drafter.draft_to_target(logits.argmax(-1)) == truth
        gap = torch.where(hit, top[..., 0] - top[..., 1], torch.where(wanted >= 0, top[..., 0] - truth_logit, torch.inf))
        gap = gap.masked_fill(~inside, torch.inf)
        for b, (accepted, length) in enumerate(zip(accepted_at_anchors(drafter, scored), scored.lengths)):
            done, closest = 1, float("inf")
            while done < length:
                r = accepted[done - 1]
                closest = min(closest, float(gap[b, done - 1, : r + 1].min()))
                done += min(r + 1, length - done)
            out.append(closest)
    return out


@pytest.mark.slow
@needs_server
@pytest.mark.parametrize("arch", ["eagle3", "dflash", "dflash-wide"])
def test_llama_server_counts_what_we_count(arch, folder_target, trained, tmp_path):
    drafter, prompts, draft, model = served(arch, folder_target, trained, tmp_path)
    # n_max = K: llama.cpp clamps DFlash to its block size but chains EAGLE-3 for all n_max steps (7 by default, which
    # on this looping text gave 12 rounds for 39 tokens where our K=4 decoder takes 15)
    with LlamaServer(model, draft, spec_type(drafter.spec.arch), ServerConfig(draft_n_max=drafter.block_size - 1)) as spec:
        s = [spec.complete(p, 40) for p in prompts]
    texts = score_texts(folder_target, drafter.spec.target_layer_ids, prompts, [x.tokens for x in s])
    replayed = replay_scored(drafter, texts)
    assert sum(x.draft_accepted for x in s) > 0  # the counts compared include accepted drafts
    # ggml's f32 kernels sum in another order than torch's (and differently on another CPU): a draft decided by a
    # near-tie may go either way, so texts with one on their path are left out, and most texts must have none
    closest = closest_call_on_path(drafter, texts)
    tie_free = [c >= 5e-3 for c in closest]  # CI saw a call 6e-4 apart go the other way
    assert sum(tie_free) >= len(s) // 2, closest
    ours = [(t.committed, t.rounds) for t in replayed.texts]
    assert [(x.committed, x.rounds) for x, ok in zip(s, tie_free) if ok] == [c for c, ok in zip(ours, tie_free) if ok]


@pytest.mark.slow
@needs_server
@pytest.mark.parametrize("arch", ["eagle3", "dflash", "dflash-wide"])
def test_llama_server_is_lossless(arch, folder_target, trained, tmp_path):
    drafter, prompts, draft, model = served(arch, folder_target, trained, tmp_path)
    with LlamaServer(model) as plain, LlamaServer(model, draft, spec_type(drafter.spec.arch)) as spec:
        a = [plain.complete(p, 40) for p in prompts]
        s = [spec.complete(p, 40) for p in prompts]
    assert sum(x.draft_accepted for x in s) > 0  # it accepted drafts, so verification had something to keep
    assert [x.tokens for x in s] == [x.tokens for x in a]


def test_llama_profile_reads_the_last_statistics_line(tmp_path, monkeypatch):
    """benchmarks/llama_profile.py: drafting calls and milliseconds come from llama.cpp's last (cumulative)
    `statistics` trace line (the format of llama.cpp 11434's common/speculative.cpp, as its server logs it)."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from llama_profile import draft_totals

    line = (
        "0.21.981.314 I spec common_specu: statistics     draft-dflash: #calls(b,g,a) =   10    {g}    {g}, #gen drafts"
        " =    {g}, #acc drafts =   236, #gen tokens =   1339, #acc tokens =   268, #mean acc len = 1.40, #acc rate/pos = "
        "(0.350, 0.047), dur(b,g,a) = 0.025, {ms}, 0.278 ms"
    )
    log = tmp_path / "spec.log"
    log.write_text(
        "\n".join(["llama-server starting", line.format(g=70, ms="360.5"), "slot print_timing: id 0", line.format(g=674, ms="3601.308")])
        + "\n"
    )
    assert draft_totals(log) == (674, 3601.308)
