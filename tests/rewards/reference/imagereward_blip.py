"""Reference ImageReward scores from the `image-reward` package's own code, for
test_imagereward_reward.py's parity test.

Runs in the reference environment (setup_env.sh: image-reward 1.5 with the versions it
was written against, transformers 4.36, timm 0.6.13, fairscale 0.4.13):

    python imagereward_blip.py OUT_DIR TOKENIZER_DIR

Builds ImageReward's BLIP at toy text sizes (ViT-B/16 at 32 px), saves its state dict as
`ImageReward.pt` is published, and scores each (image, prompt) pair with
`ImageReward.score` on PNG files, i.e. PIL -> ImageReward's transform -> BLIP -> MLP.
Also writes the transform's output (pixels_NAME.npy), so the test can compare the model and
the resize separately.
"""

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from ref_io import inputs, save_pixels, write_result
from transformers import BertTokenizer

SIDE = 32


def import_imagereward():
    # The package __init__ also imports its ReFL trainer (diffusers, datasets); load only
    # the scorer and BLIP modules by registering the packages without running __init__.
    root = Path(importlib.util.find_spec("ImageReward").submodule_search_locations[0])
    for name, path in (("ImageReward", root), ("ImageReward.models", root / "models")):
        module = types.ModuleType(name)
        module.__path__ = [str(path)]
        sys.modules[name] = module
    from ImageReward import ImageReward as scorer
    from ImageReward.models.BLIP import blip_pretrain

    return scorer, blip_pretrain


def main():
    out, batches, prompts, (tokenizer_dir,) = inputs()
    scorer, blip_pretrain = import_imagereward()

    def init_tokenizer():  # BLIP's init_tokenizer, on the test's vocabulary instead of bert-base
        tok = BertTokenizer(str(Path(tokenizer_dir) / "vocab.txt"))
        tok.add_special_tokens({"bos_token": "[DEC]"})
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        tok.enc_token_id = tok.additional_special_tokens_ids[0]
        return tok

    blip_pretrain.init_tokenizer = init_tokenizer
    med = dict(architectures=["BertModel"], attention_probs_dropout_prob=0.1, hidden_act="gelu",
               hidden_dropout_prob=0.1, hidden_size=32, initializer_range=0.02, intermediate_size=64,
               layer_norm_eps=1e-12, max_position_embeddings=40, model_type="bert", num_attention_heads=4,
               num_hidden_layers=2, pad_token_id=0, type_vocab_size=2, vocab_size=len(init_tokenizer()),
               encoder_width=768, add_cross_attention=True)
    (out / "med_config.json").write_text(json.dumps(med))

    torch.manual_seed(0)
    model = scorer.ImageReward.__new__(scorer.ImageReward)
    torch.nn.Module.__init__(model)  # ImageReward.__init__ hard-codes ViT-L at 224 px
    model.device = "cpu"
    model.blip = blip_pretrain.BLIP_Pretrain(image_size=SIDE, vit="base", med_config=str(out / "med_config.json"))
    model.preprocess = scorer._transform(SIDE)
    model.mlp = scorer.MLP(med["hidden_size"])
    with torch.no_grad():  # the MLP's init is tiny; spread the scores like a trained head's
        for p in model.mlp.parameters():
            p.mul_(10)
    model.mean, model.std = 0.16717362830052426, 1.0333394966054072
    model.eval()
    torch.save(model.state_dict(), out / "ImageReward.pt")

    result = {}
    for name, images in batches.items():
        scores, pixels = [], []
        for i, (im, prompt) in enumerate(zip(images, prompts)):
            path = out / f"{name}_{i}.png"
            im.save(path)
            with torch.no_grad():
                scores.append(model.score(prompt, str(path)))
            pixels.append(model.preprocess(Image.open(path)).numpy())  # the step score() takes
        result[name] = scores
        save_pixels(out, name, np.stack(pixels))
    write_result(out, result)


if __name__ == "__main__":
    main()
