"""imagereward: BLIP key mapping, ImageReward's preprocessing and scoring, loading."""

from __future__ import annotations

import pytest
import torch
from reference_env import check_split, record, reference_pixels, run_reference, split_difference
from reward_contract import assert_close, check_contract
from reward_models import (
    PROMPTS,
    SIDE,
    smooth_images,
    torchvision_style_pixels,
    write_bert_tokenizer,
)

import draft.rewards as rewards
from draft.errors import UserError
from draft.rewards.imagereward import MEAN, STD
from draft.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

HEADS = dict(vision_heads=4, text_heads=4)  # the tiny configs'; ImageReward v1.0 has 16 and 12

_VIT_NAMES = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.qkv": "attn.qkv",
              "self_attn.projection": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def to_imagereward_layout(vision, text, head) -> dict[str, torch.Tensor]:
    """Write transformers BLIP towers and a head in ImageReward.pt's key layout (BLIP's
    VisionTransformer and med.py BertModel names), independently of the loader's mapping."""
    out = {f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()}
    v = vision.state_dict()
    p = "blip.visual_encoder."
    out.update({p + "cls_token": v["embeddings.class_embedding"], p + "pos_embed": v["embeddings.position_embedding"],
                p + "patch_embed.proj.weight": v["embeddings.patch_embedding.weight"],
                p + "patch_embed.proj.bias": v["embeddings.patch_embedding.bias"],
                p + "norm.weight": v["post_layernorm.weight"], p + "norm.bias": v["post_layernorm.bias"]})
    for key, value in v.items():
        if key.startswith("encoder.layers."):
            i, rest = key.removeprefix("encoder.layers.").split(".", 1)
            name, kind = rest.rsplit(".", 1)
            out[f"{p}blocks.{i}.{_VIT_NAMES[name]}.{kind}"] = value
    out.update({f"mlp.layers.{k}": t for k, t in head.state_dict().items()})
    return {k: t.contiguous() for k, t in out.items()}


@pytest.fixture(scope="module")
def blip(tmp_path_factory):
    """(checkpoint folder, tokenizer folder, vision tower, text tower, head)."""
    from safetensors.torch import save_file
    from transformers import (
        BlipTextConfig,
        BlipTextModel,
        BlipVisionConfig,
        BlipVisionModel,
    )

    folder = tmp_path_factory.mktemp("imagereward")
    tok = write_bert_tokenizer(folder / "tokenizer")
    torch.manual_seed(0)
    vision = BlipVisionModel(BlipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, image_size=SIDE, patch_size=8,
                                              layer_norm_eps=1e-6)).eval()
    text = BlipTextModel(BlipTextConfig(vocab_size=len(tok), hidden_size=32, encoder_hidden_size=32,
                                        intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        max_position_embeddings=40, layer_norm_eps=1e-12),
                         add_pooling_layer=False).eval()
    head = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Dropout(0.2), torch.nn.Linear(64, 16),
                               torch.nn.Dropout(0.1), torch.nn.Linear(16, 1)).eval()
    with torch.no_grad():  # spread the scores across images as a trained head does
        for p in head.parameters():
            p.mul_(10)
    save_file(to_imagereward_layout(vision, text, head), str(folder / "ImageReward.safetensors"))
    return folder, folder / "tokenizer", vision, text, head


@pytest.mark.parametrize("size", [(SIDE, SIDE), (64, 64), (40, 72), (20, 20)])
def test_imagereward_matches_reference_scoring(blip, size):
    """ImageReward.score's steps (ImageReward.py): its transform on PIL images, BLIP's ViT,
    the text encoder cross-attending to all image tokens, [CLS] -> MLP -> standardise."""
    from transformers import AutoTokenizer

    folder, tok_dir, vision, text, head = blip
    images = smooth_images(len(PROMPTS), *size)
    with torch.no_grad():
        pixels = torchvision_style_pixels(images, SIDE, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        tokens = vision(pixel_values=pixels).last_hidden_state
        batch = AutoTokenizer.from_pretrained(tok_dir)(PROMPTS, padding="max_length", truncation=True,
                                                       max_length=35, return_tensors="pt")
        out = text(input_ids=batch.input_ids, attention_mask=batch.attention_mask, encoder_hidden_states=tokens,
                   encoder_attention_mask=torch.ones(tokens.shape[:-1], dtype=torch.long))
        ref = (head(out.last_hidden_state[:, 0]).squeeze(-1) - MEAN) / STD
        reward = rewards.get("imagereward", model=str(folder), tokenizer=str(tok_dir), **HEADS)
        # 1e-5 where nothing is resized; else PIL's 8-bit rounding (see test_clip_rewards).
        tol = 1e-5 if size == (SIDE, SIDE) else 0.02
        assert_close(reward(images, PROMPTS), ref, tol, f"imagereward {size}")
    assert ref.std() > 0.05


def test_imagereward_contract(blip):
    folder, tok_dir, *_ = blip
    reward = rewards.get("imagereward", model=str(folder / "ImageReward.safetensors"), tokenizer=str(tok_dir),
                         gradient_checkpointing=True, **HEADS)
    check_contract(reward, smooth_images(3, 48, 48, seed=6), PROMPTS[:3])


def test_imagereward_refuses_the_pickle_and_says_how_to_convert(tmp_path, blip):
    _, tok_dir, *_ = blip
    (tmp_path / "ImageReward.pt").write_bytes(b"\x80\x04")
    with pytest.raises(UserError, match=r"reward_args\.imagereward\.model=.*ImageReward\.pt.*--trust-pickle"):
        rewards.get("imagereward", model=str(tmp_path), tokenizer=str(tok_dir))


@pytest.mark.parity
def test_imagereward_matches_the_image_reward_package(tmp_path):
    """End to end against the `image-reward` package's own code in the reference
    environment: ImageReward.pt (pickle) -> convert_checkpoint -> our loader.

    Where images are resized, the difference is split in two: the model given the
    reference's own preprocessed pixels (exact), and the preprocessing (within the 8-bit
    rounding of the PIL resize that torchvision's Resize runs on a PIL image)."""
    from draft.rewards.loading import convert_checkpoint

    write_bert_tokenizer(tmp_path / "tokenizer")
    batches = {"native": smooth_images(2, SIDE, SIDE, seed=8), "down": smooth_images(2, 64, 64, seed=9),
               "wide": smooth_images(2, 40, 72, seed=10)}
    out = tmp_path / "ref"
    result = run_reference("imagereward_blip.py", out, batches, PROMPTS, tmp_path / "tokenizer")
    weights = convert_checkpoint(out / "ImageReward.pt", trust_pickle=True)
    reward = rewards.get("imagereward", model=str(weights), tokenizer=str(tmp_path / "tokenizer"),
                         vision_heads=12, text_heads=4)  # ViT-B/16 in the reference script
    for name, batch in batches.items():
        ref = torch.tensor(result[name])
        d = split_difference(reward, reward, batch, PROMPTS[: len(batch)], ref, reference_pixels(out, name),
                             OPENAI_CLIP_STD)
        record(f"imagereward {name}", d)
        # Given the same pixels our model is the package's (float32 rounding on scores of a
        # few units); the resized cases differ by 0.035-0.038 on this tiny model, whose
        # scores spread by 3.5-6 across images, and the 8-bit rounding of the reference's
        # resize accounts for that gap.
        check_split(name, d, 1e-4)
        assert d["e2e"] <= 0.05, d
