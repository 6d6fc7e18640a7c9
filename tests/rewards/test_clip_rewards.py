"""clipscore, pickscore and aesthetic against the reference pipelines (PIL -> processor -> model)."""

from __future__ import annotations

import pytest
import torch
from reward_contract import assert_close, check_contract
from reward_models import PROMPTS, SIDE, smooth_images, to_pil, torchvision_style_pixels

import draft.rewards as rewards
from draft.errors import UserError
from draft.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

# Image sizes: the model's own size (no resize: must be exact), a downscale like SD's
# 512 -> 224, a non-square one that is cropped, and an upscale; all from 8-bit values so
# PIL sees the same pixels.
SIZES = [(SIDE, SIDE), (64, 64), (48, 80), (24, 24)]
# Tolerance on cosine similarity where the reference resizes. The residual is the
# reference's own 8-bit rounding (PIL rounds after each resize pass; pixels differ by
# 0.3/255 on average); our model path given the reference's pixels is exact (see
# test_model_path_is_exact). On these tiny random models it is ~1% of the spread of
# scores across images; a bilinear, non-antialiased squash differs 5-200x more.
COS_TOL = 1.5e-3


def _features(out):
    """transformers 5 returns an output object from get_*_features, transformers 4 a tensor."""
    return out if torch.is_tensor(out) else out.pooler_output


