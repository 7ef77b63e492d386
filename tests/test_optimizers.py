"""--optimizer and --optimizer-args: each optimizer trains and resumes bit-identically, does what makes it itself
(Prodigy's growing step size, Adafactor's factored moments, Lion's sign update, schedule-free's averaged weights in
the files users get), takes kohya's spellings, refuses what it cannot combine with in one line, and its state's
size in the plan is what its package really allocates."""

import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreambooth import optimizers
from dreambooth.config import Concept, TrainConfig, build_train_config
from dreambooth.errors import UserError
from tests.train_helpers import base_args, straight_and_resumed

LORA = ("--adapter", "lora", "--lora-rank", 4, "--save-interval", 100, "--random-flip")


def config(tmp_path: Path, **settings) -> TrainConfig:
    return TrainConfig(model=tmp_path, concepts=(Concept("a photo of sks thing", tmp_path),), **settings)


def built(tmp_path: Path, params, **settings):
    """The optimizer the run would build (on this CPU) over `params`, with its name and settings."""
    cfg = config(tmp_path, **settings)
    return optimizers.build([{"params": list(params), "lr": cfg.lr}], cfg, torch.device("cpu"))


def state_of(run: Path, step: int) -> dict:
    return torch.load(run / "checkpoints" / f"step-{step}" / "training_state.pt", weights_only=False)


def tensors_equal(a, b) -> bool:
    """Nested optimizer states (dicts, lists, tensors, numbers) equal to the bit."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


# ───────────────────────────── every optimizer trains and resumes exactly ─────────────────────────────


@pytest.mark.parametrize("name", optimizers.OPTIMIZERS)
def test_each_optimizer_resumes_bit_identically(cli, model, photos, tmp_path, monkeypatch, name):
    """Stopped at step 2 (not a save step of the straight run) and resumed: the same weights and optimizer state
    at step 4 as the run that went straight through, to the bit."""
    flags = (*LORA, "--max-train-steps", 4, "--optimizer", name)
    straight_and_resumed(cli, monkeypatch, model, photos, tmp_path, flags, stop_at=2)
    a, b = (state_of(tmp_path / r, 4) for r in "ab")
    assert tensors_equal(a["optimizer"], b["optimizer"])
    assert tensors_equal(a["raw_weights"], b["raw_weights"])  # schedule-free's trained point; None for the others
    files = [load_file(tmp_path / r / "checkpoints" / "step-4" / "lora" / "unet.safetensors") for r in "ab"]
    assert tensors_equal(files[0], files[1])
    base = load_file(tmp_path / "a" / "checkpoints" / "step-4" / "lora" / "unet.safetensors")
    assert any(v.abs().sum() > 0 for k, v in base.items() if "lora_B" in k)  # it trained: B starts at zero
    report = json.loads((tmp_path / "a" / "train_report.json").read_text())
    assert report["settings"]["optimizer"] == name and isinstance(report["optimizer_args"], dict)


# ───────────────────────────── what each one does ─────────────────────────────


def quadratic_steps(optimizer, p: torch.nn.Parameter, target: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        ((p - target) ** 2).sum().backward()
        optimizer.step()


def test_prodigy_grows_its_step_size_from_d0(tmp_path):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64))
    optimizer, name, kwargs = built(tmp_path, [p], optimizer="prodigy")
    assert name == "Prodigy (prodigyopt)" and optimizer.param_groups[0]["lr"] == 1.0  # its default
    assert kwargs | {"decouple": True, "use_bias_correction": True, "safeguard_warmup": True} == kwargs
    assert kwargs["weight_decay"] == 1e-2  # --adam-weight-decay
    d = [optimizer.param_groups[0]["d"]]
    for _ in range(60):
        quadratic_steps(optimizer, p, torch.ones(64), 1)
        d.append(optimizer.param_groups[0]["d"])
    assert d[0] == 1e-6 and all(later >= earlier for earlier, later in itertools.pairwise(d))
    assert d[-1] > 100 * d[0]  # from 1e-6 towards the distance to the solution, with no learning rate to tune


@pytest.mark.parametrize("name", ["adafactor", "came"])
def test_adafactor_and_came_keep_factored_moments(tmp_path, name):
    weight, bias = torch.nn.Parameter(torch.randn(48, 32)), torch.nn.Parameter(torch.randn(48))
    optimizer, _, kwargs = built(tmp_path, [weight, bias], optimizer=name)
    quadratic_steps(optimizer, weight, torch.zeros(48, 32), 1)
    bias.grad = torch.randn(48)
    optimizer.step()
    state = optimizer.state[weight]
    assert state["exp_avg_sq_row"].shape == (48,) and state["exp_avg_sq_col"].shape == (32,)
    assert "exp_avg_sq" not in state  # no full second moment for a matrix
    assert optimizer.state[bias]["exp_avg_sq"].shape == (48,)  # a vector keeps its own
    if name == "adafactor":
        assert (kwargs["relative_step"], kwargs["scale_parameter"], kwargs["warmup_init"]) == (False, False, False)
    else:
        assert kwargs["betas"] == (0.9, 0.999, 0.9999) and kwargs["eps"] == (1e-30, 1e-16)
        assert state["exp_avg_res_row"].shape == (48,)  # the instability, factored too


def test_lion_moves_every_weight_by_the_learning_rate(tmp_path):
    """Lion's update is the sign of its momentum: one step without weight decay moves every weight by exactly lr,
    whatever its gradient. Its default lr is a third of AdamW's (its authors: 3-10× smaller)."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8192))
    optimizer, name, kwargs = built(tmp_path, [p], optimizer="lion8bit", adapter="lora", adam_weight_decay=0.0)
    assert name == "Lion (bitsandbytes, 32-bit states)"  # no CUDA here: the 32-bit states, said in a notice
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 / 3) and kwargs["betas"] == (0.9, 0.99)
    for opt in (optimizer, bnb.optim.Lion8bit([p], lr=1e-3, weight_decay=0.0)):  # and the 8-bit kernel itself
        before = p.detach().clone()
        p.grad = torch.randn(8192) * torch.logspace(-4, 2, 8192)  # gradients over six orders of magnitude
        opt.step()
        lr = opt.param_groups[0]["lr"]
        # to fp32's rounding of weights around 1 (1.2e-7)
        assert torch.allclose((p.detach() - before).abs(), torch.full_like(before, lr), rtol=0, atol=2.5e-7)


