"""`draft export`: kohya files that diffusers' own kohya reader loads whole, diffusers files for
transformer LoRAs, and merged pipelines; each checked against the LoRA as trained."""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

from draft.cli import main
from draft.config import LoraConfig
from draft.export import diffusers_state_dict, export, read_lora
from draft.models.kohya import kohya_state_dict
from draft.lora import add_lora, save_lora

RANK, ALPHA = 4, 6.0  # alpha != rank: the trained update is 1.5 * B @ A
# Every layer type a UNet LoRA adapts: attention projections, feed-forward, the transformer's
# in/out projections, the resnets' convolutions (3x3 conv LoRA), their time projection and
# shortcut, and the top-level and sampling convolutions.
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2",
           "conv_shortcut", "time_emb_proj", "conv_in", "conv_out", "downsamplers.0.conv", "upsamplers.0.conv",
           "time_embedding.linear_1")


def randomise_lora(params, seed=0):
    """Move every LoRA matrix off its initialisation, as training does (B starts at 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def run_dir(tiny_sd, tmp_path_factory):
    """A run folder (config.yaml naming the model, lora/) holding a LoRA on every layer type, alpha != rank."""
    from draft.models import load_model

    run = tmp_path_factory.mktemp("export") / "my-run"
    model = load_model(str(tiny_sd))
    randomise_lora(add_lora(model, LoraConfig(rank=RANK, alpha=ALPHA, target_modules=TARGETS)))
    save_lora(model, run / "lora")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": str(tiny_sd)}))
    return run


def add_unet_lora(unet, **config) -> None:
    """A LoRA on a bare UNet through peft (as draft's add_lora does for a pipeline's), moved off its init."""
    from peft import LoraConfig as PeftConfig

    unet.add_adapter(PeftConfig(init_lora_weights="gaussian", **config))
    randomise_lora([p for n, p in unet.named_parameters() if "lora" in n])


def save_unet_lora(unet, folder):
    """The bare UNet's adapter as draft saves one (diffusers' save_lora_weights, peft keys, config as metadata)."""
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet),
                                              unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    return folder / "pytorch_lora_weights.safetensors"


@contextlib.contextmanager
def diffusers_warnings():
    """Collect what diffusers logs at WARNING and above (its loggers do not propagate to pytest's)."""
    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def pipeline(tiny_sd):
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe) -> torch.Tensor:
    """Decoded images for fixed initial latents."""
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    return pipe(["a small red circle", "a large green square"], num_inference_steps=2, guidance_scale=3.0,
                latents=latents, output_type="pt").images


@pytest.fixture(scope="module")
def reference(run_dir, tiny_sd):
    """The run's own (diffusers-format) LoRA loaded in plain diffusers as adapter "a", and its images at scales 1 and 0.5."""
    pipe = pipeline(tiny_sd)
    pipe.load_lora_weights(str(run_dir / "lora"), adapter_name="a")
    full = images(pipe)
    pipe.set_adapters(["a"], [0.5])
    half = images(pipe)
    pipe.set_adapters(["a"], [1.0])
    return pipe, {1.0: full, 0.5: half}


def loaded_layers(module: torch.nn.Module, adapter: str) -> dict[str, LoraLayer]:
    return {n: m for n, m in module.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}


def update(layer: LoraLayer, adapter: str) -> torch.Tensor:
    """What the adapter adds to the layer's weight: peft's scaling times B @ A."""
    return layer.scaling[adapter] * layer.lora_B[adapter].weight.flatten(1) @ layer.lora_A[adapter].weight.flatten(1)


def assert_same_adapter(trained: torch.nn.Module, loaded: torch.nn.Module, adapter: str, scale: float = 1.0,
                        trained_adapter: str = "default") -> None:
    """The loaded adapter has every trained layer, with the same update (times `scale`)."""
    a, b = loaded_layers(trained, trained_adapter), loaded_layers(loaded, adapter)
    assert a and set(a) == set(b)
    for name, layer in a.items():
        want = scale * update(layer, trained_adapter)
        other = b[name]
        torch.testing.assert_close(update(other, adapter), want, rtol=1e-6, atol=1e-7, msg=name)


