"""Reference HPSv2 scores from open_clip itself, for test_hps_reward.py's parity test.

Runs in the reference environment (setup_env.sh):

    python hps_openclip.py OUT_DIR

Builds a tiny open_clip CLIP (same classes as ViT-H-14, toy sizes, GELU), saves it as
HPSv2 publishes its checkpoints (a pickled {"state_dict": ...}), writes open_clip's BPE
vocabulary as a transformers CLIPTokenizer, and scores the images with HPSv2's scoring
pipeline (tgxs002/HPSv2, hpsv2/img_score.py with light_augmentation=True: ToTensor,
ResizeMaxSize, Normalize; then diag(image_features @ text_features.T)).
"""

import json

import open_clip
import torch
import torchvision.transforms.functional as TF
from open_clip.tokenizer import SimpleTokenizer
from ref_io import inputs, save_pixels, write_result

SIDE = 32
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def resize_max_size(x, size, fill=0):
    # HPSv2's ResizeMaxSize (hpsv2/src/open_clip/transform.py), on a float CHW tensor.
    h, w = x.shape[-2:]
    scale = size / float(max(h, w))
    if scale != 1.0:
        new_size = tuple(round(dim * scale) for dim in (h, w))
        x = TF.resize(x, new_size, TF.InterpolationMode.BICUBIC)
        pad_h, pad_w = size - new_size[0], size - new_size[1]
        x = TF.pad(x, padding=[pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=fill)
    return x


def main():
    out, batches, prompts, _ = inputs()
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=16,
        vision_cfg=dict(image_size=SIDE, patch_size=8, width=32, layers=2, head_width=8, mlp_ratio=2.0),
        text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=4, layers=2, mlp_ratio=2.0),
    ).eval()
    torch.save({"epoch": 1, "state_dict": model.state_dict()}, out / "HPS_v2_compressed.pt")

    tok = SimpleTokenizer()
    (out / "tokenizer").mkdir(exist_ok=True)
    # open_clip names its special tokens <start_of_text>/<end_of_text>; the HF tokenizer
    # published for ViT-H-14 names the same ids <|startoftext|>/<|endoftext|>.
    names = {tok.sot_token_id: "<|startoftext|>", tok.eot_token_id: "<|endoftext|>"}
    vocab = {names.get(i, word): i for word, i in tok.encoder.items()}
    (out / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.get)
    (out / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")

    result = {}
    for name, images in batches.items():
        x = torch.stack([TF.normalize(resize_max_size(TF.to_tensor(im), SIDE), MEAN, STD) for im in images])
        with torch.no_grad():
            img = model.encode_image(x, normalize=True)
            txt = model.encode_text(tok(prompts[: len(images)]), normalize=True)
            result[name] = torch.diagonal(img @ txt.T).tolist()
        save_pixels(out, name, x)
    write_result(out, result)


if __name__ == "__main__":
    main()
