"""The loss and noise levers: `--loss huber|smooth-l1` with kohya's threshold schedules, `--debiased-estimation`,
`--multires-noise-iterations/--multires-noise-discount` — their formulas, their effect on a run, resume, refusals."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dreambooth.distributed import Shard
from dreambooth.losses import elementwise_loss
from dreambooth.objectives import DDPM, FlowMatching, Noised, multires_noise
from tests.flux_helpers import FLUX_FLAGS
from tests.train_helpers import base_args, sigterm_at_step

LORA = ("--adapter", "lora", "--lora-rank", 4, "--save-interval", 100, "--learning-rate", "1e-2")


def scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def test_pseudo_huber_is_l2_for_small_errors_and_linear_for_large_ones():
    c = torch.tensor([0.1])
    small, large = torch.full((1, 4), 1e-3), torch.full((1, 4), 10.0)
    zero = torch.zeros(1, 4)
    huber_small = elementwise_loss(small, zero, "huber", c)
    assert torch.allclose(huber_small, small**2, rtol=1e-3)  # 2c(√(d² + c²) − c) ≈ d² for |d| ≪ c
    huber_large = elementwise_loss(large, zero, "huber", c)
    assert torch.allclose(huber_large, 2 * c * (large - c), rtol=1e-3)  # ≈ 2c(|d| − c) for |d| ≫ c
    assert torch.allclose(elementwise_loss(large, zero, "smooth-l1", c), huber_large / c)
    assert torch.equal(elementwise_loss(large, zero, "l2", None), large**2)


def test_huber_thresholds_follow_kohyas_schedules():
    ddpm = DDPM(scheduler())
    ends = Noised(torch.zeros(2, 1), torch.tensor([0, 999]), torch.zeros(2, 1))
    exponential = ddpm.huber_c(ends, "exponential", 0.1, 2.0)
    assert torch.allclose(exponential, torch.tensor([2.0, 0.2 * 10 ** (1 / 1000)]), rtol=1e-4)  # scale → c·scale
    assert torch.allclose(ddpm.huber_c(ends, "constant", 0.1, 2.0), torch.tensor([0.2, 0.2]))
    snr = ddpm.huber_c(ends, "snr", 0.1, 1.0)
    assert 0.9 < snr[0] <= 1.0 and 0.1 < snr[1] < 0.11  # (1 − c)/(1 + σ)² + c: ~1 at clean, → c at noise
    flow = FlowMatching()
    sigmas = torch.tensor([0.0, 1.0])
    noised = Noised(torch.zeros(2, 1), sigmas, torch.zeros(2, 1), sigmas)
    assert torch.allclose(flow.huber_c(noised, "exponential", 0.1, 1.0), torch.tensor([1.0, 0.1]))


def test_debiased_estimation_weights_each_example_by_one_over_root_snr():
    from diffusers.training_utils import compute_snr

    schedule = scheduler()
    timesteps = torch.tensor([1, 10, 500, 999])
    noised = Noised(torch.zeros(4, 1), timesteps, torch.zeros(4, 1))
    snr = compute_snr(schedule, timesteps)
    weights = DDPM(schedule, debiased=True).weights(noised)
    assert torch.allclose(weights, 1 / torch.sqrt(torch.clamp(snr, max=1000)))
    both = DDPM(schedule, debiased=True, snr_gamma=5.0).weights(noised)
    assert torch.allclose(both, weights * DDPM(schedule, snr_gamma=5.0).weights(noised))
    assert DDPM(schedule).weights(noised) is None


def test_multires_noise_adds_coarse_structure_and_keeps_unit_variance():
    shard = Shard.of(0, 1, 8, False)
    plain = shard.randn(torch.Generator().manual_seed(0), 4, 32, 32)

    def coarse_power(x):  # the variance left after averaging 8×8 patches: white noise has 1/64 of it
        return torch.nn.functional.avg_pool2d(x, 8).var().item()

    powers = {}
    for discount in (0.3, 0.8):
        noise = multires_noise(plain.clone(), shard, torch.Generator().manual_seed(1), 6, discount)
        assert torch.allclose(noise.std(dim=(1, 2, 3)), torch.ones(8), atol=1e-5)
        powers[discount] = coarse_power(noise)
    # kohya's 0.3 adds a little low-frequency noise, 0.8 a lot
    assert coarse_power(plain) < powers[0.3] < powers[0.8] and powers[0.8] > 3 * coarse_power(plain)
    # each process draws the whole global batch and keeps its rows: two processes' rows are one process's batch
    whole = multires_noise(Shard.of(0, 1, 4, False).randn(torch.Generator().manual_seed(1), 4, 16, 16),
                           Shard.of(0, 1, 4, False), torch.Generator().manual_seed(2), 3, 0.3)  # fmt: skip
    halves = [
        multires_noise(Shard.of(r, 2, 2, False).randn(torch.Generator().manual_seed(1), 4, 16, 16),
                       Shard.of(r, 2, 2, False), torch.Generator().manual_seed(2), 3, 0.3)
        for r in range(2)
    ]  # fmt: skip
    assert torch.equal(torch.cat(halves), whole)


def lora(out, step):
    folder = out / "checkpoints" / f"step-{step}" / "lora"
    return {f"{p.stem}.{k}": v for p in folder.glob("*.safetensors") for k, v in load_file(p).items()}


LEVERS = ("--loss", "huber", "--huber-schedule", "snr", "--debiased-estimation", "--multires-noise-iterations", 4)


def test_the_levers_change_training_and_resume_bit_identically(cli, model, photos, tmp_path, monkeypatch):
    flags = (*LORA, "--max-train-steps", 4, "--random-flip")
    assert cli(*base_args(model, photos, tmp_path / "l2", *flags)).exit_code == 0
    assert cli(*base_args(model, photos, tmp_path / "a", *flags, *LEVERS)).exit_code == 0
    l2, levers = lora(tmp_path / "l2", 4), lora(tmp_path / "a", 4)
    assert any(not torch.equal(l2[k], levers[k]) for k in l2)
    report = json.loads((tmp_path / "a" / "train_report.json").read_text())
    losses = json.loads((tmp_path / "l2" / "train_report.json").read_text())["losses"]["loss"]
    assert report["losses"]["loss"] != losses  # a different loss is logged
    sigterm_at_step(monkeypatch, 2)
    assert cli(*base_args(model, photos, tmp_path / "b", *flags, *LEVERS)).exit_code == 130
    monkeypatch.undo()
    assert cli(*base_args(model, photos, tmp_path / "b", *flags, *LEVERS)).exit_code == 0
    resumed = lora(tmp_path / "b", 4)
    assert levers.keys() == resumed.keys() and all(torch.equal(levers[k], resumed[k]) for k in levers)


def test_kohyas_spellings_parse_as_ours():
    import typer

    from dreambooth.cli import app

    train = typer.main.get_command(app).commands["train"]
    args = [
        "--loss_type",
        "smooth_l1",
        "--debiased_estimation_loss",
        "--huber_c",
        "0.2",
        "--multires_noise_iterations",
        "6",
    ]
    with train.make_context("dreambooth train", args) as ctx:
        given = {k: v for k, v in ctx.params.items() if v is not None}
    assert given["loss"] == "smooth_l1" and given["debiased_estimation"] is True
    assert given["huber_c"] == 0.2 and given["multires_noise_iterations"] == 6


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (("--huber-c", 0), "--huber-c must be in (0, 1]"),
        (("--huber-scale", -1), "--huber-scale must be positive"),
        (("--multires-noise-iterations", -2), "--multires-noise-iterations must not be negative"),
        (("--multires-noise-discount", 1.5), "--multires-noise-discount must be between 0 and 1"),
    ],
)
def test_bad_loss_settings_are_one_line_and_exit_2(cli, model, photos, tmp_path, flags, expected):
    result = cli(*base_args(model, photos, tmp_path / "out", *LORA, *flags))
    assert result.exit_code == 2 and expected in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (("--debiased-estimation",), "--debiased-estimation weights DDPM timesteps"),
        (("--multires-noise-iterations", 4), "--multires-noise-iterations shapes the noise of a DDPM schedule"),
        (("--loss", "huber", "--huber-schedule", "snr"), "--huber-schedule snr follows a DDPM schedule"),
    ],
)
def test_ddpm_levers_on_flux_are_one_line_and_exit_2(cli, photos, tmp_path, flags, expected):
    from dreambooth.tiny_model import write_tiny_flux

    flux = write_tiny_flux(tmp_path / "flux", 0)
    result = cli(*base_args(flux, photos, tmp_path / "out", *LORA, *FLUX_FLAGS, *flags))
    assert result.exit_code == 2 and expected in result.stderr and "Traceback" not in result.stderr


def test_a_huber_flux_lora_trains(cli, photos, tmp_path):
    from dreambooth.tiny_model import write_tiny_flux

    flux = write_tiny_flux(tmp_path / "flux", 0)
    flags = (*LORA, *FLUX_FLAGS, "--max-train-steps", 2, "--loss", "huber")
    result = cli(*base_args(flux, photos, tmp_path / "out", *flags))
    assert result.exit_code == 0, result.stderr
    losses = json.loads((tmp_path / "out" / "train_report.json").read_text())["losses"]["loss"]
    assert len(losses) == 2 and all(0 < x < 1 for x in losses)  # pseudo-Huber with c ≤ 1 stays below L2's scale
