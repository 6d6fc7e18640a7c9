"""hpsv2: the open_clip -> transformers mapping, HPSv2's letterbox preprocessing, loading."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reward_contract import assert_close, check_contract
from reward_models import (
    PROMPTS,
    SIDE,
    seeded,
    smooth_images,
    tiny_clip_config,
    write_clip_tokenizer,
)

import draft.rewards as rewards
from draft.errors import UserError
from draft.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


def hf_to_openclip(model) -> dict[str, torch.Tensor]:
    """Write a transformers CLIPModel in open_clip's state-dict layout (the inverse of
    draft.rewards.hps.openclip_to_hf, written independently from open_clip's module names)."""
    sd = model.state_dict()
    out = {
        "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
        "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": sd["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": sd["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": sd["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": sd["vision_model.post_layernorm.bias"],
        "visual.proj": sd["visual_projection.weight"].T,
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].T,
        "logit_scale": sd["logit_scale"],
    }
    for tower, prefix, n in (("vision_model", "visual.", 2), ("text_model", "", 2)):
        for i in range(n):
            src, dst = f"{tower}.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
            for kind in ("weight", "bias"):
                out[dst + f"attn.in_proj_{kind}"] = torch.cat([sd[src + f"self_attn.{c}_proj.{kind}"] for c in "qkv"])
                for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                    out[dst + f"{a}.{kind}"] = sd[src + f"{b}.{kind}"]
    return {k: v.contiguous() for k, v in out.items()}


HEADS = dict(vision_heads=4, text_heads=4)  # the tiny config's; ViT-H-14 has 16 and 16


@pytest.fixture(scope="module")
def hps(tmp_path_factory):
    """(checkpoint folder, tokenizer folder, the transformers model it was made from)."""
    from safetensors.torch import save_file
    from transformers import CLIPModel

    folder = tmp_path_factory.mktemp("hps")
    tok = write_clip_tokenizer(folder / "tokenizer")
    model = seeded(lambda: CLIPModel(tiny_clip_config(len(tok), act="gelu"))).eval()
    save_file(hf_to_openclip(model), str(folder / "HPS_v2.1_compressed.safetensors"))
    return folder, folder / "tokenizer", model


def resize_max_size(x: torch.Tensor, size: int) -> torch.Tensor:
    """HPSv2's ResizeMaxSize on a float tensor (hpsv2/src/open_clip/transform.py)."""
    h, w = x.shape[-2:]
    scale = size / max(h, w)
    if scale == 1.0:
        return x
    nh, nw = round(h * scale), round(w * scale)
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    ph, pw = size - nh, size - nw
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2], value=0.0)


@pytest.mark.parametrize("size", [(SIDE, SIDE), (64, 64), (40, 72), (20, 20)])
def test_hpsv2_matches_the_model_it_was_converted_from(hps, size):
    folder, tok_dir, model = hps
    images = smooth_images(len(PROMPTS), *size)
    reward = rewards.get("hpsv2", model=str(folder), tokenizer=str(tok_dir), **HEADS)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    with torch.no_grad():
        mean, std = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
        pixels = (resize_max_size(images, SIDE) - mean) / std
        img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        # open_clip pads every prompt to 77 tokens with id 0 and no padding mask.
        ids = tok(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
        eot = (ids == tok.eos_token_id).int().argmax(1)
        ids = ids.masked_fill(ids == tok.pad_token_id, 0)
        ids[torch.arange(len(PROMPTS)), eot] = tok.eos_token_id
        txt = model.text_projection(model.text_model(input_ids=ids).pooler_output)
        ref = (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)
        assert_close(reward(images, PROMPTS), ref, 1e-5, f"hpsv2 {size}")
    assert ref.std() > 0.05


def test_hpsv2_letterboxes_non_square_images(hps):
    folder, tok_dir, _ = hps
    reward = rewards.get("hpsv2", model=str(folder), tokenizer=str(tok_dir), **HEADS)
    x = reward.clip.transform(torch.ones(1, 3, 40, 80))
    assert x.shape == (1, 3, SIDE, SIDE)
    black = (0 - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    torch.testing.assert_close(x[0, :, 0, 0], black)  # padded rows are black, as in HPSv2


def test_hpsv2_contract(hps):
    folder, tok_dir, _ = hps
    reward = rewards.get("hpsv2", model=str(folder / "HPS_v2.1_compressed.safetensors"), tokenizer=str(tok_dir),
                         gradient_checkpointing=True, **HEADS)
    check_contract(reward, smooth_images(3, 48, 48, seed=4), PROMPTS[:3])


def test_hpsv2_rejects_other_checkpoints(tmp_path, hps):
    from safetensors.torch import save_file

    _, tok_dir, _ = hps
    save_file({"layers.0.weight": torch.zeros(2, 2)}, str(tmp_path / "HPS_v2.safetensors"))
    with pytest.raises(UserError, match="not an open_clip CLIP checkpoint"):
        rewards.get("hpsv2", model=str(tmp_path), tokenizer=str(tok_dir))
    with pytest.raises(UserError, match=r"reward_args\.hpsv2\.model is not set"):
        rewards.get("hpsv2", tokenizer=str(tok_dir))


@pytest.mark.parity
def test_hpsv2_matches_open_clip(tmp_path):
    """End to end against open_clip and HPSv2's own preprocessing, run in the reference
    environment: pickled checkpoint -> convert_checkpoint -> our loader -> same scores."""
    from reference_env import record, reference_pixels, run_reference, split_difference
    from transformers import CLIPTokenizer

    from draft.rewards.loading import convert_checkpoint

    batches = {"native": torch.cat([smooth_images(2, 32, 32, seed=1), smooth_images(2, 32, 32, seed=2)]),
               "wide": smooth_images(2, 40, 72, seed=3), "down": smooth_images(2, 64, 64, seed=4)}
    out = tmp_path / "ref"
    result = run_reference("hps_openclip.py", out, batches, PROMPTS)
    weights = convert_checkpoint(out / "HPS_v2_compressed.pt", trust_pickle=True)
    tok = CLIPTokenizer(vocab=str(out / "tokenizer" / "vocab.json"), merges=str(out / "tokenizer" / "merges.txt"))
    tok.save_pretrained(out / "tokenizer")
    reward = rewards.get("hpsv2", model=str(weights), tokenizer=str(out / "tokenizer"), **HEADS)
    for name, batch in batches.items():
        ref = torch.tensor(result[name])
        d = split_difference(reward, reward.clip, batch, PROMPTS[: len(batch)], ref, reference_pixels(out, name),
                             OPENAI_CLIP_STD)
        record(f"hpsv2 {name}", d)
        # HPSv2 resizes the float image, as we do: no 8-bit rounding anywhere.
        assert d["e2e"] <= 1e-5 and d["model"] <= 1e-5 and d["levels_max"] <= 1e-3, d
        assert len(set(ref.tolist())) == len(ref)
