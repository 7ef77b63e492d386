"""`dreambooth train --adapter lora`: what trains, what a checkpoint holds, resume, levers, and bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dreambooth.families.base import Dtypes, ResolvedModel
from tests.train_helpers import base_args, sigterm_at_step

LORA = ("--adapter", "lora", "--lora-rank", 4, "--lora-alpha", 2, "--save-interval", 100)
# everything that draws random numbers or carries state across steps, with a LoRA on both models
HARD = (
    *LORA, "--max-train-steps", 6, "--learning-rate", "1e-3", "--train-batch-size", 2, "--train-text-encoder",
    "--text-encoder-lr", "5e-4", "--random-flip", "--gradient-accumulation-steps", 2, "--lr-scheduler", "cosine",
    "--lr-warmup-steps", 2, "--offset-noise", 0.05, "--snr-gamma", 5, "--no-cache-latents", "--lora-dropout", 0.1,
    "--lora-conv-rank", 2,
)  # fmt: skip


def adapter(out, step):
    folder = out / "checkpoints" / f"step-{step}" / "lora"
    return {p.stem: load_file(p) for p in folder.glob("*.safetensors")}


def test_lora_checkpoint_holds_the_adapter_and_the_training_state_only(cli, model, photos, tmp_path):
    out = tmp_path / "out"
    result = cli(*base_args(model, photos, out, *LORA, "--max-train-steps", 3, "--train-text-encoder"))
    assert result.exit_code == 0, result.stderr
    checkpoint = out / "checkpoints" / "step-3"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["dreambooth.json", "lora", "training_state.pt"]
    weights = adapter(out, 3)
    assert set(weights) == {"unet", "text_encoder"}
    # the LoRA learned something: B started at zero and moved
    ups = [v for k, v in weights["unet"].items() if "lora_B" in k]
    assert ups and all(torch.isfinite(v).all() for v in ups) and any(v.abs().sum() > 0 for v in ups)
    # only LoRA weights in the optimizer: Adam's moments are the LoRA's size, not the UNet's
    state = torch.load(checkpoint / "training_state.pt", weights_only=False)
    moments = sum(s["exp_avg"].numel() for s in state["optimizer"]["state"].values())
    lora_numel = sum(v.numel() for part in weights.values() for v in part.values())
    assert moments == lora_numel
    report = json.loads((out / "train_report.json").read_text())
    assert report["adapter"] == "lora" and report["lora_rank"] == 4 and report["lora_alpha"] == 2.0
    assert report["learning_rate"] == 1e-4 and "default" in report["learning_rate_from"]
    assert report["trainable_parameters"] == lora_numel
    # the base model is untouched
    base = load_file(model / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.isfinite(v).all() for v in base.values())


def test_lora_stopped_and_resumed_is_bit_identical(cli, model, photos, tmp_path, monkeypatch):
    straight = cli(*base_args(model, photos, tmp_path / "a", *HARD))
    assert straight.exit_code == 0, straight.stderr

    sigterm_at_step(monkeypatch, 3)
    stopped = cli(*base_args(model, photos, tmp_path / "b", *HARD))
    assert stopped.exit_code == 130
    monkeypatch.undo()
    resumed = cli(*base_args(model, photos, tmp_path / "b", *HARD))
    assert resumed.exit_code == 0, resumed.stderr
    assert "resuming from" in resumed.stderr + resumed.stdout

    a, b = adapter(tmp_path / "a", 6), adapter(tmp_path / "b", 6)
    assert a.keys() == b.keys() == {"unet", "text_encoder"}
    for part in a:
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert any(".conv1." in k for k in a["unet"])  # --lora-conv-rank put LoRA on the ResNet convolutions
    losses_a = json.loads((tmp_path / "a" / "train_report.json").read_text())["losses"]
    losses_b = json.loads((tmp_path / "b" / "train_report.json").read_text())["losses"]
    assert losses_a == losses_b


def test_lora_levers_train_the_same(cli, model, photos, tmp_path):
    """Gradient checkpointing and cached latents change how, not what: the same LoRA to rounding."""
    common = (*LORA, "--max-train-steps", 3, "--learning-rate", "1e-3", "--train-text-encoder")
    plain = cli(*base_args(model, photos, tmp_path / "a", *common, "--no-cache-latents"))
    levers = cli(*base_args(model, photos, tmp_path / "b", *common, "--gradient-checkpointing", "--no-cache-latents"))
    assert plain.exit_code == 0 and levers.exit_code == 0, plain.stderr + levers.stderr
    a, b = adapter(tmp_path / "a", 3), adapter(tmp_path / "b", 3)
    for part in a:
        for key in a[part]:
            assert torch.allclose(a[part][key], b[part][key], atol=1e-6, rtol=1e-4), (part, key)
    moved = [a["text_encoder"][k].abs().sum() for k in a["text_encoder"] if "lora_B" in k]
    assert any(m > 0 for m in moved), "the text encoder's LoRA got no gradient"


def test_lora_with_prior_preservation_and_class_images(cli, model, photos, tmp_path):
    out = tmp_path / "out"
    args = base_args(
        model, photos, out, *LORA, "--max-train-steps", 2, "--with-prior-preservation", "--class-prompt",
        "a photo of thing", "--class-data-dir", tmp_path / "classes", "--num-class-images", 2,
        "--class-inference-steps", 2, "--export-single-file",
    )  # fmt: skip
    result = cli(*args)
    assert result.exit_code == 0, result.stderr
    assert len(list((tmp_path / "classes").glob("*.png"))) == 2
    report = json.loads((out / "train_report.json").read_text())
    assert report["class_images"] == 2 and all(v >= 0 for v in report["losses"]["class"])
    exported = out / "export" / "out-lora-step-2.safetensors"
    assert exported.is_file() and exported.stat().st_size < 200_000
    assert all(k.startswith("lora_unet_") for k in load_file(exported))


def test_switching_adapter_on_an_existing_output_is_refused(cli, model, photos, tmp_path):
    out = tmp_path / "out"
    assert cli(*base_args(model, photos, out, "--max-train-steps", 1)).exit_code == 0
    result = cli(*base_args(model, photos, out, *LORA, "--max-train-steps", 2))
    assert result.exit_code == 2 and "--adapter" in result.stderr and len(result.stderr.strip().splitlines()) <= 2


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (("--lora-rank", 0), "--lora-rank"),
        (("--lora-rank", -4), "--lora-rank"),
        (("--lora-alpha", 0), "--lora-alpha"),
        (("--lora-targets", "to_q,attn_banana"), "attn_banana"),
        (("--lora-dropout", 1.5), "--lora-dropout"),
        (("--distributed", "deepspeed-zero3"), "deepspeed-zero3"),
        (("--adapter", "dora"), "--adapter"),
    ],
)
def test_bad_lora_settings_are_one_line_and_exit_2(cli, model, photos, tmp_path, flags, expected):
    args = base_args(model, photos, tmp_path / "out", "--adapter", "lora", *flags)
    result = cli(*args)
    assert result.exit_code == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()


def _outputs(unet, text_encoder, tokenizer, prompt="a photo of sks thing"):
    """The text encoder's hidden states for a prompt and the UNet's prediction on fixed noise."""
    ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn(1, unet.config.in_channels, 16, 16, generator=generator)
    with torch.no_grad():
        hidden = text_encoder(ids.input_ids)[0]
        return hidden.float(), unet(noisy, torch.tensor([500]), hidden).sample.float()


def _lora_layers(module) -> int:
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(m, LoraLayer) for m in module.modules())


def test_exported_lora_files_reproduce_the_trained_model_in_diffusers(cli, model, photos, tmp_path):
    """The files users get: the kohya file and the diffusers folder, loaded by diffusers' own load_lora_weights into
    the base pipeline, and the merged single file, all compute what our trained model computes."""
    from diffusers import StableDiffusionPipeline

    from dreambooth import adapters, families
    from dreambooth.launch import read_settings

    out = tmp_path / "out"
    flags = (*LORA, "--max-train-steps", 3, "--learning-rate", "3e-2", "--train-text-encoder", "--lora-conv-rank", 2,
             "--lora-targets", "attention,feed-forward,projections")  # fmt: skip
    assert cli(*base_args(model, photos, out, *flags)).exit_code == 0
    checkpoint = out / "checkpoints" / "step-3"

    # our trained model: the base, the adapter's LoRA layers, the checkpoint restored into them
    state = torch.load(checkpoint / "training_state.pt", weights_only=False)
    (tmp_path / "settings.json").write_text(json.dumps(state["config"]))
    cfg = read_settings(tmp_path / "settings.json")
    family = families.of_folder(model)
    c = family.load(ResolvedModel.of_folder(model), Dtypes(torch.float32, torch.float32, torch.float32))
    lora = adapters.get("lora")
    lora.prepare(c, cfg, family)
    lora.restore(c, checkpoint, state)
    ours = _outputs(c.denoiser, c.text_encoders["text_encoder"], c.tokenizers["text_encoder"])
    modules = _lora_layers(c.denoiser) + _lora_layers(c.text_encoders["text_encoder"])
    base = _outputs(*(lambda p: (p.unet, p.text_encoder, p.tokenizer))(StableDiffusionPipeline.from_pretrained(model)))
    assert not torch.allclose(ours[1], base[1], atol=1e-3), "the LoRA did not change the model"

    kohya = tmp_path / "sks-lora.safetensors"
    assert cli("export", checkpoint, kohya).exit_code == 0
    folder = tmp_path / "sks-lora-diffusers"
    assert cli("export", checkpoint, folder, "--format", "diffusers").exit_code == 0
    for source in (kohya, folder):
        pipe = StableDiffusionPipeline.from_pretrained(model)
        pipe.load_lora_weights(source)
        pipe.fuse_lora()  # in the base weights, as the WebUI applies it
        # every module of our LoRA found its place: none left unloaded
        assert _lora_layers(pipe.unet) + _lora_layers(pipe.text_encoder) == modules, source
        theirs = _outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)
        for mine, got in zip(ours, theirs, strict=True):
            assert torch.allclose(mine, got, atol=2e-3, rtol=2e-3), (source, (mine - got).abs().max())

    merged = tmp_path / "sks-merged.safetensors"
    assert cli("export", checkpoint, merged, "--merge").exit_code == 0
    assert cli("convert", merged, tmp_path / "merged").exit_code == 0
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    theirs = _outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    for mine, got in zip(ours, theirs, strict=True):
        assert torch.allclose(mine, got, atol=2e-3, rtol=2e-3), ("merged", (mine - got).abs().max())
