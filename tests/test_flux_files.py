"""Flux.1's files: BFL's released layout at full size (against BFL's own code, on the meta device), a tiny Flux from
ComfyUI's four files (or one all-in-one checkpoint, fp32, bf16 or fp8) to a diffusers folder and back bit for bit,
`inspect` on each part, and bad inputs in one line."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dreambooth.families.flux import parts
from dreambooth.families.flux.layout import transformer_sources
from dreambooth.families.sd.layout import vae_sources
from tests.flux_helpers import write_all_in_one, write_flux_files
from tests.test_lora_files import golden


def shapes_of(name: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in golden(name):
        key, shape = line.split("\t")
        out[key] = tuple(int(x) for x in shape.split(","))
    return out


@pytest.mark.parametrize("model_type", ["flux-dev", "flux-schnell"])
def test_our_tables_give_the_released_transformer_names_and_shapes(model_type):
    """diffusers' FluxTransformer2DModel with the bundled config, put into BFL's layout by our table: exactly the
    names and shapes of flux1-dev/schnell.safetensors as BFL's model code makes them (19 + 38 blocks, width 3072)."""
    from diffusers import FluxTransformer2DModel

    config = parts.bundled_config(model_type, "transformer")
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(config)
    state = model.state_dict()
    ours = {k: tuple(s.combine(*(state[x] for x in s.keys)).shape) for k, s in transformer_sources(config).items()}
    assert ours == shapes_of(f"{model_type}-transformer.txt")
    # and the architecture read back off those shapes is the bundled one
    meta = {k: torch.empty(shape, device="meta") for k, shape in ours.items()}
    inferred = parts.transformer_config(meta, "golden")
    assert {k: inferred[k] for k in config if k != "out_channels"} == {
        k: config[k] for k in config if k != "out_channels"
    }


def test_our_vae_table_gives_the_released_autoencoder_names_and_shapes():
    from diffusers import AutoencoderKL

    config = parts.bundled_config("flux-dev", "vae")
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config)
    state = vae.state_dict()
    ours = {
        k: tuple(s.combine(*(state[x] for x in s.keys)).shape) for k, s in vae_sources(list(state), config, "").items()
    }
    assert ours == shapes_of("flux-ae.txt")


def _folder_state(folder: Path, role: str) -> dict[str, torch.Tensor]:
    name = "model" if role.startswith("text") else "diffusion_pytorch_model"
    return load_file(folder / role / f"{name}.safetensors")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_flux_files(tmp_path_factory.mktemp("flux-files"))


def test_comfy_files_convert_to_a_diffusers_folder_and_back_bit_for_bit(cli, files, tmp_path):
    """The four files → `dreambooth convert` → a folder FluxPipeline loads, holding the tiny model's very tensors
    (q, k, v cut out of the fused rows, the final modulation's halves swapped back) → `dreambooth export` → the
    transformer file, byte for byte."""
    from diffusers import FluxPipeline

    from dreambooth.tiny_model import tiny_flux

    folder = tmp_path / "flux"
    result = cli("convert", files["transformer"], folder, "--clip-l", files["text_encoder"], "--t5xxl",
                 files["text_encoder_2"], "--ae", files["vae"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    for role, (_, state) in tiny_flux(0, "flux-dev").items():
        got = _folder_state(folder, role)
        for key, value in state.items():
            if key == "encoder.embed_tokens.weight":  # T5's embedding is one tensor, stored once as `shared`
                continue
            assert torch.equal(got[key], value), (role, key)
    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)
    assert pipe.transformer.config.guidance_embeds and pipe.vae.config.latent_channels == 16

    back = tmp_path / "back.safetensors"
    assert cli("export", folder, back, "--no-half").exit_code == 0
    assert back.read_bytes() == files["transformer"].read_bytes()
    with safe_open(str(back), "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "flux-1-dev"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_half_and_fp8_files_load_upcast(files, tmp_path, dtype):
    """bf16 and float8_e4m3fn files (ComfyUI's fp8 Flux) load: each tensor read and upcast to the training dtype."""
    from dreambooth.families.base import Dtypes, Part, ResolvedModel
    from dreambooth.families.flux.family import Flux

    typed = write_flux_files(tmp_path / "typed", dtype=dtype)
    model = ResolvedModel("flux-dev", parts={role: Part(path) for role, path in typed.items()})
    c = Flux("flux-dev").load(model, Dtypes(torch.float32, torch.float32, torch.float32))
    assert next(c.denoiser.parameters()).dtype == torch.float32
    original = load_file(typed["transformer"])
    loaded = c.denoiser.state_dict()
    assert torch.equal(loaded["x_embedder.weight"], original["img_in.weight"].float())
    assert torch.equal(loaded["transformer_blocks.0.attn.to_k.weight"],
                       original["double_blocks.0.img_attn.qkv.weight"].float()[32:64])  # fmt: skip


def test_the_all_in_one_checkpoint_needs_no_other_file(cli, tmp_path):
    path = write_all_in_one(tmp_path / "flux1-dev-all.safetensors")
    assert parts.identify(load_file(path)) == {
        "transformer": "model.diffusion_model.", "text_encoder": "text_encoders.clip_l.transformer.",
        "text_encoder_2": "text_encoders.t5xxl.transformer.", "vae": "vae.",
    }  # fmt: skip
    result = cli("convert", path, tmp_path / "flux")
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "flux" / "dreambooth.json").read_text())["model_type"] == "flux-dev"
    report = json.loads(cli("inspect", path, "--json").stdout)
    assert report["family"] == "flux-dev" and report["missing"] == {}