def reference_clip(folder, images, prompts):
    """The PickScore README's scorer: AutoProcessor on PIL images, then the model."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        pixels = processor(images=to_pil(images), return_tensors="pt")["pixel_values"]
        text = tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        img = _features(model.get_image_features(pixel_values=pixels))
        txt = _features(model.get_text_features(**text))
        cos = (F_normalize(img) * F_normalize(txt)).sum(-1)
    return model.logit_scale.exp() * cos, cos


def F_normalize(x):
    return x / x.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("size", SIZES)
def test_pickscore_and_clipscore_match_reference(clip_dir, size):
    images = smooth_images(len(PROMPTS), *size)
    ref_pick, ref_cos = reference_clip(clip_dir, images, PROMPTS)
    pick = rewards.get("pickscore", model=str(clip_dir), processor=str(clip_dir))
    clip = rewards.get("clipscore", model=str(clip_dir), scale=1.0, clamp=False)
    tol = 1e-5 if size == (SIDE, SIDE) else COS_TOL
    scale = pick.clip.model.logit_scale.exp().item()
    with torch.no_grad():
        assert_close(pick(images, PROMPTS), ref_pick, tol * scale, f"pickscore {size}")
        assert_close(clip(images, PROMPTS), ref_cos, tol, f"clipscore {size}")
    assert ref_cos.std() > 0.05  # the images are told apart, so the comparison means something


def test_model_path_is_exact_and_pixels_within_8bit_rounding(clip_dir):
    """Split the end-to-end difference: the model path (exact) and preprocessing (8-bit)."""
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(clip_dir)
    reward = rewards.get("clipscore", model=str(clip_dir), scale=1.0, clamp=False)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    for size in [(512, 512), (48, 80), (24, 24)]:
        images = smooth_images(2, *size, seed=1)
        ref = processor(images=to_pil(images), return_tensors="pt")["pixel_values"]
        levels = ((reward.clip.transform(images) - ref) * std).abs() * 255
        assert levels.mean() < 0.4 and levels.max() < 5, (size, levels.mean(), levels.max())
    _, ref_cos = reference_clip(clip_dir, smooth_images(2, SIDE, SIDE), PROMPTS[:2])
    with torch.no_grad():
        assert_close(reward(smooth_images(2, SIDE, SIDE), PROMPTS[:2]), ref_cos, 1e-5, "model path")


def test_clip_rewards_contract(clip_dir):
    images = smooth_images(len(PROMPTS), 40, 40, seed=3)
    check_contract(rewards.get("pickscore", model=str(clip_dir), processor=str(clip_dir)), images, PROMPTS)
    check_contract(rewards.get("clipscore", model=str(clip_dir), clamp=False), images, PROMPTS)


def test_clipscore_clamps_at_zero_like_the_paper(clip_dir):
    images = smooth_images(len(PROMPTS), 32, 32, seed=5)
    raw = rewards.get("clipscore", model=str(clip_dir), scale=2.5, clamp=False)(images, PROMPTS)
    clamped = rewards.get("clipscore", model=str(clip_dir))(images, PROMPTS)
    torch.testing.assert_close(clamped, raw.clamp(min=0))


def test_gradient_checkpointing_gives_the_same_gradient(clip_dir):
    images = smooth_images(2, 40, 40, seed=7)
    grads = []
    for ckpt in (False, True):
        r = rewards.get("pickscore", model=str(clip_dir), processor=str(clip_dir), gradient_checkpointing=ckpt)
        x = images.clone().requires_grad_(True)
        r(x, PROMPTS[:2]).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def reference_aesthetic(clip_dir, head_path, images):
    """improved-aesthetic-predictor's simple_inference.py: clip preprocess, encode_image,
    L2-normalise, MLP."""
    from safetensors.torch import load_file
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(clip_dir).eval()
    state = load_file(str(head_path))
    mlp = torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.Dropout(0.2), torch.nn.Linear(64, 32), torch.nn.Dropout(0.2),
        torch.nn.Linear(32, 16), torch.nn.Dropout(0.1), torch.nn.Linear(16, 8), torch.nn.Linear(8, 1),
    ).eval()
    mlp.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
    with torch.no_grad():
        pixels = torchvision_style_pixels(images, SIDE, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        emb = F_normalize(_features(model.get_image_features(pixel_values=pixels)))
        return mlp(emb).squeeze(-1)


# The tiny head's scores spread by 0.7-4 across images (a real head's by ~1 on its 1-10
# scale); the 8-bit rounding residual is 1-3% of that, amplified by the head.
AESTHETIC_TOL = 0.075


@pytest.mark.parametrize("size", SIZES + [(80, 45)])
def test_aesthetic_matches_reference(clip_dir, aesthetic_head, size):
    images = smooth_images(len(PROMPTS), *size, seed=11)
    ref = reference_aesthetic(clip_dir, aesthetic_head, images)
    # The head file may be given directly or as the folder that holds it.
    for source in (aesthetic_head, aesthetic_head.parent):
        reward = rewards.get("aesthetic", model=str(source), clip=str(clip_dir))
        with torch.no_grad():
            assert_close(reward(images, PROMPTS), ref, AESTHETIC_TOL, f"aesthetic {size}")
    assert ref.std() > 0.1


def test_aesthetic_contract(clip_dir, aesthetic_head):
    reward = rewards.get("aesthetic", model=str(aesthetic_head), clip=str(clip_dir), gradient_checkpointing=True)
    check_contract(reward, smooth_images(3, 48, 48, seed=2), PROMPTS[:3])


def test_aesthetic_errors_name_the_file_and_key(clip_dir, aesthetic_head, tmp_path):
    with pytest.raises(UserError, match=r"reward_args\.aesthetic\.model is not set.*sac\+logos"):
        rewards.get("aesthetic", clip=str(clip_dir))
    pth = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    pth.write_bytes(b"not really a pickle")
    with pytest.raises(UserError, match=r"pickle.*python -m draft\.rewards\.convert"):
        rewards.get("aesthetic", model=str(pth), clip=str(clip_dir))
    with pytest.raises(UserError, match=r"found sac\+logos\+ava1-l14-linearMSE\.pth.*--trust-pickle"):
        rewards.get("aesthetic", model=str(tmp_path), clip=str(clip_dir))
    with pytest.raises(UserError, match=r"reward_args\.aesthetic\.clip=.*cannot load"):
        rewards.get("aesthetic", model=str(aesthetic_head), clip=str(tmp_path))
    with pytest.raises(UserError, match=r"reward_args\.aesthetic\.model=.*no such file"):
        rewards.get("aesthetic", model=str(pth.with_suffix(".safetensors")), clip=str(clip_dir))


def test_missing_hub_weights_are_a_user_error_offline():
    # HF_HUB_OFFLINE=1 (conftest): a hub id that is not cached must fail with the key named.
    with pytest.raises(UserError, match=r"reward_args\.pickscore\.model=nobody/no-such-model"):
        rewards.get("pickscore", model="nobody/no-such-model")
    with pytest.raises(UserError, match=r"reward_args\.hpsv2\.model=nobody/no-such-repo.*HPS_v2"):
        rewards.get("hpsv2", model="nobody/no-such-repo")


# The parity tests' images: the model's own size (nothing resized), a downscale, and a
# non-square image that is resized and cropped.
PARITY_BATCHES = {"native": (SIDE, SIDE), "down": (64, 64), "wide": (48, 80)}


@pytest.mark.parity
def test_pickscore_and_clipscore_match_transformers_and_torchmetrics(tmp_path):
    """PickScore against its README scorer (transformers' own CLIPProcessor and CLIPModel)
    and CLIPScore against torchmetrics' CLIPScore, in the reference environment, on a
    model saved there by transformers 4.36 and loaded here."""
    from reference_env import check_split, record, reference_pixels, run_reference, split_difference
    from reward_models import write_clip_tokenizer

    write_clip_tokenizer(tmp_path / "tokenizer")
    batches = {name: smooth_images(len(PROMPTS), *size, seed=12) for name, size in PARITY_BATCHES.items()}
    out = tmp_path / "ref"
    result = run_reference("clip_transformers.py", out, batches, PROMPTS, tmp_path / "tokenizer")
    model = str(out / "model")
    pick = rewards.get("pickscore", model=model, processor=model)
    clip = rewards.get("clipscore", model=model, scale=100.0)  # torchmetrics reports 100 * max(cos, 0)
    raw = rewards.get("clipscore", model=model, scale=100.0, clamp=False)
    scale = pick.clip.model.logit_scale.exp().item()  # 54.6
    for name, batch in batches.items():
        ref = {k: torch.tensor(v) for k, v in result[name].items()}
        pixels = reference_pixels(out, name)
        d = split_difference(pick, pick.clip, batch, PROMPTS, ref["pickscore"], pixels, OPENAI_CLIP_STD)
        record(f"pickscore {name}", d)
        check_split(name, d, 1e-5 * scale)
        assert d["e2e"] <= COS_TOL * scale, d
        d = split_difference(raw, raw.clip, batch, PROMPTS, ref["clipscore_raw"], pixels, OPENAI_CLIP_STD)
        record(f"clipscore {name}", d)
        check_split(name, d, 1e-5 * 100)
        assert d["e2e"] <= COS_TOL * 100, d
        with torch.no_grad():  # the metric's own clamped value
            assert_close(clip(batch, PROMPTS), ref["clipscore"], COS_TOL * 100, f"clipscore {name} (clamped)")
        assert ref["clipscore_raw"].std() > 5  # the images are told apart


@pytest.mark.parity
def test_aesthetic_matches_openai_clip_and_simple_inference(tmp_path):
    """The LAION aesthetic predictor against OpenAI's `clip` package and simple_inference.py,
    in the reference environment: pickled head -> convert_checkpoint -> our loader, CLIP
    converted to transformers by transformers' own conversion code."""
    from reference_env import check_split, record, reference_pixels, run_reference, split_difference

    from draft.rewards.loading import convert_checkpoint

    batches = {name: smooth_images(len(PROMPTS), *size, seed=13) for name, size in PARITY_BATCHES.items()}
    batches["tall"] = smooth_images(len(PROMPTS), 80, 45, seed=14)
    out = tmp_path / "ref"
    result = run_reference("aesthetic_openai_clip.py", out, batches, PROMPTS)
    head = convert_checkpoint(out / "sac+logos+ava1-l14-linearMSE.pth", trust_pickle=True)
    reward = rewards.get("aesthetic", model=str(head), clip=str(out / "clip"))
    for name, batch in batches.items():
        ref = torch.tensor(result[name])
        d = split_difference(reward, reward.clip, batch, PROMPTS, ref, reference_pixels(out, name), OPENAI_CLIP_STD)
        record(f"aesthetic {name}", d)
        check_split(name, d, 1e-5 * 10)  # scores of ~10-20
        assert d["e2e"] <= AESTHETIC_TOL, d
        assert ref.std() > 0.5
