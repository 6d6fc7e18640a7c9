"""Text-queried object detection score with OWL-ViT (Minderer et al., ECCV 2022, "Simple
Open-Vocabulary Object Detection with Vision Transformers") or OWLv2 (Minderer et al.,
NeurIPS 2023, "Scaling Open-Vocabulary Object Detection").

The score of an image is the highest detection confidence, sigmoid(logit), over all
predicted boxes and text queries, in [0, 1]: the probability the detector gives that
the queried object is somewhere in the image. Maximising it adds the object; with
``mode=remove`` the reward is its negative, which removes the object, as in the DRaFT
paper's object addition/removal experiments (Clark et al., 2024, Sec. 5.3).
"""

from __future__ import annotations

import torch

from draft.errors import UserError
from draft.rewards import Reward
from draft.rewards.clip import freeze_model, load_tokenizer, model_dtype, processor_config, tokenize
from draft.rewards.loading import checkpoint_layers, from_pretrained
from draft.rewards.preprocess import ImageTransform

DETECTION_DEFAULT = "google/owlv2-base-patch16-ensemble"


class Detection(Reward):
    """Max detection confidence of a text query, in [0, 1] (negated for mode="remove").

    Args:
        model: folder or hub id of an OWL-ViT or OWLv2 detection checkpoint (with its
            tokenizer and preprocessor_config.json).
        query: the object(s) to look for, e.g. "a dog" or ["a dog", "a cat"]; default
            None uses each image's prompt as its query.
        mode: "add" to reward the object's presence, "remove" to penalise it.
        gradient_checkpointing: recompute activations in backward to save memory.
        dtype: "float16"/"bfloat16" to run the detector in half precision.
    """

    def __init__(self, model: str = DETECTION_DEFAULT, query: str | list[str] | None = None, mode: str = "add",
                 gradient_checkpointing: bool = False, dtype: str | None = None):
        super().__init__()
        from transformers import AutoConfig, Owlv2ForObjectDetection, OwlViTForObjectDetection

        key = "reward_args.detection.model"
        if mode not in ("add", "remove"):
            raise UserError(f"reward_args.detection.mode must be 'add' or 'remove', got {mode!r}")
        kind = from_pretrained(AutoConfig, model, key, what="config.json").model_type
        classes = {"owlv2": Owlv2ForObjectDetection, "owlvit": OwlViTForObjectDetection}
        if kind not in classes:
            raise UserError(f"{key}={model} is a {kind!r} model; expected an OWL-ViT or OWLv2 checkpoint")
        self.model = freeze_model(from_pretrained(classes[kind], model, key), dtype)
        self.tokenizer = load_tokenizer(model, key)
        config = processor_config(model, key)
        if config is None:
            raise UserError(f"{key}={model}: preprocessor_config.json is missing")
        self.transform = ImageTransform.from_hf(config)
        self.queries = [query] if isinstance(query, str) else (list(query) if query is not None else None)
        self.sign = 1.0 if mode == "add" else -1.0
        if gradient_checkpointing:
            checkpoint_layers(getattr(self.model, kind).vision_model.encoder.layers)
        self.freeze()

    def score(self, images, prompts):
        queries = self.queries or [None]
        # OWL models take queries as a flat [batch * queries_per_image] list, image-major.
        texts = [q if q is not None else p for p in prompts for q in queries]
        # The OWL processors pad every query to the text model's full length.
        length = self.model.config.text_config.max_position_embeddings
        batch = tokenize(self.tokenizer, texts, images.device, length, padding="max_length")
        pixels = self.transform(images).to(model_dtype(self.model))
        logits = self.model(pixel_values=pixels, **batch).logits  # [B, boxes, queries]
        return self.sign * torch.sigmoid(logits.float()).flatten(1).amax(1)
