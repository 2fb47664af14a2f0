"""Run tracking and run files (`train/tracking.py`, `cli.py`): TensorBoard's own reader reads the scalars back, W&B
offline writes its run folder, run.yaml re-runs a command with the same configs (flags override it), metric names
are namespaced, and the recipe's target layers follow the target's depth."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from test_cli import run, save_tiny_target

from draftopd import cli
from draftopd.config import DataConfig, DecodeConfig, DrafterConfig, EvalConfig, OptimConfig, PromptConfig, SFTConfig
from draftopd.train.tracking import RunInfo, write_run_files

NAMESPACES = ("train/", "rollout/", "eval/", "compute/", "time/", "memory/")


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory) -> Path:
    return save_tiny_target(tmp_path_factory.mktemp("tiny-target"))


@pytest.fixture(scope="module")
def files(target_dir, tmp_path_factory) -> dict[str, Path]:
    """A prompt file and the tiny target's regenerated answers to it."""
    folder = tmp_path_factory.mktemp("data")
    prompts = folder / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": " ".join(f"w{(i * 7 + j) % 50}" for j in range(5))}) for i in range(6)))
    data = folder / "data.jsonl"
    assert (
        cli.main(
            [
                "regenerate",
                "--target",
                str(target_dir),
                "--prompts",
                str(prompts),
                "--out",
                str(data),
                "--max-new-tokens",
                "12",
                "--no-stop-at-eos",
            ]
        )
        == 0
    )
    return {"prompts": prompts, "data": data}


def sft_args(target_dir, files, out) -> list:
    return [
        "sft",
        "--target",
        target_dir,
        "--data",
        files["data"],
        "--out",
        out,
        "--steps",
        2,
        "--batch-size",
        2,
        "--anchors-per-seq",
        2,
        "--draft-block-size",
        4,
        "--optim-lr",
        "1e-3",
        "--dtype",
        "float32",
    ]