def test_kohya_file_loads_whole_in_diffusers_and_gives_the_same_images(run_dir, tiny_sd, reference):
    assert main(["export", str(run_dir), "--format", "kohya"]) == 0
    out = run_dir / "lora" / "my-run-kohya.safetensors"
    with safe_open(str(out), framework="pt") as f:  # kohya's ss_* fields, as the UIs list LoRAs by them
        assert {k: f.metadata()[k] for k in ("ss_network_dim", "ss_network_alpha", "ss_output_name")} == {
            "ss_network_dim": "4", "ss_network_alpha": "6", "ss_output_name": "my-run-kohya"}
    lora = read_lora(run_dir)

    reference, want = reference[0], reference[1][1.0]
    kohya = pipeline(tiny_sd)
    with diffusers_warnings() as warned:
        kohya.load_lora_weights(str(out.parent), weight_name=out.name, adapter_name="k")  # diffusers' kohya reader
    assert warned == []
    assert len(loaded_layers(kohya.unet, "k")) == len(lora.down) == 82  # every layer of the file became a LoRA layer
    assert_same_adapter(reference.unet, kohya.unet, "k", trained_adapter="a")  # ... with the trained update, alpha != rank included

    assert (images(kohya) - want).abs().max() <= 1e-5
    assert (images(pipeline(tiny_sd)) - want).abs().max() > 1e-2  # the LoRA does change the images


def test_kohya_names_on_the_sd_layout(run_dir):
    lora = read_lora(run_dir)
    config = UNet2DConditionModel.load_config(str(read_lora(run_dir).base_model), subfolder="unet")
    state = kohya_state_dict(lora, config)
    attn = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0"
    for name, down, up in [
        (f"{attn}_attn1_to_q", (RANK, 32), (32, RANK)),
        (f"{attn}_attn2_to_k", (RANK, 32), (32, RANK)),
        (f"{attn}_attn2_to_out_0", (RANK, 32), (32, RANK)),
        (f"{attn}_ff_net_0_proj", (RANK, 32), (256, RANK)),
        (f"{attn}_ff_net_2", (RANK, 128), (32, RANK)),
        ("lora_unet_down_blocks_0_attentions_0_proj_in", (RANK, 32, 1, 1), (32, RANK, 1, 1)),
        ("lora_unet_up_blocks_1_attentions_1_proj_out", (RANK, 32, 1, 1), (32, RANK, 1, 1)),
        ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_v", (RANK, 64), (64, RANK)),
        ("lora_unet_down_blocks_0_resnets_0_conv1", (RANK, 32, 3, 3), (32, RANK, 1, 1)),
        ("lora_unet_up_blocks_0_resnets_1_conv2", (RANK, 64, 3, 3), (64, RANK, 1, 1)),
        ("lora_unet_down_blocks_1_resnets_0_conv_shortcut", (RANK, 32, 1, 1), (64, RANK, 1, 1)),
        ("lora_unet_mid_block_resnets_1_time_emb_proj", (RANK, 128), (64, RANK)),
        ("lora_unet_down_blocks_0_downsamplers_0_conv", (RANK, 32, 3, 3), (32, RANK, 1, 1)),
        ("lora_unet_up_blocks_0_upsamplers_0_conv", (RANK, 64, 3, 3), (64, RANK, 1, 1)),
        ("lora_unet_conv_in", (RANK, 4, 3, 3), (32, RANK, 1, 1)),
        ("lora_unet_conv_out", (RANK, 32, 3, 3), (4, RANK, 1, 1)),
        ("lora_unet_time_embedding_linear_1", (RANK, 32), (128, RANK)),
    ]:
        assert tuple(state[f"{name}.lora_down.weight"].shape) == down, name
        assert tuple(state[f"{name}.lora_up.weight"].shape) == up, name
        assert state[f"{name}.alpha"].item() == ALPHA, name  # readers apply alpha / rank = the trained 1.5
    assert len(state) == 3 * len(lora.down)
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in state)


