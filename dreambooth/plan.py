"""`dreambooth plan` / `train --dry-run`: a run's peak GPU memory and host RAM, part by part, before anything loads;
and `--vram-budget`: the memory levers a run needs to fit a card.

Nothing is read but the model's configs and file headers. The parts are built on the meta device (no memory) to
count weights as --base-precision stores them, what trains, its gradients and optimizer states, and what
--blocks-to-swap keeps in host memory; the denoiser runs one step on fake tensors (dreambooth/memory.py) at the
run's batch, resolution, precision and checkpointing to measure activations. It is an estimate of what PyTorch
allocates (torch.cuda.max_memory_allocated, what bench/ records); the CUDA context and the allocator's slack come on
top, and the budget check adds them (HEADROOM).
"""

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from dreambooth import events, optimizers
from dreambooth.config import LORA_KINDS, TrainConfig
from dreambooth.errors import UserError
from dreambooth.families.base import Components, Dtypes, ResolvedModel
from dreambooth.storage import BYTES_PER_WEIGHT, FP8, BaseStorage, storable

GIB = 2**30
CUDA_CONTEXT = int(0.5 * GIB)  # the CUDA context and cuBLAS/cuDNN workspaces (not allocated through PyTorch)
SLACK = 0.10  # the caching allocator's rounding and fragmentation, as a share of what is allocated


def headroom(allocated: int) -> int:
    """What a card must have for a run that allocates `allocated` bytes at its peak."""
    return int(allocated * (1 + SLACK)) + CUDA_CONTEXT


@dataclass
class Line:
    part: str
    nbytes: int
    note: str = ""


@dataclass
class Plan:
    """The estimate: GPU lines while latents and prompts are cached, and while training; host lines."""

    family: str
    adapter: str
    settings: dict
    caching: list[Line] = field(default_factory=list)
    training: list[Line] = field(default_factory=list)
    host: list[Line] = field(default_factory=list)  # while training
    loading: list[Line] = field(default_factory=list)  # host memory while the parts load
    budget: int | None = None
    chosen: list[str] = field(default_factory=list)

    @property
    def peak_gpu(self) -> int:
        return max(sum(x.nbytes for x in self.caching), sum(x.nbytes for x in self.training))

    @property
    def needs(self) -> int:
        return headroom(self.peak_gpu)

    @property
    def peak_host(self) -> int:
        return max(sum(x.nbytes for x in self.host), sum(x.nbytes for x in self.loading))

    def to_dict(self) -> dict:
        def lines(xs):
            return [{"part": x.part, "bytes": x.nbytes, "note": x.note} for x in xs]

        return {
            "estimate": True,
            "family": self.family,
            "adapter": self.adapter,
            "settings": self.settings,
            "caching": lines(self.caching),
            "training": lines(self.training),
            "host_loading": lines(self.loading),
            "host_training": lines(self.host),
            "peak_gpu_bytes": self.peak_gpu,
            "card_needs_bytes": self.needs,
            "peak_host_bytes": self.peak_host,
            "vram_budget_bytes": self.budget,
            "chosen": self.chosen,
        }

    def render(self) -> str:
        def gib(n: int) -> str:
            return f"{n / GIB:6.2f} GiB" if n >= 2**28 else f"{n / 2**20:6.1f} MiB"

        out = [f"Estimated memory of this run ({self.family}, {self.adapter}; an estimate, not a measurement):"]
        out.append("  " + ", ".join(f"{k} {v}" for k, v in self.settings.items()))
        for title, xs in (
            ("GPU while caching latents and prompts", self.caching),
            ("GPU while training", self.training),
        ):
            out.append(f"  {title}: {gib(sum(x.nbytes for x in xs)).strip()}")
            out += [f"    {gib(x.nbytes)}  {x.part}" + (f"  ({x.note})" if x.note else "") for x in xs]
        out.append(f"  peak allocated by PyTorch: {gib(self.peak_gpu).strip()}; a card needs about "
                   f"{gib(self.needs).strip()} (+{SLACK:.0%} allocator slack, +{CUDA_CONTEXT / GIB:.1f} GiB CUDA "
                   "context)")  # fmt: skip
        for title, xs in (("host RAM while loading", self.loading), ("host RAM while training", self.host)):
            out.append(f"  {title}: {gib(sum(x.nbytes for x in xs)).strip()}")
            out += [f"    {gib(x.nbytes)}  {x.part}" + (f"  ({x.note})" if x.note else "") for x in xs]
        out.append("  (host RAM: the model's parts only; Python, PyTorch and the CUDA libraries come on top)")
        if self.budget is not None:
            out.append(f"  --vram-budget {self.budget / GIB:.1f} GiB: " + ("; ".join(self.chosen) or "fits as set"))
        return "\n".join(out)


