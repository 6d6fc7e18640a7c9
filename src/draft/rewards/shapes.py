"""Rewards and evaluation helpers for the shapes world (the `shapes-sd` model).

`shapes-alignment` is this world's analogue of a learned text-image preference score
(HPSv2, PickScore): the attribute classifier shipped with `shapes-sd` reads each image,
and the reward is the log-probability it gives to the prompt's attributes. The helpers
below turn the same classifier into per-attribute accuracies for `draft eval`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from draft.errors import UserError
from draft.models import shapes
from draft.rewards import Reward

ATTRIBUTES = tuple(shapes.ATTRIBUTES)  # ("shape", "colour", "background", "size")


def _targets(prompts: list[str], device) -> dict[str, torch.Tensor]:
    """Class index of each attribute of each prompt, as LongTensors [B]."""
    from draft.models.shapes_classifier import targets

    try:
        attrs = [shapes.parse_prompt(p) for p in prompts]
    except ValueError as e:
        raise UserError(f"the shapes rewards score shapes-world prompts only: {e}") from None
    return targets(attrs, device)


class ShapesAlignment(Reward):
    """Sum over attributes of log p(the prompt's value of the attribute | image).

    The classifier (`draft.models.shapes_classifier`) reads shape, colour, background
    and size. The reward is at most 0 (every attribute certain and right) and falls by
    about log(n_classes) per attribute the image gets wrong. Images of any resolution are
    resized on the tensor. `attributes` restricts the sum to some of the four;
    `classifier` is a folder with another trained classifier (default: the shipped one).
    """

    def __init__(self, attributes: list[str] | tuple[str, ...] = ATTRIBUTES, classifier: str | None = None):
        super().__init__()
        from draft.models.shapes_classifier import load_classifier

        bad = [a for a in attributes if a not in ATTRIBUTES]
        if bad or not attributes:
            raise UserError(f"unknown attribute(s) {bad}; choose from {', '.join(ATTRIBUTES)}")
        self.attributes = tuple(attributes)
        self.classifier = load_classifier(classifier)
        self.freeze()

    def score(self, images, prompts):
        logits = self.classifier(images)
        y = _targets(prompts, images.device)
        logp = [logits[k].log_softmax(1).gather(1, y[k][:, None])[:, 0] for k in self.attributes]
        return torch.stack(logp).sum(0)

    def extra_repr(self) -> str:
        return f"attributes={self.attributes}"


@functools.lru_cache(maxsize=4)
def _classifier(path: str | None, device: str):
    from draft.models.shapes_classifier import load_classifier

    return load_classifier(path, device).requires_grad_(False)


def logits_of(images: torch.Tensor, classifier: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The classifier's logits for each image, `[B, n_classes]` per attribute, with no gradient
    (for metrics; the reward keeps its own classifier in the graph)."""
    model = _classifier(str(classifier) if classifier else None, str(images.device))
    with torch.no_grad():
        return model(images.float())


def predict(images: torch.Tensor, classifier: str | Path | None = None) -> dict[str, list[str]]:
    """The classifier's reading of each image: class names per attribute, lists of length B."""
    logits = logits_of(images, classifier)
    return {k: [shapes.ATTRIBUTES[k][i] for i in v.argmax(1).tolist()] for k, v in logits.items()}


def attribute_correct(
    images: torch.Tensor, prompts: list[str], classifier: str | Path | None = None
) -> dict[str, torch.Tensor]:
    """Per image, whether the classifier finds each prompt attribute, plus 'joint' (all four).

    Returns bool tensors [B] keyed 'shape', 'colour', 'background', 'size', 'joint' (on
    the CPU), so an evaluator can concatenate them over batches and average at the end.
    """
    logits = logits_of(images, classifier)
    y = _targets(list(prompts), images.device)
    hits = {k: (logits[k].argmax(1) == y[k]).cpu() for k in ATTRIBUTES}
    hits["joint"] = torch.stack([hits[k] for k in ATTRIBUTES]).all(0)
    return hits


def attribute_accuracy(
    images: torch.Tensor, prompts: list[str], classifier: str | Path | None = None
) -> dict[str, float]:
    """Fraction of images in which each attribute (and all four jointly) is recognised."""
    return {k: v.float().mean().item() for k, v in attribute_correct(images, prompts, classifier).items()}


def attribute_metrics(
    images: torch.Tensor, prompts: list[str], classifier: str | Path | None = None
) -> dict[str, float]:
    """`attribute_accuracy` with keys 'accuracy_shape', ..., 'accuracy_joint', for a metrics table."""
    return {f"accuracy_{k}": v for k, v in attribute_accuracy(images, prompts, classifier).items()}