SDXL_UNET = dict(  # SDXL's block types, linear projections, several transformer layers, text_time conditioning
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2), cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8,
    norm_num_groups=8,
)


def sdxl_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**SDXL_UNET).eval()


def sdxl_output(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x, enc = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    added = {"text_embeds": torch.randn(2, 16, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    with torch.no_grad():
        return unet(x, torch.tensor([10, 700]), enc, added_cond_kwargs=added).sample


def test_kohya_names_on_the_sdxl_layout_load_through_diffusers_sgm_reader(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    unet = sdxl_unet()
    add_unet_lora(unet, r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS) + ["add_embedding.linear_2"])
    lora = read_lora(save_unet_lora(unet, tmp_path / "lora"))
    state = kohya_state_dict(lora, dict(unet.config))
    names = {k.rsplit(".", 2)[0] if k.endswith("weight") else k.rsplit(".", 1)[0] for k in state}
    # kohya's SDXL names: the SGM UNet's input_blocks / middle_block / output_blocks paths.
    for name in [
        "lora_unet_input_blocks_0_0",  # conv_in
        "lora_unet_time_embed_0", "lora_unet_label_emb_0_2",
        "lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_2_0_out_layers_3",
        "lora_unet_input_blocks_1_0_emb_layers_1", "lora_unet_input_blocks_4_0_skip_connection",
        "lora_unet_input_blocks_3_0_op",  # the downsampler
        "lora_unet_input_blocks_4_1_proj_in", "lora_unet_input_blocks_5_1_proj_out",
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q",
        "lora_unet_input_blocks_5_1_transformer_blocks_0_attn2_to_out_0",
        "lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_0_proj",
        "lora_unet_middle_block_0_in_layers_2", "lora_unet_middle_block_1_transformer_blocks_1_ff_net_2",
        "lora_unet_middle_block_2_out_layers_3",
        "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_k", "lora_unet_output_blocks_2_1_proj_out",
        "lora_unet_output_blocks_2_2_conv",  # the upsampler, after the level's attention
        "lora_unet_output_blocks_5_0_skip_connection", "lora_unet_output_blocks_3_0_in_layers_2",
        "lora_unet_out_2",  # conv_out
    ]:
        assert name in names, name
    assert not any("down_blocks" in n or "up_blocks" in n or "mid_block_" in n for n in names)

    # diffusers' SDXL loader: remap SGM blocks with the UNet config, convert kohya keys, load.
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "xl-kohya.safetensors"))
    loaded = sdxl_unet()
    sd, alphas = StableDiffusionXLPipeline.lora_state_dict(str(tmp_path / "xl-kohya.safetensors"), unet_config=loaded.config)
    with diffusers_warnings() as warned:
        StableDiffusionXLPipeline.load_lora_into_unet(sd, alphas, loaded, adapter_name="k")
    assert warned == []
    assert len(loaded_layers(loaded, "k")) == len(lora.down) == 181
    assert_same_adapter(unet, loaded, "k")
    assert (sdxl_output(loaded) - sdxl_output(unet)).abs().max() <= 1e-5


def test_scale_and_alpha_patterns_round_trip(run_dir, tiny_sd, reference, tmp_path):
    """--scale S gives S times the update; rank/alpha patterns and rsLoRA keep each layer's own factor."""
    out = export(run_dir, "kohya", out=tmp_path / "half.safetensors", scale=0.5)
    half = pipeline(tiny_sd)
    half.load_lora_weights(str(tmp_path), weight_name=out.name, adapter_name="k")
    assert_same_adapter(reference[0].unet, half.unet, "k", scale=0.5, trained_adapter="a")
    assert (images(half) - reference[1][0.5]).abs().max() <= 1e-5

    from diffusers import UNet2DConditionModel as U

    unet = U.from_pretrained(str(tiny_sd), subfolder="unet")
    add_unet_lora(unet, r=4, lora_alpha=3, use_rslora=True, target_modules=["to_q", "conv1", "ff.net.2"],
                  rank_pattern={"conv1": 2}, alpha_pattern={"ff.net.2": 5})
    lora = read_lora(save_unet_lora(unet, tmp_path / "patterns"))
    for name, layer in loaded_layers(unet, "default").items():
        assert lora.scales[name] == pytest.approx(layer.scaling["default"]), name
    state = kohya_state_dict(lora, dict(unet.config))
    assert state["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape[0] == 2
    for path in (tmp_path / "patterns-kohya.safetensors", tmp_path / "patterns-diffusers.safetensors"):
        export(tmp_path / "patterns", path.stem.rsplit("-", 1)[1], out=path, model=str(tiny_sd))
        loaded = U.from_pretrained(str(tiny_sd), subfolder="unet")
        pipe_cls = StableDiffusionPipeline
        sd, alphas = pipe_cls.lora_state_dict(str(path))
        pipe_cls.load_lora_into_unet(sd, alphas, loaded, adapter_name="x")
        assert_same_adapter(unet, loaded, "x")


def test_diffusers_format_folds_alpha_so_every_reader_applies_the_trained_update(run_dir, tiny_sd, reference, tmp_path):
    lora = read_lora(run_dir)
    state, metadata = diffusers_state_dict(lora)
    for name in lora.down:
        # A reader that ignores the metadata (ComfyUI with no .alpha key: factor 1) gets alpha/rank * B @ A.
        torch.testing.assert_close(state[f"unet.{name}.lora_B.weight"], lora.up[name] * (ALPHA / RANK))
    out = export(run_dir, "diffusers", out=tmp_path / "d.safetensors")
    pipe = pipeline(tiny_sd)
    pipe.load_lora_weights(str(tmp_path), weight_name=out.name, adapter_name="d")
    assert_same_adapter(reference[0].unet, pipe.unet, "d", trained_adapter="a")
    assert (images(pipe) - reference[1][1.0]).abs().max() <= 1e-5


def _sd3_transformer():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                 caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=8).eval()


def _flux_transformer():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
                                  axes_dims_rope=(2, 2, 4)).eval()


