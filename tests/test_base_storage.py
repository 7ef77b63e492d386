"""The frozen base stored in fp8 / int8 / NF4 (`--base-precision`) and its blocks swapped to host memory
(`--blocks-to-swap`): what is computed, what moves, what is saved and exported, and what is refused."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from dreambooth.blockswap import BlockSwap
from dreambooth.families.base import Dtypes, ResolvedModel
from dreambooth.storage import FP8, StoredConv2d, StoredLinear, is_stored, storable, store
from tests.train_helpers import base_args, straight_and_resumed

LORA = ("--adapter", "lora", "--lora-rank", 4, "--lora-alpha", 4, "--learning-rate", "1e-2", "--save-interval", 100,
        "--train-text-encoder")  # fmt: skip


def lora_weights(out, step):
    folder = out / "checkpoints" / f"step-{step}" / "lora"
    return {f"{p.stem}.{k}": v for p in folder.glob("*.safetensors") for k, v in load_file(p).items()}


def largest_relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(((a[k].float() - b[k].float()).norm() / b[k].float().norm().clamp_min(1e-12)).item() for k in a)


# Across two runs, CPU matrix products may differ in the last bit with where the weights sit in memory (MKL picks
# kernels by alignment; a deep copy of a diffusers UNet already computes differently from the original), so runs
# whose weights are allocated differently are compared within this, beside a difference the check must see. Adam's
# normalised step turns those last bits into ~1e-4 of a LoRA weight whose gradient is near zero (measured: 5e-5 for
# fp8 against the rounded base, 1e-4 swapped against unswapped; the unrounded base differs by 0.6).
LAST_BITS = 1e-3


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


# ───────────────────────────── the layers ─────────────────────────────


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_stored_layer_computes_and_backpropagates_what_the_plain_layer_computes(kind):
    """fp32-stored: bit-identical to nn.Linear / nn.Conv2d, output and input gradient; fp8-stored: bit-identical to
    the plain layer whose weight was rounded to fp8 (the compute is the same, only the storage differs)."""
    torch.manual_seed(0)
    plain = nn.Linear(16, 24) if kind == "linear" else nn.Conv2d(8, 12, 3, padding=1)
    x = torch.randn(2, 5, 16) if kind == "linear" else torch.randn(2, 8, 6, 6)
    for dtype in (torch.float32, FP8):
        reference = nn.Linear(16, 24) if kind == "linear" else nn.Conv2d(8, 12, 3, padding=1)
        reference.load_state_dict(plain.state_dict())
        with torch.no_grad():
            reference.weight.copy_(plain.weight.to(dtype).float())
        stored = (StoredLinear if kind == "linear" else StoredConv2d)(plain, dtype, torch.float32)
        assert stored.weight.dtype == dtype and not isinstance(stored.weight, nn.Parameter)
        outputs = []
        for layer in (reference, stored):
            xi = x.clone().requires_grad_(True)
            y = layer(xi)
            y.square().sum().backward()
            outputs.append((y.detach(), xi.grad, layer.bias.grad.clone()))
            layer.bias.grad = None
        for a, b in zip(*outputs, strict=True):
            assert torch.equal(a, b), dtype


def test_peft_wraps_a_stored_layer_and_its_lora_starts_in_the_compute_precision():
    """As on a bf16 base: the adapter decides later what precision its LoRA trains in."""
    from peft import LoraConfig, inject_adapter_in_model

    model = nn.Sequential(nn.Linear(8, 8), nn.Conv2d(8, 8, 1))
    store(model, ["0", "1"], "fp8", torch.bfloat16)
    assert all(is_stored(m) for m in model)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["0", "1"]), model)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert len(lora) == 4 and all(p.dtype == torch.bfloat16 and p.requires_grad for p in lora)
    assert storable(model, [model], "fp8") == []  # the LoRA's own layers are never stored


def test_nf4_and_int8_layers_run_forward_and_backward_through_bitsandbytes():
    """bitsandbytes' CPU path: the quantised layer computes close to the plain one, and a gradient reaches its
    input (what a LoRA beside it needs)."""
    torch.manual_seed(0)
    plain = nn.Linear(128, 64)
    x = torch.randn(4, 128)
    for precision, tolerance in (("nf4", 0.15), ("int8", 0.02)):
        model = nn.Sequential(nn.Linear(128, 64))
        model[0].load_state_dict(plain.state_dict())
        store(model, ["0"], precision, torch.float32)
        assert is_stored(model[0]) and type(model[0]).__module__.startswith("bitsandbytes")
        xi = x.clone().requires_grad_(True)
        y = model(xi)
        y.sum().backward()
        relative = ((y - plain(x)).norm() / plain(x).norm()).item()
        assert relative < tolerance, (precision, relative)
        assert xi.grad is not None and torch.isfinite(xi.grad).all()


def test_nf4_leaves_a_layer_it_cannot_pack_in_the_compute_precision():
    model = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 32))
    assert storable(model, [model], "nf4") == ["1"]
    assert storable(model, [model], "fp8") == ["0", "1"]


# ───────────────────────────── block swapping (the mechanism) ─────────────────────────────


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 8)
        self.lora = nn.Parameter(torch.zeros(8, 8))

    def forward(self, x):
        return x + self.b(torch.relu(self.a(x))) + x @ self.lora


class _Blocks(nn.Module):
    def __init__(self, checkpointing: bool):
        super().__init__()
        self.blocks = nn.ModuleList(_Block() for _ in range(6))
        self.checkpointing = checkpointing

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpointing else block(x)
        return x


@pytest.mark.parametrize("checkpointing", [False, True])
def test_swapped_blocks_compute_bit_identically_and_each_comes_over_once_each_way(checkpointing):
    """N swapped blocks: 2N − 1 block copies a step (forward, then backward in reverse; the last block is still
    there when backward starts), and nothing differs from the unswapped model, with or without checkpointing."""
    import copy

    torch.manual_seed(0)
    reference = _Blocks(checkpointing)
    for name, p in reference.named_parameters():
        p.requires_grad_("lora" in name)
    swapped = copy.deepcopy(reference)
    store(swapped, storable(swapped, list(swapped.blocks), "auto"), "auto", torch.float32)
    swap = BlockSwap(list(swapped.blocks), 3, torch.device("cpu"))
    x = torch.randn(4, 8)
    for _ in range(3):
        before = swap.loads, swap.bytes_moved
        for model in (reference, swapped):
            model(x).square().mean().backward()
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p -= 0.1 * p.grad
                        p.grad = None
        assert swap.loads - before[0] == 2 * 3 - 1
        assert swap.bytes_moved - before[1] == 5 * swap.block_bytes[3]
        assert len(swap.resident) <= 2  # at most two swapped blocks on the device at a time
    trained = [{n: p.detach() for n, p in m.named_parameters() if p.requires_grad} for m in (reference, swapped)]
    assert_same(*trained)
    # the host copies are the only copies of the swapped weights
    assert all(layer.stored.device.type == "cpu" for layers in swap.layers.values() for layer in layers)


# ───────────────────────────── in training ─────────────────────────────


def _rounded_to_fp8(model, folder):
    """A copy of the tiny model whose layers that --base-precision fp8 stores hold fp8-rounded fp32 weights."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from dreambooth import families

    shutil.copytree(model, folder)
    family = families.of_folder(model)
    for sub, cls in (("unet", UNet2DConditionModel), ("text_encoder", CLIPTextModel)):
        part = cls.from_pretrained(model / sub)
        roots = family.blocks(part) if sub == "unet" else [part]
        for name in storable(part, roots, "fp8"):
            layer = part.get_submodule(name)
            with torch.no_grad():
                layer.weight.copy_(layer.weight.to(FP8).float())
        shutil.rmtree(folder / sub)
        part.save_pretrained(folder / sub)
    return folder