# ───────────────────────────── the model, without its weights ─────────────────────────────


def resolve(cfg: TrainConfig) -> ResolvedModel:
    """The model as training would resolve it, without converting anything: a folder, Flux's files, or an SD/SDXL
    single file (read from its header)."""
    from dreambooth import preflight
    from dreambooth.families.flux import parts as flux_parts

    src = cfg.model
    if src.is_file() and src.suffix.lower() in (".ckpt", ".safetensors") and not flux_parts.is_flux_file(src):
        cached = preflight.cache_entry(cfg.cache / "converted", src)
        if (cached / "model_index.json").is_file():
            return ResolvedModel.of_folder(cached)
        return ResolvedModel(_single_file_family(src), parts={"file": _part(src)})
    return preflight.resolve_model(cfg)


def _part(path: Path):
    from dreambooth.families.base import Part

    return Part(path)


def _single_file_family(path: Path) -> str:
    from dreambooth.checkpoint.load import open_checkpoint
    from dreambooth.families.sd.detect import detect_family, refuse_unsupported

    detection = detect_family(open_checkpoint(path))
    refuse_unsupported(detection, path)
    return detection.family


def skeleton(model: ResolvedModel) -> dict[str, torch.nn.Module]:
    """The model's parts by role (denoiser, text encoders, vae), built from their configs on the current default
    device (meta, or under fake tensors): shapes without weights."""
    if model.folder is not None:
        return {role: _from_folder(model.folder / role) for role in _folder_roles(model.folder)}
    if "file" in model.parts:
        return _from_single_file(model.parts["file"].path)
    return _from_flux_files(model)


def _folder_roles(folder: Path) -> list[str]:
    index = json.loads((folder / "model_index.json").read_text())
    return [k for k, v in index.items() if isinstance(v, list) and v[0] and (folder / k / "config.json").is_file()]


def _from_folder(part: Path) -> torch.nn.Module:
    config = json.loads((part / "config.json").read_text())
    if "_class_name" in config:  # a diffusers model
        import diffusers

        return getattr(diffusers, config["_class_name"]).from_config(config)
    import transformers

    cls = getattr(transformers, config["architectures"][0])
    return cls(transformers.AutoConfig.from_pretrained(part))


def _from_flux_files(model: ResolvedModel) -> dict[str, torch.nn.Module]:
    from dreambooth.checkpoint.load import open_checkpoint
    from dreambooth.families.flux import parts

    out = {}
    for role, part in model.parts.items():
        ckpt = open_checkpoint(part.path)  # the header only: tensors are byte ranges
        tensors = parts.strip(ckpt.tensors, part.prefix)
        out[role] = parts.build(role, parts.part_config(role, tensors, model.family, str(part.path), ckpt.metadata))
    return out


