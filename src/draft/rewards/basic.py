"""Simple, model-free rewards: brightness, saturation and colourfulness.

They need no weights, run anywhere, and make good smoke tests for a training set-up:
each one is easy to raise and easy to see in the images.
"""

from __future__ import annotations

from draft.rewards import Reward

# ITU-R BT.601 luma weights, the ones PIL's "L" conversion uses.
_LUMA = (0.299, 0.587, 0.114)


class Brightness(Reward):
    """Mean luma of the image, in [0, 1]."""

    def score(self, images, prompts):
        w = images.new_tensor(_LUMA).view(1, 3, 1, 1)
        return (images * w).sum(1).mean((1, 2))


class Saturation(Reward):
    """Mean HSV saturation (max - min) / max over pixels, in [0, 1].

    `eps` keeps the ratio finite (and its gradient bounded) on black pixels.
    """

    def __init__(self, eps: float = 1e-2):
        super().__init__()
        self.eps = eps

    def score(self, images, prompts):
        hi = images.amax(1)
        lo = images.amin(1)
        return ((hi - lo) / (hi + self.eps)).mean((1, 2))


class Colorfulness(Reward):
    """Colourfulness of Hasler & Suesstrunk (2003), "Measuring colourfulness in natural images".

    M = sigma_rgyb + 0.3 * mu_rgyb over the opponent channels rg = R - G and
    yb = (R + G) / 2 - B, computed on [0, 1] images (the paper uses [0, 255], so values here
    are 1/255 of the paper's: about 0 for grey images and up to ~0.7 for saturated ones).
    """

    def score(self, images, prompts):
        r, g, b = images.unbind(1)
        rg = (r - g).flatten(1)
        yb = (0.5 * (r + g) - b).flatten(1)
        # The small constant keeps sqrt differentiable on flat (grey) images.
        sigma = (rg.var(1, unbiased=False) + yb.var(1, unbiased=False) + 1e-8).sqrt()
        mu = (rg.mean(1).square() + yb.mean(1).square() + 1e-8).sqrt()
        return sigma + 0.3 * mu
