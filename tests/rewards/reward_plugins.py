"""A user's own rewards, named as `reward_plugins:NAME` in the plug-in tests."""

import torch

from draft.rewards import Reward


def redness(images, prompts):
    """A plain function with the reward contract."""
    return images[:, 0].mean((1, 2))


class Target(Reward):
    """A class plug-in with arguments: closeness of the mean colour to `rgb`."""

    def __init__(self, rgb=(1.0, 0.0, 0.0)):
        super().__init__()
        self.register_buffer("rgb", torch.tensor(rgb, dtype=torch.float32))

    def score(self, images, prompts):
        return -(images.mean((2, 3)) - self.rgb).square().sum(1)