def _from_single_file(path: Path) -> dict[str, torch.nn.Module]:
    """An SD/SDXL single file's parts from its header: the configs `convert` would write (shapes decide them)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dreambooth.checkpoint.load import open_checkpoint
    from dreambooth.families.sd import spec
    from dreambooth.families.sd.convert import recorded_configs
    from dreambooth.families.sd.detect import detect_family

    ckpt = open_checkpoint(path)
    family = detect_family(ckpt).family
    model_type = spec.model_type_of(family, "epsilon")  # the prediction type changes no shape
    recorded = recorded_configs(ckpt)
    out = {
        "unet": UNet2DConditionModel.from_config(recorded.get("unet") or spec.infer_unet_config(ckpt.tensors,
                                                                                              model_type)),
        "vae": AutoencoderKL.from_config(recorded.get("vae") or spec.infer_vae_config(ckpt.tensors, model_type)),
    }  # fmt: skip
    for name, encoder in spec.FAMILIES[family].text_encoders.items():
        config = CLIPTextConfig(**(recorded.get(name) or spec.infer_text_config(ckpt.tensors, model_type, name)))
        out[name] = (CLIPTextModelWithProjection if encoder.projection else CLIPTextModel)(config)
    return out


# ───────────────────────────── weights, trained state, swap ─────────────────────────────


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def stored_size(model: torch.nn.Module, names: list[str], precision: str, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes of the named layers' weights as `precision` stores them, bytes of everything else in `dtype`)."""
    weights = {id(model.get_submodule(n).weight) for n in names}
    stored = 0
    for name in names:
        w = model.get_submodule(name).weight
        if precision == "fp8":
            stored += w.numel()
        elif precision == "int8":
            stored += w.numel() + 4 * w.shape[0]  # one fp32 scale per row
        elif precision == "nf4":
            stored += int(w.numel() * BYTES_PER_WEIGHT["nf4"])
        else:
            stored += w.numel() * _size(dtype)
    rest = sum(p.numel() * _size(dtype) for p in model.parameters() if id(p) not in weights)
    return stored, rest


def precision_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", FP8: "fp8"}[dtype]


def _mixed(cfg: TrainConfig) -> torch.dtype:
    # on a GPU, "auto" means what the card does: plans are for GPUs, bf16-capable ones (Ampere and later)
    mixed = {"auto": "bf16"}.get(cfg.mixed_precision, cfg.mixed_precision)
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed, torch.float32)


def _memo(memo: dict, key, make):
    if key not in memo:
        memo[key] = make()
    return memo[key]


def estimate(cfg: TrainConfig, family, model: ResolvedModel, memo: dict | None = None) -> Plan:
    """The memory `cfg` needs on `model`. `memo` keeps what does not change between the candidates of --vram-budget
    (the skeleton, the trained tensors, the measured step and VAE encoding)."""
    from dreambooth import adapters

    memo = {} if memo is None else memo
    adapter = adapters.get(cfg.adapter)
    weight_dtype = _mixed(cfg)
    dtypes = adapter.dtypes(cfg, weight_dtype)
    settings = {
        "resolution": cfg.resolution,
        "batch": cfg.train_batch_size,
        "mixed_precision": precision_name(weight_dtype),
        "base_precision": cfg.base_precision,
        "blocks_to_swap": cfg.blocks_to_swap,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "optimizer": _optimizer_name(cfg),
    }
    plan = Plan(family.name, cfg.adapter, settings, budget=cfg.vram_budget_bytes)
    parts = _memo(memo, "parts", lambda: _meta_skeleton(model))
    swap_host = _add_weights(plan, cfg, family, adapter, parts, dtypes)
    _add_trained_state(plan, cfg, family, adapter, model, memo, dtypes, weight_dtype)
    if swap_host:
        plan.host.append(Line("swapped blocks", swap_host, "pinned host memory"))
    return plan