def metric_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_scalars_read_back(target_dir, files, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rc, _, err = run(capsys, *sft_args(target_dir, files, tmp_path / "sft"), "--report-to", "tensorboard")
    assert rc == 0, err
    rows = metric_rows(tmp_path / "sft")
    events = EventAccumulator(str(tmp_path / "sft" / "tensorboard"))
    events.Reload()
    names = set(events.Tags()["scalars"])
    assert names == {k for k in rows[0] if k not in ("step", "time")} and all(n.startswith(NAMESPACES) for n in names)
    for name in ("train/loss", "compute/flops", "memory/max_rss_gb"):
        assert [(e.step, e.value) for e in events.Scalars(name)] == [(r["step"], pytest.approx(r[name], rel=1e-6)) for r in rows]


def test_wandb_offline_writes_its_run_folder(target_dir, files, tmp_path, capsys, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline by default, no network
    monkeypatch.setenv("WANDB_SILENT", "true")
    rc, _, err = run(capsys, *sft_args(target_dir, files, tmp_path / "sft"), "--report-to", "wandb")
    assert rc == 0, err
    runs = list((tmp_path / "sft" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb")), list((tmp_path / "sft" / "wandb").iterdir())


def test_opd_metrics_are_namespaced(target_dir, files, tmp_path, capsys):
    rc, _, err = run(
        capsys,
        "opd",
        "--target",
        target_dir,
        "--prompts",
        files["prompts"],
        "--out",
        tmp_path / "opd",
        "--steps",
        1,
        "--prompts-per-rollout",
        2,
        "--rollouts-per-step",
        1,
        "--max-new-tokens",
        8,
        "--draft-block-size",
        4,
    )
    assert rc == 0, err
    row = metric_rows(tmp_path / "opd")[0]
    assert {"train/loss", "train/loss_acc", "train/loss_rej", "rollout/acc_tokens", "rollout/rej_weight", "memory/max_rss_gb"} <= set(row)
    assert all(k.startswith(NAMESPACES) for k in row if k not in ("step", "time"))


def test_run_files_and_config_rerun(target_dir, files, tmp_path, capsys):
    """run.yaml holds the resolved configs; `--config run.yaml` runs with the same ones, a flag given overrides the file."""
    out = tmp_path / "sft"
    argv = [str(a) for a in sft_args(target_dir, files, out)]
    rc, _, err = run(capsys, *argv)
    assert rc == 0, err
    assert (out / "command.txt").read_text().split() == ["draftopd", *argv]
    env = json.loads((out / "env.json").read_text())
    assert env["packages"]["torch"] and env["device"] == "cpu" and env["dtype"] == "float32" and env["host"]
    known = vars(cli.parse_args(["sft"]))
    base = cli.read_run_config(str(out / "run.yaml"), "sft", known)
    assert base["sft"] == SFTConfig(steps=2, batch_size=2, anchors_per_seq=2, optim=OptimConfig(lr=1e-3))
    assert base["drafter"] == DrafterConfig(block_size=4) and base["data"] == DataConfig()
    assert base["args"]["data"] == str(files["data"]) and base["args"]["dtype"] == "float32"
    rc, _, err = run(capsys, "sft", "--config", out / "run.yaml", "--out", tmp_path / "again", "--steps", 3)
    assert rc == 0, err
    again = cli.read_run_config(str(tmp_path / "again" / "run.yaml"), "sft", known)
    assert again["sft"] == replace(base["sft"], steps=3) and again["drafter"] == base["drafter"]
    assert again["args"] == {**base["args"], "out": str(tmp_path / "again")}
    assert [r["step"] for r in metric_rows(tmp_path / "again")] == [1, 2, 3]


RESULT = {"table": "", "checkpoint": "x", "results": {}, "ablations": {}, "plot": "x"}  # what a runner returns, for the printers


def captured(monkeypatch, module: str, name: str) -> list:
    """Replace `module.name` (a command's runner) by one that records its arguments and returns a table."""
    import importlib

    calls = []
    monkeypatch.setattr(importlib.import_module(module), name, lambda *a, **kw: calls.append((a, kw)) or dict(RESULT))
    return calls


def write_config(folder: Path, command: str, **configs) -> Path:
    write_run_files(folder, RunInfo(command, configs), "cpu", "float32")
    return folder / "run.yaml"


def test_config_round_trip_of_every_training_command(target_dir, files, tmp_path, capsys, monkeypatch):
    """Configs off their defaults in every nested group -> run.yaml -> `CMD --config run.yaml` builds the same ones."""
    from draftopd.experiment import ExperimentConfig
    from draftopd.recipe import RecipeConfig
    from draftopd.train.losses import LossConfig
    from draftopd.train.opd import OPDConfig

    sft = SFTConfig(steps=7, loss="kl", slot_decay=3.0, optim=OptimConfig(lr=2e-3, betas=(0.8, 0.9)))
    drafter = DrafterConfig(block_size=4, target_layer_ids=(0, 2))
    calls = captured(monkeypatch, "draftopd.train.sft", "train_sft")
    path = write_config(
        tmp_path / "sft",
        "sft",
        args={"target": str(target_dir), "data": str(files["data"]), "out": str(tmp_path / "s")},
        sft=sft,
        drafter=drafter,
        data=DataConfig(max_tokens=512),
    )
    assert run(capsys, "sft", "--config", path)[0] == 0
    assert calls[0][0][3] == sft and calls[0][0][4] == str(tmp_path / "s")

    opd = OPDConfig(
        steps=3,
        anchors="random",
        rollout=DecodeConfig(max_new_tokens=8, temperature=0.5, seed=4),
        loss=LossConfig(gamma=0.5, rej_slots="first"),
        optim=OptimConfig(lr=1e-4),
    )
    calls = captured(monkeypatch, "draftopd.train.opd", "train_opd")
    path = write_config(
        tmp_path / "opd",
        "opd",
        args={"target": str(target_dir), "out": str(tmp_path / "o")},
        opd=opd,
        prompts=PromptConfig(prompts=str(files["prompts"]), limit=4),
        drafter=drafter,
    )
    assert run(capsys, "opd", "--config", path)[0] == 0
    assert calls[0][0][3] == opd and len(calls[0][0][2]) == 4
    assert run(capsys, "opd", "--config", path, "--temperature", "0", "--loss-gamma", "0.9")[0] == 0
    assert calls[1][0][3] == replace(opd, rollout=replace(opd.rollout, temperature=0.0), loss=replace(opd.loss, gamma=0.9))

    recipe = RecipeConfig(
        target=str(target_dir),
        out_dir=str(tmp_path / "r"),
        feature_layers=2,
        drafter=DrafterConfig(block_size=4),
        eval=EvalConfig(num_prompts=3, decode=DecodeConfig(max_new_tokens=16, lookup_ngram=2)),
    )
    calls = captured(monkeypatch, "draftopd.recipe", "run_recipe")
    assert run(capsys, "recipe", "--config", write_config(tmp_path / "rec", "recipe", recipe=recipe))[0] == 0
    assert calls[0][0][0] == recipe
    assert run(capsys, "recipe", "--config", tmp_path / "rec" / "run.yaml", "--eval-max-new-tokens", 5)[0] == 0
    assert calls[1][0][0] == replace(recipe, eval=replace(recipe.eval, decode=replace(recipe.eval.decode, max_new_tokens=5)))

    demo = ExperimentConfig(
        out_dir=str(tmp_path / "d"),
        start=None,
        ablations=("no-decay",),
        curve_every=3,
        opd=replace(ExperimentConfig().opd, rollout=DecodeConfig(max_new_tokens=40)),
    )
    calls = captured(monkeypatch, "draftopd.experiment", "run_experiment")
    assert run(capsys, "demo", "--config", write_config(tmp_path / "demo", "demo", experiment=demo))[0] == 0
    assert calls[0][0][0] == demo


def test_every_flag_has_help(capsys):
    """Every command's --help lists each of its flags with a non-empty help text (from the config field's metadata)."""
    parser = cli.build_parser()
    for name, sub in parser.commands.items():
        text = sub.format_help()
        for action in sub._actions:
            for flag in action.option_strings:
                assert flag in text, (name, flag)
            assert action.help and action.help.strip(), (name, action.option_strings)


def test_choices_come_from_the_fields():
    from draftopd.config import field_choices
    from draftopd.train.losses import LossConfig

    flags = {a.dest: a for a in cli.build_parser().commands["opd"]._actions}
    assert flags["loss_rej_slots"].choices == field_choices(LossConfig, "rej_slots") == ("all", "first", "wrong")
    assert flags["anchors"].choices == ("error", "random") and flags["report_to"].choices == ("none", "tensorboard", "wandb")
    assert "lookup_ngram" not in flags and "max_new_tokens" in flags  # rollouts draft every slot


def test_recipe_layers_follow_the_target_depth(target_dir, files, tmp_path, capsys):
    """The recipe's target layers: evenly spaced from 1 to N-3, rounded up (SmolLM2, N = 30: 1, 10, 19, 27, the layers of
    the committed recipe's numbers); a target of another depth gets its own."""
    from draftopd.recipe import RecipeConfig, recipe_drafter, spread_layers

    assert recipe_drafter(RecipeConfig(), 30).target_layer_ids == (1, 10, 19, 27)
    assert spread_layers(8, 4) == (1, 3, 4, 5) and spread_layers(36, 5) == (1, 9, 17, 25, 33) and spread_layers(4, 4) == (1,)
    assert recipe_drafter(replace(RecipeConfig(), drafter=DrafterConfig(target_layer_ids=(2,))), 30).target_layer_ids == (2,)
    rc, out, err = run(
        capsys,
        "recipe",
        "--target",
        target_dir,
        "--data",
        files["data"],
        "--out-dir",
        tmp_path / "rec",
        "--steps",
        1,
        "--labels",
        "text",
        "--draft-vocab-size",
        32,
        "--eval-sets",
        files["prompts"],
        "--eval-num-prompts",
        2,
        "--eval-max-new-tokens",
        4,
        "--device",
        "cpu",
        "--json",
    )
    assert rc == 0, err
    spec = json.loads((Path(json.loads(out)["checkpoint"]) / "config.json").read_text())["draftopd_spec"]
    assert spec["target_layer_ids"] == [1]  # 4 layers: 1 to N-3 = 1
    recorded = cli.read_run_config(str(tmp_path / "rec" / "run.yaml"), "recipe", vars(cli.parse_args(["recipe"])))
    assert recorded["recipe"].drafter.target_layer_ids == (1,) and (tmp_path / "rec" / "sft" / "run.yaml").exists()
