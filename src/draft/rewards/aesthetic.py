"""The LAION aesthetic predictor, the main reward of the DRaFT paper (Clark et al., 2024, Sec. 5).

"Improved aesthetic predictor" (github.com/christophschuhmann/improved-aesthetic-predictor,
`simple_inference.py`): the OpenAI CLIP ViT-L/14 image embedding, L2-normalised, goes
through a five-layer linear MLP trained to predict AVA/LAION ratings on a 1-10 scale.
Real images score about 4-7; DRaFT pushes Stable Diffusion 1.4 samples from ~5.5 to ~8.

The head is published as a pickle (`sac+logos+ava1-l14-linearMSE.pth`); convert it once
with `python -m draft.rewards.convert FILE.pth --trust-pickle` and point
``reward_args.aesthetic.model`` at the resulting `.safetensors` (or at a folder holding it).
"""

from __future__ import annotations

import re

import torch

from draft.errors import UserError
from draft.rewards import Reward
from draft.rewards.clip import CLIP_DEFAULT, ClipEmbedder, freeze_model
from draft.rewards.loading import from_pretrained, load_state_dict, weights_file
from draft.rewards.preprocess import ImageTransform

HEAD_FILES = (
    "sac+logos+ava1-l14-linearMSE.safetensors",
    "aesthetic-model.safetensors",
    "model.safetensors",
)


class MLPHead(torch.nn.Sequential):
    """The linear stack of the aesthetic predictor and ImageReward, rebuilt from a state dict.

    Both store `layers.{i}.weight/bias` for the linear layers of an `nn.Sequential` whose
    other slots are dropout (identity in eval mode); the original has no activations.
    """

    def __init__(self, state: dict[str, torch.Tensor], prefix: str = "layers."):
        pattern = re.compile(re.escape(prefix) + r"(\d+)\.weight")
        indices = sorted({int(m.group(1)) for k in state if (m := pattern.fullmatch(k))})
        if not indices:
            raise UserError(f"no '{prefix}N.weight' tensors found: this is not an MLP head checkpoint")
        layers = []
        for i in range(indices[-1] + 1):
            if i in indices:
                out_features, in_features = state[f"{prefix}{i}.weight"].shape
                layers.append(torch.nn.Linear(in_features, out_features))
            else:
                layers.append(torch.nn.Identity())
        super().__init__(*layers)
        self.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})


class Aesthetic(Reward):
    """LAION aesthetic score (about 1-10) of each image; prompts are ignored.

    Args:
        model: the MLP head: a .safetensors file, a folder holding one of
            `HEAD_FILES`, or a hub repo id holding one.
        clip: folder or hub id of the CLIP ViT-L/14 the head was trained on
            (transformers format; default `openai/clip-vit-large-patch14`).
        gradient_checkpointing: recompute CLIP activations in backward to save memory.
        dtype: "float16"/"bfloat16" to run CLIP in half precision (the head stays float32).
    """

    def __init__(self, model: str | None = None, clip: str = CLIP_DEFAULT,
                 gradient_checkpointing: bool = False, dtype: str | None = None):
        super().__init__()
        from transformers import CLIPModel

        path = weights_file(model, HEAD_FILES, "reward_args.aesthetic.model", "sac+logos+ava1-l14-linearMSE.pth")
        state = load_state_dict(path)
        self.head = MLPHead(state)
        backbone = freeze_model(from_pretrained(CLIPModel, clip, "reward_args.aesthetic.clip"), dtype)
        # Only the image tower is used; free the text tower. (CLIPVisionModelWithProjection
        # would load it alone, but takes its projection size from the vision sub-config,
        # which some CLIP configs leave at the default, and then re-initialises it.)
        del backbone.text_model, backbone.text_projection
        if self.head[0].in_features != backbone.config.projection_dim:
            raise UserError(
                f"aesthetic head expects {self.head[0].in_features}-d embeddings but reward_args.aesthetic.clip="
                f"{clip} gives {backbone.config.projection_dim}-d"
            )
        side = backbone.config.vision_config.image_size
        # OpenAI's `clip.load` preprocessing: PIL bicubic resize of the short side, then
        # torchvision's CenterCrop (rounded offset), then the OpenAI mean/std.
        transform = ImageTransform("shortest", (side, side), (side, side), "bicubic", "round", clamp=True)
        self.clip = ClipEmbedder(backbone, None, transform, gradient_checkpointing)
        self.freeze()

    def score(self, images, prompts):
        return self.head(self.clip.image(images)).squeeze(-1)

