"""What each optimizer step trains on, as pure functions of (seed, step): prompts, noise
seeds, the once-per-step random choices, and which video frames the reward scores.

Global sample j of step n gets its prompt and noise from (seed, n, j) alone, and every
choice made once per step (AlignProp's K, ReFL's stop step, the video frames) comes from
(seed, n), so any split of a step into micro-batches and processes trains on the same
samples with the same choices; a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from draft.methods import Batch
from draft.sampling import SampleNoise


def sample_seed(seed: int, step: int, index: int) -> int:
    """The seed of global sample `index` at optimizer step `step`."""
    return int(np.random.SeedSequence([seed, step, index]).generate_state(1)[0])


def step_prompts(seed: int, step: int, num_prompts: int, samples: int) -> np.ndarray:
    """Indices into the training prompts of the step's `samples` global samples."""
    return np.random.default_rng([seed, step]).integers(0, num_prompts, size=samples)


def choose_frames(seed: int, step: int, num_frames: int, count: int, how: str) -> tuple[int, ...] | None:
    """The video frames the reward scores at this step (None: all of them): `count` frames,
    evenly spaced (first and last included), drawn at random, or the first ones."""
    if num_frames == 0 or count == 0 or count >= num_frames:
        return None
    if how == "first":
        return tuple(range(count))
    if how == "random":
        rng = np.random.default_rng([seed, step, 2])
        return tuple(sorted(int(i) for i in rng.choice(num_frames, size=count, replace=False)))
    if count == 1:
        return (num_frames - 1,)
    return tuple(sorted({round(k * (num_frames - 1) / (count - 1)) for k in range(count)}))


def micro_batch(seed: int, step: int, micro: int, process: int, num_processes: int, batch_size: int,
                grad_accum: int, prompts: Sequence[str], latent_shape: tuple[int, ...], device,
                frames: tuple[int, ...] | None = None) -> Batch:
    """This process's micro-batch `micro` of optimizer step `step`."""
    picks = step_prompts(seed, step, len(prompts), batch_size * grad_accum * num_processes)
    first = (micro * num_processes + process) * batch_size
    idx = range(first, first + batch_size)
    noise = SampleNoise([sample_seed(seed, step, j) for j in idx], latent_shape, device)
    return Batch([prompts[picks[j]] for j in idx], noise, np.random.default_rng([seed, step, 1]), step, micro, frames)


def spread(m: int, n: int) -> list[int]:
    """n indices into a list of m: evenly spaced when n <= m (prompt files are often
    sorted, so the first few would all be alike), else cycling through it, so each item
    appears with several seeds (which the diversity figure needs)."""
    return [k * m // n if n <= m else k % m for k in range(n)]
