"""The `draft` command end to end, as a subprocess, and its answers to bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from draft.cli import main

TINY_RUN = ["steps=2", "batch_size=2", "sampling.num_steps=3", "sampling.guidance_scale=3", "method=draft-k", "k=2",
            "log.sample_every=1", "log.sample_prompts=1", "log.eval_samples=2", "log.checkpoint_every=1",
            "prompts=a small red circle|a large blue square", "eval_prompts=a green star|a small red circle"]


def draft_cli(*args, cwd=None, env_extra=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "draft.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


@pytest.fixture(scope="module")
def cli_run(tiny_sd, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    proc = draft_cli("train", f"model={tiny_sd}", "reward=brightness", f"output_dir={out}", "name=r", *TINY_RUN,
                     "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "r", proc


@pytest.mark.slow
def test_train_subprocess_end_to_end(cli_run):
    run, proc = cli_run
    assert "effective batch 2" in proc.stdout and "reward queries per step 2" in proc.stdout
    assert "before:" in proc.stdout  # the base model's figures, printed at the start
    table = proc.stdout[proc.stdout.index("held-out, 2 images"):].splitlines()
    assert table[0].split()[-2:] == ["before", "after"] and table[1].startswith("reward_mean")
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert list((run / "logs").rglob("events.out.tfevents*")), "no TensorBoard events"
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_resume_continues_where_the_run_stopped(cli_run, tiny_sd):
    run, _ = cli_run
    proc = draft_cli("train", "--resume", str(run), "steps=3", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert "resuming" in proc.stdout


@pytest.mark.slow
def test_sample_and_eval_subprocess(cli_run, tiny_sd, tmp_path):
    run, _ = cli_run
    proc = draft_cli("sample", "--model", str(tiny_sd), "--lora", f"{run}:0.5", "--prompt", "a red circle",
                     "--prompt", "a blue star", "--num-images", "2", "--steps", "3", "--out", str(tmp_path / "s"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 4 images, each also enlarged (32 px is too small to look at), and the grid
    from PIL import Image

    assert len(list((tmp_path / "s").glob("*.png"))) == 9
    assert Image.open(tmp_path / "s" / "000-0.preview.png").size == (128, 128)
    proc = draft_cli("eval", "--model", str(tiny_sd), "--lora", str(run), "--reward", "brightness", "--prompts",
                     "a red circle|a blue star", "--seeds", "2", "--steps", "3", "--out", str(tmp_path / "e.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["n"] == 4 and 0 <= result["reward_mean"] <= 1 and result["diversity"] > 0


def test_rewards_lists_names_and_help_is_fast():
    proc = draft_cli("rewards")
    assert proc.returncode == 0 and "brightness" in proc.stdout and "saturation" in proc.stdout
    # `draft --help` must not import torch
    code = "import sys, draft.cli; draft.cli.build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


@pytest.mark.slow
def test_dry_run_validates_and_prints(tiny_sd, tmp_path):
    proc = draft_cli("train", f"model={tiny_sd}", "reward=brightness", "prompts=a|b|c", "eval_prompts=a red cat",
                     "grad_accum=3", f"output_dir={tmp_path}", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "effective batch 12" in proc.stdout and "method: draft-lv" in proc.stdout
    assert not any(tmp_path.iterdir())


@pytest.fixture
def bad_rewards(tmp_path, monkeypatch):
    (tmp_path / "bad_rewards.py").write_text(textwrap.dedent("""
        import torch
        def wrong_shape(images, prompts):
            return images.mean((2, 3))
        def nan(images, prompts):
            return images.mean((1, 2, 3)) * float("nan")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.mark.parametrize(
    "args, message",
    [
        (["lerning_rate=0.1"], "unknown config key 'lerning_rate'"),
        (["sampling.num_step=3"], "did you mean 'num_steps'"),
        (["steps=many"], "steps must be an integer"),
        (["model=/no/such/folder"], "model folder '/no/such/folder' not found"),
        (["reward=brightnes"], "did you mean 'brightness'"),
        (["reward=bad_rewards:wrong_shape"], "expected shape (2,)"),
        (["reward=bad_rewards:nan"], "non-finite"),
        (["prompts=no_such_set"], "prompt set or file 'no_such_set' not found"),
        (["method=draft-k", "k=9"], "k=9 is larger than sampling.num_steps=3"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_run_folder(args, message, tiny_sd, tmp_path, bad_rewards, capsys):
    out = tmp_path / "runs"
    code = main(["train", f"model={tiny_sd}", "reward=brightness", f"output_dir={out}", "name=x", *TINY_RUN,
                 *args, "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert not (out / "x").exists()


def test_bad_input_exit_code_as_a_real_process(tmp_path):
    proc = draft_cli("train", "model=/no/such/folder", f"output_dir={tmp_path}")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    proc = draft_cli("sample", "--prompt")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_existing_run_folder_is_not_clobbered(cli_run, tiny_sd, capsys):
    run, _ = cli_run
    before = (run / "metrics.jsonl").read_text()
    code = main(["train", f"model={tiny_sd}", "reward=brightness", f"output_dir={run.parent}", f"name={run.name}",
                 *TINY_RUN])
    assert code == 2 and "--resume" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_an_unwritable_out_stops_before_sampling_with_one_line(tiny_sd, tmp_path, capsys, command):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "sub" / ("e.json" if command == "eval" else "images")
    folder = out.parent if command == "eval" else out
    what = "the evaluation results" if command == "eval" else "the images"
    extra = ["--prompt", "a red circle"] if command == "sample" else ["--prompts", "a red circle", "--seeds", "1"]
    assert main([command, "--model", str(tiny_sd), *extra, "--steps", "2", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"stopped: could not write {what} to {folder}: {os.strerror(20)}"  # ENOTDIR


def test_sample_and_eval_sample_as_the_model_is_trained_unless_told():
    from draft.cli import _sampling, build_parser

    from draft.defaults import resolve_sampling

    def sampling(*argv):
        args = build_parser().parse_args(["sample", "--prompt", "a red circle", *argv])
        return resolve_sampling(args.model, _sampling(args))

    flow = sampling("--model", "shapes-flow")
    assert (flow.num_steps, flow.guidance_scale) == (10, 4.0)  # shapes-flow's recipe (draft.models)
    assert sampling("--model", "shapes-flow", "--steps", "50", "--guidance", "6").num_steps == 50
    sd = sampling()
    assert (sd.num_steps, sd.guidance_scale) == (20, 7.5)  # shapes-sd's recipe too
