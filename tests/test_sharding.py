"""FSDP2 through Accelerate (`draft.sharding`): two CPU processes launched with the
README's FSDP2 `accelerate config` shard the frozen denoiser (Accelerate's own
`fsdp2_prepare_model`, over gloo) and train the LoRA one process trains on the same global batch;
a sharded checkpoint resumes to the uninterrupted result."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from draft.cli import main
from draft.models.tiny import PROMPTS

README = Path(__file__).resolve().parents[1] / "README.md"

# merge_lora and merged_recompute are off under sharding (a start-up line says so): off in the
# one-process run too, so both run the same arithmetic.
COMMON = ["reward=brightness", f"prompts={'|'.join(PROMPTS)}", f"eval_prompts={PROMPTS[0]}", "method=draft-lv",
          "lr=1e-2", "kl_coeff=0", "sampling.num_steps=3", "sampling.guidance_scale=3", "log.sample_prompts=1",
          "log.sample_seeds=1", "log.eval_samples=0", "log.trackers=[]", "seed=5", "sampling.merge_lora=false",
          "sampling.merged_recompute=false", "--no-progress"]


@pytest.fixture
def launch_fsdp2(launch_two_processes, tmp_path_factory):
    """The two-process launch with the README's FSDP2 `accelerate config` in place of
    --multi_gpu (its bf16 overridden by the launch's --mixed_precision no)."""
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", README.read_text(), re.S) if "fsdp_version: 2" in b]
    config = tmp_path_factory.mktemp("fsdp2") / "fsdp2.yaml"
    config.write_text(block)
    launch, env = launch_two_processes
    i = launch.index("--multi_gpu")
    return [*launch[:i], "--config_file", str(config), *launch[i + 1:]], env


def _sharded(launch_fsdp2, *args: str) -> str:
    launch, env = launch_fsdp2
    out = subprocess.run([*launch, "train", *args], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def _lora(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "lora" / "pytorch_lora_weights.safetensors")


def _grad_norms(run: Path) -> list[float]:
    return [json.loads(line)["grad_norm"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_fsdp_version_1_is_refused_at_start(tiny_sd, tmp_path, monkeypatch, capsys):
    """What `accelerate launch` sets for an FSDP1 config: refused in one line, nothing written."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    assert main(["train", f"model={tiny_sd}", *COMMON, "steps=1", f"output_dir={tmp_path}", "name=r"]) == 2
    assert "FSDP version 1 is not supported: set fsdp_version: 2" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_fsdp2_two_processes_equal_one_process(tiny_sd, tmp_path, one_thread, launch_fsdp2):
    common = [f"model={tiny_sd}", *COMMON, "steps=3", "lora.target_modules=to_q,to_k,to_v,to_out.0",
              f"output_dir={tmp_path}"]
    stdout = _sharded(launch_fsdp2, *common, "name=two", "batch_size=1")
    assert "FSDP2: the denoiser is sharded across 2 processes" in stdout
    assert "effective batch 2 = 1 x 1 accumulation x 2 process(es)" in stdout
    assert main(["train", *common, "name=one", "batch_size=2"]) == 0
    one, two = _lora(tmp_path / "one"), _lora(tmp_path / "two")
    assert one.keys() == two.keys() and all(k.startswith("unet.") for k in one)
    # Round-off only (batch 1 against batch 2 kernels, the gradient's reduce-scatter): up to
    # 1.9e-6 seen against weights of ~0.4, as DDP's attention-only run allows 5e-6.
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=5e-6)
    # The gradient norm is the whole LoRA's, clipped over the shards as one.
    assert _grad_norms(tmp_path / "two") == pytest.approx(_grad_norms(tmp_path / "one"), rel=1e-4)


@pytest.mark.slow
def test_fsdp2_checkpoint_resumes_sharded_and_unsharded(tiny_sd, tmp_path, one_thread, launch_fsdp2):
    """A sharded checkpoint holds the LoRA and Adam's moments whole: --resume continues it
    sharded to the uninterrupted run's LoRA, and one process continues it alike."""
    common = [f"model={tiny_sd}", *COMMON, "batch_size=1", "log.checkpoint_every=2", f"output_dir={tmp_path}"]
    _sharded(launch_fsdp2, *common, "steps=3", "name=whole")
    _sharded(launch_fsdp2, *common, "steps=2", "name=cut")
    whole = _grad_norms(tmp_path / "whole")
    # Two sharded runs of one config take the same first steps (were they to differ, the
    # resume below could not be judged: Adam at lr 1e-2 turns a last-bit difference in a
    # gradient near zero into a difference of the learning rate's size).
    assert _grad_norms(tmp_path / "cut") == whole[:2]
    adapter = load_file(tmp_path / "cut" / "checkpoints" / "step-00000002" / "adapter.safetensors")
    assert all(v.shape == _lora(tmp_path / "cut")[f"unet.{k}"].shape for k, v in adapter.items())
    subprocess.run(["cp", "-r", str(tmp_path / "cut"), str(tmp_path / "cut1")], check=True)
    assert "resuming" in _sharded(launch_fsdp2, "--resume", str(tmp_path / "cut"), "steps=3", "--no-progress")
    resumed = _grad_norms(tmp_path / "cut")
    for k, v in _lora(tmp_path / "whole").items():
        torch.testing.assert_close(_lora(tmp_path / "cut")[k], v, rtol=0, atol=1e-7,
                                   msg=lambda m: f"{m}\ngradient norms: whole {whole}, resumed {resumed}")
    # One process at batch 2 continues the same checkpoint: no shard is left in it.
    assert main(["train", "--resume", str(tmp_path / "cut1"), "steps=3", "batch_size=2", "--no-progress"]) == 0
    for k, v in _lora(tmp_path / "whole").items():
        torch.testing.assert_close(_lora(tmp_path / "cut1")[k], v, rtol=0, atol=5e-6)


@pytest.mark.slow
def test_fsdp2_two_processes_equal_one_on_a_flow_model(tmp_path_factory, tmp_path, one_thread, launch_fsdp2):
    """The same on SD3 (rectified flow, a transformer sharded per block, the family's own LoRA
    targets), each process accumulating two micro-batches."""
    from draft.models.tiny import build_tiny

    # With an evaluation before and after training, which every process samples when sharded.
    common = [f"model={build_tiny(tmp_path_factory.mktemp('sd3-fsdp'), 'sd3')}", *COMMON, "steps=2",
              "log.eval_samples=1", f"output_dir={tmp_path}"]
    stdout = _sharded(launch_fsdp2, *common, "name=two", "batch_size=1", "grad_accum=2")
    assert "effective batch 4 = 1 x 2 accumulation x 2 process(es)" in stdout
    assert main(["train", *common, "name=one", "batch_size=4"]) == 0
    one, two = _lora(tmp_path / "one"), _lora(tmp_path / "two")
    assert one.keys() == two.keys() and all(k.startswith("transformer.") for k in one)
    for k in one:  # 3.1e-6 seen against weights of ~0.5
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-5)
    evals = [json.loads((tmp_path / n / "report" / "eval.json").read_text()) for n in ("one", "two")]
    assert evals[1]["after"]["reward_mean"] == pytest.approx(evals[0]["after"]["reward_mean"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["cached-prompts-nf4", "ddpo", "wan"])
def test_fsdp2_two_processes_equal_one_with_the_memory_options_ddpo_and_video(case, tmp_path_factory, tmp_path,
                                                                              one_thread, launch_fsdp2):
    """Under FSDP2 too: prompts encoded once and the encoders released, over an NF4 base (its
    4-bit weights sharded: torchao's NF4 tensor gathers itself); DDPO's policy gradient; a
    video model (Wan, its 3-D blocks sharded)."""
    from draft.models.tiny import build_tiny

    if case == "cached-prompts-nf4":
        pytest.importorskip("torchao")
    family = "wan" if case == "wan" else "sd"
    extra = {"cached-prompts-nf4": ["text_encoders=cache", "quantize=nf4"],
             "ddpo": ["method=ddpo", "sampling.eta=1.0", "ddpo_rollout_reuse=1", "ddpo_min_prompt_count=1"],
             "wan": ["sampling.height=16", "sampling.width=16", "sampling.frames=9", "reward_frames=2"]}[case]
    common = [f"model={build_tiny(tmp_path_factory.mktemp(family), family)}", *COMMON, "steps=3", *extra,
              f"output_dir={tmp_path}"]
    stdout = _sharded(launch_fsdp2, *common, "name=two", "batch_size=1")
    assert "FSDP2: the denoiser is sharded across 2 processes" in stdout
    assert main(["train", *common, "name=one", "batch_size=2"]) == 0
    one, two = _lora(tmp_path / "one"), _lora(tmp_path / "two")
    assert one.keys() == two.keys()
    assert _grad_norms(tmp_path / "two") == pytest.approx(_grad_norms(tmp_path / "one"), rel=1e-4)
    # The LoRA's update (lora_B starts at zero) agrees to 1% of its norm, where a wrong
    # reduction differs by O(1): Adam turns round-off in near-zero gradients into steps of
    # about lr (seen: 2e-6 with the cache and NF4, 5e-5 on Wan, 1e-3 for DDPO, against lr 1e-2).
    diff = sum(float(((one[k] - two[k]) ** 2).sum()) for k in one) ** 0.5
    update = sum(float((one[k] ** 2).sum()) for k in one if ".lora_B." in k) ** 0.5
    assert update > 0 and diff / update < 1e-2, (diff, update)


def test_int8_and_float8_bases_are_refused_under_fsdp2():
    """torchao's int8 and float8 weights implement no split, so fully_shard would fail inside
    `prepare` on every process: refused at start, pointing at nf4, which shards."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from draft import sharding
    from draft.config import TrainConfig
    from draft.errors import UserError

    acc = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True, num_processes=2, print=print)
    for how in ("int8", "float8"):
        with pytest.raises(UserError, match=f"quantize={how} is not supported under FSDP2.*quantize=nf4"):
            sharding.setup(TrainConfig(quantize=how), acc)
    assert sharding.setup(TrainConfig(quantize="nf4"), acc).quantize == "nf4"


def test_the_guard_is_refused_under_fsdp2():
    """The guard evaluates and keeps the best LoRA on the main process alone; under sharding
    every process must join each forward, so it is refused at start, not left to hang."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from draft import sharding
    from draft.config import SamplingConfig, TrainConfig
    from draft.errors import UserError
    from draft.guard import GuardConfig

    acc = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True, num_processes=2, print=print)
    with pytest.raises(UserError, match="guard.every is not supported under FSDP2"):
        sharding.setup(TrainConfig(guard=GuardConfig(every=5)), acc)
    assert sharding.setup(TrainConfig(), acc).sampling.merge_lora is False
    # A compiled bare module would skip FSDP2's all-gathers: the option is turned off, saying so.
    lines = []
    acc.print = lines.append
    config = sharding.setup(TrainConfig(sampling=SamplingConfig(compile="whole")), acc)
    assert config.sampling.compile == "none" and any("sampling.compile=whole is off" in line for line in lines)
