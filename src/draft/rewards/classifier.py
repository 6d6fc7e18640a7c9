"""Log-probability of a target class under a Hugging Face image classifier.

Raising log p(target | image) steers generations towards a class. Lowering the log
probability of the class an image truly shows (weight -1 in the reward spec, e.g.
``reward=classifier:-1``) is the adversarial setting of the DRaFT paper (Clark et al.,
2024, Sec. 5.4): small changes that fool the classifier while the image stays the same
to a person.
"""

from __future__ import annotations

import torch

from draft.errors import UserError, did_you_mean
from draft.rewards import Reward
from draft.rewards.clip import freeze_model, model_dtype, processor_config
from draft.rewards.loading import from_pretrained
from draft.rewards.preprocess import ImageTransform


class Classifier(Reward):
    """log p(target | image) under any transformers `AutoModelForImageClassification` (<= 0).

    Args:
        model: folder or hub id of the classifier (safetensors, preprocessor_config.json).
        target: the class, as its label in the model's config (`id2label`) or its index.
        dtype: "float16"/"bfloat16" to run the classifier in half precision.

    Multi-label models (`problem_type="multi_label_classification"`) score
    log sigmoid(logit) of the target, since their classes are independent.
    """

    def __init__(self, model: str | None = None, target: str | int | None = None, dtype: str | None = None):
        super().__init__()
        from transformers import AutoModelForImageClassification

        key = "reward_args.classifier"
        net = from_pretrained(AutoModelForImageClassification, model, f"{key}.model")
        self.model = freeze_model(net, dtype)
        self.target = _class_index(net.config.id2label, target, f"{key}.target")
        config = processor_config(model, f"{key}.model")
        if config is None:
            raise UserError(f"{key}.model={model}: preprocessor_config.json is missing")
        try:
            self.transform = ImageTransform.from_hf(config)
        except ValueError as e:
            raise UserError(f"{key}.model={model}: {e}") from None
        self.multi_label = net.config.problem_type == "multi_label_classification"
        self.freeze()

    def score(self, images, prompts):
        logits = self.model(pixel_values=self.transform(images).to(model_dtype(self.model))).logits.float()
        if self.multi_label:
            return torch.nn.functional.logsigmoid(logits[:, self.target])
        return logits.log_softmax(-1)[:, self.target]


def _class_index(id2label: dict, target: str | int | None, key: str) -> int:
    """The index of `target`, given as a label or an index (as int or digit string)."""
    labels = {int(i): str(name) for i, name in id2label.items()}
    if target is None:
        raise UserError(f"{key} is not set; name a class, e.g. {labels[min(labels)]!r}")
    if isinstance(target, int) or str(target).isdigit():
        if int(target) in labels:
            return int(target)
        raise UserError(f"{key}={target}: the model has classes 0..{max(labels)}")
    by_name = {name.lower(): i for i, name in labels.items()}
    if str(target).lower() in by_name:
        return by_name[str(target).lower()]
    raise UserError(f"{key}={target!r} is not a class of this model{did_you_mean(str(target), labels.values())}")