def test_lion_weight_decay_keeps_adamws_strength():
    """lr × λ as AdamW's: a third of the learning rate, three times the decay, unless --adam-weight-decay is given."""
    cfg = build_train_config(None, {"model": ".", "instance_data_dir": ".", "instance_prompt": "sks",
                                    "optimizer": "lion8bit"})  # fmt: skip
    assert optimizers.settings(cfg)["weight_decay"] == pytest.approx(3e-2)
    assert cfg.lr * optimizers.settings(cfg)["weight_decay"] == pytest.approx(5e-6 * 1e-2)
    mine = build_train_config(None, {"model": ".", "instance_data_dir": ".", "instance_prompt": "sks",
                                     "optimizer": "lion8bit", "adam_weight_decay": 0.1})  # fmt: skip
    assert optimizers.settings(mine)["weight_decay"] == 0.1


def test_schedule_free_files_hold_its_average_and_training_continues_from_its_point(cli, model, photos, tmp_path):
    """The checkpoint's (and so the export's) weights are the averaged x the optimizer's eval mode gives,
    x = y + (1 − 1/β₁)(z − y); the trained point y is kept in the training state."""
    flags = (*LORA, "--max-train-steps", 3, "--optimizer", "schedulefree-adamw", "--learning-rate", "1e-2",
             "--export-single-file")  # fmt: skip
    assert cli(*base_args(model, photos, tmp_path, *flags)).exit_code == 0
    state = state_of(tmp_path, 3)
    y = state["raw_weights"]
    beta1 = state["optimizer"]["param_groups"][0]["betas"][0]
    assert state["optimizer"]["param_groups"][0]["train_mode"] is True  # resumes in train mode
    z = {name: state["optimizer"]["state"][i]["z"] for i, name in enumerate(y)}
    x = {name: y[name].lerp(z[name], 1 - 1 / beta1) for name in y}
    files = load_file(tmp_path / "checkpoints" / "step-3" / "lora" / "unet.safetensors")
    exported = load_file(next((tmp_path / "export").glob("*.safetensors")))
    differs = False
    for name in y:
        path = name.removeprefix("unet.").replace(".default", "")
        assert torch.equal(files[path], x[name]), path
        down_up = "lora_down" if ".lora_A." in path else "lora_up"
        key = "lora_unet_" + path.split(".lora_")[0].replace(".", "_") + f".{down_up}.weight"
        assert torch.equal(exported[key], x[name].half())
        differs |= not torch.equal(exported[key], y[name].half())
    assert differs  # and they are not the trained point's


