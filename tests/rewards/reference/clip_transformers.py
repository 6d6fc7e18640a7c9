"""Reference CLIP scores for test_clip_rewards.py's parity test: PickScore's README scorer
(transformers' own CLIPProcessor and CLIPModel) and torchmetrics' CLIPScore.

Runs in the reference environment (setup_env.sh), i.e. with the transformers release of
PickScore's time (4.36) and its PIL-based processors:

    python clip_transformers.py OUT_DIR TOKENIZER_DIR

Builds a tiny CLIPModel there and saves it with its CLIPProcessor into OUT_DIR/model, as
PickScore's and OpenAI's checkpoints are published, then scores each (image, prompt)
pair. Writes the processor's pixels (pixels_NAME.npy) so the test can separate model and
preprocessing.
"""

from pathlib import Path

import numpy as np
import torch
from ref_io import inputs, save_pixels, write_result
from transformers import (
    AutoModel,
    AutoProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
)

SIDE = 32


def build(folder: Path, tokenizer_dir: str) -> None:
    tok = CLIPTokenizer(vocab_file=f"{tokenizer_dir}/vocab.json", merges_file=f"{tokenizer_dir}/merges.txt",
                        model_max_length=77)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    text = dict(common, vocab_size=len(tok), max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(projection_dim=16, text_config=text,
                                 vision_config=dict(common, image_size=SIDE, patch_size=8))).eval()
    with torch.no_grad():  # a visible logit scale, as trained models have
        model.logit_scale.fill_(4.0)
    model.save_pretrained(folder, safe_serialization=True)
    image_processor = CLIPImageProcessor(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE})
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(folder)


def pickscore(folder: Path, images, prompts) -> list[float]:
    # PickScore's README ("Inference with Hugging Face"), one prompt and its image at a time.
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    scores = []
    for image, prompt in zip(images, prompts):
        image_inputs = processor(images=[image], padding=True, truncation=True, max_length=77, return_tensors="pt")
        text_inputs = processor(text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
        with torch.no_grad():
            image_embs = model.get_image_features(**image_inputs)
            image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
            text_embs = model.get_text_features(**text_inputs)
            text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
            scores.append((model.logit_scale.exp() * (text_embs @ image_embs.T)[0]).item())
    return scores


def torchmetrics_clipscore(folder: Path, images, prompts) -> tuple[list[float], list[float]]:
    """CLIPScore's per-image value max(100 cos, 0) through the metric's public API, and the
    unclamped 100 cos from the update function the metric calls."""
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update
    from torchmetrics.multimodal.clip_score import CLIPScore

    def load():
        return CLIPModel.from_pretrained(folder), CLIPProcessor.from_pretrained(folder)

    metric = CLIPScore(model_name_or_path=load)
    tensors = [torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images]  # uint8 [3, H, W], as documented
    clamped = []
    for image, prompt in zip(tensors, prompts):
        metric.reset()
        metric.update(image, prompt)
        clamped.append(metric.compute().item())
    with torch.no_grad():
        raw, _ = _clip_score_update(tensors, prompts, metric.model, metric.processor)
    return clamped, raw.tolist()


def main():
    out, batches, prompts, (tokenizer_dir,) = inputs()
    folder = out / "model"
    build(folder, tokenizer_dir)
    result = {}
    for name, images in batches.items():
        texts = prompts[: len(images)]
        clamped, raw = torchmetrics_clipscore(folder, images, texts)
        result[name] = dict(pickscore=pickscore(folder, images, texts), clipscore=clamped, clipscore_raw=raw)
        pixels = AutoProcessor.from_pretrained(folder)(images=images, return_tensors="pt")["pixel_values"]
        save_pixels(out, name, pixels)
    write_result(out, result)


if __name__ == "__main__":
    main()
