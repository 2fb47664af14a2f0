"""The `draftopd` command line on a tiny local target folder: the pipeline end to end and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from draftopd.cli import main
from draftopd.config import DecodeConfig, DrafterConfig
from draftopd.models.drafter import new_drafter, save_drafter
from draftopd.models.load import tiny_target

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory) -> Path:
    return save_tiny_target(tmp_path_factory.mktemp("tiny-target"))


def save_tiny_target(folder: Path) -> Path:
    """A tiny Llama saved as a Hugging Face folder with a word-level ChatML tokenizer (64 ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "<|im_start|>", "<|im_end|>", "user", "assistant", "system"] + [f"w{i}" for i in range(58)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="<|im_end|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tok.chat_template = CHATML
    target = tiny_target(vocab_size=64, hidden_size=32, num_layers=4, sharpness=30.0)
    target.model.config.eos_token_id = 2
    target.model.generation_config.eos_token_id = 2
    target.model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, fragment: str) -> None:
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("draftopd: error:") and fragment in lines[0], err


def test_generate_prints_text_and_stats(target_dir, capsys):
    rc, out, _ = run(capsys, "generate", "--target", target_dir, "--prompt", "w1 w2 w3", "--max-new-tokens", 12, "--draft-block-size", 8)
    assert rc == 0 and "tau:" in out and "per-slot acceptance:" in out and "tokens/s:" in out
    rc, out, _ = run(capsys, "generate", "--target", target_dir, "--prompt", "w1 w2 w3", "--max-new-tokens", 12, "--json")
    result = json.loads(out)
    assert rc == 0 and len(result["texts"]) == 1 and result["stats"]["tau"] >= 1.0 and len(result["stats"]["slot_acceptance"]) == 15


def test_generate_defaults_to_the_bundled_drafter_and_its_decoding(target_dir, tmp_path, capsys, monkeypatch):
    """No --drafter: the drafter bundled for the target, with its config's "decode" (here 1 draft a round and prompt
    lookup on 2-grams), each field unless its flag is given (even at its default value); a target with none bundled
    gets an untrained drafter and a note."""
    from draftopd import cli

    rc, _, err = run(capsys, "generate", "--target", target_dir, "--prompt", "w1 w2", "--max-new-tokens", 8, "--json")
    assert rc == 0 and "untrained drafter" in err
    drafter = new_drafter(tiny_target(vocab_size=64, hidden_size=32, num_layers=4, sharpness=30.0), DrafterConfig(block_size=4))
    save_drafter(drafter, tmp_path / "bundled", {"decode": {"num_drafts": 1, "lookup_ngram": 2}})
    monkeypatch.setitem(cli.BUNDLED_DRAFTERS, str(target_dir), tmp_path / "bundled")
    args = ("generate", "--target", target_dir, "--prompt", "w1 w2 w3", "--max-new-tokens", 16, "--json", "--dtype", "float32")
    rc, out, err = run(capsys, *args)
    assert rc == 0 and str(tmp_path / "bundled") in err and "1 drafts a round, prompt lookup on 2-grams" in err
    assert len(json.loads(out)["stats"]["slot_acceptance"]) == 3
    assert cli.default_drafter(str(target_dir), None) == (str(tmp_path / "bundled"), DecodeConfig(num_drafts=1, lookup_ngram=2))
    rc, out, err = run(capsys, *args, "--num-drafts", 3)
    assert rc == 0 and "3 drafts a round, prompt lookup on 2-grams" in err
    rc, out, err = run(capsys, *args, "--lookup-ngram", 0)  # given at its default value: lookup off, the draft length kept
    assert rc == 0 and "1 drafts a round;" in err and json.loads(out)["stats"]["looked_up"] == 0
    rc, out, err = run(capsys, *args, "--num-drafts", 0)  # lookup alone, the bundled n-gram size
    stats = json.loads(out)["stats"]
    assert rc == 0 and "0 drafts a round, prompt lookup on 2-grams" in err and 0 < stats["looked_up"] < 1
    assert cli.default_drafter(str(target_dir), "elsewhere") == ("elsewhere", DecodeConfig())
    # decoding measured per device class: the entry of the class the command runs in, else "other"
    by_class = {
        "by_class": {"cpu-float32": {"num_drafts": 0, "lookup_ngram": 2}, "cpu-bfloat16": {"num_drafts": 2}},
        "other": {"num_drafts": 3},
    }
    save_drafter(drafter, tmp_path / "classes", {"decode": by_class})
    monkeypatch.setitem(cli.BUNDLED_DRAFTERS, str(target_dir), tmp_path / "classes")
    assert cli.default_drafter(str(target_dir), None, "cpu-float32")[1] == DecodeConfig(num_drafts=0, lookup_ngram=2)
    assert cli.default_drafter(str(target_dir), None, "cpu-bfloat16")[1] == DecodeConfig(num_drafts=2)
    assert cli.default_drafter(str(target_dir), None, "cuda-bfloat16")[1] == DecodeConfig(num_drafts=3)
    assert cli.decoding_class("cpu", "float32") == "cpu-float32" and cli.decoding_class("cpu", "bfloat16") == "cpu-bfloat16"
    rc, out, err = run(capsys, *args)
    assert rc == 0 and "0 drafts a round, prompt lookup on 2-grams" in err


