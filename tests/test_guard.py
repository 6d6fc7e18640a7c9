"""The held-out guard (`draft.guard`): the LoRA it keeps, when it stops a run, resume, its settings and cards."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from draft.cli import main
from draft.config import LogConfig, LoraConfig, SamplingConfig, TrainConfig, load_config
from draft.errors import UserError
from draft.guard import BEST_FILE, Guard, GuardConfig
from draft.runs import RunFolder


def guarded(tiny_sd, out, **guard) -> TrainConfig:
    """A tiny run with the guard on, a checkpoint after every step and every checkpoint kept."""
    return TrainConfig(
        model=str(tiny_sd), reward="brightness", prompts="a small red circle|a large blue square|a green star",
        eval_prompts="a small red circle|a green star", method="draft-k", k=1, steps=4, batch_size=1, lr=1e-2,
        output_dir=str(out), name="run", seed=3, sampling=SamplingConfig(num_steps=3, guidance_scale=3.0),
        lora=LoraConfig(rank=4, alpha=4.0),
        log=LogConfig(sample_every=100, sample_prompts=1, sample_seeds=1, checkpoint_every=1, keep_checkpoints=20,
                      eval_samples=0, trackers=()),
        guard=GuardConfig(**{"every": 1, "samples": 2, **guard}))


def args(config: TrainConfig) -> list[str]:
    """The same run as `draft train` arguments: its config file."""
    from draft.configio import dump_yaml

    path = Path(config.output_dir) / f"{config.name}-{config.steps}.yaml"
    dump_yaml(config, path)
    return [str(path)]


@pytest.fixture
def script(monkeypatch):
    """Held-out figures and training rewards chosen by step, through the real loop: the guard's
    evaluation runs as usual and its `reward_mean` is then replaced by `held_out[step]`; the
    training reward the guard counts at a step is `train[step]` where given."""
    from draft.watch import Watch

    chosen = {"held_out": {}, "train": {}, "step": 0}
    start, after_step, evaluate = Guard.start, Guard.after_step, Watch.evaluate

    def scripted_start(self, fresh, log):
        chosen["step"] = 0
        return start(self, fresh, log)

    def scripted_after_step(self, step, row, last):
        chosen["step"] = step
        row["reward_mean"] = chosen["train"].get(step, row["reward_mean"])
        return after_step(self, step, row, last)

    def scripted_evaluate(self, n=None):
        figures = evaluate(self, n)
        if n is not None and chosen["step"] in chosen["held_out"]:  # the guard's evaluation
            figures = {**figures, "reward_mean": chosen["held_out"][chosen["step"]]}
        return figures

    monkeypatch.setattr(Guard, "start", scripted_start)
    monkeypatch.setattr(Guard, "after_step", scripted_after_step)
    monkeypatch.setattr(Watch, "evaluate", scripted_evaluate)
    return chosen


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def peft_weights(lora_folder: Path) -> dict[str, torch.Tensor]:
    """A saved LoRA's weights by peft key (the file's keys carry the pipeline component's prefix)."""
    return {k.split(".", 1)[1]: v for k, v in load_file(lora_folder / "pytorch_lora_weights.safetensors").items()}


def test_the_kept_lora_is_the_lora_of_the_step_with_the_best_held_out_figure(tiny_sd, tmp_path, script, one_thread):
    from draft import train

    script["held_out"].update({0: 0.1, 1: 0.5, 2: 0.9, 3: 0.4})
    run = train(guarded(tiny_sd, tmp_path).replace(steps=3), progress=False)
    rows = metrics(run)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert [r["guard_reward_mean"] for r in rows] == [0.1, 0.5, 0.9, 0.4]
    assert [r["guard_best_step"] for r in rows] == [0, 1, 2, 2]
    assert all("guard_jpeg_kb" in r for r in rows)  # the evaluation's other figures are logged too
    best = json.loads((run / "lora-best" / BEST_FILE).read_text())
    assert (best["step"], best["metric"], best["value"]) == (2, "reward_mean", 0.9)
    kept = peft_weights(run / "lora-best")
    at_step_2 = load_file(run / "checkpoints" / "step-00000002" / "adapter.safetensors")
    assert kept.keys() == at_step_2.keys()
    for key, value in at_step_2.items():
        assert torch.equal(kept[key], value), key
    last = peft_weights(run / "lora")
    assert any(not torch.equal(last[k], kept[k]) for k in kept)  # a step on, the last LoRA moved

    # Each card says which LoRA it is; the best's shows its step, and its export command works.
    last_card = (run / "lora" / "README.md").read_text()
    assert "**This is the last LoRA**, from the end of training (step 3)" in last_card
    assert "best held-out `reward_mean` (0.9, step 2) in `lora-best/`" in last_card
    best_card = (run / "lora-best" / "README.md").read_text()
    assert ("**This is the held-out guard's best LoRA**, from step 2 of 3: the highest held-out `reward_mean` (0.9) "
            "of the guard's evaluations of 2 held-out samples every 1 step.") in best_card
    assert "| optimizer steps | 2 of 3 |" in best_card and "| reward_mean | 0.1 | 0.9 |" in best_card
    assert "before_after.png" not in best_card  # the grid shows the last LoRA, not this one
    line = next(line for line in best_card.splitlines() if line.startswith("draft export") and "kohya" in line)
    command, _, comment = line.partition("#")
    assert main(shlex.split(command)[1:]) == 0
    assert comment.split("writes", 1)[1].strip() == str(run / "lora-best" / "run-best-kohya.safetensors")
    assert (run / "lora-best" / "run-best-kohya.safetensors").is_file()


