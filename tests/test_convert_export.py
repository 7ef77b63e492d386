"""Round trips and what users get from convert / export / inspect, on tiny original-layout checkpoints."""

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.conftest import LAYOUTS, write_original
from tests.original_layouts import original_state_dict

FAMILY_OF = {"sd1": "sd1", "sd2": "sd2", "sd2-v": "sd2"}


def assert_same_tensors(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert got[key].shape == tensor.shape, key
        assert got[key].dtype == tensor.dtype, key
        assert torch.equal(got[key], tensor), key


@pytest.mark.parametrize("model_type", ["sd1", "sd2", "sd2-v"])
@pytest.mark.parametrize("ema", [False, True], ids=["no-ema", "with-ema"])
def test_round_trip_is_bit_identical(tmp_path, cli, model_type, ema):
    src = write_original(tmp_path / "in.safetensors", FAMILY_OF[model_type], ema=ema)
    assert cli("convert", src, tmp_path / "d", "--model-type", model_type).exit_code == 0
    assert cli("export", tmp_path / "d", tmp_path / "out.safetensors").exit_code == 0

    assert_same_tensors(load_file(tmp_path / "out.safetensors"), load_file(src))


def test_ema_flag_takes_the_ema_weights(tmp_path, cli):
    src = write_original(tmp_path / "in.safetensors", "sd1", ema=True)
    assert cli("convert", src, tmp_path / "d", "--model-type", "sd1", "--ema").exit_code == 0
    assert cli("export", tmp_path / "d", tmp_path / "out.safetensors").exit_code == 0

    original, out = load_file(src), load_file(tmp_path / "out.safetensors")
    unet_keys = [k for k in original if k.startswith("model.diffusion_model.")]
    for key in unet_keys:  # the UNet now holds what was the EMA copy…
        ema_key = "model_ema." + key.removeprefix("model.").replace(".", "")
        assert torch.equal(out[key], original[ema_key]), key
    # …which is therefore not stored twice; everything else is unchanged
    assert sorted(out) == sorted(k for k in original if not k.startswith("model_ema."))
    provenance = json.loads((tmp_path / "d" / "dreambooth.json").read_text())
    assert provenance["ema_used"] is True and provenance["ema_present"] is True


def test_ema_flag_without_ema_weights_is_refused(tiny_sd1, tmp_path, cli):
    result = cli("convert", tiny_sd1, tmp_path / "d", "--model-type", "sd1", "--ema")
    assert result.exit_code == 2
    assert "--ema" in result.stderr and "no EMA" in result.stderr
    assert not (tmp_path / "d").exists()


def test_half_equals_the_fp16_cast(tmp_path, cli, tiny_sd2):
    assert cli("convert", tiny_sd2, tmp_path / "d", "--model-type", "sd2").exit_code == 0
    assert cli("export", tmp_path / "d", tmp_path / "half.safetensors", "--half").exit_code == 0

    want = {k: v.half() if v.is_floating_point() else v for k, v in load_file(tiny_sd2).items()}
    assert_same_tensors(load_file(tmp_path / "half.safetensors"), want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_keeps_its_dtype(tmp_path, cli, dtype):
    src = write_original(tmp_path / "in.safetensors", "sd1", dtype=dtype)
    assert cli("convert", src, tmp_path / "d", "--model-type", "sd1").exit_code == 0
    assert cli("export", tmp_path / "d", tmp_path / "out.safetensors").exit_code == 0
    assert_same_tensors(load_file(tmp_path / "out.safetensors"), load_file(src))


def test_ckpt_output_is_a_plain_state_dict(tmp_path, cli, tiny_sd1):
    assert cli("convert", tiny_sd1, tmp_path / "d", "--model-type", "sd1").exit_code == 0
    assert cli("export", tmp_path / "d", tmp_path / "out.ckpt").exit_code == 0
    loaded = torch.load(tmp_path / "out.ckpt", weights_only=True)
    assert list(loaded) == ["state_dict"]
    assert_same_tensors(loaded["state_dict"], load_file(tiny_sd1))


def test_export_metadata_and_v_sidecar(tmp_path, cli):
    src = write_original(tmp_path / "in.safetensors", "sd2")
    assert cli("convert", src, tmp_path / "d", "--model-type", "sd2-v").exit_code == 0
    assert cli("export", tmp_path / "d", tmp_path / "v.safetensors").exit_code == 0

    with safe_open(tmp_path / "v.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["dreambooth.family"] == "sd2"
    assert meta["dreambooth.prediction_type"] == "v_prediction"
    assert meta["modelspec.prediction_type"] == "v"
    assert meta["dreambooth.base_model_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert "dreambooth.version" in meta
    sidecar = (tmp_path / "v.yaml").read_text()
    assert 'parameterization: "v"' in sidecar
    # and the sidecar alone is enough evidence to convert it back as a v model
    assert cli("inspect", tmp_path / "v.safetensors", "--json").exit_code == 0


def test_converted_folder_loads_offline_and_generates(tmp_path, cli, tiny_sd1, monkeypatch):
    from diffusers import StableDiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli("convert", tiny_sd1, tmp_path / "d", "--model-type", "sd1").exit_code == 0
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "d", local_files_only=True)
    assert pipe.tokenizer("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]
    image = pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [
        "dreambooth.json",
        "model_index.json",
        "original_extras.safetensors",
        "scheduler",
        "text_encoder",
        "tokenizer",
        "unet",
        "vae",
    ]


def test_sd2_tokenizer_pads_with_token_zero(tmp_path, cli, tiny_sd2):
    from transformers import CLIPTokenizer

    assert cli("convert", tiny_sd2, tmp_path / "d", "--model-type", "sd2").exit_code == 0
    tok = CLIPTokenizer.from_pretrained(tmp_path / "d" / "tokenizer")
    ids = tok("a dog", padding="max_length", max_length=77).input_ids
    assert ids[:4] == [49406, 320, 1929, 49407] and ids[4:] == [0] * 73


def test_vae_swap(tmp_path, cli, tiny_sd1):
    other = original_state_dict(LAYOUTS["sd1"], seed=7)
    vae_only = {k.removeprefix("first_stage_model."): v for k, v in other.items() if k.startswith("first_stage_model.")}
    save_file(vae_only, tmp_path / "vae.safetensors")
    vae = tmp_path / "vae.safetensors"
    assert cli("convert", tiny_sd1, tmp_path / "d", "--model-type", "sd1", "--vae", vae).exit_code == 0
    assert cli("export", tmp_path / "d", tmp_path / "out.safetensors").exit_code == 0
    out, base = load_file(tmp_path / "out.safetensors"), load_file(tiny_sd1)
    for key in base:
        want = other[key] if key.startswith("first_stage_model.") else base[key]
        assert torch.equal(out[key], want), key


def test_inspect_reports_family_ema_dtype_params_and_evidence(tmp_path, cli):
    src = write_original(tmp_path / "m.safetensors", "sd2", ema=True, dtype=torch.float16)
    result = cli("inspect", src, "--json", "--model-type", "sd2")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["family"] == "sd2" and report["model_type"] == "sd2"
    assert report["ema_present"] is True
    assert report["dtype"] == "float16"
    assert report["size_bytes"] == src.stat().st_size
    assert set(report["parameters"]) == {"unet", "vae", "text_encoder"}
    assert all(n > 0 for n in report["parameters"].values())
    assert any("--model-type" in line for line in report["evidence"])
    assert not list(tmp_path.glob("*/"))  # inspect writes nothing


def test_inspect_describes_a_fragment_of_sdxl_as_unsupported(tmp_path, cli):
    # one of SDXL's encoders and no UNet: described, not converted (full SDXL files: tests/test_sdxl_convert.py)
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.ones(4)}, tmp_path / "xl.safetensors")
    result = cli("inspect", tmp_path / "xl.safetensors", "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["family"] == "unknown" and report["supported"] is False
    assert "SDXL" in report["evidence"][0]