def _sd3_out(m):
    g = torch.Generator().manual_seed(1)
    x, enc, pooled = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 3, 16, generator=g), torch.randn(1, 16, generator=g)
    with torch.no_grad():
        return m(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled, timestep=torch.tensor([3])).sample


def _flux_out(m):
    g = torch.Generator().manual_seed(1)
    x, enc, pooled = torch.randn(1, 16, 8, generator=g), torch.randn(1, 3, 16, generator=g), torch.randn(1, 16, generator=g)
    with torch.no_grad():
        return m(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled, timestep=torch.tensor([0.5]),
                 img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(3, 3)).sample


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_transformer_lora_diffusers_export_loads_in_its_pipeline(family, tmp_path):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline
    from peft import LoraConfig as PeftConfig

    build, run, pipe_cls = {"sd3": (_sd3_transformer, _sd3_out, StableDiffusion3Pipeline),
                            "flux": (_flux_transformer, _flux_out, FluxPipeline)}[family]
    transformer = build()
    transformer.add_adapter(PeftConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian",
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "ff.net.2"]))
    randomise_lora([p for n, p in transformer.named_parameters() if "lora" in n])
    pipe_cls.save_lora_weights(tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(transformer),
                               transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())
    out = export(tmp_path / "lora", "diffusers", out=tmp_path / "x.safetensors")
    with safe_open(str(out), framework="pt") as f:
        keys = list(f.keys())
    # ComfyUI reads "transformer."-prefixed peft keys for SD3 and FLUX; diffusers' SD3 loader refuses any key
    # without "lora" (an ".alpha" key), so the factor alpha/rank is in B and no alpha key is needed.
    assert keys and all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    loaded = build()
    with diffusers_warnings() as warned:
        if family == "flux":  # the loader that also reads ".alpha" keys
            sd, alphas, metadata = pipe_cls.lora_state_dict(str(out), return_alphas=True, return_lora_metadata=True)
            assert not alphas
            pipe_cls.load_lora_into_transformer(sd, None, loaded, adapter_name="x", metadata=metadata)
        else:
            sd, metadata = pipe_cls.lora_state_dict(str(out), return_lora_metadata=True)
            pipe_cls.load_lora_into_transformer(sd, loaded, adapter_name="x", metadata=metadata)
    assert warned == []
    assert_same_adapter(transformer, loaded, "x")
    assert (run(loaded) - run(transformer)).abs().max() <= 1e-5
    assert (run(build()) - run(transformer)).abs().max() > 1e-3

    assert main(["export", str(tmp_path / "lora"), "--format", "kohya", "--model", "x"]) == 2  # kohya is for UNets


