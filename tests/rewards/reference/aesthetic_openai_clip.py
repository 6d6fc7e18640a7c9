"""Reference LAION aesthetic scores for test_clip_rewards.py's parity test: OpenAI's `clip`
package and the predictor's simple_inference.py (christophschuhmann/improved-aesthetic-predictor).

Runs in the reference environment (setup_env.sh):

    python aesthetic_openai_clip.py OUT_DIR

Builds a tiny OpenAI CLIP (clip.model.CLIP, QuickGELU, toy sizes) and an MLP with the
predictor's layout, saves the head as the published pickle
(sac+logos+ava1-l14-linearMSE.pth), converts the CLIP to transformers with transformers'
own conversion code (as openai/clip-vit-large-patch14 was made) into OUT_DIR/clip, and
scores the images as simple_inference.py does: clip's preprocess, encode_image, numpy L2
normalisation, MLP. Writes the preprocessed pixels (pixels_NAME.npy).
"""

import numpy as np
import torch
from clip.clip import _transform
from clip.model import CLIP
from ref_io import inputs, save_pixels, write_result
from torch import nn
from transformers import CLIPConfig, CLIPModel
from transformers.models.clip.convert_clip_original_pytorch_to_hf import (
    copy_text_model_and_projection,
    copy_vison_model_and_projection,
)

SIDE = 32
SIZES = [16, 64, 32, 16, 8, 1]  # the real head: 768, 1024, 128, 64, 16, 1


class MLP(nn.Module):
    """simple_inference.py's MLP (a LightningModule there; only `layers` holds weights)."""

    def __init__(self):
        super().__init__()
        a, b, c, d, e, f = SIZES
        self.layers = nn.Sequential(nn.Linear(a, b), nn.Dropout(0.2), nn.Linear(b, c), nn.Dropout(0.2),
                                    nn.Linear(c, d), nn.Dropout(0.1), nn.Linear(d, e), nn.Linear(e, f))

    def forward(self, x):
        return self.layers(x)


def normalized(a, axis=-1, order=2):  # simple_inference.py
    l2 = np.atleast_1d(np.linalg.norm(a, order, axis))
    l2[l2 == 0] = 1
    return a / np.expand_dims(l2, axis)


def main():
    out, batches, _, _ = inputs()
    torch.manual_seed(0)
    # OpenAI CLIP derives head counts as width // 64.
    model = CLIP(embed_dim=SIZES[0], image_resolution=SIDE, vision_layers=2, vision_width=128, vision_patch_size=8,
                 context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
                 transformer_layers=2).eval()
    mlp = MLP().eval()
    with torch.no_grad():  # gains above the default init, so scores spread as a trained head's do
        for layer in mlp.layers:
            if isinstance(layer, nn.Linear):
                layer.weight.mul_(4)
    torch.save(mlp.state_dict(), out / "sac+logos+ava1-l14-linearMSE.pth")

    config = CLIPConfig(
        projection_dim=SIZES[0],
        text_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=1,
                         vocab_size=49408, max_position_embeddings=77),
        vision_config=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                           image_size=SIDE, patch_size=8),
    )
    hf = CLIPModel(config).eval()
    copy_text_model_and_projection(hf, model)
    copy_vison_model_and_projection(hf, model)
    hf.logit_scale = model.logit_scale
    for param in hf.parameters():  # the copy leaves views into OpenAI's tensors; safetensors wants copies
        param.data = param.data.clone(memory_format=torch.contiguous_format)
    hf.save_pretrained(out / "clip", safe_serialization=True)

    preprocess = _transform(model.visual.input_resolution)  # what clip.load returns as `preprocess`
    result = {}
    for name, images in batches.items():
        pixels = torch.stack([preprocess(im) for im in images])
        with torch.no_grad():
            features = model.encode_image(pixels)
            result[name] = mlp(torch.from_numpy(normalized(features.numpy())).float()).squeeze(-1).tolist()
        save_pixels(out, name, pixels)
    write_result(out, result)


if __name__ == "__main__":
    main()
