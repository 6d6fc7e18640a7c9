"""Reference detection scores for test_detection_reward.py's parity test: OWL-ViT and OWLv2
through transformers' own processor, model and post-processing.

Runs in the reference environment (setup_env.sh; transformers 4.36 with its PIL/scipy
processors):

    python owl_transformers.py OUT_DIR TOKENIZER_DIR KIND        # KIND: owlvit or owlv2

Builds a tiny detector of that kind, saves it with its processor into OUT_DIR/model, and
scores each image as transformers' object-detection recipe does: processor(text=queries,
images=...), model(**inputs), processor.post_process_object_detection(threshold=0), and
takes the highest box score. Two query sets: each image's prompt (`prompt`) and the fixed
pair "a cat", "a dog" (`fixed`). Writes the processor's pixels (pixels_NAME.npy).
"""

import torch
from ref_io import inputs, save_pixels, write_result
from transformers import (
    CLIPTokenizer,
    Owlv2Config,
    Owlv2ForObjectDetection,
    Owlv2ImageProcessor,
    Owlv2Processor,
    OwlViTConfig,
    OwlViTForObjectDetection,
    OwlViTImageProcessor,
    OwlViTProcessor,
)

SIDE = 32
FIXED = ["a cat", "a dog"]


def build(folder, tokenizer_dir, kind):
    tok = CLIPTokenizer(vocab_file=f"{tokenizer_dir}/vocab.json", merges_file=f"{tokenizer_dir}/merges.txt",
                        model_max_length=16)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    text = dict(common, vocab_size=len(tok), max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(common, image_size=SIDE, patch_size=8)
    size = {"height": SIDE, "width": SIDE}
    if kind == "owlvit":
        config, model_cls = OwlViTConfig, OwlViTForObjectDetection
        processor = OwlViTProcessor(image_processor=OwlViTImageProcessor(size=size, crop_size=size), tokenizer=tok)
    else:
        config, model_cls = Owlv2Config, Owlv2ForObjectDetection
        processor = Owlv2Processor(image_processor=Owlv2ImageProcessor(size=size), tokenizer=tok)
    torch.manual_seed(0)
    model = model_cls(config(text_config=text, vision_config=vision, projection_dim=32)).eval()
    with torch.no_grad():  # random heads give logits of +-80, where sigmoid is flat; a
        model.class_head.logit_scale.weight.zero_()  # trained one gives about -10..10
        model.class_head.logit_scale.bias.zero_()
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return model, processor


def best_scores(model, processor, images, queries):
    inputs = processor(text=queries, images=images, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    sizes = torch.tensor([im.size[::-1] for im in images])
    results = processor.post_process_object_detection(outputs=outputs, threshold=0.0, target_sizes=sizes)
    return [r["scores"].max().item() for r in results]


def main():
    out, batches, prompts, (tokenizer_dir, kind) = inputs()
    model, processor = build(out / "model", tokenizer_dir, kind)
    result = {}
    for name, images in batches.items():
        result[name] = dict(prompt=best_scores(model, processor, images, [[p] for p in prompts[: len(images)]]),
                            fixed=best_scores(model, processor, images, [FIXED] * len(images)))
        save_pixels(out, name, processor(images=images, return_tensors="pt")["pixel_values"])
    write_result(out, result)


if __name__ == "__main__":
    main()
