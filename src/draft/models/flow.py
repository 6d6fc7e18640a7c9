"""What the rectified-flow families share: the schedule and its resolution-dependent shift.

Every flow family samples x_t = (1 - σ)·x_0 + σ·ε with Euler steps on the sigmas its
pipeline builds with `FlowMatchEulerDiscreteScheduler.set_timesteps`; they differ in small
ways, each an override here:

- `image_tokens`: the image sequence length the dynamic shift mu is computed from (SD3:
  patches of the transformer's patch size; FLUX.1 and Qwen-Image: 2x2 packed latents);
- `mu`: the dynamic shift itself (FLUX.1's linear rule in the token count from the
  scheduler config; FLUX.2's empirical fit in the token count and the number of steps);
- `sigmas`: the sigma grid passed in (FLUX.1: linear from 1 to 1/T; SD3: the scheduler's);
- `max_shift`: calculate_shift's fallback when the scheduler config does not name it.
"""

from __future__ import annotations

from draft.models.base import PipelineAdapter, Size


class FlowMatching(PipelineAdapter):
    max_shift = 1.15  # FLUX.1's and Qwen-Image's pipelines; SD3's says 1.16

    @property
    def denoiser_config(self):
        return self.pipe.transformer.config  # every flow family's denoiser is the pipeline's transformer

    def schedule(self, num_steps: int, size: Size = Size()):
        """The pipeline's schedule: its shift, and with dynamic shifting mu from the token count."""
        from draft.sampling import Schedule

        cfg = self.scheduler_config
        # The scheduler reads mu only with dynamic shifting on (the pipelines may pass one regardless).
        mu = self.mu(self.image_tokens(self.size(size)), num_steps) if cfg.get("use_dynamic_shifting", False) else None
        return Schedule.from_scheduler_config(cfg, num_steps, sigmas=self.sigmas(num_steps), mu=mu)

    def mu(self, tokens: int, num_steps: int) -> float:
        """The dynamic shift for an image of `tokens` tokens: FLUX.1's `calculate_shift`, linear
        in the token count between the scheduler config's two anchors."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        cfg = self.scheduler_config
        return calculate_shift(tokens, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                               cfg.get("base_shift", 0.5), cfg.get("max_shift", self.max_shift))

    def sigmas(self, num_steps: int):
        """The sigma grid the pipeline passes to `set_timesteps` (None: the scheduler's own)."""
        return None

    def image_tokens(self, size: Size) -> int:
        """The length of the transformer's image sequence for a sample of this size."""
        _, h, w = self.latent_shape(size)[-3:]
        return (h // 2) * (w // 2)
