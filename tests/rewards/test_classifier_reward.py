"""classifier: any transformers image classifier, against its processor and model."""

from __future__ import annotations

import pytest
import torch
from reward_contract import assert_close, check_contract
from reward_models import PROMPTS, SIDE, smooth_images, to_pil

import draft.rewards as rewards
from draft.errors import UserError

LABELS = {0: "cat", 1: "dog", 2: "sunset"}


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    from transformers import ViTConfig, ViTForImageClassification
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    folder = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       image_size=SIDE, patch_size=8, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    ViTForImageClassification(config).save_pretrained(folder)
    # ViT's processor squashes to a fixed size with bilinear resampling and mean = std = 0.5.
    ViTImageProcessorPil(size={"height": SIDE, "width": SIDE}).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("size", [(SIDE, SIDE), (64, 64), (40, 72)])
def test_classifier_matches_reference(vit_dir, size):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    images = smooth_images(len(PROMPTS), *size)
    model = AutoModelForImageClassification.from_pretrained(vit_dir).eval()
    with torch.no_grad():
        pixels = AutoImageProcessor.from_pretrained(vit_dir)(images=to_pil(images), return_tensors="pt")["pixel_values"]
        ref = model(pixel_values=pixels).logits.log_softmax(-1)[:, 1]
        for target in ("dog", 1, "1", "Dog"):
            ours = rewards.get("classifier", model=str(vit_dir), target=target)(images, PROMPTS)
            assert_close(ours, ref, 1e-5 if size == (SIDE, SIDE) else 2e-3, f"classifier {size}")


def test_classifier_contract_and_adversarial_weight(vit_dir):
    images = smooth_images(3, 48, 48, seed=3)
    reward = rewards.get("classifier", model=str(vit_dir), target="cat")
    logp = check_contract(reward, images, PROMPTS[:3])
    assert (logp <= 0).all()
    # The paper's adversarial setting: push away from the true class with weight -1.
    away = rewards.from_config("classifier:-1", {"classifier": {"model": str(vit_dir), "target": "cat"}})
    torch.testing.assert_close(away(images, PROMPTS[:3]), -logp)


def test_classifier_errors(vit_dir, tmp_path):
    with pytest.raises(UserError, match=r"reward_args\.classifier\.target='dgo'.*did you mean 'dog'"):
        rewards.get("classifier", model=str(vit_dir), target="dgo")
    with pytest.raises(UserError, match=r"reward_args\.classifier\.target is not set"):
        rewards.get("classifier", model=str(vit_dir))
    with pytest.raises(UserError, match=r"classes 0\.\.2"):
        rewards.get("classifier", model=str(vit_dir), target=7)
    with pytest.raises(UserError, match=r"reward_args\.classifier\.model is not set"):
        rewards.get("classifier", target="cat")
    # Processor options we do not reproduce are refused rather than approximated.
    import json
    import shutil

    shutil.copytree(vit_dir, tmp_path / "convnext")
    cfg_path = tmp_path / "convnext" / "preprocessor_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(crop_pct=0.875)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="crop_pct"):
        rewards.get("classifier", model=str(tmp_path / "convnext"), target="cat")