@pytest.mark.slow
def test_under_ddp_the_guard_keeps_and_decides_as_one_process_does(tiny_sd, tmp_path, launch_two_processes):
    """Two processes at half batch: the main process evaluates, every process learns its
    decision (a broadcast), and the figures, the best step and the kept LoRA are those of
    one process on the whole batch (to the round-off of the split batch)."""
    import subprocess

    config = guarded(tiny_sd, tmp_path, patience=1).replace(
        steps=3, lora=LoraConfig(rank=4, alpha=4.0, target_modules=("to_q", "to_k", "to_v", "to_out.0")))
    common = [*args(config), "kl_coeff=0", "--no-progress"]
    launch, env = launch_two_processes
    two = subprocess.run([*launch, "train", *common, "name=two", "batch_size=1"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    assert main(["train", *common, "name=one", "batch_size=2"]) == 0
    one_rows, two_rows = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in two_rows] == [r["step"] for r in one_rows]  # stopped (or not) at the same step
    assert [r["guard_best_step"] for r in two_rows] == [r["guard_best_step"] for r in one_rows]
    for a, b in zip(one_rows, two_rows):
        assert b["guard_reward_mean"] == pytest.approx(a["guard_reward_mean"], abs=1e-5)
    best_one, best_two = (json.loads((tmp_path / n / "lora-best" / BEST_FILE).read_text()) for n in ("one", "two"))
    assert best_two["step"] == best_one["step"]
    kept_one, kept_two = peft_weights(tmp_path / "one" / "lora-best"), peft_weights(tmp_path / "two" / "lora-best")
    assert kept_one.keys() == kept_two.keys()
    for key in kept_one:
        torch.testing.assert_close(kept_two[key], kept_one[key], rtol=0, atol=5e-6, msg=key)


class _Watch:
    """Held-out figures in the order given."""

    def __init__(self, values):
        self.values = iter(values)

    def evaluate(self, n):
        return {"n": n, "reward_mean": next(self.values)}


class _Accelerator:
    is_main_process, num_processes = True, 1

    def __init__(self):
        self.printed = []

    def print(self, text, **_):
        self.printed.append(text)


# (held-out figure at step 0, 1, 2, ...; training reward at step 1, 2, ...; patience; the step it stops at)
RULES = [
    # Falls at steps 2 and 3, the training reward rising each time: stops at the second fall.
    ([0.5, 0.9, 0.8, 0.7, 0.6], [1, 2, 3, 4], 2, 3),
    # The same with patience 3: the third fall.
    ([0.5, 0.9, 0.8, 0.7, 0.6, 0.5], [1, 2, 3, 4, 5], 3, 4),
    # The training reward fell too at step 3: not hacking, the count starts again.
    ([0.5, 0.9, 0.8, 0.7, 0.6, 0.5], [1, 2, 1, 2, 3], 2, 5),
    # A recovery at step 3 breaks the run of falls.
    ([0.5, 0.9, 0.8, 0.85, 0.7, 0.6], [1, 2, 3, 4, 5, 6], 2, 5),
    # Equal is not a fall; patience 0 never stops.
    ([0.5, 0.9, 0.9, 0.9, 0.9], [1, 2, 3, 4], 1, None),
    ([0.5, 0.9, 0.8, 0.7, 0.6], [1, 2, 3, 4], 0, None),
    # Stuck at its floor below the best (accuracy 0 after hacking) counts as falling on.
    ([0.5, 0.9, 0.0, 0.0, 0.0], [1, 2, 3, 4], 3, 4),
    # A rise resets the count; level below the best counts again after it.
    ([0.5, 0.9, 0.6, 0.7, 0.7, 0.7], [1, 2, 3, 4, 5], 2, 5),
]


@pytest.mark.parametrize("held_out, train, patience, stop", RULES)
def test_the_guard_stops_exactly_when_the_held_out_figure_falls_while_the_training_reward_rises(
        held_out, train, patience, stop, tiny_lora, tmp_path):
    model, _ = tiny_lora
    acc = _Accelerator()
    guard = Guard(GuardConfig(every=1, patience=patience), _Watch(held_out), RunFolder(tmp_path), acc, model,
                  model.denoiser)
    guard.start(True, lambda row: None)
    stopped_at = None
    for step, reward in enumerate(train, 1):
        guard.after_step(step, {"reward_mean": reward}, False)
        if guard.stopped:
            stopped_at = step
            break
    assert stopped_at == stop
    if stop is not None:
        assert len(acc.printed) == 1 and acc.printed[0].startswith(f"stopping early at step {stop}: held-out "
                                                                   f"reward_mean fell or stayed below its best at {patience} evaluation")
        assert "\n" not in acc.printed[0]


def test_the_guard_counts_the_training_reward_over_the_steps_between_evaluations(tiny_lora, tmp_path):
    """every=2: the rule compares the mean training reward of steps 1-2, 3-4, ... (not single steps)."""
    model, _ = tiny_lora
    guard = Guard(GuardConfig(every=2, patience=1), _Watch([0.5, 0.9, 0.8]), RunFolder(tmp_path), _Accelerator(),
                  model, model.denoiser)
    guard.start(True, lambda row: None)
    for step, reward in enumerate([1.0, 3.0, 2.5, 1.0], 1):  # means 2.0 then 1.75: the training reward fell
        guard.after_step(step, {"reward_mean": reward}, False)
    assert not guard.stopped and guard.state.falling == 0 and guard.state.previous_train == 1.75


def test_a_figure_that_could_not_be_measured_is_never_the_best_nor_a_fall(tiny_lora, tmp_path):
    model, _ = tiny_lora
    guard = Guard(GuardConfig(every=1, patience=1), _Watch([0.5, float("nan"), None, 0.4, 0.9]), RunFolder(tmp_path),
                  _Accelerator(), model, model.denoiser)
    guard.start(True, lambda row: None)
    for step, reward in enumerate([1.0, 2.0, 3.0], 1):
        guard.after_step(step, {"reward_mean": reward}, False)
        assert not guard.stopped and guard.state.best_step == 0  # 0.4 after nothing measured is no fall either
    guard.after_step(4, {"reward_mean": 4.0}, False)
    assert guard.state.best_step == 4 and json.loads((tmp_path / "lora-best" / BEST_FILE).read_text())["value"] == 0.9


def test_the_last_step_is_not_an_early_stop(tiny_lora, tmp_path):
    model, _ = tiny_lora
    acc = _Accelerator()
    guard = Guard(GuardConfig(every=1, patience=1), _Watch([0.5, 0.9, 0.8]), RunFolder(tmp_path), acc, model,
                  model.denoiser)
    guard.start(True, lambda row: None)
    guard.after_step(1, {"reward_mean": 1.0}, False)
    guard.after_step(2, {"reward_mean": 2.0}, True)
    assert not guard.stopped and acc.printed == [] and guard.state.falling == 1


def test_an_early_stop_ends_the_run_as_a_finished_one(tiny_sd, tmp_path, script, capsys, one_thread):
    config = guarded(tiny_sd, tmp_path, patience=1).replace(steps=5)
    script["held_out"].update({0: 0.5, 1: 0.9, 2: 0.8})
    script["train"].update({1: 1.0, 2: 2.0})
    assert main(["train", *args(config), "--no-progress"]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "run"
    assert ("stopping early at step 2: held-out reward_mean fell or stayed below its best at 1 evaluation in a row while the training "
            f"reward rose (the sign of reward hacking); the best LoRA, step 1 (reward_mean 0.9), is in {run / 'lora-best'}\n") in out
    assert [r["step"] for r in metrics(run)][-1] == 2
    assert (run / "checkpoints" / "step-00000002").is_dir() and not (run / "checkpoints" / "step-00000003").exists()
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert "| optimizer steps | 2 of 5 |" in (run / "lora" / "README.md").read_text()
    assert json.loads((run / "lora-best" / BEST_FILE).read_text())["step"] == 1


@pytest.mark.slow
def test_resume_keeps_the_guards_state_and_decides_as_an_unbroken_run(tiny_sd, tmp_path, script, one_thread):
    """every=2, resumed at step 3 (between two evaluations): the best so far, the falling count and
    the training rewards since the last evaluation all carry over. Losing any of them changes the
    outcome: a fresh count or training window stops at step 6, a fresh best keeps step 4."""
    script["held_out"].update({0: 0.5, 2: 0.9, 4: 0.8, 6: 0.7, 8: 0.6})
    script["train"].update({1: 1.0, 2: 1.0, 3: 0.0, 4: 1.5, 5: 2.0, 6: 2.0, 7: 3.0, 8: 3.0})
    runs = {}
    for name, parts in (("unbroken", [10]), ("resumed", [3, 10])):
        config = guarded(tiny_sd, tmp_path, every=2, patience=2).replace(name=name)
        for k, steps in enumerate(parts):
            resume = ["--resume", str(tmp_path / name)] if k else []
            assert main(["train", *resume, *args(config.replace(steps=steps)), "--no-progress"]) == 0
        runs[name] = tmp_path / name
    unbroken, resumed = runs["unbroken"], runs["resumed"]
    assert [r["step"] for r in metrics(resumed)] == [r["step"] for r in metrics(unbroken)] == list(range(9))
    assert json.loads((resumed / "lora-best" / BEST_FILE).read_text()) == json.loads(
        (unbroken / "lora-best" / BEST_FILE).read_text())
    assert json.loads((unbroken / "lora-best" / BEST_FILE).read_text())["step"] == 2
    state = [json.loads((r / "checkpoints" / "step-00000008" / "state.json").read_text())["trainer"]["guard"]
             for r in (unbroken, resumed)]
    assert state[0] == state[1] and state[0]["falling"] == 2
    for key, value in peft_weights(unbroken / "lora-best").items():
        assert torch.equal(peft_weights(resumed / "lora-best")[key], value)


def test_resume_puts_the_checkpoints_best_lora_back(tiny_sd, tmp_path, script, capsys, one_thread):
    """A run stopped after writing a new best LoRA but before its next checkpoint, resumed on
    another course (here: step 2 is no longer the best): lora-best/ holds the checkpoint's best."""
    import shutil

    script["held_out"].update({0: 0.1, 1: 0.5, 2: 0.9})
    config = guarded(tiny_sd, tmp_path).replace(steps=2)
    assert main(["train", *args(config), "--no-progress"]) == 0
    run = tmp_path / "run"
    assert json.loads((run / "lora-best" / BEST_FILE).read_text())["step"] == 2
    shutil.rmtree(run / "checkpoints" / "step-00000002")  # as if killed between the best's write and the checkpoint
    script["held_out"][2] = 0.2
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert json.loads((run / "lora-best" / BEST_FILE).read_text())["step"] == 1
    at_step_1 = load_file(run / "checkpoints" / "step-00000001" / "adapter.safetensors")
    kept = peft_weights(run / "lora-best")
    assert kept.keys() == at_step_1.keys() and all(torch.equal(kept[k], v) for k, v in at_step_1.items())
    # The guard's state judges one figure on one set of samples: a resume that changes them is refused.
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "steps=3", "guard.samples=3", "--no-progress"]) == 2
    assert "this run's held-out guard judged guard.metric=reward_mean on guard.samples=2" in capsys.readouterr().err


