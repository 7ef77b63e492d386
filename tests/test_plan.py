"""`dreambooth plan` / `train --dry-run` and `--vram-budget`: the estimate's parts against what training really holds,
the fake-tensor measurement against the same step on real tensors, and the levers a budget picks."""

import json
from dataclasses import replace

import pytest
import torch

from dreambooth import families, plan
from dreambooth.config import build_train_config
from dreambooth.families.base import ResolvedModel
from tests.flux_helpers import FLUX_FLAGS, write_flux_files
from tests.train_helpers import base_args, config_only_folder

LORA = ("--adapter", "lora", "--lora-rank", 4)


def plan_of(cli, *args) -> dict:
    result = cli("--log-format", "json", "plan", *args)
    assert result.exit_code == 0, result.stderr + result.stdout
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return next(e for e in events if e["event"] == "plan")


def line(lines: list[dict], part: str) -> int:
    return next(x["bytes"] for x in lines if x["part"] == part)


def config(model, photos, tmp_path, **settings):
    flags = {"model": str(model), "instance_data_dir": str(photos), "instance_prompt": "a photo of sks thing",
             "output": str(tmp_path / "out"), "resolution": 32, **settings}  # fmt: skip
    return build_train_config(None, flags)


def test_plan_counts_what_training_holds(cli, model, photos, tmp_path):
    """Weights and the LoRA's size, gradients and Adam's moments are what the run really has: the report's
    trainable parameters and the base's own tensors; `train --dry-run` prints the same and writes nothing."""
    from safetensors.torch import load_file

    args = base_args(model, photos, tmp_path / "out", *LORA, "--max-train-steps", 1)[1:]
    estimate = plan_of(cli, *args)
    assert estimate["estimate"] is True and estimate["family"] == "sd1"
    unet = load_file(model / "unet" / "diffusion_pytorch_model.safetensors")
    assert line(estimate["training"], "unet weights") == sum(t.numel() * 4 for t in unet.values())  # fp32
    assert cli(*base_args(model, photos, tmp_path / "out", *LORA, "--max-train-steps", 1)).exit_code == 0
    trained = json.loads((tmp_path / "out" / "train_report.json").read_text())["trainable_parameters"]
    assert line(estimate["training"], "LoRA weights") == trained * 4
    assert line(estimate["training"], "gradients") == trained * 4
    assert line(estimate["training"], "optimizer states") == trained * 8  # AdamW: two fp32 moments
    assert line(estimate["training"], "activations") > 0

    dry = cli("train", *args[:-2], "--output", tmp_path / "dry", "--dry-run")
    assert dry.exit_code == 0 and "an estimate, not a measurement" in dry.stdout
    assert "peak allocated by PyTorch" in dry.stdout and not (tmp_path / "dry").exists()


def test_plan_counts_a_stored_base_as_training_stores_it(cli, model, photos, tmp_path):
    """fp8: the report of a real run says how many bytes its stored layers took; the plan's unet line is those
    bytes plus the unstored rest in the run's precision."""
    flags = (*LORA, "--max-train-steps", 1, "--base-precision", "fp8")
    estimate = plan_of(cli, *base_args(model, photos, tmp_path / "out", *flags)[1:])
    assert cli(*base_args(model, photos, tmp_path / "out", *flags)).exit_code == 0
    report = json.loads((tmp_path / "out" / "train_report.json").read_text())
    family = families.of_folder(model)
    with torch.device("meta"):
        unet = plan.skeleton(ResolvedModel.of_folder(model))["unet"]
    names = plan.storable(unet, family.blocks(unet), "fp8")
    layers = {id(unet.get_submodule(n).weight) for n in names}
    rest = sum(p.numel() * 4 for p in unet.parameters() if id(p) not in layers)
    assert line(estimate["training"], "unet weights") == report["base_storage"]["unet"]["bytes"] + rest