def test_pipeline_regenerate_sft_opd_eval(target_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": " ".join(f"w{(i * 7 + j) % 50}" for j in range(5))}) for i in range(12)))
    data = tmp_path / "data.jsonl"
    rc, out, err = run(
        capsys,
        "regenerate",
        "--target",
        target_dir,
        "--prompts",
        prompts,
        "--out",
        data,
        "--max-new-tokens",
        16,
        "--no-stop-at-eos",
        "--json",
    )
    assert rc == 0, err  # a user's file is used whole by default (split auto -> all)
    assert json.loads(out)["split"] == "all" and json.loads(out)["prompts"] == 12
    assert json.loads(out)["written"] == 12 and len(data.read_text().splitlines()) == 12
    rc, out, err = run(
        capsys,
        "sft",
        "--target",
        target_dir,
        "--data",
        data,
        "--out",
        tmp_path / "sft",
        "--steps",
        3,
        "--batch-size",
        4,
        "--anchors-per-seq",
        4,
        "--draft-block-size",
        8,
        "--json",
    )
    assert rc == 0, err
    sft_ckpt = json.loads(out)["checkpoint"]
    assert (Path(sft_ckpt) / "model.safetensors").exists()
    rc, out, err = run(
        capsys,
        "opd",
        "--target",
        target_dir,
        "--drafter",
        sft_ckpt,
        "--prompts",
        prompts,
        "--out",
        tmp_path / "opd",
        "--steps",
        2,
        "--prompts-per-rollout",
        2,
        "--max-new-tokens",
        12,
        "--anchors",
        "random",
        "--json",
    )
    assert rc == 0, err
    lines = (tmp_path / "opd" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "rollout/tau" in json.loads(lines[0])
    assert json.loads(out)["prompts"] == 12  # opd too reads a user's file whole by default


def test_bad_inputs_give_one_line_errors(target_dir, tmp_path, capsys):
    rc, _, err = run(capsys, "generate", "--target", "no-such-model", "--prompt", "hi")
    assert_one_line_error(rc, err, "unknown target")
    rc, _, err = run(capsys, "generate", "--target", target_dir, "--prompt", "   ")
    assert_one_line_error(rc, err, "empty prompt")
    rc, _, err = run(capsys, "generate", "--target", target_dir, "--prompt", " ".join(["w1"] * 600))
    assert_one_line_error(rc, err, "exceeds the target's context")
    other = new_drafter(tiny_target(vocab_size=64, hidden_size=48, num_layers=4), DrafterConfig(block_size=8))
    save_drafter(other, tmp_path / "other")
    rc, _, err = run(capsys, "generate", "--target", target_dir, "--drafter", tmp_path / "other", "--prompt", "w1")
    assert_one_line_error(rc, err, "does not match target")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "config.json").write_text("{not json")
    rc, _, err = run(capsys, "generate", "--target", target_dir, "--drafter", tmp_path / "corrupt", "--prompt", "w1")
    assert_one_line_error(rc, err, "corrupt drafter checkpoint")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    rc, _, err = run(capsys, "sft", "--target", target_dir, "--data", tmp_path / "empty.jsonl", "--out", tmp_path / "s")
    assert_one_line_error(rc, err, "no usable training examples")
    rc, _, err = run(capsys, "demo", "--ablations", "nonsense")
    assert_one_line_error(rc, err, "unknown ablation")


def test_target_loading_never_trusts_remote_code(target_dir, tmp_path, monkeypatch):
    """Every from_pretrained gets trust_remote_code=False (unset, transformers asks in a terminal and a yes runs
    the folder's Python); a folder that only remote code could load is one TargetError line, no question asked."""
    import shutil

    import transformers

    from draftopd.models.load import load_target
    from draftopd.models.target import TargetError

    calls = []
    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        real = cls.from_pretrained.__func__
        monkeypatch.setattr(cls, "from_pretrained", classmethod(lambda c, *a, _real=real, **kw: calls.append(kw) or _real(c, *a, **kw)))
    load_target(str(target_dir))
    assert len(calls) >= 3 and all(kw.get("trust_remote_code") is False for kw in calls)
    remote = tmp_path / "remote"
    shutil.copytree(target_dir, remote)
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "model_type": "my-arch", "auto_map": {"AutoModelForCausalLM": "m.M"}}))
    monkeypatch.setattr("sys.stdin", None)  # any question would fail loudly
    with pytest.raises(TargetError, match="never runs code shipped with a model"):
        load_target(str(remote))


