"""Flux.1 DreamBooth on a tiny random Flux (2 double + 2 single blocks, tiny CLIP-L and T5 with T5's real
vocabulary, a 16-channel VAE): the conditioning and the call are what FluxPipeline computes, LoRA and full runs
train from ComfyUI's four files and resume bit-identically, the exported LoRA computes what we trained in every
form users load (kohya's fused layout applied as ComfyUI applies it, diffusers' own through FluxPipeline, merged),
class images come from the Flux pipeline, and settings that mean nothing for Flux are one line."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dreambooth.tiny_model import write_tiny_flux
from tests.flux_helpers import FLUX_FLAGS, flux_args, write_flux_files
from tests.train_helpers import base_args, sigterm_at_step

LORA = ("--adapter", "lora", "--lora-rank", 4, "--lora-alpha", 2, "--save-interval", 100)


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return write_tiny_flux(tmp_path_factory.mktemp("flux") / "model", seed=0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_flux_files(tmp_path_factory.mktemp("flux-files"))


def f32():
    from dreambooth.families.base import Dtypes

    return Dtypes(torch.float32, torch.float32, torch.float32)


def pipeline(folder):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(folder, dtype=torch.float32, local_files_only=True)


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 16, 8, 8, generator=g), torch.tensor([0.3, 0.9])


def test_conditioning_and_prediction_are_what_the_flux_pipeline_computes(flux):
    """T5's hidden states and CLIP-L's pooled output as FluxPipeline.encode_prompt makes them; the transformer
    called on the packed latents with their ids, σ as the timestep and dev's guidance, unpacked."""
    from dreambooth import families
    from dreambooth.families.base import ResolvedModel
    from dreambooth.families.flux.family import pack

    model = ResolvedModel.of_folder(flux)
    family = families.get(model.family)
    assert family.name == "flux-dev" and family.denoiser_name == "transformer"
    c = family.load(model, f32())
    c.extra.update(guidance=3.5, t5_length=32)
    pipe = pipeline(flux)
    prompts = ["a photo of sks thing", ""]
    with torch.no_grad():
        ours = family.encode(c, prompts)
        hidden, pooled, text_ids = pipe.encode_prompt(prompts, prompt_2=None, max_sequence_length=32)
    assert torch.equal(ours["hidden"], hidden) and torch.equal(ours["pooled"], pooled)
    noisy, sigmas = inputs()
    b, ch, h, w = noisy.shape
    assert torch.equal(pack(noisy), pipe._pack_latents(noisy, b, ch, h, w))
    with torch.no_grad():
        pred = family.predict(c, noisy, sigmas, ours)
        theirs = pipe.transformer(
            hidden_states=pipe._pack_latents(noisy, b, ch, h, w), timestep=sigmas,
            guidance=torch.full((b,), 3.5), pooled_projections=pooled, encoder_hidden_states=hidden,
            txt_ids=text_ids, img_ids=pipe._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32),
        ).sample  # fmt: skip
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    assert torch.equal(pred, pipe._unpack_latents(theirs, h * vae_factor, w * vae_factor, vae_factor))


def _lora_weights(out, step):
    return load_file(out / "checkpoints" / f"step-{step}" / "lora" / "transformer.safetensors")


