"""SDXL single files: inspect / convert / export on tiny files in the released layout (base 1.0 and the refiner).

The original files are built by tests/original_layouts.py from sgm's model definitions (not from diffusers' maps),
so the round trip checks our converter against an independent reading of the layout.
"""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.original_layouts import TINY_SDXL, TINY_SDXL_REFINER, original_state_dict

LAYOUTS = {"sdxl": TINY_SDXL, "sdxl-refiner": TINY_SDXL_REFINER}


def write_sdxl(path, model_type="sdxl", *, dtype=torch.float32, seed=0, metadata=None, edit=None):
    """A tiny SDXL file as Stability released them (no schedule buffers); `edit` changes the state dict first."""
    state = original_state_dict(LAYOUTS[model_type], schedule_buffers=False, dtype=dtype, seed=seed)
    if edit:
        edit(state)
    save_file(state, path, metadata=metadata)
    return path


def assert_same_tensors(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and got[key].shape == tensor.shape, key
        assert torch.equal(got[key], tensor), key


@pytest.mark.parametrize("model_type", ["sdxl", "sdxl-refiner"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_round_trip_is_bit_identical(tmp_path, cli, model_type, dtype):
    src = write_sdxl(tmp_path / "in.safetensors", model_type, dtype=dtype)
    result = cli("convert", src, tmp_path / "d")  # auto-detected
    assert result.exit_code == 0, result.stderr
    assert cli("export", tmp_path / "d", tmp_path / "out.safetensors").exit_code == 0

    assert_same_tensors(load_file(tmp_path / "out.safetensors"), load_file(src))
    provenance = json.loads((tmp_path / "d" / "dreambooth.json").read_text())
    assert provenance["family"] == model_type and provenance["prediction_type"] == "epsilon"
    # what diffusers has no place for (open_clip's logit_scale) is kept aside, not lost
    extras = load_file(tmp_path / "d" / "original_extras.safetensors")
    prefix = "conditioner.embedders.0.model." if model_type == "sdxl-refiner" else "conditioner.embedders.1.model."
    assert sorted(extras) == [prefix + "logit_scale"]


def test_converted_base_runs_in_the_sdxl_pipeline(tmp_path, cli):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    src = write_sdxl(tmp_path / "in.safetensors")
    assert cli("convert", src, tmp_path / "d").exit_code == 0
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "d", local_files_only=True)

    assert isinstance(pipe.scheduler, EulerDiscreteScheduler) and pipe.scheduler.config.steps_offset == 1
    assert pipe.tokenizer.pad_token == "<|endoftext|>" and pipe.tokenizer_2.pad_token == "!"
    assert pipe.vae.config.scaling_factor == 0.13025 and pipe.vae.config.force_upcast
    # read off the shapes: two encoders side by side (32 + 64), 6 time ids × 8 + pooled 48, 2 blocks per level
    assert pipe.unet.config.cross_attention_dim == 96 and pipe.unet.config.addition_time_embed_dim == 8
    assert pipe.unet.config.transformer_layers_per_block == 2
    assert pipe.text_encoder_2.config.hidden_size == 64 and pipe.text_encoder_2.config.projection_dim == 48
    # the bigG projection arrives transposed into a Linear: pooled = final-layer EOS state @ text_projection
    original = load_file(src)
    assert torch.equal(
        pipe.text_encoder_2.text_projection.weight, original["conditioner.embedders.1.model.text_projection"].T
    )

    out = pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert out.images.shape == (1, 64, 64, 3)
    assert torch.isfinite(torch.from_numpy(out.images)).all()


def test_converted_refiner_runs_in_the_img2img_pipeline(tmp_path, cli):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    src = write_sdxl(tmp_path / "in.safetensors", "sdxl-refiner")
    assert cli("convert", src, tmp_path / "d").exit_code == 0
    index = json.loads((tmp_path / "d" / "model_index.json").read_text())
    assert index["text_encoder"] == [None, None] and index["requires_aesthetics_score"] is True
    assert not (tmp_path / "d" / "text_encoder").exists()

    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(tmp_path / "d", local_files_only=True)
    assert pipe.text_encoder is None and pipe.config.requires_aesthetics_score
    out = pipe("a photo", image=torch.rand(1, 3, 64, 64), num_inference_steps=4, strength=0.5, output_type="np")
    assert out.images.shape == (1, 64, 64, 3)


def test_inspect_names_the_family_and_the_evidence(tmp_path, cli):
    base = write_sdxl(tmp_path / "base.safetensors", dtype=torch.float16)
    refiner = write_sdxl(tmp_path / "refiner.safetensors", "sdxl-refiner")

    report = json.loads(cli("inspect", base, "--json").stdout)
    assert report["family"] == "sdxl" and report["supported"] is True and report["dtype"] == "float16"
    assert report["prediction_type"] == "epsilon" and report["prediction_type_from"] == "sdxl-default"
    assert set(report["parameters"]) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert any("conditioner.embedders.1.model" in line for line in report["evidence"])

    report = json.loads(cli("inspect", refiner, "--json").stdout)
    assert report["family"] == "sdxl-refiner" and set(report["parameters"]) == {"unet", "vae", "text_encoder_2"}
    assert any("refiner" in line for line in report["evidence"])

    text = cli("inspect", base).stdout
    assert "sdxl" in text


def test_v_prediction_from_the_flag_is_written_back_as_the_v_pred_key(tmp_path, cli):
    src = write_sdxl(tmp_path / "in.safetensors")
    assert cli("convert", src, tmp_path / "d", "--model-type", "sdxl-v").exit_code == 0
    scheduler = json.loads((tmp_path / "d" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["_class_name"] == "EulerDiscreteScheduler"

    assert cli("export", tmp_path / "d", tmp_path / "v.safetensors").exit_code == 0
    with safe_open(tmp_path / "v.safetensors", "pt") as f:
        meta = f.metadata()
        assert f.get_tensor("v_pred").numel() == 0  # what ComfyUI and the WebUI look for
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert meta["modelspec.prediction_type"] == "v"
    assert not (tmp_path / "v.yaml").exists()  # no sidecar for SDXL: the key says it


def test_v_pred_key_alone_decides(tmp_path, cli):
    src = write_sdxl(tmp_path / "in.safetensors", edit=lambda s: s.update(v_pred=torch.zeros(0)))
    report = json.loads(cli("inspect", src, "--json").stdout)
    assert report["prediction_type"] == "v_prediction" and report["prediction_type_from"] == "metadata"
    assert cli("convert", src, tmp_path / "d").exit_code == 0
    assert cli("export", tmp_path / "d", tmp_path / "out.safetensors").exit_code == 0
    assert_same_tensors(load_file(tmp_path / "out.safetensors"), load_file(src))


def test_zero_terminal_snr_v_model_keeps_its_marks_both_ways(tmp_path, cli):
    """A v-prediction, zero-terminal-SNR SDXL (as ComfyUI marks it) converts to the rescaled, trailing schedule, and a
    folder trained that way (adapters.Full.save writes the same scheduler) exports with both marks."""
    marks = {"v_pred": torch.zeros(0), "ztsnr": torch.zeros(0)}
    src = write_sdxl(tmp_path / "in.safetensors", edit=lambda s: s.update(marks))
    assert cli("convert", src, tmp_path / "d").exit_code == 0
    scheduler = json.loads((tmp_path / "d" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["rescale_betas_zero_snr"] is True
    assert scheduler["timestep_spacing"] == "trailing"
    assert cli("export", tmp_path / "d", tmp_path / "out.safetensors").exit_code == 0
    assert_same_tensors(load_file(tmp_path / "out.safetensors"), load_file(src))

    (tmp_path / "d" / "original_extras.safetensors").unlink()  # as a folder that never had a single file
    assert cli("export", tmp_path / "d", tmp_path / "trained.safetensors").exit_code == 0
    out = load_file(tmp_path / "trained.safetensors")
    assert out["v_pred"].numel() == 0 and out["ztsnr"].numel() == 0


def test_the_flag_overrides_a_v_pred_mark(tmp_path, cli):
    src = write_sdxl(tmp_path / "in.safetensors", edit=lambda s: s.update(v_pred=torch.zeros(0)))
    assert cli("convert", src, tmp_path / "d", "--model-type", "sdxl").exit_code == 0
    assert cli("export", tmp_path / "d", tmp_path / "out.safetensors").exit_code == 0
    assert "v_pred" not in load_file(tmp_path / "out.safetensors")


def test_export_of_a_diffusers_folder_is_the_released_layout_in_fp16(tmp_path, cli):
    """A trained full checkpoint is a diffusers folder with our provenance: the same as this tiny one."""
    from dreambooth.tiny_model import write_tiny_diffusers

    folder = write_tiny_diffusers(tmp_path / "model", seed=3, model_type="sdxl")
    result = cli("export", folder, tmp_path / "xl.safetensors", "--half")
    assert result.exit_code == 0, result.stderr

    with safe_open(tmp_path / "xl.safetensors", "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
        dtypes = {f.get_tensor(k).dtype for k in keys}
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base" and meta["dreambooth.family"] == "sdxl"
    assert meta["modelspec.prediction_type"] == "epsilon" and "v_pred" not in keys
    assert dtypes == {torch.float16, torch.int64}  # fp16 weights; CLIP's position_ids stay int64
    released = original_state_dict(TINY_SDXL, schedule_buffers=False)
    # the released keys, bar open_clip's logit_scale, which nothing reads (a converted file keeps its own)
    assert keys == set(released) - {"conditioner.embedders.1.model.logit_scale"}

    # and it converts back to the same folder
    assert cli("export", folder, tmp_path / "full.safetensors").exit_code == 0
    assert cli("convert", tmp_path / "full.safetensors", tmp_path / "again").exit_code == 0
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        weights = "model.safetensors" if name.startswith("text") else "diffusion_pytorch_model.safetensors"
        assert_same_tensors(load_file(tmp_path / "again" / name / weights), load_file(folder / name / weights))


def test_diffusers_own_single_file_loader_reads_our_export(tmp_path, cli):
    """What other tools do with the file: diffusers' from_single_file gets the folder's weights back."""
    from diffusers import StableDiffusionXLPipeline

    src = write_sdxl(tmp_path / "in.safetensors", seed=5)
    assert cli("convert", src, tmp_path / "d").exit_code == 0
    assert cli("export", tmp_path / "d", tmp_path / "xl.safetensors", "--half").exit_code == 0

    pipe = StableDiffusionXLPipeline.from_single_file(
        tmp_path / "xl.safetensors", config=str(tmp_path / "d"), local_files_only=True, torch_dtype=torch.float16
    )
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        weights = "model.safetensors" if name.startswith("text") else "diffusion_pytorch_model.safetensors"
        theirs = getattr(pipe, name).state_dict()
        for key, tensor in load_file(tmp_path / "d" / name / weights).items():
            assert torch.equal(theirs[key], tensor.half()), (name, key)


def test_vae_file_replaces_the_sdxl_vae(tmp_path, cli):
    src = write_sdxl(tmp_path / "in.safetensors")
    other = original_state_dict(TINY_SDXL, schedule_buffers=False, seed=7)
    # a standalone VAE file (like sdxl-vae-fp16-fix): the VAE's keys without first_stage_model.
    vae = {k.removeprefix("first_stage_model."): v.half() for k, v in other.items() if k.startswith("first_stage")}
    save_file(vae, tmp_path / "vae.safetensors")

    result = cli("convert", src, tmp_path / "d", "--vae", tmp_path / "vae.safetensors")
    assert result.exit_code == 0, result.stderr
    config = json.loads((tmp_path / "d" / "vae" / "config.json").read_text())
    assert config["scaling_factor"] == 0.13025  # SDXL's, not SD 1.x's 0.18215
    got = load_file(tmp_path / "d" / "vae" / "diffusion_pytorch_model.safetensors")
    assert torch.equal(got["encoder.conv_in.weight"], vae["encoder.conv_in.weight"])


def _drop(*keys):
    return lambda state: [state.pop(k) for k in keys]


@pytest.mark.parametrize(
    ("edit", "args", "message"),
    [
        (_drop("model.diffusion_model.label_emb.0.0.weight"), [], "lacks UNet weights"),
        (_drop("conditioner.embedders.1.model.text_projection"), [], "text_encoder_2"),
        (_drop("conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"), [], "text_encoder"),
        (_drop("first_stage_model.decoder.conv_out.weight"), [], "vae"),
        (None, ["--model-type", "sd1"], "--model-type sdxl"),
        (None, ["--model-type", "sdxl-refiner"], "--model-type sdxl"),
    ],
    ids=["no-label-emb", "no-text-projection", "no-clip-l-norm", "no-vae-conv-out", "sd1-flag", "refiner-flag"],
)
def test_bad_sdxl_input_is_one_line_exit_2(tmp_path, cli, edit, args, message):
    src = write_sdxl(tmp_path / "in.safetensors", edit=edit)
    for command in (["convert", src, tmp_path / "d"], ["inspect", src]):
        result = cli(*command, *args)
        assert result.exit_code == 2, (command, result.stdout, result.stderr)
        assert message.lower() in result.stderr.lower() and str(src) in result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "d").exists()


def test_a_file_with_half_of_sdxl_is_not_taken_for_it(tmp_path, cli):
    src = write_sdxl(tmp_path / "in.safetensors", edit=lambda s: [s.pop(k) for k in list(s) if ".embedders.1." in k])
    result = cli("convert", src, tmp_path / "d")
    assert result.exit_code == 2 and "not SDXL's pair of encoders" in result.stderr