def test_features_and_recipe_commands(target_dir, tmp_path, capsys, monkeypatch):
    """regenerate -> features -> recipe (features again, cached; SFT from the cache; evaluation) on the tiny target;
    the recipe's --device reaches every target it loads."""
    import draftopd.recipe

    loads, real = [], draftopd.recipe.load_target
    monkeypatch.setattr(draftopd.recipe, "load_target", lambda *a, **kw: loads.append(kw.get("device")) or real(*a, **kw))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": " ".join(f"w{(i * 5 + j) % 50}" for j in range(6))}) for i in range(10)))
    data = tmp_path / "data.jsonl"
    assert (
        run(
            capsys,
            "regenerate",
            "--target",
            target_dir,
            "--prompts",
            prompts,
            "--split",
            "all",
            "--out",
            data,
            "--max-new-tokens",
            16,
            "--no-stop-at-eos",
        )[0]
        == 0
    )
    rc, out, err = run(capsys, "features", "--target", target_dir, "--data", data, "--out", tmp_path / "feat", "--json")
    assert rc == 0, err
    assert json.loads(out)["sequences"] == 10 and (tmp_path / "feat" / "manifest.json").exists()
    rc, out, err = run(
        capsys,
        "recipe",
        "--target",
        target_dir,
        "--data",
        data,
        "--out-dir",
        tmp_path / "rec",
        "--steps",
        3,
        "--labels",
        "text",
        "--draft-vocab-size",
        32,
        "--draft-target-layer-ids",
        0,
        2,
        "--eval-sets",
        prompts,
        "--eval-num-prompts",
        2,
        "--eval-max-new-tokens",
        8,
        "--device",
        "cpu",
        "--json",
    )
    assert rc == 0, err
    assert loads == ["cpu"] * 3  # training (embedding and head), features, evaluation
    result = json.loads(out)
    assert result["feature_tokens"] > 0 and set(result["times"]) == {"answers_s", "features_s", "sft_s", "eval_s", "total_s"}
    assert result["times"]["total_s"] >= sum(v for k, v in result["times"].items() if k != "total_s")
    assert (Path(result["checkpoint"]) / "model.safetensors").exists() and (tmp_path / "rec" / "eval.json").exists()
    assert json.loads((Path(result["checkpoint"]) / "config.json").read_text())["draftopd_spec"]["mask_token_id"] is not None  # exportable
    rc, _, err = run(capsys, "recipe", "--target", target_dir, "--data", tmp_path / "missing.jsonl", "--out-dir", tmp_path / "r2")
    assert_one_line_error(rc, err, "no regenerated data")