def test_a_lora_on_an_fp8_base_trains_as_on_the_base_rounded_to_fp8(cli, model, photos, tmp_path):
    """fp8 changes how the frozen weights are stored, not what is computed: the same steps on a base whose weights
    were rounded to fp8 (and kept in fp32) give the same LoRA weights (to the last bits; bit for bit per layer, in
    the test above), while the unrounded base gives visibly different ones. The report says what was stored."""
    rounded = _rounded_to_fp8(model, tmp_path / "rounded")
    flags = (*LORA, "--max-train-steps", 3)
    fp8 = cli(*base_args(model, photos, tmp_path / "fp8", *flags, "--base-precision", "fp8"))
    assert fp8.exit_code == 0, fp8.stderr
    assert cli(*base_args(rounded, photos, tmp_path / "ref", *flags)).exit_code == 0
    assert cli(*base_args(model, photos, tmp_path / "unrounded", *flags)).exit_code == 0
    trained = {run: lora_weights(tmp_path / run, 3) for run in ("fp8", "ref", "unrounded")}
    assert largest_relative_difference(trained["fp8"], trained["ref"]) < LAST_BITS
    assert largest_relative_difference(trained["unrounded"], trained["ref"]) > 100 * LAST_BITS
    report = json.loads((tmp_path / "fp8" / "train_report.json").read_text())
    assert report["base_precision"] == "fp8"
    # the text encoder trains a LoRA, so its frozen layers are stored too; nothing else of it is
    assert set(report["base_storage"]) == {"unet", "text_encoder"}
    assert all(part["precision"] == "fp8" and part["layers"] > 0 for part in report["base_storage"].values())