def _add_weights(plan: Plan, cfg: TrainConfig, family, adapter, parts: dict, dtypes: Dtypes) -> int:
    """Each part's weights as stored, in the phases and places they take memory; the swapped blocks' bytes."""
    denoiser_name = family.denoiser_name
    trains_whole = adapter.trains_whole(cfg, family)
    storage = BaseStorage(cfg.base_precision, frozenset({denoiser_name, *family.text_encoder_names} - trains_whole))
    text_trains = set(family.trainable_text) if cfg.train_text_encoder else set()
    swap_host = swap_flight = 0
    for role, part in parts.items():
        if role == "vae":
            continue
        is_denoiser = role == denoiser_name
        dtype = dtypes.denoiser if is_denoiser else dtypes.text(role in text_trains)
        roots = family.blocks(part) if is_denoiser else [part]
        names = storage.layers(role, part, roots)
        stored, rest = stored_size(part, names, storage.precision if names else "auto", dtype)
        how = f"{storage.precision} + {precision_name(dtype)}" if names else precision_name(dtype)
        if is_denoiser and cfg.blocks_to_swap:
            blocks = family.blocks(part)
            sizes = [_block_bytes(b, storage.precision if names else "auto", dtype)
                     for b in blocks[len(blocks) - cfg.blocks_to_swap :]]  # fmt: skip
            swap_host = sum(sizes)
            swap_flight = sum(sorted(sizes)[-2:])  # the block computing and the one coming over
            stored -= swap_host
        nbytes = stored + rest
        # stored layers are stored as they are read (families/stream.py): loading holds one layer more, not a part
        plan.loading.append(Line(f"{role}", nbytes + swap_host * is_denoiser, how))
        if is_denoiser:
            plan.training.append(Line(f"{role} weights", nbytes, how))
            if cfg.blocks_to_swap:
                plan.training.append(Line("swapped blocks in flight", swap_flight,
                                          f"2 of {cfg.blocks_to_swap} swapped blocks"))  # fmt: skip
        elif role in text_trains:
            plan.training.append(Line(f"{role} weights", nbytes, how))
            plan.caching.append(Line(f"{role} weights", nbytes, how))
        else:
            plan.caching.append(Line(f"{role} weights", nbytes, how + ", leaves the GPU after caching"))
            plan.host.append(Line(f"{role} weights", nbytes, how + ", off the GPU"))
    vae_bytes = _nbytes(parts["vae"].parameters()) // 4 * _size(dtypes.frozen)
    vae_how = precision_name(dtypes.frozen)
    plan.caching.append(Line("vae weights", vae_bytes, vae_how))
    plan.loading.append(Line("vae", vae_bytes, vae_how))
    if cfg.cache_latents:
        plan.host.append(Line("vae weights", vae_bytes, vae_how + ", off the GPU"))
    else:
        plan.training.append(Line("vae weights", vae_bytes, "--no-cache-latents: encodes every step"))
    return swap_host


def _add_trained_state(plan: Plan, cfg: TrainConfig, family, adapter, model, memo: dict, dtypes: Dtypes,
                       weight_dtype: torch.dtype) -> None:  # fmt: skip
    """What trains (a LoRA's weights; a full model's are counted with the weights), its gradients and optimizer
    states, the step's activations, and the VAE encoding while latents are cached."""
    lora_key = (cfg.adapter, cfg.lora_rank, cfg.lora_conv_rank, cfg.lora_targets, cfg.train_text_encoder, cfg.full_bf16,
                cfg.lora_dora, cfg.lokr_factor)  # fmt: skip
    trained = _memo(memo, ("trained", lora_key), lambda: _trained_params(cfg, family, adapter, _meta_skeleton(model)))
    if cfg.adapter in LORA_KINDS:  # counted off the adapter's own layers: LoHa's four factors, LoKr's, DoRA's m
        kind = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}[cfg.adapter]
        note = f"rank {cfg.lora_rank}{', DoRA' if cfg.lora_dora else ''}, fp32"
        plan.training.append(Line(f"{kind} weights", _nbytes(trained), note))
    step_key = ("step", cfg.gradient_checkpointing, cfg.train_batch_size, cfg.with_prior_preservation, lora_key,
                dtypes.denoiser, weight_dtype, cfg.resolution)  # fmt: skip
    step = _memo(memo, step_key, lambda: measure(cfg, family, model, weight_dtype))
    if cfg.fused_backward:
        largest = max((t.numel() * t.element_size() for t in trained), default=0)
        plan.training.append(Line("gradients", largest, "--fused-backward: one weight's at a time"))
    else:
        plan.training.append(Line("gradients", _nbytes(trained), "what trains, in its own precision"))
    states = _optimizer_bytes(cfg, trained)
    if cfg.offload_optimizer == "cpu":
        plan.host.append(Line("optimizer states", states, "--offload-optimizer cpu"))
    else:
        plan.training.append(Line("optimizer states", states, _optimizer_name(cfg)))
    plan.training.append(Line("activations", step.activations,
                              _activation_note(cfg) + (", measured on fake tensors" if step.peak else "")))  # fmt: skip
    encoding = _memo(memo, ("vae", cfg.resolution, dtypes.frozen),
                     lambda: _vae_encode_bytes(cfg, family, model, dtypes.frozen))  # fmt: skip
    plan.caching.append(Line("VAE encoding", encoding, f"one {cfg.resolution} px image, measured on fake tensors"))