def test_the_fake_step_counts_what_the_real_step_allocates():
    """The activations are measured on fake tensors: the same counter over the same step on real tensors agrees."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dreambooth.memory import measure_step

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
        model[0].weight.requires_grad_(False)
        return model

    def step_of(model):
        def step():
            x = torch.randn(32, 64)
            model(x).square().mean().backward()

        return step

    real = measure_step(step_of(build()), None)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = measure_step(step_of(build()), None)
    assert real == fake and real.activations > 32 * 256 * 4  # at least the hidden activations were counted


def test_activations_grow_with_resolution_and_shrink_with_checkpointing(model, photos, tmp_path):
    family = families.of_folder(model)
    resolved = ResolvedModel.of_folder(model)

    def activations(**settings):
        cfg = plan.with_defaults(config(model, photos, tmp_path, adapter="lora", **settings), family)
        return plan.measure(cfg, family, resolved, torch.float32).activations

    small, large = activations(resolution=32), activations(resolution=64)
    assert 3 * small < large < 5 * small  # four times the pixels
    assert activations(resolution=64, gradient_checkpointing=True) < large


def test_a_budget_picks_levers_the_user_left_open(cli, model, photos, tmp_path):
    family = families.of_folder(model)
    resolved = ResolvedModel.of_folder(model)
    # at 128 px the tiny UNet's activations outweigh the caching pass
    as_set = plan.estimate(plan.with_defaults(config(model, photos, tmp_path, adapter="lora", resolution=128), family),
                           family, resolved)  # fmt: skip
    checkpointed = plan.estimate(
        plan.with_defaults(config(model, photos, tmp_path, adapter="lora", resolution=128, gradient_checkpointing=True),
                           family),
        family, resolved,
    )  # fmt: skip
    assert checkpointed.needs < as_set.needs
    budget = f"{(checkpointed.needs + as_set.needs) / 2 / 2**20:.3f}MB"
    flags = base_args(model, photos, tmp_path / "out", *LORA, "--resolution", 128, "--vram-budget", budget)[1:]
    chosen = plan_of(cli, *flags)
    assert chosen["settings"]["gradient_checkpointing"] is True
    assert chosen["chosen"] == [plan.WHY["gradient_checkpointing"]]
    assert chosen["card_needs_bytes"] <= chosen["vram_budget_bytes"]
    # set by the user: never changed (here nothing else fits, and the message says what was reached without it)
    kept = cli("plan", *flags, "--no-gradient-checkpointing")
    assert kept.exit_code == 2 and "gradient_checkpointing False" in kept.stderr
    # and training takes what the plan chose, and says so
    run = cli(*base_args(model, photos, tmp_path / "run", *LORA, "--resolution", 128, "--max-train-steps", 1,
                         "--vram-budget", budget))  # fmt: skip
    assert run.exit_code == 0, run.stderr
    assert f"--vram-budget {budget}: gradient checkpointing" in run.stdout + run.stderr


def test_a_budget_nothing_meets_is_one_line_and_exit_2(cli, model, photos, tmp_path):
    result = cli("plan", *base_args(model, photos, tmp_path / "out", *LORA, "--vram-budget", "1MB")[1:])
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert "--vram-budget 1MB: no setting fits; the smallest reachable is about" in result.stderr


def test_plan_reads_flux_files_and_a_single_sd_file_without_loading_or_converting(cli, tiny_sd1, photos, tmp_path):
    files = write_flux_files(tmp_path / "flux")
    parts = ("--clip-l", files["text_encoder"], "--t5xxl", files["text_encoder_2"], "--ae", files["vae"])
    flags = (*LORA, *FLUX_FLAGS, *parts, "--base-precision", "fp8", "--blocks-to-swap", 2)
    flux = plan_of(cli, *base_args(files["transformer"], photos, tmp_path / "out", *flags)[1:])
    assert flux["family"] == "flux-dev"
    assert line(flux["training"], "swapped blocks in flight") > 0
    assert line(flux["host_training"], "swapped blocks") > 0
    cache = tmp_path / "cache"
    single = plan_of(cli, *base_args(tiny_sd1, photos, tmp_path / "out", *LORA, "--cache-dir", cache)[1:])
    assert single["family"] == "sd1" and not (cache / "converted").exists()


@pytest.mark.slow
def test_full_size_flux_lora_plan_and_a_12gb_budget(photos, tmp_path):
    """The released FLUX.1 [dev] shapes (from the bundled configs): the transformer's 11.9 B weights at 2 bytes in
    bf16 and about 1 byte in fp8; a 12 GB budget takes checkpointing, 8-bit Adam, fp8 and swapped blocks."""
    folder = config_only_folder("flux-dev", tmp_path / "flux")
    family = families.get("flux-dev")
    resolved = ResolvedModel("flux-dev", folder=folder)
    settings = {"adapter": "lora", "resolution": 1024, "mixed_precision": "bf16", "gradient_checkpointing": True}
    cfg = plan.with_defaults(config(folder, photos, tmp_path, **settings), family)
    bf16 = plan.estimate(cfg, family, resolved)
    weights = line(bf16.to_dict()["training"], "transformer weights")
    assert weights == 11_901_408_320 * 2
    fp8 = plan.estimate(replace(cfg, base_precision="fp8"), family, resolved)
    assert 11.0 < line(fp8.to_dict()["training"], "transformer weights") / 2**30 < 11.3
    chosen, fitted = plan.fit_budget(
        plan.with_defaults(config(folder, photos, tmp_path, adapter="lora", resolution=1024, mixed_precision="bf16",
                                  vram_budget="12GB"), family),
        family, resolved,
    )  # fmt: skip
    assert fitted.needs <= 12 * 2**30 and chosen.base_precision in ("fp8", "nf4") and chosen.gradient_checkpointing