def test_swapped_blocks_train_as_unswapped_ones_and_the_report_counts_the_copies(cli, model, photos, tmp_path):
    """The same steps with 4 of 12 blocks in host memory (to the last bits: the swapped weights are fresh copies, see
    LAST_BITS; bit for bit in the mechanism's test above)."""
    flags = (*LORA, "--max-train-steps", 2, "--gradient-checkpointing")
    assert cli(*base_args(model, photos, tmp_path / "plain", *flags)).exit_code == 0
    swapped = cli(*base_args(model, photos, tmp_path / "swap", *flags, "--blocks-to-swap", 4))
    assert swapped.exit_code == 0, swapped.stderr
    assert "--blocks-to-swap 4: 4 of 12 unet blocks" in swapped.stderr + swapped.stdout
    assert (
        largest_relative_difference(lora_weights(tmp_path / "swap", 2), lora_weights(tmp_path / "plain", 2)) < LAST_BITS
    )
    report = json.loads((tmp_path / "swap" / "train_report.json").read_text())["block_swap"]
    assert (report["blocks_swapped"], report["blocks"]) == (4, 12)
    assert report["block_copies"] == 2 * (2 * 4 - 1)  # two steps, 2N − 1 copies each
    assert 0 < report["bytes_moved_per_step"] < 2 * report["swapped_bytes"]


@pytest.mark.parametrize("levers", [("--base-precision", "fp8", "--blocks-to-swap", 3), ("--base-precision", "nf4")],
                         ids=["fp8-swap", "nf4"])  # fmt: skip
def test_a_lora_on_a_stored_base_resumes_bit_identically(cli, model, photos, tmp_path, monkeypatch, levers):
    flags = (*LORA, "--max-train-steps", 4, *levers, "--random-flip")
    straight_and_resumed(cli, monkeypatch, model, photos, tmp_path, flags, stop_at=2)
    assert_same(lora_weights(tmp_path / "a", 4), lora_weights(tmp_path / "b", 4))


def _outputs(c):
    """The text encoder's hidden states and the UNet's prediction on fixed noise, through our components."""
    tokenizer, encoder = c.tokenizers["text_encoder"], c.text_encoders["text_encoder"]
    ids = tokenizer(["a photo of sks thing"], padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids  # fmt: skip
    noisy = torch.randn(1, c.denoiser.config.in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = encoder(ids)[0]
        return torch.cat([hidden.flatten(), c.denoiser(noisy, torch.tensor([500]), hidden).sample.flatten()]).float()


def _trained(model, checkpoint, storage=None):
    """Our trained model from a checkpoint: the base (stored as `storage` says, or fp32), the LoRA restored."""
    from dreambooth import adapters, families
    from dreambooth.launch import read_settings

    state = torch.load(checkpoint / "training_state.pt", weights_only=False)
    settings = checkpoint.parent / "settings.json"
    settings.write_text(json.dumps(state["config"]))
    cfg = read_settings(settings)
    family = families.of_folder(model)
    lora = adapters.get("lora")
    c = family.load(ResolvedModel.of_folder(model), Dtypes(torch.float32, torch.float32, torch.float32))
    if storage is not None:
        adapters.store_base(c, family, storage, Dtypes(torch.float32, torch.float32, torch.float32))
    lora.prepare(c, cfg, family)
    lora.restore(c, checkpoint, state)
    return _outputs(c)


@pytest.mark.parametrize("precision", ["nf4", "int8"])
def test_a_lora_trained_on_a_quantised_base_exports_for_the_full_precision_base(cli, model, photos, tmp_path,
                                                                                precision):  # fmt: skip
    """The file users load is the usual one: loaded by diffusers onto the full-precision base, it computes what our
    LoRA computes on that base (rel. error < 1e-3), and it stands as close to the quantised-base model it trained
    with as the quantised base alone stands to the full-precision base (quantisation is the only difference)."""
    from diffusers import StableDiffusionPipeline

    from dreambooth.storage import BaseStorage

    out = tmp_path / "out"
    flags = (*LORA, "--max-train-steps", 2, "--learning-rate", "3e-2", "--base-precision", precision)
    run = cli(*base_args(model, photos, out, *flags))
    assert run.exit_code == 0, run.stderr
    report = json.loads((out / "train_report.json").read_text())
    assert report["base_storage"]["unet"]["precision"] == precision
    checkpoint = out / "checkpoints" / "step-2"
    exported = tmp_path / "sks-lora.safetensors"
    assert cli("export", checkpoint, exported).exit_code == 0

    pipe = StableDiffusionPipeline.from_pretrained(model)
    base_full = _outputs(_components_of(pipe))
    pipe.load_lora_weights(exported)
    pipe.fuse_lora()
    theirs = _outputs(_components_of(pipe))
    ours_full = _trained(model, checkpoint)
    storage = BaseStorage(precision, frozenset({"unet", "text_encoder"}))
    ours_quantised = _trained(model, checkpoint, storage)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert rel(theirs, ours_full) < 1e-3
    assert rel(ours_full, base_full) > 1e-3, "the LoRA did not change the model"
    base_quantised = _base_only(model, storage)
    assert rel(ours_quantised, ours_full) < 1.5 * rel(base_quantised, base_full) + 1e-4


def _components_of(pipe):
    from types import SimpleNamespace

    return SimpleNamespace(
        tokenizers={"text_encoder": pipe.tokenizer},
        text_encoders={"text_encoder": pipe.text_encoder},
        denoiser=pipe.unet,
    )


def _base_only(model, storage):
    from dreambooth import adapters, families

    family = families.of_folder(model)
    f32 = Dtypes(torch.float32, torch.float32, torch.float32)
    c = family.load(ResolvedModel.of_folder(model), f32)
    adapters.store_base(c, family, storage, f32)
    return _outputs(c)


# ───────────────────────────── refused ─────────────────────────────


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (("--adapter", "full", "--base-precision", "nf4"), "--base-precision nf4 stores the base quantised"),
        (("--adapter", "lora", "--blocks-to-swap", 13), "--blocks-to-swap 13: Stable Diffusion 1.x's unet has 12"),
        (("--adapter", "full", "--blocks-to-swap", 2), "--blocks-to-swap 2 keeps frozen weights in host memory"),
        (("--adapter", "lora", "--blocks-to-swap", -1), "--blocks-to-swap must not be negative"),
        (("--adapter", "lora", "--base-precision", "nf4", "--blocks-to-swap", 2), "--blocks-to-swap moves"),
        (("--adapter", "lora", "--base-precision", "bf16"), "--mixed-precision no computes in fp32"),
        (("--adapter", "lora", "--vram-budget", "lots"), "--vram-budget 'lots' is not an amount of memory"),
    ],
)
def test_bad_storage_settings_are_one_line_and_exit_2(cli, model, photos, tmp_path, flags, expected):
    result = cli(*base_args(model, photos, tmp_path / "out", *flags))
    assert result.exit_code == 2, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr


# ───────────────────────────── loading into stored layers ─────────────────────────────


@pytest.mark.parametrize("kind", ["sd1", "sdxl", "flux"])
def test_a_folder_part_streams_into_stored_layers_as_loading_then_storing_would(tmp_path, kind):
    """fp8 parts are read tensor by tensor into stored layers (never whole in the load precision): the same weights
    as from_pretrained followed by storing, T5's embedding still one tensor under both names."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    from dreambooth.families import stream
    from dreambooth.storage import BaseStorage
    from dreambooth.tiny_model import write_tiny_diffusers, write_tiny_flux

    if kind == "flux":
        folder = write_tiny_flux(tmp_path / kind, 0)
        parts = [("transformer", FluxTransformer2DModel), ("text_encoder", CLIPTextModel),
                 ("text_encoder_2", T5EncoderModel)]  # fmt: skip
    else:
        folder = write_tiny_diffusers(tmp_path / kind, 0, kind)
        parts = [("unet", UNet2DConditionModel), ("text_encoder", CLIPTextModel)]
        parts += [("text_encoder_2", CLIPTextModelWithProjection)] if kind == "sdxl" else []
    for role, cls in parts:
        storage = BaseStorage("fp8", frozenset({role}))
        streamed = stream.load_part(cls, folder / role, role, torch.float32, storage)
        loaded = cls.from_pretrained(folder / role)
        store(loaded, storage.layers(role, loaded, [loaded]), "fp8", torch.float32)
        for (name, a), (other, b) in zip(_weights(streamed), _weights(loaded), strict=True):
            assert name == other and a.dtype == b.dtype and torch.equal(a, b), (role, name)
        assert any(isinstance(m, StoredLinear) for m in streamed.modules()), role
        if role == "text_encoder_2" and kind == "flux":
            assert streamed.shared.weight is streamed.encoder.embed_tokens.weight


def _weights(model):
    """Every weight by name, a stored layer's as stored."""
    out = [(n, p.detach()) for n, p in model.named_parameters()]
    out += [(f"{n}.stored", m.stored) for n, m in model.named_modules() if isinstance(m, StoredLinear | StoredConv2d)]
    return sorted(out, key=lambda x: x[0])