def _meta_skeleton(model: ResolvedModel) -> dict[str, torch.nn.Module]:
    with torch.device("meta"):
        return skeleton(model)


def _block_bytes(block: torch.nn.Module, precision: str, dtype: torch.dtype) -> int:
    """What a swapped block moves: its storable layers' weights as stored (fp8, or the compute precision)."""
    names = storable(block, [block], "auto")
    return sum(block.get_submodule(n).weight.numel() * (1 if precision == "fp8" else _size(dtype)) for n in names)


def _trained_params(cfg, family, adapter, parts) -> list[torch.Tensor]:
    """The trained tensors (on the meta device): a LoRA's, through the adapter's own preparation; or the parts that
    train whole, in their training precision."""
    if cfg.adapter == "full":
        dtypes = adapter.dtypes(cfg, _mixed(cfg))
        names = adapter.trains_whole(cfg, family)
        return [torch.empty(p.shape, dtype=dtypes.denoiser, device="meta")
                for role in names for p in parts[role].parameters()]  # fmt: skip
    c = _components(family, parts)
    with torch.device("meta"):
        trained = adapter.prepare(c, cfg, family)
    return [p for model in trained.values() for p in model.parameters() if p.requires_grad]


def _components(family, parts) -> Components:
    return Components(
        denoiser=parts[family.denoiser_name],
        vae=parts["vae"],
        text_encoders={n: parts[n] for n in family.text_encoder_names},
        tokenizers={},
        scheduler=None,
        model_dir=None,
        prediction_type="flow" if family.denoiser_name == "transformer" else "epsilon",
        denoiser_name=family.denoiser_name,
        extra={"trainable_text": family.trainable_text},
    )


def _optimizer_name(cfg: TrainConfig) -> str:
    return optimizers.KINDS[cfg.optimizer].title


def _optimizer_bytes(cfg: TrainConfig, trained: list[torch.Tensor]) -> int:
    """Each optimizer's state as its package allocates it (dreambooth/optimizers.py): AdamW two moments per weight
    in its precision, 8-bit AdamW two bytes (+ an fp32 scale per block of 256), Lion one, Prodigy four buffers,
    Adafactor and CAME factored moments per matrix, schedule-free two."""
    return optimizers.state_bytes(cfg.optimizer, trained, optimizers.parse_args(cfg.optimizer_args, cfg.optimizer))


def _activation_note(cfg: TrainConfig) -> str:
    batch = cfg.train_batch_size * (2 if cfg.with_prior_preservation else 1)
    checkpointing = "with" if cfg.gradient_checkpointing else "without"
    return f"batch {batch} at {cfg.resolution} px, {checkpointing} gradient checkpointing"


# ───────────────────────────── a step on fake tensors ─────────────────────────────


