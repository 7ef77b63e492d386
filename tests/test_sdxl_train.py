"""SDXL DreamBooth on a tiny random SDXL (two CLIP encoders with projection, a UNet with text_time conditioning):
the conditioning is what diffusers' own pipeline computes, full and LoRA runs train and resume bit-identically, the
kohya SDXL LoRA loads in diffusers and computes what we trained, class images come from the SDXL pipeline."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dreambooth.families.base import Dtypes, ResolvedModel
from dreambooth.tiny_model import write_tiny_diffusers
from tests.test_buckets import BUCKET_FLAGS, _captioned_photos
from tests.train_helpers import base_args, sigterm_at_step

F32 = Dtypes(torch.float32, torch.float32, torch.float32)
LORA = ("--adapter", "lora", "--lora-rank", 4, "--lora-alpha", 2, "--save-interval", 100)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return write_tiny_diffusers(tmp_path_factory.mktemp("sdxl") / "model", seed=0, model_type="sdxl")


def pipeline(folder):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(folder, dtype=torch.float32, local_files_only=True)


def test_conditioning_is_what_the_sdxl_pipeline_computes(sdxl):
    """Both encoders' penultimate states side by side, encoder 2's pooled projection, and the six time ids
    (original size, crop corner, target size) in the order the pipeline builds them."""
    from dreambooth import families
    from dreambooth.families.sdxl.family import time_ids

    family = families.of_folder(sdxl)
    assert family.name == "sdxl"
    c = family.load(ResolvedModel.of_folder(sdxl), F32)
    pipe = pipeline(sdxl)
    prompts = ["a photo of sks thing", ""]
    with torch.no_grad():
        ours = family.encode(c, prompts)
        hidden, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    assert torch.equal(ours["hidden"], hidden) and ours["hidden"].shape[-1] == 64
    assert torch.equal(ours["pooled"], pooled)

    geometry = torch.tensor([[48.0, 40.0, 3.0, 5.0, 32.0, 32.0], [32.0, 64.0, 0.0, 16.0, 32.0, 32.0]])
    expected = torch.cat(
        [
            pipe._get_add_time_ids((48, 40), (3, 5), (32, 32), torch.float32, text_encoder_projection_dim=32),
            pipe._get_add_time_ids((32, 64), (0, 16), (32, 32), torch.float32, text_encoder_projection_dim=32),
        ]
    )
    noisy = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(time_ids(geometry, noisy, 2), expected)
    # without a record: a square crop of an image of the latents' own size
    assert time_ids(None, noisy, 2).tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2
    t = torch.tensor([10, 900])
    with torch.no_grad():
        pred = family.predict(c, noisy, t, ours, geometry)
        added = {"text_embeds": pooled, "time_ids": expected}
        theirs = pipe.unet(noisy, t, hidden, added_cond_kwargs=added).sample
        other = family.predict(c, noisy, t, ours, geometry.flip(0))
    assert torch.equal(pred, theirs)
    assert not torch.allclose(pred, other), "the time ids do not reach the UNet"


def _weights(folder):
    return {p.relative_to(folder).as_posix(): load_file(p) for p in sorted(folder.rglob("*.safetensors"))}


def test_sdxl_full_fine_tune_with_buckets_and_captions_resumes_bit_identically_and_loads(
    cli, sdxl, tmp_path, monkeypatch
):
    """Photos of three aspect ratios in their buckets (their sizes and crops as time ids), captions with the
    trigger kept, caption dropout, both text encoders training: stopped and resumed equals straight through."""
    photos = _captioned_photos(tmp_path / "sks")
    flags = (
        *BUCKET_FLAGS, "--caption-extension", ".txt", "--caption-dropout", 0.3,
        "--max-train-steps", 4, "--save-interval", 100, "--train-text-encoder", "--learning-rate", "1e-3",
        "--train-batch-size", 2, "--random-flip", "--lr-scheduler", "cosine", "--lr-warmup-steps", 1,
        "--no-cache-latents", "--no-save-fp16",
    )  # fmt: skip
    straight = cli(*base_args(sdxl, photos, tmp_path / "a", *flags))
    assert straight.exit_code == 0, straight.stderr
    sigterm_at_step(monkeypatch, 2)
    assert cli(*base_args(sdxl, photos, tmp_path / "b", *flags)).exit_code == 130
    monkeypatch.undo()
    resumed = cli(*base_args(sdxl, photos, tmp_path / "b", *flags))
    assert resumed.exit_code == 0, resumed.stderr

    a, b = (_weights(tmp_path / run / "checkpoints" / "step-4") for run in ("a", "b"))
    assert a.keys() == b.keys()
    assert {"unet/diffusion_pytorch_model.safetensors", "text_encoder_2/model.safetensors"} <= a.keys()
    for name in a:
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name
    base = _weights(sdxl)
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "text_encoder_2/model.safetensors"):  # fmt: skip
        assert any(not torch.equal(a[part][k], base[part][k]) for k in a[part]), f"{part} did not train"
    report = json.loads((tmp_path / "a" / "train_report.json").read_text())
    assert report["family"] == "sdxl" and report["adapter"] == "full"
    assert report["buckets"] == {"40x24": 2, "32x32": 2, "16x48": 1} and report["captions"] == 2
    assert json.loads((tmp_path / "b" / "train_report.json").read_text())["losses"] == report["losses"]

    # the checkpoint is an SDXL diffusers folder that diffusers' own pipeline loads and samples from
    pipe = pipeline(tmp_path / "a" / "checkpoints" / "step-4")
    image = pipe("a photo of sks thing", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and torch.isfinite(torch.from_numpy(image)).all()


def _lora_layers(module) -> int:
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(m, LoraLayer) for m in module.modules())


def _outputs(pipe, prompt="a photo of sks thing"):
    """Both encoders' conditioning and the UNet's prediction on fixed noise, as the pipeline computes them."""
    with torch.no_grad():
        hidden, _, pooled, _ = pipe.encode_prompt([prompt], do_classifier_free_guidance=False)
        noisy = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        ids = pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), torch.float32, text_encoder_projection_dim=32)
        added = {"text_embeds": pooled, "time_ids": ids}
        pred = pipe.unet(noisy, torch.tensor([500]), hidden, added_cond_kwargs=added).sample
    return hidden, pooled, pred


def test_sdxl_lora_kohya_file_loads_in_diffusers_and_computes_what_we_trained(cli, sdxl, photos, tmp_path):
    """LoRA on the UNet (attention + convs) and on both text encoders, each encoder at its own learning rate;
    the kohya file (lora_unet_<original layout>, lora_te1_, lora_te2_) and the diffusers folder, loaded by
    StableDiffusionXLPipeline.load_lora_weights, reproduce our trained model."""
    from dreambooth import adapters, families
    from dreambooth.launch import read_settings

    out = tmp_path / "out"
    flags = (*LORA, "--max-train-steps", 3, "--learning-rate", "3e-2", "--train-text-encoder", "--text-encoder-lr",
             "1e-2", "--lora-conv-rank", 2, "--lora-targets", "attention,feed-forward,projections")  # fmt: skip
    result = cli(*base_args(sdxl, photos, out, *flags, "--export-single-file"))
    assert result.exit_code == 0, result.stderr
    checkpoint = out / "checkpoints" / "step-3"
    assert sorted(p.name for p in (checkpoint / "lora").iterdir()) == [
        "lora.json", "text_encoder.safetensors", "text_encoder_2.safetensors", "unet.safetensors",
    ]  # fmt: skip

    state = torch.load(checkpoint / "training_state.pt", weights_only=False)
    (tmp_path / "settings.json").write_text(json.dumps(state["config"]))
    cfg = read_settings(tmp_path / "settings.json")
    c = families.of_folder(sdxl).load(ResolvedModel.of_folder(sdxl), F32)
    lora = adapters.get("lora")
    lora.prepare(c, cfg, families.get("sdxl"))
    lora.restore(c, checkpoint, state)
    mine = pipeline(sdxl)
    mine.unet, mine.text_encoder, mine.text_encoder_2 = (
        c.denoiser,
        c.text_encoders["text_encoder"],
        c.text_encoders["text_encoder_2"],
    )
    ours = _outputs(mine)
    modules = sum(_lora_layers(m) for m in c.models.values())
    base = _outputs(pipeline(sdxl))
    assert all(not torch.allclose(o, b, atol=1e-3) for o, b in zip(ours, base, strict=True)), "the LoRA did nothing"

    kohya = out / "export" / "out-lora-step-3.safetensors"
    with safe_open(str(kohya), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    modules_in_file = {k.split(".")[0] for k in keys}
    assert {m.split("_")[1] for m in modules_in_file} == {"unet", "te1", "te2"}
    unet_modules = sorted(m for m in modules_in_file if m.startswith("lora_unet_"))
    # kohya's SDXL names: the UNet in the original (SGM) layout, the encoders in the Hugging Face CLIP layout
    assert all(m.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
               for m in unet_modules), unet_modules[:3]  # fmt: skip
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q" in modules_in_file
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj" in modules_in_file
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"

    folder = tmp_path / "sks-lora-diffusers"
    assert cli("export", checkpoint, folder, "--format", "diffusers").exit_code == 0
    for source in (kohya, folder):
        pipe = pipeline(sdxl)
        pipe.load_lora_weights(source)
        pipe.fuse_lora()
        loaded = sum(_lora_layers(m) for m in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2))
        assert loaded == modules, (source, loaded, modules)
        for o, got in zip(ours, _outputs(pipe), strict=True):
            assert torch.allclose(o, got, atol=2e-3, rtol=2e-3), (source, (o - got).abs().max())

    # baked in: the SDXL single file a merge writes, converted back, computes the same
    merged = tmp_path / "sks-merged.safetensors"
    assert cli("export", checkpoint, merged, "--merge").exit_code == 0
    with safe_open(str(merged), "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert cli("convert", merged, tmp_path / "merged").exit_code == 0
    for o, got in zip(ours, _outputs(pipeline(tmp_path / "merged")), strict=True):
        assert torch.allclose(o, got, atol=2e-3, rtol=2e-3), ("merged", (o - got).abs().max())


def test_sdxl_lora_with_buckets_captions_and_class_images_from_the_sdxl_pipeline(cli, sdxl, tmp_path):
    out = tmp_path / "out"
    photos = _captioned_photos(tmp_path / "sks")
    args = base_args(
        sdxl, photos, out, *LORA, *BUCKET_FLAGS, "--caption-extension", ".txt", "--max-train-steps", 3,
        "--train-batch-size", 2, "--with-prior-preservation", "--class-prompt", "a photo of thing",
        "--class-data-dir", tmp_path / "classes", "--num-class-images", 2, "--class-inference-steps", 2,
    )  # fmt: skip
    result = cli(*args)
    assert result.exit_code == 0, result.stderr
    assert len(list((tmp_path / "classes").glob("*.png"))) == 2
    report = json.loads((out / "train_report.json").read_text())
    assert report["class_images"] == 2 and report["family"] == "sdxl"
    assert report["buckets"] == {"40x24": 2, "32x32": 2, "16x48": 1} and report["captions"] == 2
    assert all(math.isfinite(v) for v in report["losses"]["class"])


def test_sdxl_levers_train_the_same(cli, sdxl, photos, tmp_path):
    """Gradient checkpointing changes how, not what: the same LoRA to rounding. Cached latents (and the cached,
    frozen text encoders' outputs every run here has) give the same losses to rounding — not the same weights:
    Adam's first steps move a weight by ±lr whatever the size of its gradient, so a rounding difference in a
    near-zero gradient shows at full size."""
    # centre crops: a cache draws each image's random crop once, the uncached run at every step
    common = (*LORA, "--max-train-steps", 2, "--learning-rate", "1e-3", "--center-crop")
    plain = cli(*base_args(sdxl, photos, tmp_path / "a", *common, "--no-cache-latents"))
    checkpointed = cli(*base_args(sdxl, photos, tmp_path / "b", *common, "--no-cache-latents",
                                  "--gradient-checkpointing"))  # fmt: skip
    cached = cli(*base_args(sdxl, photos, tmp_path / "c", *common, "--cache-latents"))
    assert {plain.exit_code, checkpointed.exit_code, cached.exit_code} == {0}, plain.stderr + cached.stderr
    a, b = (load_file(tmp_path / r / "checkpoints" / "step-2" / "lora" / "unet.safetensors") for r in "ab")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=1e-4), key
    losses = [json.loads((tmp_path / r / "train_report.json").read_text())["losses"]["loss"] for r in "ac"]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_the_refiner_cannot_be_trained(cli, photos, tmp_path):
    refiner = write_tiny_diffusers(tmp_path / "refiner", seed=0, model_type="sdxl-refiner")
    result = cli(*base_args(refiner, photos, tmp_path / "out", "--max-train-steps", 1))
    assert result.exit_code == 2
    assert "refiner" in result.stderr and "no CLIP ViT-L" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_vae_of_another_family_is_refused(cli, sdxl, model, photos, tmp_path):
    result = cli(*base_args(sdxl, photos, tmp_path / "out", "--max-train-steps", 1, "--vae", model / "vae"))
    assert result.exit_code == 2
    assert "another model family" in result.stderr and "--vae" in result.stderr


def test_non_finite_latents_stop_with_what_to_do(cli, sdxl, photos, tmp_path):
    """A VAE that overflows (here: NaN weights) is named, with the fix, before any step trains on garbage."""
    import shutil

    from safetensors.torch import save_file

    vae = tmp_path / "vae"
    shutil.copytree(sdxl / "vae", vae)
    weights = vae / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state = {k: torch.full_like(v, float("nan")) if "encoder.conv_out" in k else v for k, v in state.items()}
    save_file(state, weights)
    result = cli(*base_args(sdxl, photos, tmp_path / "out", "--max-train-steps", 2, "--vae", vae))
    assert result.exit_code == 2, result.stderr
    assert "non-finite latents" in result.stderr and "fp16" in result.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_zero_terminal_snr_rescales_the_schedule_of_a_v_prediction_model(cli, model, photos, tmp_path):
    """--zero-terminal-snr: the last step is pure noise, the saved model says so; an epsilon model is refused."""
    from diffusers import DDPMScheduler

    refused = cli(*base_args(model, photos, tmp_path / "eps", "--max-train-steps", 1, "--zero-terminal-snr"))
    assert refused.exit_code == 2 and "v-prediction" in refused.stderr

    v_model = write_tiny_diffusers(tmp_path / "v", seed=0, model_type="sd1-v")
    out = tmp_path / "out"
    result = cli(*base_args(v_model, photos, out, "--max-train-steps", 2, "--zero-terminal-snr", "--snr-gamma", 5))
    assert result.exit_code == 0, result.stderr
    config = json.loads((out / "checkpoints" / "step-2" / "scheduler" / "scheduler_config.json").read_text())
    assert config["rescale_betas_zero_snr"] is True and config["timestep_spacing"] == "trailing"
    assert "rescale_betas_zero_snr" not in json.loads((v_model / "scheduler" / "scheduler_config.json").read_text())
    rescaled = DDPMScheduler.from_config(config)
    base = DDPMScheduler.from_config(json.loads((v_model / "scheduler" / "scheduler_config.json").read_text()))
    assert rescaled.alphas_cumprod[-1] < 1e-6 and base.alphas_cumprod[-1] > 1e-3
    losses = json.loads((out / "train_report.json").read_text())["losses"]
    assert all(torch.isfinite(torch.tensor(v)).all() for v in losses.values() if isinstance(v, list))


def test_an_sd1_lora_merged_onto_sdxl_is_refused(cli, sdxl, model, photos, tmp_path):
    out = tmp_path / "out"
    assert cli(*base_args(model, photos, out, *LORA, "--max-train-steps", 1)).exit_code == 0
    result = cli("export", out / "checkpoints" / "step-1", tmp_path / "merged.safetensors", "--merge", "--base", sdxl)
    assert result.exit_code == 2
    assert "sdxl" in result.stderr and "sd1" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "merged.safetensors").exists()


def test_sdxl_full_step_inside_backward_and_low_vram_train(cli, sdxl, photos, tmp_path):
    """--fused-backward updates SDXL's UNet exactly as the usual step does; the --low-vram profile trains SDXL
    (its 8-bit Adam falls back to torch's AdamW on a CPU, said in the report)."""
    run = ("--max-train-steps", 2, "--learning-rate", "1e-3", "--max-grad-norm", 0, "--save-interval", 100,
           "--center-crop")  # fmt: skip
    usual = cli(*base_args(sdxl, photos, tmp_path / "a", *run))
    fused = cli(*base_args(sdxl, photos, tmp_path / "b", *run, "--fused-backward"))
    assert usual.exit_code == 0 and fused.exit_code == 0, usual.stderr + fused.stderr
    a, b = (_weights(tmp_path / r / "checkpoints" / "step-2")["unet/diffusion_pytorch_model.safetensors"] for r in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)

    low = cli(*base_args(sdxl, photos, tmp_path / "c", *run, "--low-vram", "--mixed-precision", "no"))
    assert low.exit_code == 0, low.stderr
    report = json.loads((tmp_path / "c" / "train_report.json").read_text())
    assert report["family"] == "sdxl" and "inside backward" in report["optimizer"]