@pytest.mark.parametrize("name", ["adafactor", "came"])
def test_optimizers_of_one_weight_at_a_time_step_inside_backward_exactly(cli, model, photos, tmp_path, name):
    """Adafactor and CAME keep each weight's state on its own: stepped inside backward (--fused-backward), one
    optimizer per weight, they train exactly as the usual step does."""
    run = (*LORA, "--max-train-steps", 2, "--max-grad-norm", 0, "--optimizer", name)
    assert cli(*base_args(model, photos, tmp_path / "usual", *run)).exit_code == 0
    assert cli(*base_args(model, photos, tmp_path / "fused", *run, "--fused-backward")).exit_code == 0
    usual, fused = (load_file(tmp_path / r / "checkpoints" / "step-2" / "lora" / "unet.safetensors")
                    for r in ("usual", "fused"))  # fmt: skip
    assert tensors_equal(usual, fused)
    assert "inside backward" in json.loads((tmp_path / "fused" / "train_report.json").read_text())["optimizer"]


def test_optimizer_args_reach_the_optimizer(cli, model, photos, tmp_path):
    flags = (*LORA, "--max-train-steps", 1, "--optimizer", "prodigy", "--optimizer-args",
             "weight_decay=0.05 betas=0.8,0.9 d_coef=2")  # fmt: skip
    assert cli(*base_args(model, photos, tmp_path, *flags)).exit_code == 0
    group = state_of(tmp_path, 1)["optimizer"]["param_groups"][0]
    assert (group["weight_decay"], tuple(group["betas"]), group["d_coef"]) == (0.05, (0.8, 0.9), 2)
    report = json.loads((tmp_path / "train_report.json").read_text())
    assert report["optimizer"] == "Prodigy (prodigyopt)" and report["learning_rate"] == 1.0
    assert report["optimizer_args"]["d_coef"] == 2 and report["optimizer_args"]["decouple"] is True
    assert report["learning_rate_from"] == "the default for --optimizer prodigy with --adapter lora"


# ───────────────────────────── spellings ─────────────────────────────


def flags_of(*args: str) -> dict:
    from dreambooth.cli import _train_flags

    return {k: v for k, v in _train_flags(list(args)).items() if v is not None}


@pytest.mark.parametrize(
    ("kohya", "ours"),
    [("AdamW8bit", "adamw8bit"), ("PagedAdamW8bit", "paged-adamw8bit"), ("Prodigy", "prodigy"),
     ("Adafactor", "adafactor"), ("Lion8bit", "lion8bit"), ("CAME", "came"),
     ("AdamWScheduleFree", "schedulefree-adamw"), ("came_pytorch.CAME", "came"), ("adamw", "adamw")],
)  # fmt: skip
def test_kohyas_optimizer_names_are_ours(tmp_path, kohya, ours):
    flags = flags_of("--optimizer_type", kohya)
    assert flags == {"optimizer": kohya}
    assert config(tmp_path, **flags).optimizer == ours


def test_kohyas_optimizer_args_one_value_per_word(tmp_path):
    kohya = flags_of("--optimizer_type", "adafactor", "--optimizer_args", "relative_step=False",
                     "eps=(1e-30, 1e-3)", "--max_train_steps", "3")  # fmt: skip
    ours = flags_of("--optimizer", "adafactor", "--optimizer-args", "relative_step=False 'eps=(1e-30, 1e-3)'",
                    "--max-train-steps", "3")  # fmt: skip
    assert (
        config(tmp_path, optimizer=kohya["optimizer"], optimizer_args=kohya["optimizer_args"]).optimizer_args
        == ("relative_step=False", "eps=(1e-30, 1e-3)")
        == config(tmp_path, optimizer=ours["optimizer"], optimizer_args=ours["optimizer_args"]).optimizer_args
    )
    assert kohya["max_train_steps"] == ours["max_train_steps"] == 3