def test_inspect_names_the_variant_dtypes_and_the_missing_parts(cli, files, tmp_path):
    report = json.loads(cli("inspect", files["transformer"], "--json").stdout)
    assert report["family"] == "flux-dev" and report["title"] == "FLUX.1 [dev]"
    assert report["parts"]["transformer"]["double_blocks"] == 2 and report["parts"]["transformer"]["hidden"] == 32
    assert set(report["missing"]) == {"--clip-l", "--t5xxl", "--ae"}
    schnell = write_flux_files(tmp_path / "schnell", model_type="flux-schnell", dtype=torch.bfloat16)
    report = json.loads(cli("inspect", schnell["transformer"], "--json").stdout)
    assert report["family"] == "flux-schnell" and report["dtype"] == "bfloat16"
    assert "no guidance embedding" in " ".join(report["evidence"])
    for role, flag in (("text_encoder", "--clip-l"), ("text_encoder_2", "--t5xxl"), ("vae", "--ae")):
        report = json.loads(cli("inspect", files[role], "--json").stdout)
        assert report["family"] == "flux-part" and report["use_as"] == flag and report["dtype"] == "float32", role
    text = cli("inspect", files["transformer"]).stdout
    assert "flux-dev" in text and "--t5xxl" in text


def test_a_comfy_diffusion_model_that_is_no_known_model_is_described_not_a_traceback(cli, tmp_path):
    """Keys under model.diffusion_model. that are neither Flux's nor an SD UNet's: inspect says what it found."""
    path = tmp_path / "other.safetensors"
    save_file({"model.diffusion_model.blocks.0.weight": torch.zeros(2, 2)}, path)
    result = cli("inspect", path, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["supported"] is False and "no Stable Diffusion UNet" in report["evidence"][0]


def test_bad_flux_files_are_one_line_and_exit_2(cli, files, tmp_path):
    def refused(*args, expected):
        result = cli("convert", *args, tmp_path / "out")
        assert result.exit_code == 2, result.stderr
        assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) <= 2

    model, clip, t5, ae = (files[r] for r in ("transformer", "text_encoder", "text_encoder_2", "vae"))
    refused(model, "--clip-l", clip, "--ae", ae, expected="--t5xxl")  # missing
    refused(model, "--clip-l", t5, "--t5xxl", clip, "--ae", ae, expected="pass it as --t5xxl")  # swapped
    refused(t5, expected="not a Flux transformer")  # a part as the model
    from tests.conftest import write_original

    sd = write_original(tmp_path / "sd.safetensors", "sd1")
    refused(sd, "--clip-l", clip, expected="--clip-l names a part of a Flux.1 model")
    sd_vae = tmp_path / "sd-vae.safetensors"
    save_file({k.removeprefix("first_stage_model."): v for k, v in load_file(sd).items()
               if k.startswith("first_stage_model.")}, sd_vae)  # fmt: skip
    refused(model, "--clip-l", clip, "--t5xxl", t5, "--ae", sd_vae, expected="4-channel latents")