def test_lora_from_comfy_files_trains_resumes_bit_identically_and_samples(cli, files, photos, tmp_path, monkeypatch):
    """The transformer's file + --clip-l/--t5xxl/--ae, CLIP-L's LoRA too: stopped at step 2 and resumed equals the
    run straight through; samples come from the Flux pipeline; the report says what ran."""
    flags = (*flux_args(files), *FLUX_FLAGS, *LORA, "--max-train-steps", 4, "--learning-rate", "1e-2",
             "--train-text-encoder", "--random-flip", "--save-sample-prompt", "a photo of sks thing",
             "--n-save-sample", 1, "--save-infer-steps", 2)  # fmt: skip
    straight = cli(*base_args(files["transformer"], photos, tmp_path / "a", *flags))
    assert straight.exit_code == 0, straight.stderr
    sigterm_at_step(monkeypatch, 2)
    assert cli(*base_args(files["transformer"], photos, tmp_path / "b", *flags)).exit_code == 130
    monkeypatch.undo()
    resumed = cli(*base_args(files["transformer"], photos, tmp_path / "b", *flags))
    assert resumed.exit_code == 0, resumed.stderr
    for name in ("transformer", "text_encoder"):
        a, b = (load_file(tmp_path / run / "checkpoints" / "step-4" / "lora" / f"{name}.safetensors") for run in "ab")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    report = json.loads((tmp_path / "a" / "train_report.json").read_text())
    assert (report["family"], report["objective"], report["prediction_type"]) == ("flux-dev", "flow-matching", "flow")
    assert report["model"]["parts"]["text_encoder_2"] == str(files["text_encoder_2"])
    assert json.loads((tmp_path / "b" / "train_report.json").read_text())["losses"] == report["losses"]
    assert all(len(x) == 4 and all(map(lambda v: v == v, x)) for x in [report["losses"]["loss"]])
    info = json.loads((tmp_path / "a" / "checkpoints" / "step-4" / "lora" / "lora.json").read_text())
    assert info["family"] == "flux-dev" and info["transformer_layout"]["num_single_layers"] == 2
    assert len(info["components"]["transformer"]["ranks"]) == 2 * 14 + 2 * 6  # all-linear: kohya's default
    assert (tmp_path / "a" / "checkpoints" / "step-4" / "samples" / "prompt0-00.png").is_file()


def test_lora_loss_falls(cli, flux, photos, tmp_path):
    result = cli(*base_args(flux, photos, tmp_path / "out", *FLUX_FLAGS, *LORA, "--lora-rank", 8,
                            "--max-train-steps", 20, "--learning-rate", "1e-2"))  # fmt: skip
    assert result.exit_code == 0, result.stderr
    losses = json.loads((tmp_path / "out" / "train_report.json").read_text())["losses"]["loss"]
    assert sum(losses[-6:]) / 6 < 0.9 * sum(losses[:6]) / 6, losses  # seen: 1.53 → 1.24


def _trained(flux, checkpoint):
    """Our trained model: the base, the adapter's LoRA layers, the checkpoint restored into them."""
    from dreambooth import adapters, families
    from dreambooth.families.base import ResolvedModel
    from dreambooth.launch import read_settings

    state = torch.load(checkpoint / "training_state.pt", weights_only=False)
    settings = checkpoint.parent.parent / "settings.json"
    settings.write_text(json.dumps(state["config"]))
    cfg = read_settings(settings)
    model = ResolvedModel.of_folder(flux)
    family = families.get(model.family)
    c = family.load(model, f32())
    c.extra.update(guidance=cfg.guidance_scale, t5_length=cfg.t5_max_length)
    lora = adapters.get("lora")
    lora.prepare(c, cfg, family)
    lora.restore(c, checkpoint, state)
    return family, c


def _outputs(family, c, prompt="a photo of sks thing"):
    noisy, sigmas = inputs(1)
    with torch.no_grad():
        cond = family.encode(c, [prompt, prompt])
        return cond["pooled"], family.predict(c, noisy, sigmas, cond)