def measure(cfg: TrainConfig, family, model: ResolvedModel, weight_dtype: torch.dtype):
    """One training step of the denoiser (and its LoRA), at the run's batch and resolution, on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dreambooth import adapters
    from dreambooth.memory import measure_step
    from dreambooth.performance import enable_gradient_checkpointing

    adapter = adapters.get(cfg.adapter)
    dtypes = adapter.dtypes(cfg, weight_dtype)
    batch = cfg.train_batch_size * (2 if cfg.with_prior_preservation else 1)
    with torch.device("meta"):
        parts = skeleton(model)
        c = _components(family, parts)
        family.objective(c, cfg)  # what the family keeps of the settings (Flux: T5's length, guidance)
        # only the denoiser runs here: the text encoders' weights and LoRA are counted by `estimate`
        adapter.prepare(c, replace(cfg, train_text_encoder=False), family)
    denoiser = c.denoiser
    with FakeTensorMode(allow_non_fake_inputs=True):
        _fake_weights(denoiser, dtypes.denoiser, keep_trained=cfg.adapter in LORA_KINDS)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(denoiser, denoiser=True)
        denoiser.train()
        for layer in denoiser.modules():
            if hasattr(layer, "module_dropout"):
                # peft's LoHa/LoKr draw their module dropout as a Python bool in training mode, which fake tensors
                # cannot give; in eval mode they compute the same product
                layer.eval()
        channels, side = _latent_shape(parts, cfg.resolution)
        shapes = family.conditioning_shapes(c, batch)
        mixed = None if weight_dtype == torch.float32 else weight_dtype
        flow = c.prediction_type == "flow"

        def step():
            noisy = torch.randn(batch, channels, side, side, dtype=dtypes.denoiser)
            timesteps = torch.rand(batch) if flow else torch.randint(0, 1000, (batch,))
            cond = {k: torch.randn(*shape, dtype=dtypes.denoiser) for k, shape in shapes.items()}
            pred = family.predict(c, noisy, timesteps, cond)
            torch.nn.functional.mse_loss(pred.float(), noisy.float()).backward()

        return measure_step(step, mixed)


def _vae_encode_bytes(cfg: TrainConfig, family, model: ResolvedModel, dtype: torch.dtype) -> int:
    from diffusers import AutoencoderKL
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dreambooth.memory import measure_inference

    with torch.device("meta"):
        config = skeleton(model)["vae"].config
    with FakeTensorMode(allow_non_fake_inputs=True):
        with _default_dtype(dtype):
            vae = AutoencoderKL.from_config(config)
        image = torch.randn(1, 3, cfg.resolution, cfg.resolution, dtype=dtype)
        return measure_inference(lambda: vae.encode(image).latent_dist.mean)


class _default_dtype:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __enter__(self):
        self.old = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype if self.dtype.is_floating_point and self.dtype != FP8 else self.old)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.old)


def _fake_weights(model: torch.nn.Module, dtype: torch.dtype, keep_trained: bool) -> None:
    """A meta model's weights as fake tensors (under the active FakeTensorMode), in `dtype`; with `keep_trained`
    what trains keeps the precision the adapter gave it (a LoRA's fp32)."""
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                keep = keep_trained and p.requires_grad
                fake = torch.empty(p.shape, dtype=p.dtype if keep else dtype)
                module._parameters[name] = torch.nn.Parameter(fake, requires_grad=p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = torch.empty(b.shape, dtype=dtype if b.is_floating_point() else b.dtype)


def _latent_shape(parts, resolution: int) -> tuple[int, int]:
    vae = parts["vae"].config
    factor = 2 ** (len(vae.block_out_channels) - 1)
    return vae.latent_channels, resolution // factor


# ───────────────────────────── the plan, and --vram-budget ─────────────────────────────


def plan_run(cfg: TrainConfig) -> Plan:
    """The estimate for `cfg` as given, or, with --vram-budget, for the levers chosen to meet it."""
    from dreambooth import families

    model = resolve(cfg)
    family = families.get(model.family)
    cfg = with_defaults(cfg, family)
    if cfg.vram_budget_bytes is None:
        return estimate(cfg, family, model)
    _, plan = fit_budget(cfg, family, model)
    return plan


def with_defaults(cfg: TrainConfig, family) -> TrainConfig:
    from dreambooth.adapters import with_family_defaults

    return with_family_defaults(cfg, family)


def fit_budget(cfg: TrainConfig, family, model: ResolvedModel) -> tuple[TrainConfig, Plan]:
    """The first of the candidates (each adding a lever to the last, never one the user set) whose estimate fits
    --vram-budget; none: one line naming the smallest the ladder reached."""
    budget = cfg.vram_budget_bytes
    memo: dict = {}
    tried = []
    blocks = len(family.blocks(_memo(memo, "parts", lambda: _meta_skeleton(model))[family.denoiser_name]))
    for changes in candidates(cfg, family, blocks):
        try:  # checked as the run would check it: a combination it refuses is no candidate
            candidate = TrainConfig(**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__} | changes)
        except UserError:
            continue
        plan = estimate(candidate, family, model, memo)
        tried.append(plan)
        if plan.needs <= budget:
            plan.chosen = [why(name, value, blocks) for name, value in changes.items() if name in WHY]
            return candidate, plan
    smallest = min(tried, key=lambda p: p.needs)
    raise UserError(
        f"--vram-budget {cfg.vram_budget}: no setting fits; the smallest reachable is about "
        f"{smallest.needs / GIB:.1f} GiB ({', '.join(f'{k} {v}' for k, v in smallest.settings.items())})",
        "raise the budget, or lower --resolution or --train-batch-size"
        + (", or train a LoRA (--adapter lora)" if cfg.adapter == "full" else ""),
    )


WHY = {
    "gradient_checkpointing": "gradient checkpointing (activations recomputed in backward, ~25 % slower)",
    "use_8bit_adam": "8-bit AdamW (optimizer states in a quarter of the memory)",
    "fused_backward": "--fused-backward (each weight updated in backward: no full set of gradients)",
    "full_bf16": "--full-bf16 (the trained weights in bf16, without fp32 master weights)",
    "base_precision": "--base-precision {value} (the frozen weights in {value})",
    "blocks_to_swap": "--blocks-to-swap {value} (the frozen weights of the last {value} of {blocks} blocks in host "
    "memory, copied over as they compute)",
}


def why(name: str, value, blocks: int) -> str:
    return WHY[name].format(value=value, blocks=blocks)


def candidates(cfg: TrainConfig, family, blocks: int):
    """Settings to try, as changes to `cfg`, in the order levers cost least speed for the memory they save; the
    first is the run as set. A lever the user set (`cfg.explicit`) is never changed."""
    explicit = set(cfg.explicit)
    chosen: dict = {}
    yield {}

    def add(**changes) -> bool:
        if any(k in explicit and getattr(cfg, k) != v for k, v in changes.items()):
            return False
        chosen.update(changes)
        return True

    ladder = [{"gradient_checkpointing": True}]
    if cfg.optimizer == "adamw":  # an optimizer the user chose stays
        ladder.append({"optimizer": "adamw8bit", "use_8bit_adam": True})
    if cfg.adapter == "full":
        # fp8 stores what stays frozen in a full fine-tune: the text encoders that do not train
        ladder += [{"fused_backward": True, "max_grad_norm": 0.0}, {"base_precision": "fp8"}]
        ladder.append({"full_bf16": True})  # last: no fp32 master weights (kohya's SDXL recipe; needs bf16)
    else:
        ladder.append({"base_precision": "fp8"})
    for changes in ladder:
        if add(**changes):
            yield dict(chosen)
    if cfg.adapter == "full" or "blocks_to_swap" in explicit:
        return
    if family.denoiser_name == "transformer":  # a transformer's blocks are alike: each swapped one saves as much
        for n in range(2, blocks, 2):
            if add(blocks_to_swap=n):
                yield dict(chosen)
    if "base_precision" not in explicit:  # NF4 does not swap: the smallest base, all of it on the GPU
        yield {**chosen, "blocks_to_swap": 0, "base_precision": "nf4"}


def apply_budget(cfg: TrainConfig, family, model: ResolvedModel) -> TrainConfig:
    """--vram-budget in `train`: the levers chosen, said in one notice each."""
    if cfg.vram_budget_bytes is None:
        return cfg
    chosen, plan = fit_budget(cfg, family, model)
    for why in plan.chosen:
        events.notice(f"--vram-budget {cfg.vram_budget}: {why}")
    events.notice(
        f"--vram-budget {cfg.vram_budget}: estimated peak {plan.peak_gpu / GIB:.1f} GiB allocated, about "
        f"{plan.needs / GIB:.1f} GiB with the CUDA context (`dreambooth plan` shows the parts)"
    )
    return chosen
