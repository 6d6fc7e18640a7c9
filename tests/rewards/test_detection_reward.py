"""detection: OWL-ViT and OWLv2 against their processors and models."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from reward_contract import assert_close, check_contract
from reward_models import PROMPTS, SIDE, smooth_images, to_pil, write_clip_tokenizer

import draft.rewards as rewards
from draft.errors import UserError

KINDS = ["owlvit", "owlv2"]


def _owl(kind: str, folder):
    from transformers import (
        Owlv2Config,
        Owlv2ForObjectDetection,
        OwlViTConfig,
        OwlViTForObjectDetection,
    )
    from transformers.models.owlv2.image_processing_pil_owlv2 import (
        Owlv2ImageProcessorPil,
    )
    from transformers.models.owlvit.image_processing_pil_owlvit import (
        OwlViTImageProcessorPil,
    )

    tok = write_clip_tokenizer(folder, max_length=16)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    text = dict(common, vocab_size=len(tok), max_position_embeddings=16,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(common, image_size=SIDE, patch_size=8)
    owlvit = kind == "owlvit"
    config_cls = OwlViTConfig if owlvit else Owlv2Config
    model_cls = OwlViTForObjectDetection if owlvit else Owlv2ForObjectDetection
    torch.manual_seed(0)
    model = model_cls(config_cls(text_config=text, vision_config=vision, projection_dim=32)).eval()
    with torch.no_grad():  # random heads give logits of +-80, where sigmoid is flat; a
        model.class_head.logit_scale.weight.zero_()  # trained one gives about -10..10
        model.class_head.logit_scale.bias.zero_()
    model.save_pretrained(folder)
    size = {"height": SIDE, "width": SIDE}
    if kind == "owlvit":
        OwlViTImageProcessorPil(size=size, crop_size=size).save_pretrained(folder)
    else:
        Owlv2ImageProcessorPil(size=size).save_pretrained(folder)
    return model


@pytest.fixture(scope="module", params=KINDS)
def owl(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, folder, _owl(request.param, folder)


def reference_detection(folder, model, images, queries):
    """The transformers OWL recipe: processor(text=[[queries]] per image, images=PIL)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    processor = AutoImageProcessor.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        pixels = processor(images=to_pil(images), return_tensors="pt")["pixel_values"]
        text = tok([q for qs in queries for q in qs], padding="max_length", max_length=16, return_tensors="pt")
        logits = model(pixel_values=pixels, input_ids=text.input_ids, attention_mask=text.attention_mask).logits
    return torch.sigmoid(logits).flatten(1).amax(1)


@pytest.mark.parametrize("size", [(SIDE, SIDE), (64, 64), (40, 72)])
def test_detection_matches_reference(owl, size):
    pytest.importorskip("scipy")  # OWLv2's reference processor resizes with scipy.ndimage
    kind, folder, model = owl
    images = smooth_images(len(PROMPTS), *size)
    fixed = ["a cat", "a dog"]
    with torch.no_grad():
        ours_prompt = rewards.get("detection", model=str(folder))(images, PROMPTS)
        ours_fixed = rewards.get("detection", model=str(folder), query=fixed)(images, PROMPTS)
        ours_remove = rewards.get("detection", model=str(folder), query="a cat", mode="remove")(images, PROMPTS)
    # OWLv2's reference resizes float images (exact match); OWL-ViT's resizes 8-bit ones.
    tol = 1e-5 if kind == "owlv2" or size == (SIDE, SIDE) else 2e-3
    assert_close(ours_prompt, reference_detection(folder, model, images, [[p] for p in PROMPTS]), tol, kind)
    assert_close(ours_fixed, reference_detection(folder, model, images, [fixed] * len(PROMPTS)), tol, kind)
    assert_close(-ours_remove, reference_detection(folder, model, images, [["a cat"]] * len(PROMPTS)), tol, kind)


def test_detection_contract(owl):
    kind, folder, _ = owl
    images = smooth_images(3, 48, 48, seed=2)
    check_contract(rewards.get("detection", model=str(folder), query="a cat"), images, PROMPTS[:3])
    removing = rewards.get("detection", model=str(folder), mode="remove", gradient_checkpointing=True)
    assert (check_contract(removing, images, PROMPTS[:3]) <= 0).all()


def test_detection_rejects_bad_arguments(owl, clip_dir):
    _, folder, _ = owl
    with pytest.raises(UserError, match="mode must be 'add' or 'remove'"):
        rewards.get("detection", model=str(folder), mode="delete")
    with pytest.raises(UserError, match="expected an OWL-ViT or OWLv2 checkpoint"):
        rewards.get("detection", model=str(clip_dir))


@pytest.mark.parity
@pytest.mark.parametrize("kind", KINDS)
def test_detection_matches_transformers_post_processing(kind, tmp_path):
    """Against transformers' own OWL recipe in the reference environment (transformers
    4.36): processor, model, post_process_object_detection, highest box score; on a
    detector saved there and loaded here."""
    from reference_env import check_split, record, reference_pixels, run_reference, split_difference

    write_clip_tokenizer(tmp_path / "tokenizer", max_length=16)
    batches = {"native": smooth_images(len(PROMPTS), SIDE, SIDE, seed=15),
               "down": smooth_images(len(PROMPTS), 64, 64, seed=16),
               "wide": smooth_images(len(PROMPTS), 40, 72, seed=17)}
    out = tmp_path / "ref"
    result = run_reference("owl_transformers.py", out, batches, PROMPTS, tmp_path / "tokenizer", kind)
    folder = str(out / "model")
    by_prompt = rewards.get("detection", model=folder)
    fixed = rewards.get("detection", model=folder, query=["a cat", "a dog"])
    removing = rewards.get("detection", model=folder, mode="remove")
    std = by_prompt.transform.std
    for name, batch in batches.items():
        ref = {k: torch.tensor(v) for k, v in result[name].items()}
        pixels = reference_pixels(out, name)
        if kind == "owlv2" and batch.shape[-1] != batch.shape[-2]:
            # transformers 4.36 pads OWLv2 inputs to a square with gray (0.5; "as per the
            # original OWLv2 implementation", its docstring says), transformers 5 with black
            # (0.0), which we follow (the fast test holds us to it). Record that difference,
            # then compare with 4.36's padding: the rest must be exact.
            d = split_difference(by_prompt, by_prompt, batch, PROMPTS, ref["prompt"], pixels, std)
            record(f"detection {kind} {name} (black padding, as transformers 5)", d)
            assert d["model"] <= 1e-5, d
            for reward in (by_prompt, fixed, removing):
                reward.transform = dataclasses.replace(reward.transform, fill=0.5)
        for query, reward in (("prompt", by_prompt), ("fixed", fixed)):
            d = split_difference(reward, reward, batch, PROMPTS, ref[query], pixels, std)
            record(f"detection {kind} {name} ({query} queries)", d)
            if kind == "owlv2":
                # OWLv2's processor resizes the float image (scikit-image style): exact.
                assert d["e2e"] <= 1e-5 and d["model"] <= 1e-5 and d["levels_max"] <= 1e-2, d
            else:
                # OWL-ViT's resizes the 8-bit image with PIL, as the CLIP processors do.
                check_split(name, d, 1e-5)
                assert d["e2e"] <= 2e-3, d
        with torch.no_grad():
            assert_close(-removing(batch, PROMPTS), ref["prompt"], 2e-3, f"detection {kind} remove")
        assert ref["prompt"].std() > 0.01
