"""The shapes-world attribute classifier: one small CNN, one head per attribute.

It judges images of the shapes world: which shape, which colour, which background, which
size. The `shapes-alignment` reward and `draft eval` use it to score model samples, so it
is trained on clean renders under mild corruption (noise, blur, colour shifts), the kind
of imperfection generated images have. Weights are shipped as safetensors with a JSON
config; nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from draft.models import shapes

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class ShapesClassifier(nn.Module):
    """A 5-layer CNN on 32x32 images with a linear head per attribute.

    Inputs of any size are resized on the tensor (anti-aliased bilinear), so the
    classifier, and every reward built on it, accepts any resolution. Forward returns
    a dict of logits, one `[B, n_classes]` tensor per attribute in `shapes.ATTRIBUTES`.
    """

    def __init__(self, width: int = 32, image_size: int = 32, classes: dict[str, list[str]] | None = None):
        super().__init__()
        self.width, self.image_size = width, image_size
        self.classes = {k: list(v) for k, v in (classes or shapes.ATTRIBUTES).items()}
        w = width

        def block(c_in, c_out, stride=1):
            return [nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out), nn.SiLU()]

        self.features = nn.Sequential(
            *block(3, w), *block(w, 2 * w, 2), *block(2 * w, 2 * w), *block(2 * w, 4 * w, 2), *block(4 * w, 4 * w)
        )
        # Mean and max pooling: the mean sees areas (size, background), the max sees a
        # small shape that the mean would dilute.
        self.heads = nn.ModuleDict({k: nn.Linear(8 * w, len(v)) for k, v in self.classes.items()})

    def config(self) -> dict:
        return {"width": self.width, "image_size": self.image_size, "classes": self.classes}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(
                images, size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False
            )
        h = self.features(images * 2 - 1)
        pooled = torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)
        return {k: head(pooled) for k, head in self.heads.items()}

    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(self.config(), indent=2) + "\n")
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, directory / WEIGHTS_NAME)
        return directory


def load_classifier(directory: str | Path | None = None, device: str | torch.device = "cpu") -> ShapesClassifier:
    """The classifier saved in `directory` (default: the one shipped with the package), in eval mode."""
    from draft.safeio import load_safetensors

    directory = Path(directory) if directory is not None else shapes.CLASSIFIER_DIR
    if not (directory / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"no shapes classifier at {directory} (expected {WEIGHTS_NAME} and {CONFIG_NAME})")
    model = ShapesClassifier(**json.loads((directory / CONFIG_NAME).read_text()))
    model.load_state_dict(load_safetensors(directory / WEIGHTS_NAME, "shapes classifier"))
    return model.to(device).eval()


def targets(attrs: list[shapes.Attributes], device=None) -> dict[str, torch.Tensor]:
    """Class indices per attribute for a list of `Attributes`, as LongTensors [B]."""
    idx = [a.index() for a in attrs]
    return {k: torch.tensor([i[k] for i in idx], device=device) for k in shapes.ATTRIBUTES}


def blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur with standard deviation `sigma` [B] (pixels), 5x5 kernel."""
    x = torch.arange(-2, 3, dtype=images.dtype)
    k = torch.exp(-(x[None] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    k = k / k.sum(1, keepdim=True)  # [B, 5]
    b, c, h, w = images.shape
    flat = images.reshape(1, b * c, h, w)
    kx = k.repeat_interleave(c, 0)[:, None, None, :]
    flat = F.conv2d(F.pad(flat, (2, 2, 0, 0), mode="replicate"), kx, groups=b * c)
    flat = F.conv2d(F.pad(flat, (0, 0, 2, 2), mode="replicate"), kx.transpose(2, 3), groups=b * c)
    return flat.reshape(b, c, h, w)


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mild corruptions of clean renders: colour gain/offset, blur, pixel noise.

    Strengths are drawn per image; about a quarter of the images stay clean.
    """
    b = images.shape[0]

    def u(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(b, *shape, generator=gen)

    x = images * u(0.9, 1.1, 3, 1, 1) + u(-0.05, 0.05, 3, 1, 1)
    x = torch.where(u(0, 1, 1, 1, 1) < 0.5, blur(x, u(0.3, 1.0)), x)
    x = x + u(0, 0.06, 1, 1, 1) * torch.randn(x.shape, generator=gen)
    clean = u(0, 1, 1, 1, 1) < 0.25
    return torch.where(clean, images, x).clamp(0, 1)


def loss_and_accuracy(model: ShapesClassifier, images, attrs) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed cross-entropy over the attributes, and the accuracy of each."""
    logits = model(images)
    y = targets(attrs, images.device)
    loss = sum(F.cross_entropy(logits[k], y[k]) for k in logits)
    acc = {k: (logits[k].argmax(1) == y[k]).float().mean().item() for k in logits}
    return loss, acc


def train_classifier(
    steps: int = 1500, batch_size: int = 128, lr: float = 2e-3, seed: int = 0, pool: int = 30_000,
    device: str = "cpu", progress: bool = True,
) -> ShapesClassifier:
    """Train the attribute classifier on corrupted renders of every combination (both splits).

    Renders come from a fixed pool drawn from `seed` (cheaper than fresh ones every
    step); the corruptions are drawn fresh each step. One-cycle cosine learning rate.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data = shapes.draw_examples(pool, seed=seed, split="all")
    images = torch.from_numpy(data.images)
    model = ShapesClassifier().to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    bar = tqdm(range(steps), desc="classifier", disable=not progress)
    for _ in bar:
        idx = torch.randint(pool, (batch_size,), generator=gen)
        x = augment(images[idx], gen).to(device)
        loss, acc = loss_and_accuracy(model, x, [data.attributes[i] for i in idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{min(acc.values()):.3f}")
    return model.eval()