def test_sft_from_feature_cache_and_its_bad_inputs(target_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": " ".join(f"w{(i * 3 + j) % 50}" for j in range(5))}) for i in range(8)))
    data = tmp_path / "data.jsonl"
    assert (
        run(
            capsys,
            "regenerate",
            "--target",
            target_dir,
            "--prompts",
            prompts,
            "--split",
            "all",
            "--out",
            data,
            "--max-new-tokens",
            12,
            "--no-stop-at-eos",
        )[0]
        == 0
    )
    assert run(capsys, "features", "--target", target_dir, "--data", data, "--out", tmp_path / "feat", "--draft-num-layers", 2)[0] == 0
    rc, out, err = run(
        capsys,
        "sft",
        "--target",
        target_dir,
        "--features",
        tmp_path / "feat",
        "--out",
        tmp_path / "sft",
        "--steps",
        2,
        "--batch-size",
        4,
        "--anchors-per-seq",
        4,
        "--draft-num-layers",
        2,
        "--draft-vocab-size",
        20,
        "--labels",
        "greedy",
        "--json",
    )
    assert rc == 0, err
    assert json.loads(out)["examples"] == 8
    rc, out, err = run(
        capsys,
        "sft",
        "--target",
        target_dir,
        "--features",
        tmp_path / "feat",
        "--out",
        tmp_path / "e3",
        "--steps",
        2,
        "--batch-size",
        4,
        "--anchors-per-seq",
        4,
        "--draft-arch",
        "eagle3",
        "--draft-target-layer-ids",
        1,
        1,
        1,
        "--json",
    )
    assert rc == 0, err  # an EAGLE-3 drafter reads its three layers from the same cache
    rc, _, err = run(
        capsys,
        "sft",
        "--target",
        target_dir,
        "--features",
        tmp_path / "feat",
        "--out",
        tmp_path / "e3b",
        "--drafter",
        tmp_path / "e3" / "last",
        "--draft-arch",
        "dflash",
    )
    assert_one_line_error(rc, err, "holds an EAGLE-3 drafter, not a DFlash one")
    rc, _, err = run(
        capsys, "sft", "--target", target_dir, "--features", tmp_path / "feat", "--out", tmp_path / "sft2", "--draft-num-layers", 1
    )
    assert_one_line_error(rc, err, "holds target layers")  # a cache made for another layer set
    rc, _, err = run(capsys, "sft", "--target", target_dir, "--features", tmp_path / "nope", "--out", tmp_path / "sft3")
    assert_one_line_error(rc, err, "no feature cache")
    rc, _, err = run(capsys, "sft", "--target", target_dir, "--features", tmp_path / "feat", "--data", data, "--out", tmp_path / "sft4")
    assert_one_line_error(rc, err, "exactly one of")
    rc, _, err = run(
        capsys,
        "sft",
        "--target",
        target_dir,
        "--features",
        tmp_path / "feat",
        "--out",
        tmp_path / "sft5",
        "--draft-num-layers",
        2,
        "--loss",
        "kl",
    )
    assert_one_line_error(rc, err, "final hidden states")


def test_export_and_import_reference_dflash(target_dir, tmp_path, capsys):
    """`export --format dflash` then `import` gives back the same weights; what cannot be exported exactly, a checkpoint
    of another target, or an --out that holds a drafter is one error line and nothing is written."""
    pytest.importorskip("dflash", reason="z-lab's reference DFlash is not installed: pip install --no-deps dflash==0.1.0")
    from draftopd.models.drafter import load_drafter
    from draftopd.models.load import load_target

    target = load_target(str(target_dir))
    save_drafter(new_drafter(target, DrafterConfig(block_size=4, target_layer_ids=(0, 2), mask_token_id=5), seed=3), tmp_path / "ours")
    rc, out, err = run(capsys, "export", "--target", target_dir, "--drafter", tmp_path / "ours", "--out", tmp_path / "ref", "--json")
    assert rc == 0, err
    assert json.loads((tmp_path / "ref" / "config.json").read_text())["architectures"] == ["DFlashDraftModel"]
    rc, out, err = run(capsys, "import", "--target", target_dir, "--from", tmp_path / "ref", "--out", tmp_path / "back", "--json")
    assert rc == 0, err
    back, ours = load_drafter(tmp_path / "back", target), load_drafter(tmp_path / "ours", target)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), back.state_dict().values()))
    rc, _, err = run(capsys, "import", "--target", target_dir, "--from", tmp_path / "ref", "--out", tmp_path / "back")
    assert_one_line_error(rc, err, "already holds a drafter")
    save_drafter(new_drafter(target, DrafterConfig(arch="eagle3", block_size=4)), tmp_path / "e3")
    rc, _, err = run(capsys, "export", "--target", target_dir, "--drafter", tmp_path / "e3", "--out", tmp_path / "e3-ref")
    assert_one_line_error(rc, err, "only a DFlash drafter has a reference DFlash format")
    assert not (tmp_path / "e3-ref" / "config.json").exists()
    rc, out, err = run(
        capsys,
        "export",
        "--format",
        "speculators",
        "--target",
        target_dir,
        "--drafter",
        tmp_path / "ours",
        "--out",
        tmp_path / "spec",
        "--json",
    )
    assert rc == 0, err  # the speculators format (vLLM) takes either architecture
    assert json.loads((tmp_path / "spec" / "config.json").read_text())["speculators_model_type"] == "dflash"
    rc, _, err = run(capsys, "import", "--target", target_dir, "--from", tmp_path / "ours", "--out", tmp_path / "x")
    assert_one_line_error(rc, err, "is not a reference DFlash drafter")  # our own format is not the reference's