def test_a_config_file_takes_kohyas_list(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('model = "."\ninstance_data_dir = "."\ninstance_prompt = "sks"\noptimizer_type = "Prodigy"\n'
                    'optimizer_args = ["d_coef=0.5", "betas=(0.9, 0.99)"]\n')  # fmt: skip
    cfg = build_train_config(toml, {})
    assert cfg.optimizer == "prodigy" and optimizers.settings(cfg)["betas"] == (0.9, 0.99)


def test_the_old_flags_are_aliases_and_low_vram_stays_paged_8bit_adamw(tmp_path):
    base = {"model": ".", "instance_data_dir": ".", "instance_prompt": "sks"}
    assert build_train_config(None, {**base, "use_8bit_adam": True}).optimizer == "adamw8bit"
    assert build_train_config(None, {**base, "low_vram": True}).optimizer == "paged-adamw8bit"
    mine = build_train_config(None, {**base, "low_vram": True, "optimizer": "prodigy"})
    # the profile yields to the optimizer named: no 8-bit alias, no step inside backward (Prodigy needs all grads)
    assert (mine.optimizer, mine.use_8bit_adam, mine.fused_backward, mine.gradient_checkpointing) == (
        "prodigy", False, False, True)  # fmt: skip
    came = build_train_config(None, {**base, "low_vram": True, "optimizer": "came"})
    assert came.fused_backward and not came.paged_adam
    synced = build_train_config(None, {**base, "optimizer": "PagedAdamW8bit"})
    assert synced.use_8bit_adam and synced.paged_adam


# ───────────────────────────── what cannot combine ─────────────────────────────


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"optimizer": "nadam"}, "--optimizer 'nadam' is unknown"),
        ({"optimizer": "adafactor", "optimizer_args": "foo=1"}, "--optimizer adafactor takes no 'foo'"),
        ({"optimizer": "came", "optimizer_args": "lr=1"}, "--optimizer came takes no 'lr'"),
        ({"optimizer": "prodigy", "optimizer_args": "d_coef"}, "'d_coef' is not key=value"),
        ({"optimizer": "prodigy", "optimizer_args": "d_coef=big"}, "'big' is not a Python literal"),
        ({"optimizer": "adafactor", "optimizer_args": "relative_step=True"}, "relative_step"),
        ({"optimizer": "prodigy", "fused_backward": True, "max_grad_norm": 0.0}, "--fused-backward.*prodigy"),
        ({"optimizer": "schedulefree-adamw", "fused_backward": True, "max_grad_norm": 0.0},
         "--fused-backward.*schedulefree-adamw"),
        ({"optimizer": "prodigy", "distributed": "deepspeed-zero2"}, "--optimizer prodigy and --distributed"),
        ({"optimizer": "adafactor", "distributed": "deepspeed-zero3"}, "--optimizer adafactor and --distributed"),
        ({"optimizer": "schedulefree-adamw", "distributed": "deepspeed-zero2"}, "schedulefree-adamw and --distri"),
        ({"optimizer": "lion8bit", "distributed": "deepspeed-zero2", "offload_optimizer": "cpu"},
         "--optimizer lion8bit and --offload-optimizer cpu"),
        ({"optimizer": "prodigy", "use_8bit_adam": True}, "--use-8bit-adam means --optimizer adamw8bit"),
        ({"optimizer": "lion8bit", "adam_beta1": 0.8}, "--adam-beta1 is AdamW's"),
        ({"optimizer": "prodigy", "scale_lr": True}, "--scale-lr and --optimizer prodigy"),
        ({"optimizer": "prodigy", "train_text_encoder": True, "text_encoder_lr": 0.5}, "--text-encoder-lr"),
        ({"optimizer": "schedulefree-adamw", "lr_scheduler": "cosine"}, "--lr-scheduler cosine and --optimizer"),
        ({"optimizer": "schedulefree-adamw", "ema_decay": 0.99}, "--ema-decay and --optimizer schedulefree"),
        ({"optimizer": "came", "adam_impl": "fused"}, "--adam-impl"),
    ],
)  # fmt: skip
def test_what_an_optimizer_cannot_combine_with_names_the_flags(settings, message):
    base = {"model": ".", "instance_data_dir": ".", "instance_prompt": "sks"}
    with pytest.raises(UserError, match=message):
        build_train_config(None, {**base, **settings})


