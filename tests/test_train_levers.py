"""Speed and memory levers, trackers and --vae: each changes how training runs, never what it computes (unless
it is meant to), and each is checked here on the CPU. What they save on a GPU is measured by bench/train.py."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dreambooth import families, performance
from dreambooth.config import build_train_config
from dreambooth.errors import UserError
from dreambooth.tiny_model import write_tiny_diffusers
from tests.train_helpers import base_args, write_photos

UNET = ("unet", "diffusion_pytorch_model.safetensors")
# no clipping: the step inside backward cannot clip (it updates before all gradients exist)
RUN = (
    "--max-train-steps", 4, "--learning-rate", "1e-3", "--train-batch-size", 2, "--max-grad-norm", 0,
    "--lr-scheduler", "cosine", "--lr-warmup-steps", 1, "--random-flip", "--save-interval", 2,
)  # fmt: skip


@pytest.fixture(scope="module")
def usual(tmp_path_factory, model, photos):
    """The reference run: one AdamW step after backward."""
    from dreambooth.cli import main

    out = tmp_path_factory.mktemp("usual")
    main([str(a) for a in base_args(model, photos, out, *RUN)])
    return out


def _unet(out, step):
    return load_file(out.joinpath("checkpoints", f"step-{step}", *UNET))


def _report(out):
    return json.loads((out / "train_report.json").read_text())


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


def test_step_inside_backward_trains_exactly_like_the_usual_step(cli, usual, model, photos, tmp_path):
    result = cli(*base_args(model, photos, tmp_path, *RUN, "--fused-backward"))
    assert result.exit_code == 0, result.stderr
    assert _report(tmp_path)["optimizer"] == "AdamW (torch), stepped inside backward"
    assert _report(tmp_path)["losses"] == _report(usual)["losses"]
    _assert_same_weights(_unet(tmp_path, 4), _unet(usual, 4))
    assert not torch.equal(_unet(tmp_path, 4)["conv_in.weight"], load_file(model.joinpath(*UNET))["conv_in.weight"])


def test_checkpoint_of_the_step_inside_backward_resumes_without_it(cli, usual, model, photos, tmp_path):
    first = cli(*base_args(model, photos, tmp_path, *RUN, "--fused-backward", "--max-train-steps", 2))
    assert first.exit_code == 0, first.stderr
    rest = cli(*base_args(model, photos, tmp_path, *RUN))  # the same run, to step 4, the usual way
    assert rest.exit_code == 0, rest.stderr
    assert "resuming from" in rest.stderr
    # Adam's moments and the schedule crossed over exactly: the end is the uninterrupted usual run's
    _assert_same_weights(_unet(tmp_path, 4), _unet(usual, 4))


def test_low_vram_fills_in_what_was_not_given(tmp_path):
    photos = write_photos(tmp_path / "p", count=1)
    flags = {"model": tmp_path, "instance_data_dir": photos, "instance_prompt": "sks", "output": tmp_path / "o"}
    cfg = build_train_config(None, {**flags, "low_vram": True})
    assert (cfg.use_8bit_adam, cfg.paged_adam, cfg.fused_backward, cfg.max_grad_norm) == (True, True, True, 0.0)
    assert (cfg.gradient_checkpointing, cfg.cache_latents, cfg.mixed_precision) == (True, True, "fp16")
    mine = build_train_config(None, {**flags, "low_vram": True, "mixed_precision": "bf16", "fused_backward": False})
    assert (mine.mixed_precision, mine.fused_backward, mine.use_8bit_adam) == ("bf16", False, True)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"low_vram": True, "max_grad_norm": 1.0}, "--max-grad-norm"),
        ({"fused_backward": True, "gradient_accumulation_steps": 2, "max_grad_norm": 0.0}, "--gradient-accumulation"),
        ({"paged_adam": True}, "--paged-adam"),
        ({"adam_impl": "fused", "use_8bit_adam": True}, "--adam-impl"),
        ({"report_to": "comet"}, "--report-to"),
    ],
)
def test_levers_that_cannot_combine_name_the_flags(tmp_path, flags, message):
    photos = write_photos(tmp_path / "p", count=1)
    base = {"model": tmp_path, "instance_data_dir": photos, "instance_prompt": "sks", "output": tmp_path / "o"}
    with pytest.raises(UserError, match=message):
        build_train_config(None, {**base, **flags})


def test_low_vram_runs_on_a_cpu_with_the_fallbacks_said(cli, model, photos, tmp_path):
    result = cli(*base_args(model, photos, tmp_path, "--low-vram", "--max-train-steps", 2, "--save-interval", 2))
    assert result.exit_code == 0, result.stderr
    assert "8-bit AdamW cannot run here" in result.stderr and "fp32 on the CPU" in result.stderr
    report = _report(tmp_path)
    assert report["optimizer"] == "AdamW (torch), stepped inside backward" and report["mixed_precision"] == "no"


def test_channels_last_and_adam_kernels_compute_the_same_training(cli, usual, model, photos, tmp_path):
    result = cli(*base_args(model, photos, tmp_path, *RUN, "--channels-last", "--adam-impl", "foreach"))
    assert result.exit_code == 0, result.stderr
    assert _report(tmp_path)["optimizer"] == "AdamW (torch, foreach)"
    # other kernels add up in another order: equal to rounding, which Adam turns into up to ±lr for the few weights
    # whose gradient is about 0; the bulk moved the same way
    ours, ref, base = _unet(tmp_path, 4), _unet(usual, 4), load_file(model.joinpath(*UNET))
    diff = torch.cat([(ours[k] - ref[k]).abs().flatten() for k in ref])
    moved = torch.cat([(ref[k] - base[k]).abs().flatten() for k in ref])
    assert diff.mean() < 0.01 * moved.mean() and (diff > 1e-5).float().mean() < 0.01
    assert _report(tmp_path)["losses"]["loss"] == pytest.approx(_report(usual)["losses"]["loss"], abs=1e-4)


def test_torch_compile_compiles_the_repeated_blocks_in_place(model, monkeypatch):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    keys = list(unet.state_dict())
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append(type(self).__name__))
    blocks = families.get("sd1").blocks(unet)
    performance.compile_blocks(blocks)
    assert len(blocks) == len(compiled) > 0 and set(compiled) <= {"BasicTransformerBlock", "ResnetBlock2D"}
    assert list(unet.state_dict()) == keys  # checkpoints keep their keys


def test_loss_scale_skips_an_overflowing_step_and_halves(tmp_path):
    weight = torch.nn.Parameter(torch.ones(3))
    scale = performance.LossScale(scale=4.0, growth_interval=2)
    opt = performance.FusedBackwardOptimizer([weight], lambda group: torch.optim.SGD(group, lr=0.1), scale)
    opt.scale_loss((weight * torch.tensor([1.0, float("inf"), 1.0])).sum()).backward()
    opt.step()
    assert opt.step_was_skipped and scale.scale == 2.0 and torch.equal(weight.detach(), torch.ones(3))
    for _ in range(2):
        opt.scale_loss(weight.sum()).backward()
        opt.step()
        assert not opt.step_was_skipped
    assert scale.scale == 4.0  # grows back after growth_interval good steps
    assert torch.allclose(weight.detach(), torch.full((3,), 0.8))  # two SGD steps of lr 0.1 on unscaled grads
    assert weight.grad is None  # freed inside backward


def test_report_to_tensorboard_logs_losses_and_sample_grids(cli, model, photos, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    samples = ("--save-sample-prompt", "a photo of sks thing", "--n-save-sample", 2, "--save-infer-steps", 2)
    result = cli(*base_args(model, photos, tmp_path, *RUN, *samples, "--report-to", "tensorboard"))
    assert result.exit_code == 0, result.stderr
    runs = [p.parent for p in (tmp_path / "logs").rglob("events.out.tfevents.*")]
    assert runs, "no TensorBoard event file under OUTPUT/logs"
    events = EventAccumulator(str(runs[0]), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert losses == pytest.approx(_report(tmp_path)["losses"]["loss"], rel=1e-5)
    assert [e.step for e in events.Images("samples/prompt0")] == [2, 4]


def test_report_to_wandb_runs_offline_into_the_output(cli, model, photos, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_DISABLE_SERVICE", "false")
    result = cli(*base_args(model, photos, tmp_path, "--max-train-steps", 2, "--report-to", "wandb"))
    assert result.exit_code == 0, result.stderr
    runs = list((tmp_path / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb")), "no offline W&B run under OUTPUT/logs/wandb"


def test_vae_file_is_converted_once_and_trained_with(cli, model, photos, tmp_path):
    other = write_tiny_diffusers(tmp_path / "other", seed=1)
    assert cli("export", other, tmp_path / "other.safetensors").exit_code == 0
    prefix = "first_stage_model."
    vae_only = {k.removeprefix(prefix): v for k, v in load_file(tmp_path / "other.safetensors").items() if prefix in k}
    save_file(vae_only, tmp_path / "vae.safetensors")  # as a standalone VAE file (vae-ft-mse-…) is laid out
    args = base_args(model, photos, tmp_path / "o", "--vae", tmp_path / "vae.safetensors", "--max-train-steps", 1)
    result = cli(*args)
    assert result.exit_code == 0, result.stderr
    name = "diffusion_pytorch_model.safetensors"
    saved = load_file(tmp_path / "o" / "checkpoints" / "step-1" / "vae" / name)
    _assert_same_weights(saved, load_file(other / "vae" / name))
    assert len(list((tmp_path / "o" / "cache" / "vae").iterdir())) == 1


def test_missing_vae_file_names_the_flag(cli, model, photos, tmp_path):
    result = cli(*base_args(model, photos, tmp_path / "o", "--vae", tmp_path / "missing.safetensors"))
    assert result.exit_code == 2 and "--vae" in result.stderr