def rel_err(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_exported_lora_computes_what_we_trained_in_every_form(cli, flux, photos, tmp_path):
    """kohya's fused file, applied to BFL's weights as ComfyUI applies it (scale = alpha / rows of the down);
    diffusers' own file loaded by FluxPipeline.load_lora_weights; the merged transformer (+ CLIP-L) file."""
    from dreambooth import families
    from dreambooth.checkpoint.keymap import build_original, from_original
    from dreambooth.families.base import Part, ResolvedModel
    from dreambooth.families.flux.layout import transformer_sources

    out = tmp_path / "out"
    flags = (*FLUX_FLAGS, *LORA, "--max-train-steps", 3, "--learning-rate", "3e-2", "--train-text-encoder",
             "--lora-targets", "attention,feed-forward,projections,modulation")  # fmt: skip
    assert cli(*base_args(flux, photos, out, *flags)).exit_code == 0
    checkpoint = out / "checkpoints" / "step-3"
    family, c = _trained(flux, checkpoint)
    ours = _outputs(family, c)
    base_c = family.load(ResolvedModel.of_folder(flux), f32())
    base_c.extra.update(guidance=1.0, t5_length=32)
    base = _outputs(family, base_c)
    assert all(rel_err(o, b) > 1e-3 for o, b in zip(ours, base, strict=True)), "the LoRA did nothing"

    # kohya's layout, as ComfyUI applies it: W_fused += up @ down · alpha / rows(down)
    kohya = tmp_path / "sks.safetensors"
    assert cli("export", checkpoint, kohya, "--no-half").exit_code == 0
    lora = load_file(kohya)
    assert "lora_unet_single_blocks_0_linear1.lora_down.weight" in lora  # q, k, v and the MLP input, fused
    assert lora["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape == (16, 32)
    assert float(lora["lora_unet_single_blocks_0_linear1.alpha"]) == 8.0  # 4 parts × alpha 2: alpha / rank kept
    state = base_c.denoiser.state_dict()
    config = dict(base_c.denoiser.config)
    sources = transformer_sources(config)
    original = build_original(sources, state)
    for name in {k.rsplit(".", 2)[0] for k in lora if k.startswith("lora_unet_") and k.endswith("down.weight")}:
        down, up, alpha = (lora[f"{name}.{s}"].float() for s in ("lora_down.weight", "lora_up.weight", "alpha"))
        key = next(k for k in original if k.replace(".", "_") == name.removeprefix("lora_unet_") + "_weight")
        original[key] = original[key] + up @ down * (alpha / down.shape[0])
    back, missing = from_original(sources, original, {k: tuple(v.shape) for k, v in state.items()})
    comfy = family.load(ResolvedModel.of_folder(flux), f32())
    comfy.denoiser.load_state_dict(back)
    comfy.text_encoders["text_encoder"] = c.text_encoders["text_encoder"]  # CLIP-L's LoRA: checked below
    comfy.extra.update(guidance=1.0, t5_length=32)
    assert not missing and rel_err(_outputs(family, comfy)[1], ours[1]) < 1e-5

    # diffusers' own layout, through FluxPipeline.load_lora_weights (fused into the weights, as UIs apply it)
    folder = tmp_path / "sks-diffusers"
    assert cli("export", checkpoint, folder, "--format", "diffusers").exit_code == 0
    pipe = pipeline(flux)
    pipe.load_lora_weights(folder)
    pipe.fuse_lora()
    loaded = family.load(ResolvedModel.of_folder(flux), f32())
    loaded.denoiser, loaded.text_encoders["text_encoder"] = pipe.transformer, pipe.text_encoder
    loaded.extra.update(guidance=1.0, t5_length=32)
    errors = [rel_err(got, o) for got, o in zip(_outputs(family, loaded), ours, strict=True)]
    assert max(errors) < 2e-3, errors  # fp16 in the file

    # merged: the transformer file ComfyUI's "Load Diffusion Model" reads, and CLIP-L's beside it
    merged = tmp_path / "sks-merged.safetensors"
    result = cli("export", checkpoint, merged, "--merge", "--no-half")
    assert result.exit_code == 0, result.stderr
    parts = {"transformer": Part(merged), "text_encoder": Part(tmp_path / "sks-merged-clip_l.safetensors")}
    files = write_flux_files(tmp_path / "base-files")
    parts |= {role: Part(files[role]) for role in ("text_encoder_2", "vae")}
    baked = families.get("flux-dev").load(ResolvedModel("flux-dev", parts=parts), f32())
    baked.extra.update(guidance=1.0, t5_length=32)
    errors = [rel_err(got, o) for got, o in zip(_outputs(family, baked), ours, strict=True)]
    assert max(errors) < 1e-5, errors
    with safe_open(str(merged), "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "flux-1-dev"


def test_full_fine_tune_keeps_what_trained_resumes_and_exports_the_transformer(cli, files, photos, tmp_path,
                                                                               monkeypatch):  # fmt: skip
    """A full run's checkpoint holds the transformer (and no 9.5 GB T5 copy) and where the base's parts are; it
    resumes bit-identically and exports BFL's single file."""
    flags = (*flux_args(files), *FLUX_FLAGS, "--max-train-steps", 4, "--save-interval", 100,
             "--learning-rate", "1e-3", "--export-single-file")  # fmt: skip
    assert cli(*base_args(files["transformer"], photos, tmp_path / "a", *flags)).exit_code == 0
    sigterm_at_step(monkeypatch, 2)
    assert cli(*base_args(files["transformer"], photos, tmp_path / "b", *flags)).exit_code == 130
    monkeypatch.undo()
    assert cli(*base_args(files["transformer"], photos, tmp_path / "b", *flags)).exit_code == 0
    checkpoint = tmp_path / "a" / "checkpoints" / "step-4"
    assert {p.name for p in checkpoint.iterdir()} == {"dreambooth.json", "training_state.pt", "transformer"}
    record = json.loads((checkpoint / "dreambooth.json").read_text())
    assert record["base_model"]["parts"]["text_encoder_2"] == str(files["text_encoder_2"])
    a, b = (load_file(tmp_path / run / "checkpoints" / "step-4" / "transformer" / "diffusion_pytorch_model.safetensors")
            for run in "ab")  # fmt: skip
    assert all(torch.equal(a[k], b[k]) for k in a)
    base = load_file(files["transformer"])
    exported = tmp_path / "a" / "export" / "a-step-4.safetensors"
    with safe_open(str(exported), "pt") as f:
        assert set(f.keys()) == set(base) and f.get_tensor("img_in.weight").dtype == torch.bfloat16
        assert not torch.equal(f.get_tensor("double_blocks.0.img_attn.qkv.weight").float(),
                               base["double_blocks.0.img_attn.qkv.weight"].bfloat16().float())  # fmt: skip


def test_class_images_come_from_the_flux_pipeline(cli, files, photos, tmp_path):
    out = tmp_path / "out"
    result = cli(*base_args(files["transformer"], photos, out, *flux_args(files), *FLUX_FLAGS, *LORA,
                            "--max-train-steps", 2, "--with-prior-preservation", "--class-prompt", "a photo of thing",
                            "--class-data-dir", out / "class", "--num-class-images", 2, "--class-inference-steps", 2,
                            "--sample-batch-size", 2))  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert len(list((out / "class").glob("*.png"))) == 2
    report = json.loads((out / "train_report.json").read_text())
    assert report["class_images"] == 2 and report["losses"]["class"][0] > 0


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (("--resolution", 40), "multiple of 16"),
        (("--snr-gamma", 5), "--snr-gamma"),
        (("--zero-terminal-snr",), "--zero-terminal-snr"),
        (("--lora-targets", "to_q,banana"), "banana"),
        (("--lora-conv-rank", 4), "--lora-conv-rank"),
    ],
)
def test_settings_that_mean_nothing_for_flux_are_one_line_and_exit_2(cli, flux, photos, tmp_path, flags, expected):
    result = cli(*base_args(flux, photos, tmp_path / "out", *FLUX_FLAGS, *LORA, *flags))
    assert result.exit_code == 2, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_a_schnell_lora_is_not_merged_onto_dev(cli, photos, tmp_path):
    schnell = write_tiny_flux(tmp_path / "schnell", model_type="flux-schnell")
    dev = write_tiny_flux(tmp_path / "dev")
    assert cli(*base_args(schnell, photos, tmp_path / "out", *FLUX_FLAGS, *LORA, "--max-train-steps", 1)).exit_code == 0
    report = json.loads((tmp_path / "out" / "train_report.json").read_text())
    assert report["family"] == "flux-schnell" and report["settings"]["save_infer_steps"] == 4
    result = cli("export", tmp_path / "out" / "checkpoints" / "step-1", tmp_path / "m.safetensors", "--merge",
                 "--base", dev)  # fmt: skip
    assert result.exit_code == 2 and "FLUX.1 [schnell]" in result.stderr and "--base" in result.stderr


def test_flux_flags_on_a_stable_diffusion_model_are_refused(cli, model, photos, files, tmp_path):
    result = cli(*base_args(model, photos, tmp_path / "out", "--clip-l", files["text_encoder"]))
    assert result.exit_code == 2 and "--clip-l" in result.stderr and "Flux" in result.stderr


def test_run_trains_flux_from_its_files_in_place_and_a_rerun_skips(cli, files, photos, tmp_path):
    """`dreambooth run` with run.toml naming ComfyUI's four files: nothing is converted or copied, class images,
    training and the LoRA export happen, and the same command again skips every stage."""
    out = tmp_path / "out"
    config = tmp_path / "run.toml"
    config.write_text(
        f'model = "{files["transformer"]}"\nclip_l = "{files["text_encoder"]}"\nt5xxl = "{files["text_encoder_2"]}"\n'
        f'ae = "{files["vae"]}"\noutput = "{out}"\n[train]\ninstance_data_dir = "{photos}"\n'
        'instance_prompt = "a photo of sks thing"\nresolution = 32\nmax_train_steps = 2\nadapter = "lora"\n'
        't5_max_length = 32\nwith_prior_preservation = true\nclass_prompt = "a photo of thing"\n'
        "num_class_images = 2\nclass_inference_steps = 2\nseed = 3\n"
    )
    first = cli("run", "--config", config)
    assert first.exit_code == 0, first.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    stages = {name: record["status"] for name, record in manifest["stages"].items()}
    assert stages == {"convert": "not needed", "classes": "done", "train": "done", "export": "done"}
    assert set(manifest["stages"]["train"]["inputs"]["base"]["files"]) == {"transformer", "text_encoder",
                                                                          "text_encoder_2", "vae"}  # fmt: skip
    assert not (out / "base").exists() and (out / "export" / "flux1-dreambooth-lora-step-2.safetensors").is_file()
    again = cli("run", "--config", config)
    assert again.exit_code == 0, again.stderr
    stages = {n: r["status"] for n, r in json.loads((out / "manifest.json").read_text())["stages"].items()}
    assert stages == {"convert": "not needed", "classes": "skipped", "train": "skipped", "export": "skipped"}


def test_two_processes_train_a_flux_lora_like_one(tmp_path, files, photos, monkeypatch):
    """DDP over the peft-wrapped transformer and CLIP-L, the model read from ComfyUI's files in each process: two
    processes × batch 1 learn what one process learns with batch 2 (to float rounding)."""
    from tests.test_distributed import launch, train_here

    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    flags = (*flux_args(files), *FLUX_FLAGS, *LORA, "--train-text-encoder", "--max-train-steps", 3,
             "--learning-rate", "1e-3", "--random-flip")  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    train_here(*base_args(files["transformer"], photos, one, *flags, "--train-batch-size", 2))
    launch(tmp_path, *base_args(files["transformer"], photos, two, *flags, "--num-processes", 2))
    report_one, report_two = (json.loads((out / "train_report.json").read_text()) for out in (one, two))
    assert report_two["world_size"] == 2 and report_two["family"] == "flux-dev"
    assert report_one["losses"]["loss"] == pytest.approx(report_two["losses"]["loss"], abs=1e-5)
    for part in ("transformer", "text_encoder"):
        a, b = (load_file(out / "checkpoints" / "step-3" / "lora" / f"{part}.safetensors") for out in (one, two))
        assert a.keys() == b.keys() and any("lora_B" in k for k in a)
        for key in a:
            assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-3), (part, key)