def test_a_refusal_is_one_line_and_exit_2(cli, model, photos, tmp_path):
    result = cli(*base_args(model, photos, tmp_path, "--optimizer", "prodigy", "--fused-backward",
                            "--max-grad-norm", 0))  # fmt: skip
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert "--fused-backward" in result.stderr and "--optimizer prodigy" in result.stderr
    bad = cli(*base_args(model, photos, tmp_path, "--optimizer", "came", "--optimizer-args", "decouple=True"))
    assert bad.exit_code == 2 and "--optimizer came takes no 'decouple'" in bad.stderr


def test_a_checkpoint_continues_with_its_own_optimizer(cli, model, photos, tmp_path):
    assert cli(*base_args(model, photos, tmp_path, *LORA, "--max-train-steps", 1)).exit_code == 0
    other = cli(*base_args(model, photos, tmp_path, *LORA, "--max-train-steps", 2, "--optimizer", "came"))
    assert other.exit_code == 2 and "trained with --optimizer adamw" in other.stderr


# ───────────────────────────── memory ─────────────────────────────


def test_each_keyword_is_the_packages_own():
    """--optimizer-args keys are the constructors' own keyword names (a package's rename would show here)."""
    import inspect

    import bitsandbytes as bnb
    from came_pytorch import CAME
    from prodigyopt import Prodigy
    from schedulefree import AdamWScheduleFree
    from transformers.optimization import Adafactor

    classes = {"adamw": torch.optim.AdamW, "adamw8bit": bnb.optim.AdamW8bit,
               "paged-adamw8bit": bnb.optim.PagedAdamW8bit, "prodigy": Prodigy, "adafactor": Adafactor,
               "schedulefree-adamw": AdamWScheduleFree, "came": CAME, "lion8bit": bnb.optim.Lion8bit}  # fmt: skip
    for name, cls in classes.items():
        assert set(optimizers.KINDS[name].keys) <= set(inspect.signature(cls).parameters), name


@pytest.mark.parametrize("name", optimizers.OPTIMIZERS)
def test_state_size_is_what_the_package_allocates(name):
    """The plan's optimizer-state bytes against the state each package really holds after a step, over a matrix, a
    convolution, a vector and a tensor too small for 8-bit states."""
    import bitsandbytes as bnb
    from came_pytorch import CAME
    from prodigyopt import Prodigy
    from schedulefree import AdamWScheduleFree
    from transformers.optimization import Adafactor

    make = {"adamw": torch.optim.AdamW, "adamw8bit": bnb.optim.AdamW8bit, "paged-adamw8bit": bnb.optim.AdamW8bit,
            "prodigy": Prodigy, "adafactor": lambda p, lr: Adafactor(p, lr=lr, relative_step=False),
            "schedulefree-adamw": AdamWScheduleFree, "came": CAME, "lion8bit": bnb.optim.Lion8bit}[name]  # fmt: skip
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*shape)) for shape in ((96, 64), (16, 8, 3, 3), (320,), (40, 20))]
    optimizer = make(params, lr=1e-3)
    if name == "schedulefree-adamw":
        optimizer.train()
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    held = sum(t.numel() * t.element_size() for p in params for key, t in optimizer.state[p].items()
               if isinstance(t, torch.Tensor) and t.dim() > 0 and not key.startswith("qmap"))  # fmt: skip
    assert optimizers.state_bytes(name, params) == held


def test_the_plan_counts_each_optimizers_state(cli, model, photos, tmp_path):
    from tests.test_plan import line, plan_of

    sizes = {}
    for name in ("adamw", "lion8bit", "prodigy", "adafactor"):
        args = base_args(model, photos, tmp_path / "out", "--optimizer", name)[1:]
        sizes[name] = line(plan_of(cli, *args)["training"], "optimizer states")
    # the full fine-tune's fp32 weights: AdamW keeps two moments (8 bytes a weight), Prodigy four buffers, 8-bit Lion
    # one byte (a tiny model's many small tensors four), Adafactor factored second moments and no first
    assert sizes["prodigy"] == 2 * sizes["adamw"]
    assert sizes["lion8bit"] < sizes["adamw"] / 4 and sizes["adafactor"] < sizes["adamw"] / 2
