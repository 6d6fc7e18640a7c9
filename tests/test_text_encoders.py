"""text_encoders=device|offload|cache: the same training, with the text encoders' work done
every micro-batch, only while encoding, or once at the start."""

from __future__ import annotations

import pytest
import torch

from draft.config import LogConfig, LoraConfig, SamplingConfig, TrainConfig
from draft.models.text import join_rows, split_rows, text_encoders
from draft.runs import RunFolder


@pytest.fixture
def make_trainer():
    """Trainer objects in this process, each with a fresh Accelerate state."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from draft.defaults import resolve
    from draft.trainer import Trainer

    def make(config: TrainConfig):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        return Trainer(resolve(config), Accelerator(cpu=True), RunFolder(config.output_dir), None)

    yield make
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def config(model: str, tmp_path, **changes) -> TrainConfig:
    return TrainConfig(
        model=model, reward="shapes-alignment", prompts="train", eval_prompts="heldout", method="draft-k", k=2,
        steps=2, batch_size=2, lr=1e-2, output_dir=str(tmp_path), name="run", seed=3, kl_coeff=0.0,
        sampling=SamplingConfig(num_steps=4, negative_prompt="blurry"), lora=LoraConfig(rank=4, alpha=4.0),
        log=LogConfig(sample_prompts=2, sample_seeds=1, eval_samples=3, trackers=()),
    ).replace(**changes)


def count_forwards(model) -> list[int]:
    """A counter of the text encoders' forward calls (one list entry, incremented by hooks)."""
    calls = [0]
    for m in text_encoders(model).values():
        m.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def train_steps(t, n: int = 2) -> torch.Tensor:
    for _ in range(n):
        t.optimizer_step()
        t.progress.step += 1
    return torch.cat([p.detach().flatten() for p in t.params])


@pytest.mark.slow
@pytest.mark.parametrize("model", ["shapes-sd", "shapes-flow"])
def test_cached_and_offloaded_encoders_train_the_same_lora_as_encoding_every_step(model, tmp_path, make_trainer):
    loras = {}
    for mode in ("device", "offload", "cache"):
        t = make_trainer(config(model, tmp_path, text_encoders=mode))
        start = torch.cat([p.detach().flatten() for p in t.params])
        loras[mode] = train_steps(t)
        assert not torch.equal(loras[mode], start)
    torch.testing.assert_close(loras["offload"], loras["device"], rtol=0, atol=0)
    # Encoded at the step's batch size, the cached rows are the step's own, bit for bit.
    torch.testing.assert_close(loras["cache"], loras["device"], rtol=0, atol=0)


def test_with_the_cache_a_training_step_runs_no_text_encoder(tmp_path, make_trainer):
    t = make_trainer(config("shapes-sd", tmp_path, text_encoders="cache"))
    calls = count_forwards(t.model)
    train_steps(t, 1)
    t.watch.grid(), t.watch.evaluate()  # the grid and the held-out evaluation come from the cache too
    assert calls == [0]
    # The weights are gone from every device; the device mode's step does encode.
    assert all(p.is_meta for m in text_encoders(t.model).values() for p in m.parameters())
    t = make_trainer(config("shapes-sd", tmp_path))
    calls = count_forwards(t.model)
    train_steps(t, 1)
    assert calls[0] > 0


def test_a_prompt_missing_from_the_cache_is_named(tmp_path, make_trainer):
    t = make_trainer(config("shapes-sd", tmp_path, text_encoders="cache"))
    with pytest.raises(RuntimeError, match="'a prompt never seen'"):
        t.sampler.conditioning(["a prompt never seen"])


def test_rows_split_and_join_back_to_the_batch():
    cond = {"embeds": torch.randn(3, 5, 4), "pair": (torch.randn(3, 2), None), "scale": 2.0}
    rows = split_rows(cond, 3)
    assert rows[1]["embeds"].shape == (1, 5, 4) and rows[2]["pair"][1] is None
    back = join_rows(rows)
    assert torch.equal(back["embeds"], cond["embeds"]) and torch.equal(back["pair"][0], cond["pair"][0])
    assert back["scale"] == 2.0 and join_rows(split_rows(None, 2)) is None
    with pytest.raises(ValueError, match="join_conditioning"):
        join_rows([torch.zeros(1, 5), torch.zeros(1, 6)])