def test_a_bf16_full_fine_tune_keeps_the_transformer_in_bf16(cli, flux, photos, tmp_path):
    """Flux's full fine-tune with --mixed-precision bf16 keeps its weights in bf16 (kohya's --full_bf16): no fp32
    master copy of 12 B parameters. --full-bf16 anywhere else is one line."""
    import subprocess
    import sys

    out = tmp_path / "out"
    # in a process of its own: accelerate's state is one per process, and this one is bf16
    args = base_args(flux, photos, out, *FLUX_FLAGS, "--max-train-steps", 2, "--save-interval", 100,
                     "--mixed-precision", "bf16", "--learning-rate", "1e-3")  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "dreambooth", *map(str, args)], capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "train_report.json").read_text())
    assert report["settings"]["full_bf16"] is True and all(x == x for x in report["losses"]["loss"])
    weights = load_file(out / "checkpoints" / "step-2" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    assert not torch.equal(weights["x_embedder.weight"], load_file(
        flux / "transformer" / "diffusion_pytorch_model.safetensors")["x_embedder.weight"].bfloat16())  # fmt: skip
    refused = cli(*base_args(flux, photos, tmp_path / "x", "--full-bf16", "--mixed-precision", "no"))
    assert refused.exit_code == 2 and "--full-bf16" in refused.stderr and "bf16" in refused.stderr