def test_merge_saves_a_pipeline_with_the_lora_folded_in(run_dir, reference, tmp_path):
    merged_dir = tmp_path / "merged"
    assert main(["export", str(run_dir), "--merge", str(merged_dir), "--scale", "1"]) == 0
    files = [p for p in merged_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert not any(p.suffix in (".bin", ".pt", ".pth", ".ckpt") for p in files)
    merged = pipeline(merged_dir)
    assert not loaded_layers(merged.unet, "export")  # plain weights, no LoRA layers
    assert (images(merged) - reference[1][1.0]).abs().max() <= 1e-5


def test_export_errors_are_one_line_user_errors(run_dir, tmp_path, capsys):
    assert main(["export", str(run_dir)]) == 2  # neither --format nor --merge
    assert main(["export", str(run_dir), "--format", "onnx"]) == 2
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes((run_dir / "lora" / "pytorch_lora_weights.safetensors").read_bytes())
    assert main(["export", str(lone), "--format", "kohya"]) == 2  # which base model?
    assert "--model" in capsys.readouterr().err
    assert main(["export", str(run_dir), "--format", "kohya", "--out", str(tmp_path / "x.bin")]) == 2
    assert main(["export", str(tmp_path / "missing"), "--format", "kohya"]) == 2
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert main(["export", str(run_dir), "--merge", str(tmp_path / "full")]) == 2


def test_sd3_run_lora_exports_and_merges(tmp_path):
    """draft's own SD3 LoRA (transformer keys): the diffusers export and the merged pipeline give its images."""
    from diffusers import StableDiffusion3Pipeline

    from draft.models import load_model
    from draft.models.tiny import build_tiny

    base = build_tiny(tmp_path / "sd3", "sd3")
    run = tmp_path / "sd3-run"
    model = load_model(str(base))
    randomise_lora(add_lora(model, LoraConfig(rank=RANK, alpha=ALPHA, target_modules=("to_q", "to_k", "add_q_proj", "ff.net.2"))))
    save_lora(model, run / "lora")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": str(base)}))

    def sd3_images(pipe):
        pipe.set_progress_bar_config(disable=True)
        latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
        return pipe("a small red circle", num_inference_steps=2, guidance_scale=3.0, latents=latents,
                    output_type="pt").images

    def sd3(path):  # the tiny SD3 has no T5, as SD3 may run in diffusers
        return StableDiffusion3Pipeline.from_pretrained(str(path), text_encoder_3=None, tokenizer_3=None)

    reference = sd3(base)
    reference.load_lora_weights(str(run / "lora"), adapter_name="a")
    want = sd3_images(reference)
    assert main(["export", str(run), "--format", "diffusers", "--merge", str(tmp_path / "merged")]) == 0
    exported = sd3(base)
    with diffusers_warnings() as warned:
        exported.load_lora_weights(str(run / "lora"), weight_name="sd3-run-diffusers.safetensors", adapter_name="d")
    assert warned == []
    assert_same_adapter(reference.transformer, exported.transformer, "d", trained_adapter="a")
    assert (sd3_images(exported) - want).abs().max() <= 1e-5
    merged = sd3(tmp_path / "merged")
    assert not loaded_layers(merged.transformer, "export")
    assert (sd3_images(merged) - want).abs().max() <= 1e-5
    assert main(["export", str(run), "--format", "kohya"]) == 2  # kohya names are for UNets
