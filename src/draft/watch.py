"""What a run looks at while it trains, on the main process: fixed-seed sample grids and
held-out evaluations, always of the same prompts and seeds, so that step 0 and step N can
be compared sample for sample.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from draft.config import TrainConfig
from draft.errors import UserError
from draft.plan import choose_frames, spread

EVAL_SEED = 10_000  # held-out sample k is seeded EVAL_SEED + k, apart from the grid's seeds 0, 1, ...


class Watch:
    """Grids and evaluations of `model` as it is (its LoRA included); `bare` is a context
    manager factory that runs the model without a distributed wrapper (no collectives)."""

    def __init__(self, model, reward, eval_prompts: list[str], config: TrainConfig, device,
                 bare: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        self.model, self.reward, self.eval_prompts = model, reward, eval_prompts
        self.config, self.device, self.bare = config, device, bare

    def grid_prompts(self) -> list[str]:
        """`log.sample_prompts` of the evaluation prompts, spread over the list."""
        m = len(self.eval_prompts)
        return [self.eval_prompts[i] for i in spread(m, min(self.config.log.sample_prompts, m))]

    def grid_layout(self) -> tuple[list[str], list[int]]:
        """(prompt, seed) of each sample of the grid, row by row: one column per prompt, one row per seed."""
        chosen, seeds = self.grid_prompts(), range(self.config.log.sample_seeds)
        return [p for _ in seeds for p in chosen], [s for s in seeds for _ in chosen]

    def prompts(self) -> list[str]:
        """Every prompt the grids and evaluations (the held-out guard's too) sample: what
        `text_encoders=cache` encodes for them."""
        guard = self.config.guard
        sizes = (self.config.log.eval_samples, guard.samples if guard.every else 0)
        return self.grid_prompts() + [self.eval_prompts[g] for n in sizes if n
                                      for g in spread(len(self.eval_prompts), n)]

    def grid(self) -> torch.Tensor:
        """The fixed-seed grid's samples, in `grid_layout`'s order."""
        from draft.inference import generate

        prompts, seeds = self.grid_layout()
        with self.bare():
            return generate(self.model, prompts, seeds, self.config.sampling)

    def check_reward(self, samples: torch.Tensor, prompts: list[str], needs_gradient: bool) -> None:
        """Try the reward on real samples: a failing, non-finite or gradient-less reward stops
        the run here, before anything is written."""
        name = self.config.reward
        samples = samples.to(self.device).requires_grad_(True)
        try:
            r = self.reward(samples, prompts)
        except (ValueError, TypeError, RuntimeError) as e:
            raise UserError(f"reward {name!r} failed on a test batch: {str(e).splitlines()[0]}") from None
        if not torch.isfinite(r).all():
            raise UserError(f"reward {name!r} returned non-finite values on a test batch: {r.tolist()}")
        if needs_gradient and not r.requires_grad:
            raise UserError(f"reward {name!r} passes no gradient to the samples; "
                            f"method={self.config.method} needs one (method=ddpo works without)")

    def evaluate(self, n: int | None = None) -> dict | None:
        """Reward (and model metrics) on `n` (default `log.eval_samples`) held-out prompts, one
        fixed seed each, scored a batch at a time; None when evaluation is off."""
        from draft.evaluation import evaluate_model

        n = self.config.log.eval_samples if n is None else n
        if n == 0:
            return None
        groups = spread(len(self.eval_prompts), n)
        prompts = [self.eval_prompts[g] for g in groups]  # as `prompts` lists them
        frames = choose_frames(0, 0, self.model.size(self._size()).frames, self.config.reward_frames, "even")
        with self.bare():
            return evaluate_model(self.model, prompts, [EVAL_SEED + k for k in range(n)], groups, self.reward,
                                  self.config.sampling, self.device, frames)

    def score(self, samples: torch.Tensor, prompts: list[str]) -> dict:
        """The figures an evaluation reports, of `samples` (one group each)."""
        from draft.evaluation import score_batches

        return score_batches([(samples, prompts, range(len(prompts)))], self.reward, self.model.metrics, self.device)

    def _size(self):
        from draft.inference import sample_size

        return sample_size(self.config.sampling)