def test_export_widens_a_reduced_vocabulary_for_the_reference_format(target_dir, tmp_path, capsys):
    """A reduced-vocabulary DFlash drafter (the committed one is) is refused by `export --format dflash` with one line
    naming --widen-vocab; with it the export loads back as the same weights with the full head, whose logits at the
    kept tokens are the reduced drafter's."""
    pytest.importorskip("dflash", reason="z-lab's reference DFlash is not installed: pip install --no-deps dflash==0.1.0")
    from draftopd.models.drafter import load_drafter
    from draftopd.models.load import load_target

    target = load_target(str(target_dir))
    drafter = new_drafter(target, DrafterConfig(block_size=4, target_layer_ids=(0, 2), mask_token_id=5, vocab_size=24), seed=3)
    kept = torch.arange(1, 49, 2)
    drafter.set_draft_vocab(kept)
    save_drafter(drafter, tmp_path / "ours")
    rc, _, err = run(capsys, "export", "--target", target_dir, "--drafter", tmp_path / "ours", "--out", tmp_path / "ref")
    assert_one_line_error(rc, err, "--widen-vocab")
    assert not (tmp_path / "ref" / "config.json").exists()
    rc, _, err = run(capsys, "export", "--target", target_dir, "--drafter", tmp_path / "ours", "--out", tmp_path / "ref", "--widen-vocab")
    assert rc == 0, err
    rc, _, err = run(capsys, "import", "--target", target_dir, "--from", tmp_path / "ref", "--out", tmp_path / "back")
    assert rc == 0, err
    back = load_drafter(tmp_path / "back", target)
    assert back.spec.draft_vocab_size is None
    params = dict(drafter.named_parameters())
    assert params.keys() == dict(back.named_parameters()).keys()
    assert all(torch.equal(p, params[n]) for n, p in back.named_parameters())
    features = target.score(torch.tensor([[3, 9, 4, 11, 7, 2]]), torch.ones(1, 6, dtype=torch.bool), (0, 2)).features
    positions, valid = torch.arange(6)[None], torch.ones(1, 6, dtype=torch.bool)
    with torch.no_grad():
        logits = [
            d.draft_logits(d.project_context(features, positions, valid), torch.tensor([[8]]), torch.tensor([[6]])) for d in (drafter, back)
        ]
    assert torch.equal(logits[0][..., kept], logits[1][..., kept])


def test_demo_refuses_a_folder_of_another_run(capsys, tmp_path):
    """Cached stages are reused only by the configuration that wrote them: an older demo's folder, or the same
    folder with another start, is one error line before any model loads."""
    old = tmp_path / "old"
    old.mkdir()
    (old / "curves.json").write_text("{}")
    rc, _, err = run(capsys, "demo", "--out", str(old))
    assert rc == 2 and "holds files of another run" in err
    new = tmp_path / "new"
    new.mkdir()
    (new / "experiment.json").write_text('{"start": "bundled"}')
    rc, _, err = run(capsys, "demo", "--out", str(new), "--start", "none")
    assert rc == 2 and "another configuration" in err and "start" in err


def test_demo_loads_its_target_with_its_device_and_dtype(capsys, tmp_path, monkeypatch):
    import draftopd.experiment
    from draftopd.models.target import TargetError

    def stop(name, dtype, device):
        raise TargetError(f"loading {name} as {dtype} on {device}")

    monkeypatch.setattr(draftopd.experiment, "load_target", stop)
    rc, _, err = run(capsys, "demo", "--out", str(tmp_path / "a"), "--device", "cpu", "--dtype", "bfloat16")
    assert rc == 2 and err.strip() == "draftopd: error: loading smollm2-135m as torch.bfloat16 on cpu"
    rc, _, err = run(capsys, "demo", "--out", str(tmp_path / "b"))
    assert rc == 2 and err.strip().endswith(f"as torch.float32 on {'cuda' if torch.cuda.is_available() else 'cpu'}")
    assert "device" not in json.loads((tmp_path / "a" / "experiment.json").read_text())  # a run may move to another device


def test_auto_dtype_is_bfloat16_only_where_it_is_fast(monkeypatch):
    """`--dtype auto` (and the recipe's feature and evaluation dtypes): an AVX2-only CPU prefills 6x slower in bf16
    (`benchmarks/bench_verify.py`, docs/results/strong-drafters.md)."""
    from draftopd.config import resolve_dtype

    for fast, want in ((False, torch.float32), (True, torch.bfloat16)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda fast=fast: fast)
        assert resolve_dtype("auto", "cpu") == want
        assert resolve_dtype("float32", "cpu") == torch.float32 and resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