BAD = [("guard.every=-1", "guard.every must be >= 0"), ("guard.samples=0", "guard.samples must be positive"),
       ("guard.patience=-2", "guard.patience must be >= 0"), ("guard.metric=''", "guard.metric must name")]


@pytest.mark.parametrize("override, message", BAD)
def test_bad_guard_settings_are_user_errors(override, message):
    with pytest.raises(UserError, match=message):
        load_config(None, shlex.split(override))


def test_a_metric_the_evaluation_does_not_report_is_refused_before_anything_is_written(tiny_sd, tmp_path, capsys,
                                                                                     one_thread):
    config = guarded(tiny_sd, tmp_path, metric="accuracy")
    assert main(["train", *args(config), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown guard.metric 'accuracy'") and "reward_mean" in err and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_text_encoders_cache_encodes_the_guards_prompts():
    """`text_encoders=cache` encodes what `Watch.prompts` lists: with the guard on, its samples' prompts too."""
    from draft.plan import spread
    from draft.watch import Watch

    held_out = [f"prompt {i}" for i in range(10)]
    log = LogConfig(eval_samples=2, sample_prompts=1)
    on = Watch(None, None, held_out, TrainConfig(log=log, guard=GuardConfig(every=5, samples=5)), "cpu").prompts()
    off = Watch(None, None, held_out, TrainConfig(log=log), "cpu").prompts()
    guard_prompts = {held_out[g] for g in spread(10, 5)}
    assert guard_prompts <= set(on) and not guard_prompts <= set(off)