def _meta_lora(config: dict, targets: tuple[str, ...], text: bool = False):
    """A peft LoRA on the full-size transformer (or CLIP-L), on the meta device: (info, states) as a checkpoint
    holds them."""
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig, inject_adapter_in_model

    from dreambooth.families.flux.family import Flux
    from dreambooth.families.flux.lora import transformer_layout
    from dreambooth.formats.lora import describe_adapters

    family = Flux("flux-dev")
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(config)
    linear, _ = family.lora_modules(transformer, family.lora_targets(targets).denoiser, 0)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=linear), transformer)
    models = {"transformer": transformer}
    if text:
        from transformers import CLIPTextConfig, CLIPTextModel

        with torch.device("meta"):
            clip = CLIPTextModel(CLIPTextConfig(**parts.bundled_config("flux-dev", "text_encoder")))
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=list(family.lora_targets(targets).text)),
                                clip)  # fmt: skip
        models["text_encoder"] = clip
    from peft import get_peft_model_state_dict

    states = {name: get_peft_model_state_dict(m) for name, m in models.items()}
    info = {"family": "flux-dev", "transformer_layout": transformer_layout(transformer),
            "components": describe_adapters(models)}  # fmt: skip
    return info, states


def test_kohya_flux_lora_names_are_kohyas_at_full_size():
    """Our default (all-linear) LoRA on the released transformer, written in kohya's layout: exactly the 304 module
    names kohya's lora_flux makes for FLUX.1 [dev], fused modules with their fused in/out features; CLIP-L's as
    kohya's lora_te1_ names."""
    from dreambooth.families.flux.lora import to_kohya

    info, states = _meta_lora(parts.bundled_config("flux-dev", "transformer"), ("all-linear",), text=True)
    kohya = to_kohya(info, states)
    modules = {k.removesuffix(".lora_down.weight"): v for k, v in kohya.items() if k.endswith(".lora_down.weight")}
    expected = dict(line.split("\t") for line in golden("flux-kohya-lora-modules.txt"))
    expected |= dict(line.split("\t") for line in golden("flux-kohya-lora-te1-modules.txt"))
    assert sorted(modules) == sorted(expected)
    for name, down in modules.items():
        up = kohya[f"{name}.lora_up.weight"]
        assert f"{down.shape[1]},{up.shape[0]}" == expected[name], name
        assert kohya[f"{name}.alpha"].shape == ()  # a scalar, as kohya writes it
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    assert kohya[f"{qkv}.lora_down.weight"].shape == (12, 3072) and float(kohya[f"{qkv}.alpha"]) == 12.0
    assert kohya["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (21504, 16)


@pytest.mark.slow
def test_kohya_flux_lora_at_real_widths_loads_in_diffusers_and_computes_ours():
    """diffusers re-splits kohya's fused modules only at Flux's own widths (it assumes 3072 and 12288): one double
    and one single block of the released width, a LoRA with random ups, the kohya file through
    FluxPipeline.lora_state_dict + load_lora_adapter vs peft's own forward (relative error stated below)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig, inject_adapter_in_model

    from dreambooth.families.flux.family import Flux
    from dreambooth.families.flux.lora import to_kohya, transformer_layout
    from dreambooth.formats.lora import describe_adapters

    config = {**parts.bundled_config("flux-dev", "transformer"), "num_layers": 1, "num_single_layers": 1}
    torch.manual_seed(0)
    ours = FluxTransformer2DModel.from_config(config).eval()
    theirs = FluxTransformer2DModel.from_config(config).eval()
    theirs.load_state_dict(ours.state_dict())
    family = Flux("flux-dev")
    linear, _ = family.lora_modules(ours, family.lora_targets(("all-linear",)).denoiser, 0)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=2, target_modules=linear), ours)
    for name, p in ours.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    from peft import get_peft_model_state_dict

    info = {"family": "flux-dev", "transformer_layout": transformer_layout(ours),
            "components": describe_adapters({"transformer": ours})}  # fmt: skip
    kohya = to_kohya(info, {"transformer": get_peft_model_state_dict(ours)})
    state = FluxPipeline.lora_state_dict({k: v.clone() for k, v in kohya.items()})
    state = state[0] if isinstance(state, tuple) else state
    theirs.load_lora_adapter({k.removeprefix("transformer."): v for k, v in state.items()}, prefix=None)
    g = torch.Generator().manual_seed(1)
    args = dict(hidden_states=torch.randn(1, 16, 64, generator=g), timestep=torch.tensor([0.5]),
                guidance=torch.tensor([1.0]), pooled_projections=torch.randn(1, 768, generator=g),
                encoder_hidden_states=torch.randn(1, 8, 4096, generator=g), txt_ids=torch.zeros(8, 3),
                img_ids=torch.zeros(16, 3))  # fmt: skip
    with torch.no_grad():
        mine, got = ours(**args).sample, theirs(**args).sample
    error = ((mine - got).norm() / mine.norm()).item()
    print(f"kohya's fused Flux LoRA re-split by diffusers: relative error {error:.2e}")
    assert error < 1e-5
