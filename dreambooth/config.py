"""Training configuration: frozen dataclasses that check their own values, built from TOML, JSON and flags.

Only values are checked here (ranges, combinations, the concepts file's shape). Whether folders, images and
models on disk are usable is checked by `train.preflight`, still before any heavy work.
"""

import json
import tomllib
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from dreambooth import optimizers
from dreambooth.errors import UserError

MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
ATTENTION = ("sdpa", "xformers")
DISTRIBUTED = ("ddp", "deepspeed-zero2", "deepspeed-zero3")
OFFLOAD = ("none", "cpu")
REPORT_TO = ("none", "tensorboard", "wandb", "all")
ADAM_IMPLS = ("auto", "for-loop", "foreach", "fused")
# --low-vram: full-UNet fine-tuning at 512 px in about 6 GB of GPU memory, the UNet staying on the GPU. It fills in
# what the user did not set: 8-bit AdamW with paged states, gradient checkpointing, cached latents and text
# embeddings (so the VAE and the text encoder leave the GPU), fp16 autocast over frozen half-precision parts, and
# the optimizer step inside backward (no clipping then: clipping needs all gradients before the first update).
LOW_VRAM = {
    "use_8bit_adam": True,
    "paged_adam": True,
    "gradient_checkpointing": True,
    "cache_latents": True,
    "mixed_precision": "fp16",
    "fused_backward": True,
    "max_grad_norm": 0.0,
}
ADAPTERS = ("full", "lora", "loha", "lokr")
# the adapters that train beside a frozen base through peft (LoRA, and LyCORIS' LoHa and LoKr)
LORA_KINDS = ("lora", "loha", "lokr")
# --base-precision: how the frozen base's big layers are stored (dreambooth/storage.py); auto: as --mixed-precision
BASE_PRECISIONS = ("auto", "bf16", "fp16", "fp8", "int8", "nf4")
# flow matching (dreambooth/objectives.py): how σ is drawn, and how the loss is weighted over σ
TIMESTEP_SAMPLING = ("uniform", "sigmoid", "logit-normal", "shift", "flux-shift")
FLOW_WEIGHTING = ("none", "sigma-sqrt", "cosmap")
LOSSES = ("l2", "huber", "smooth-l1")  # --loss (kohya's --loss_type; smooth_l1 is accepted too)
HUBER_SCHEDULES = ("constant", "exponential", "snr")
EMA_DEVICES = ("gpu", "cpu")  # --ema-device: the training device, or host memory
# what diffusers' and kohya's LoRA trainers use as the learning rate of a LoRA; the full fine-tune's is 5e-6
DEFAULT_LEARNING_RATE = {"full": 5e-6, "lora": 1e-4, "loha": 1e-4, "lokr": 1e-4}
CONCEPT_KEYS = ("instance_prompt", "class_prompt", "instance_data_dir", "class_data_dir")


# --help panels of `dreambooth train` (and the sections of any other form built from TrainConfig)
MODEL = "Model, output and run"
DATA = "Data"
PRIOR = "Prior preservation"
ADAPTER = "What trains: the whole model or an adapter"
OPTIMIZER = "Optimizer, schedule and averaged weights"
LOSS = "Loss and noise"
FLOW = "Flow matching (FLUX.1)"
MEMORY = "Memory and speed"
SAVING = "Saving, samples and logs"
SCALING = "Scaling out (several GPUs or machines)"
PANELS = (MODEL, DATA, PRIOR, ADAPTER, OPTIMIZER, LOSS, FLOW, MEMORY, SAVING, SCALING)


def setting(
    default: Any,
    panel: str | None,
    help: str = "",
    *,
    choices: tuple[str, ...] = (),
    option: str | None = None,
    option_type: type | None = None,
) -> Any:
    """A TrainConfig field and what a front end shows for it: its panel (None: not an option), one help text, the
    values it takes, the option's spelling where it is not the kebab-case name, and the type an option reads
    where it differs from the field's (a comma-separated string for a tuple)."""
    metadata = {"panel": panel, "help": help, "choices": choices, "option": option, "option_type": option_type}
    if default is MISSING:
        return field(metadata=metadata)
    if isinstance(default, (list, dict, set)):
        raise TypeError("a setting's default must be immutable (a tuple, not a list)")
    return field(default=default, metadata=metadata)


def flag(name: str) -> str:
    """The command-line spelling of a config field, for error messages."""
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class Concept:
    """One subject to learn: its images and prompt, and (for prior preservation) its class."""

    instance_prompt: str
    instance_data_dir: Path
    class_prompt: str | None = None
    class_data_dir: Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.instance_prompt, str) or not self.instance_prompt.strip():
            raise UserError("the instance prompt is empty", "pass --instance-prompt, e.g. 'a photo of sks dog'")
        object.__setattr__(self, "instance_data_dir", Path(self.instance_data_dir))
        if self.class_data_dir is not None:
            object.__setattr__(self, "class_data_dir", Path(self.class_data_dir))


def load_concepts_list(path: Path) -> tuple[Concept, ...]:
    """`concepts_list.json` as the classic script reads it: a list of {instance_prompt, class_prompt, …}."""
    path = Path(path)
    where = f"--concepts-list {path}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{where}: file not found", "pass the path of your concepts_list.json") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{where}: cannot read it ({exc})", "check the file's permissions and encoding") from None
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{where}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})",
            "fix the JSON; the format is a list of {instance_prompt, class_prompt, instance_data_dir, class_data_dir}",
        ) from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data:
        raise UserError(f"{where}: expected a non-empty JSON list of concepts", "wrap your concept objects in [ … ]")
    return tuple(_concept_from_dict(entry, f"{where}: entry {i}") for i, entry in enumerate(data))


def _concept_from_dict(entry: Any, where: str) -> Concept:
    if not isinstance(entry, dict):
        raise UserError(f"{where} is a {type(entry).__name__}, not an object", "each entry is {instance_prompt, …}")
    unknown = sorted(set(entry) - set(CONCEPT_KEYS))
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}", f"the keys are {', '.join(CONCEPT_KEYS)}")
    for key in ("instance_prompt", "instance_data_dir"):
        if not isinstance(entry.get(key), str) or not entry[key].strip():
            raise UserError(f"{where}: key {key!r} is missing or empty", f'add "{key}": "…" to that entry')
    for key in ("class_prompt", "class_data_dir"):
        if entry.get(key) is not None and not isinstance(entry[key], str):
            raise UserError(f"{where}: key {key!r} must be a string", f'write "{key}": "…"')
    return Concept(
        instance_prompt=entry["instance_prompt"],
        instance_data_dir=Path(entry["instance_data_dir"]),
        class_prompt=entry.get("class_prompt") or None,
        class_data_dir=Path(entry["class_data_dir"]) if entry.get("class_data_dir") else None,
    )


@dataclass(frozen=True)
class TrainConfig:
    """Everything `dreambooth train` needs. Field names are the flags' names in snake_case.

    Each field is declared with `setting(default, panel, help)`: the `dreambooth train` option (its name, choices,
    help and --help panel) is generated from it, so a new setting is one line here.
    """

    model: Path = setting(MISSING, MODEL, "Base model: a diffusers folder, or a .ckpt/.safetensors file.")
    concepts: tuple[Concept, ...] = setting(MISSING, None)  # from --instance-*/--class-* or --concepts-list
    output: Path = setting(Path("output"), MODEL, "Where checkpoints, exports and reports go.")
    vae: Path | None = setting(None, MODEL, "Replacement VAE: a diffusers VAE folder or a .safetensors/.ckpt file.")
    cache_dir: Path | None = setting(None, MODEL, "Where converted single files go; default OUTPUT/cache.")
    # the text encoders and VAE of a model given as its transformer's single file (ComfyUI keeps Flux in four)
    clip_l: Path | None = setting(None, FLOW, "Flux given as its transformer's file: CLIP-L (clip_l.safetensors).")
    t5xxl: Path | None = setting(None, FLOW, "Flux given as its transformer's file: T5-XXL (t5xxl_fp16.safetensors).")
    ae: Path | None = setting(None, FLOW, "Flux given as its transformer's file: the VAE (ae.safetensors).")
    # prior preservation
    with_prior_preservation: bool = setting(False, PRIOR, "Also train on class images, keeping the class's look.")
    prior_loss_weight: float = setting(1.0, PRIOR, "Weight of the class images' loss.")
    num_class_images: int = setting(100, PRIOR, "Class images to have; missing ones are generated first.")
    sample_batch_size: int = setting(4, PRIOR, "Class images generated at a time.")
    class_inference_steps: int = setting(50, PRIOR, "Sampling steps per generated class image.")
    # data
    resolution: int = setting(512, DATA, "Training images' side in pixels (buckets: about resolution² pixels).")
    center_crop: bool = setting(False, DATA, "Crop the centre of each image (otherwise a random crop).")
    random_flip: bool = setting(False, DATA, "Mirror images at random (the ShivamShrirao fork's --hflip).")
    caption_extension: str | None = setting(
        None,
        DATA,
        "Per-image captions: the first line of photo.txt beside photo.jpg for '.txt' (UTF-8); none or empty: the "
        "instance prompt. A caption without the instance prompt's identifier (its words that the class prompt "
        "lacks, e.g. 'sks') gets the instance prompt in front: '<instance prompt>, <caption>'. Class images: the "
        "class prompt, or their own caption files.",
    )
    caption_dropout: float = setting(0.0, DATA, "Share of instance examples trained with an empty caption, e.g. 0.1.")
    # CLIP prompts of SD/SDXL read in 75-token chunks up to this many tokens (kohya's --max_token_length)
    max_token_length: int = setting(
        75,
        DATA,
        "SD/SDXL: read prompts and captions up to 150 or 225 tokens, in CLIP's 75-token chunks (kohya's "
        "--max_token_length); 75 is CLIP's window, past which a prompt is cut (the run says so).",
    )
    buckets: bool = setting(
        False,
        DATA,
        "Aspect-ratio buckets of about resolution² px (sides multiples of --bucket-step) instead of square crops; "
        "each batch from one bucket; small images are never upscaled.",
    )
    bucket_min_side: int | None = setting(None, DATA, "Shortest bucket side (default 256, or --resolution).")
    bucket_max_side: int | None = setting(None, DATA, "Longest bucket side (default 2 × --resolution).")
    bucket_step: int | None = setting(None, DATA, "Bucket sides are multiples of it (default 64: VAE 8 × UNet 8).")
    # the loss weighted by a mask per photo (dreambooth/data.py finds, cuts and caches it with its photo)
    masked_loss: bool = setting(
        False,
        DATA,
        "Weigh the loss by a mask per photo: photo.mask.png beside photo.jpg, else the photo's alpha channel (white "
        "trains, black does not, grey in between); photos without one, and class images, train whole.",
    )
    # held-out images (dreambooth/validation.py): their loss at fixed noise levels and fixed noise, every N steps
    validation_split: float = setting(
        0.0, DATA, "Hold out this share of the instance images (e.g. 0.1) and log their loss."
    )
    validation_dir: Path | None = setting(None, DATA, "Held-out images of their own (captions as for training).")
    validation_every: int | None = setting(
        None, DATA, "Steps between validations (default: --save-interval, else a tenth of the run)."
    )
    # what trains (dreambooth/adapters.py): the whole model, or LoRA layers beside the frozen base
    adapter: str = setting(
        "full",
        ADAPTER,
        "full: fine-tune the whole denoiser; lora: train LoRA layers (kohya/A1111 file); loha, lokr: LyCORIS' "
        "Hadamard and Kronecker products (their files load in the WebUI and ComfyUI).",
        choices=ADAPTERS,
    )
    # a full fine-tune's weights kept in bf16, no fp32 master copy (kohya's --full_bf16); None: the family's choice
    # (Flux: on with --mixed-precision bf16, where fp32 masters of 12 B parameters would need 48 GB more)
    full_bf16: bool | None = setting(
        None,
        ADAPTER,
        "Full fine-tune: keep the trained weights in bf16, no fp32 master copy (kohya's --full_bf16; needs "
        "--mixed-precision bf16). Default: on for Flux with bf16.",
    )
    lora_rank: int = setting(16, ADAPTER, "LoRA rank (kohya's network dim).")
    lora_alpha: float | None = setting(None, ADAPTER, "LoRA alpha; scale = alpha / rank (default: the rank).")
    lora_dropout: float = setting(0.0, ADAPTER, "Dropout on the LoRA layers' input while training.")
    # the family's groups (attention, feed-forward, …) or module names; None: the family's default (its module tables
    # live with the family, which expands and checks them once the model is known)
    lora_targets: tuple[str, ...] | None = setting(
        None,
        ADAPTER,
        "Comma-separated: attention (default), feed-forward, projections, or module names.",
        option_type=str,
    )
    lora_conv_rank: int = setting(0, ADAPTER, "> 0: LoCon, the 3×3 convolutions too, at this rank.")
    lora_conv_alpha: float | None = setting(None, ADAPTER, "LoCon's alpha (default: --lora-conv-rank).")
    # DoRA (--adapter lora): each weight's magnitude trains apart from its direction (peft's use_dora)
    lora_dora: bool = setting(
        False, ADAPTER, "DoRA: train each weight's magnitude apart from its direction (--adapter lora)."
    )
    # LoKr: the factor the Kronecker product splits each dimension by; -1 as balanced as it divides (LyCORIS's)
    lokr_factor: int | None = setting(
        None, ADAPTER, "LoKr's Kronecker factor (--adapter lokr); -1 (its default): as balanced as it divides."
    )
    train_text_encoder: bool = setting(False, ADAPTER, "Train the text encoder(s) too.")
    text_encoder_steps: int | None = setting(None, ADAPTER, "Train the text encoder only for the first N steps.")
    # optimisation
    seed: int | None = setting(None, OPTIMIZER, "Seed of everything random; none: a new one, recorded in the report.")
    train_batch_size: int = setting(1, OPTIMIZER, "Examples per process and micro-batch.")
    max_train_steps: int = setting(800, OPTIMIZER, "Optimizer steps to train.")
    learning_rate: float | None = setting(None, OPTIMIZER, "Default 5e-6 (full), 1e-4 (LoRA).")
    text_encoder_lr: float | None = setting(None, OPTIMIZER, "The text encoder's own rate (default: --learning-rate).")
    scale_lr: bool = setting(False, OPTIMIZER, "Multiply the rate by the examples per optimizer step.")
    lr_scheduler: str = setting("constant", OPTIMIZER, "The rate over the run.", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = setting(0, OPTIMIZER, "Steps of linear warm-up.")
    lr_num_cycles: int = setting(1, OPTIMIZER, "cosine_with_restarts: the number of cycles.")
    lr_power: float = setting(1.0, OPTIMIZER, "polynomial: the power.")
    adam_beta1: float = setting(0.9, OPTIMIZER, "AdamW's β1.")
    adam_beta2: float = setting(0.999, OPTIMIZER, "AdamW's β2.")
    adam_weight_decay: float = setting(1e-2, OPTIMIZER, "AdamW's decoupled weight decay.")
    adam_epsilon: float = setting(1e-8, OPTIMIZER, "AdamW's ε.")
    # the optimizer (dreambooth/optimizers.py); None: adamw, or what --use-8bit-adam/--paged-adam say. Any case of
    # kohya's names is taken (AdamW8bit, Prodigy, …), so the CLI offers no fixed list
    optimizer: str | None = setting(
        None,
        OPTIMIZER,
        "adamw (default), adamw8bit, paged-adamw8bit, prodigy, adafactor, schedulefree-adamw, came, lion8bit "
        "(kohya's names too, any case).",
    )
    # its constructor's own settings as kohya writes them: "key=value" items, values Python literals; a key the
    # optimizer does not take is refused
    optimizer_args: tuple[str, ...] = setting(
        (),
        OPTIMIZER,
        "The optimizer's own settings, kohya's way: 'weight_decay=0.01 betas=0.9,0.99 decouple=True'.",
        option_type=str,
    )
    max_grad_norm: float = setting(1.0, OPTIMIZER, "Clip the gradients' norm to this; 0: no clipping.")
    gradient_accumulation_steps: int = setting(1, OPTIMIZER, "Micro-batches per optimizer step.")
    use_8bit_adam: bool = setting(
        False, OPTIMIZER, "8-bit AdamW (bitsandbytes): a quarter of AdamW's state memory (= --optimizer adamw8bit)."
    )
    # an exponential moving average of the trained weights (dreambooth/ema.py); exports and samples from it
    ema_decay: float | None = setting(
        None, OPTIMIZER, "Keep an exponential moving average of the trained weights, e.g. 0.999."
    )
    ema_device: str = setting("gpu", OPTIMIZER, "Where the average lives (cpu: no GPU memory).", choices=EMA_DEVICES)
    ema_start_step: int = setting(0, OPTIMIZER, "Before this step the average follows the weights.")
    export_ema: bool | None = setting(
        None, OPTIMIZER, "Checkpoints, exports and samples hold the average (default with --ema-decay)."
    )
    # the loss (dreambooth/objectives.py, train.elementwise_loss): L2, or kohya's pseudo-Huber / smooth L1 with a
    # threshold scheduled over the timesteps (None: "snr" for DDPM, "exponential" for flow matching)
    loss: str = setting(
        "l2",
        LOSS,
        "l2, or kohya's pseudo-Huber (huber) or smooth L1, robust to outlier pixels, with a threshold scheduled "
        "over the timesteps.",
        choices=(*LOSSES, "smooth_l1"),  # kohya's spelling (--loss_type smooth_l1): the same loss
    )
    huber_schedule: str | None = setting(
        None,
        LOSS,
        "The threshold over the timesteps (default: snr for SD/SDXL, exponential for Flux).",
        choices=HUBER_SCHEDULES,
    )
    huber_c: float = setting(0.1, LOSS, "The threshold (constant) or its end value, in (0, 1].")
    huber_scale: float = setting(1.0, LOSS, "Scales the threshold.")
    debiased_estimation: bool = setting(
        False, LOSS, "Weight each example by 1/√SNR (SD/SDXL; kohya's --debiased_estimation_loss)."
    )
    multires_noise_iterations: int = setting(0, LOSS, "Multi-resolution noise levels, e.g. 6 (SD/SDXL); 0: off.")
    multires_noise_discount: float = setting(0.3, LOSS, "Each coarser level's weight factor.")
    offset_noise: float = setting(0.0, LOSS, "Offset noise, e.g. 0.05: darker darks and brighter brights.")
    snr_gamma: float | None = setting(None, LOSS, "Min-SNR weighting, e.g. 5.")
    zero_terminal_snr: bool = setting(
        False,
        LOSS,
        "Rescale the noise schedule to zero terminal SNR (Lin et al. 2023): true black/white and the full range "
        "at the last step. Needs a v-prediction model.",
    )
    # flow matching (Flux): how σ is drawn (None: the family's choice), and the dev model's guidance input
    timestep_sampling: str | None = setting(
        None,
        FLOW,
        "How σ is drawn: uniform, sigmoid/logit-normal (of --logit-mean/--logit-std), shift (sigmoid then "
        "--flow-shift), flux-shift (sigmoid then Flux-dev's resolution-dependent shift). Default: the model's.",
        choices=TIMESTEP_SAMPLING,
    )
    flow_shift: float = setting(3.0, FLOW, "--timestep-sampling shift: σ' = kσ/(1+(k−1)σ).")
    logit_mean: float = setting(0.0, FLOW, "The mean of the normal that sigmoid/logit-normal sampling squashes.")
    logit_std: float = setting(1.0, FLOW, "Its standard deviation.")
    flow_weighting: str = setting("none", FLOW, "Loss weighting over σ (SD3's).", choices=FLOW_WEIGHTING)
    guidance_scale: float = setting(1.0, FLOW, "FLUX.1-dev's guidance input while training (kohya's advice).")
    t5_max_length: int | None = setting(None, FLOW, "T5 tokens per prompt (default: dev 512, schnell 256).")
    # the frozen base (dreambooth/storage.py, blockswap.py): how its big layers are stored, how many of the
    # denoiser's blocks live in host memory, and the GPU memory the run must fit (dreambooth/plan.py picks levers)
    base_precision: str = setting(
        "auto",
        MEMORY,
        "How the frozen base is stored: auto (as --mixed-precision), bf16, fp16, fp8 (1 byte a weight, computed "
        "in the run's precision; kohya's --fp8_base), int8 or nf4 (bitsandbytes; QLoRA). What trains keeps its "
        "own precision.",
        choices=BASE_PRECISIONS,
    )
    blocks_to_swap: int = setting(
        0,
        MEMORY,
        "LoRA: keep the frozen weights of the denoiser's last N blocks in host memory, each block copied to the "
        "GPU just before it computes (overlapped with compute).",
    )
    vram_budget: str | None = setting(
        None,
        MEMORY,
        "Fit the run in this much GPU memory, e.g. 12GB (GiB, as cards are sold): the levers you did not set "
        "(checkpointing, fp8/NF4 base, swapped blocks, 8-bit Adam, …) are chosen from the estimate `dreambooth "
        "plan` prints.",
    )
    # speed and memory (dreambooth/performance.py); all off unless asked, --low-vram turns on the memory ones
    low_vram: bool = setting(
        False,
        MEMORY,
        "Profile: 8-bit paged AdamW, checkpointing, cached latents, fp16, the step inside backward (each still "
        "overridable).",
    )
    mixed_precision: str = setting("no", MEMORY, "Compute in fp16 or bf16 (autocast).", choices=MIXED_PRECISION)
    gradient_checkpointing: bool = setting(False, MEMORY, "Recompute activations in backward: less memory, slower.")
    cache_latents: bool = setting(
        True, MEMORY, "Encode images and prompts once, then free the VAE and frozen text encoders."
    )
    attention: str = setting("sdpa", MEMORY, "The attention kernels.", choices=ATTENTION)
    paged_adam: bool = setting(
        False, MEMORY, "8-bit Adam's states in paged (spillable) memory (= --optimizer paged-adamw8bit)."
    )
    fused_backward: bool = setting(False, MEMORY, "Update each weight inside backward (no clipping/accumulation).")
    torch_compile: bool = setting(False, MEMORY, "Compile the denoiser's blocks (regional torch.compile).")
    channels_last: bool = setting(False, MEMORY, "NHWC convolutions.")
    adam_impl: str = setting("auto", MEMORY, "torch AdamW's kernels (auto = torch's choice).", choices=ADAM_IMPLS)
    # saving
    save_interval: int = setting(500, SAVING, "Steps between checkpoints.")
    save_min_steps: int = setting(0, SAVING, "No checkpoint before this step.")
    save_fp16: bool = setting(False, SAVING, "Checkpoints and exports in fp16 (the classic --save_half).")
    export_single_file: bool = setting(False, SAVING, "Also write an A1111 .safetensors per checkpoint.")
    keep_last: int | None = setting(None, SAVING, "Keep only the last K checkpoints.")
    save_sample_prompt: tuple[str, ...] = setting((), SAVING, "A prompt to sample at each checkpoint (repeatable).")
    save_sample_negative_prompt: str | None = setting(None, SAVING, "The samples' negative prompt.")
    n_save_sample: int = setting(4, SAVING, "Samples per prompt and checkpoint.")
    save_guidance_scale: float | None = setting(None, SAVING, "Samples' guidance (default: SD 7.5, Flux-dev 3.5).")
    save_infer_steps: int | None = setting(None, SAVING, "Samples' steps (default 20; Flux-schnell 4).")
    report_to: str = setting(
        "none", SAVING, "Also log to TensorBoard / W&B (offline) under OUTPUT/logs.", choices=REPORT_TO
    )
    resume: bool = setting(
        False, MODEL, "Require a checkpoint to continue from (re-runs resume anyway).", option="--resume"
    )
    # scaling out (dreambooth/launch.py starts the processes through accelerate; train.py shards the work)
    num_processes: int = setting(1, SCALING, "Processes (GPUs) of all machines together: 2 machines × 4 GPUs = 8.")
    num_machines: int = setting(1, SCALING, "Machines taking part.")
    machine_rank: int = setting(0, SCALING, "This machine's number, 0 … num-machines − 1.")
    main_process_ip: str | None = setting(None, SCALING, "Address of the machine with rank 0.")
    main_process_port: int | None = setting(None, SCALING, "Its port.")
    accelerate_config: Path | None = setting(None, SCALING, "An `accelerate config` file for the launch.")
    distributed: str = setting("ddp", SCALING, "How processes share the work.", choices=DISTRIBUTED)
    offload_optimizer: str = setting("none", SCALING, "DeepSpeed: keep the optimizer in CPU memory.", choices=OFFLOAD)
    # --preset: the shipped settings (assets/presets/NAME.toml) this run started from
    preset: str | None = setting(
        None,
        MODEL,
        "Start from shipped settings (`--list-presets`): the classic SD 1.5 recipe, SD 1.5 LoRA, SDXL LoRA, SDXL "
        "full on ~24 GB, Flux LoRA. The config file and flags win.",
    )
    # the settings the user gave (config file or flags), so that profiles chosen later never override them
    explicit: tuple[str, ...] = setting((), None)

    def __post_init__(self) -> None:
        for name in PATH_SETTINGS:  # a config file's or the launcher's strings: paths
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        object.__setattr__(self, "concepts", tuple(self.concepts))
        object.__setattr__(self, "save_sample_prompt", tuple(self.save_sample_prompt))
        object.__setattr__(self, "explicit", tuple(self.explicit))
        if not self.concepts:
            raise UserError(
                "no training images given",
                "pass --instance-data-dir and --instance-prompt, or --concepts-list concepts_list.json",
            )
        if self.resolution % 8 or self.resolution < 8:
            raise UserError(
                f"--resolution {self.resolution} is not a multiple of 8",
                f"try --resolution {max(8, self.resolution // 8 * 8)}",
            )
        for name in ("train_batch_size", "max_train_steps", "gradient_accumulation_steps", "save_interval",
                     "sample_batch_size", "n_save_sample", "save_infer_steps", "class_inference_steps",
                     "lr_num_cycles"):  # fmt: skip
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(
                    f"{flag(name)} must be at least 1 (got {getattr(self, name)})", "pass a positive number"
                )
        for name in ("num_class_images", "lr_warmup_steps", "save_min_steps", "prior_loss_weight", "max_grad_norm",
                     "offset_noise", "adam_weight_decay"):  # fmt: skip
            if getattr(self, name) < 0:
                raise UserError(f"{flag(name)} must not be negative (got {getattr(self, name)})", "pass 0 or more")
        self._check_adapter()
        for name in ("learning_rate", "text_encoder_lr"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise UserError(f"{flag(name)} must be positive (got {value})", "e.g. --learning-rate 1e-6")
        if self.mixed_precision not in MIXED_PRECISION:
            raise UserError(
                f"--mixed-precision {self.mixed_precision!r} is unknown", f"use {' | '.join(MIXED_PRECISION)}"
            )
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise UserError(f"--lr-scheduler {self.lr_scheduler!r} is unknown", f"use {' | '.join(LR_SCHEDULERS)}")
        if self.attention not in ATTENTION:
            raise UserError(f"--attention {self.attention!r} is unknown", f"use {' | '.join(ATTENTION)}")
        if self.keep_last is not None and self.keep_last < 1:
            raise UserError(
                f"--keep-last must be at least 1 (got {self.keep_last})", "omit it to keep every checkpoint"
            )
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise UserError(f"--snr-gamma must be positive (got {self.snr_gamma})", "5.0 is the usual choice")
        if self.text_encoder_steps is not None:
            if not self.train_text_encoder:
                raise UserError("--text-encoder-steps needs --train-text-encoder", "add --train-text-encoder")
            if self.text_encoder_steps < 1:
                raise UserError(
                    "--text-encoder-steps must be at least 1", "omit it to train the text encoder throughout"
                )
        self._check_prior_preservation()
        self._check_optimizer()
        self._check_speed_levers()
        self._check_scaling()
        self._check_captions_and_buckets()
        self._check_flow_matching()
        self._check_loss()
        self._check_ema()
        self._check_validation()
        self._check_full_bf16()
        self._check_base_storage()

    def _check_prior_preservation(self) -> None:
        if self.with_prior_preservation:
            for i, concept in enumerate(self.concepts):
                which = f"concept {i} ({concept.instance_prompt!r})" if len(self.concepts) > 1 else "it"
                if not concept.class_prompt:
                    raise UserError(
                        f"--with-prior-preservation needs a class prompt, and {which} has none",
                        "pass --class-prompt (or class_prompt in the concepts list), e.g. 'a photo of dog'",
                    )
                if concept.class_data_dir is None:
                    raise UserError(
                        f"--with-prior-preservation needs a class image folder, and {which} has none",
                        "pass --class-data-dir (or class_data_dir in the concepts list); missing images are generated",
                    )

    def _check_base_storage(self) -> None:
        if self.base_precision not in BASE_PRECISIONS:
            raise UserError(
                f"--base-precision {self.base_precision!r} is unknown", f"use {' | '.join(BASE_PRECISIONS)}"
            )
        if self.base_precision in ("bf16", "fp16") and self.mixed_precision == "no":
            raise UserError(
                f"--base-precision {self.base_precision} runs the frozen base in {self.base_precision}, and "
                "--mixed-precision no computes in fp32",
                f"add --mixed-precision {self.base_precision}, or use --base-precision fp8 (stored in 8 bits, computed "
                "in the run's precision)",
            )
        if self.base_precision in ("int8", "nf4") and self.adapter == "full":
            raise UserError(
                f"--base-precision {self.base_precision} stores the base quantised, which cannot train, and --adapter "
                "full trains it",
                "use --adapter lora (QLoRA), or --base-precision fp8 (a full fine-tune then stores the frozen text "
                "encoders in fp8)",
            )
        if self.deepspeed and (self.base_precision != "auto" or self.blocks_to_swap):
            lever = f"--base-precision {self.base_precision}" if self.base_precision != "auto" else "--blocks-to-swap"
            raise UserError(
                f"{lever} and --distributed {self.distributed}: DeepSpeed converts and partitions the model itself",
                f"use --distributed ddp with {lever}, or drop it",
            )
        if self.blocks_to_swap < 0:
            raise UserError(f"--blocks-to-swap must not be negative (got {self.blocks_to_swap})", "0 turns it off")
        if self.blocks_to_swap:
            if self.adapter == "full":
                raise UserError(
                    f"--blocks-to-swap {self.blocks_to_swap} keeps frozen weights in host memory, and --adapter full "
                    "trains every weight of the denoiser",
                    "use --adapter lora, or for a full fine-tune --use-8bit-adam, --fused-backward and "
                    "--gradient-checkpointing (--low-vram)",
                )
            if self.base_precision in ("int8", "nf4"):
                raise UserError(
                    f"--blocks-to-swap moves bf16/fp16/fp8 weights, and --base-precision {self.base_precision} "
                    "quantises them with bitsandbytes",
                    "use --base-precision fp8 with --blocks-to-swap, or NF4 without it",
                )
            if self.torch_compile:
                raise UserError(
                    "--torch-compile and --blocks-to-swap: the swap's copies run between the compiled blocks' calls",
                    "drop one of them",
                )
        if self.vram_budget is not None:
            object.__setattr__(self, "vram_budget", str(self.vram_budget).strip())
            self.vram_budget_bytes  # noqa: B018 — checks the value

    @property
    def vram_budget_bytes(self) -> int | None:
        """--vram-budget in bytes: 12GB, 12G, 12GiB and 12 all mean 12 GiB (a "12 GB" card has 12 GiB);
        12000MB is MiB."""
        if self.vram_budget is None:
            return None
        import re

        match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(gib|gb|g|mib|mb|m)?", self.vram_budget.lower())
        if not match or float(match.group(1)) <= 0:
            raise UserError(f"--vram-budget {self.vram_budget!r} is not an amount of memory", "e.g. 12GB or 8000MB")
        unit = 2**20 if (match.group(2) or "g").startswith("m") else 2**30
        return int(float(match.group(1)) * unit)

    def _check_full_bf16(self) -> None:
        if self.full_bf16 and self.mixed_precision != "bf16":
            raise UserError(
                f"--full-bf16 keeps the trained weights in bf16, and --mixed-precision is {self.mixed_precision}",
                "add --mixed-precision bf16 (a GPU with bf16: Ampere or newer), or drop --full-bf16",
            )
        if self.full_bf16 and self.adapter != "full":
            raise UserError("--full-bf16 is for --adapter full (a LoRA trains in fp32 beside a bf16 base already)",
                            "drop --full-bf16")  # fmt: skip

    def _check_validation(self) -> None:
        if not 0 <= self.validation_split < 0.5:
            raise UserError(
                f"--validation-split must be in [0, 0.5) (got {self.validation_split})", "e.g. 0.1 holds out a tenth"
            )
        if self.validation_split and self.validation_dir is not None:
            raise UserError("--validation-split and --validation-dir both given", "use one of them")
        if self.validation_every is not None and self.validation_every < 1:
            raise UserError(f"--validation-every must be at least 1 (got {self.validation_every})", "e.g. 100")
        if self.validates and self.deepspeed:
            raise UserError(
                f"--validation-split/--validation-dir and --distributed {self.distributed}: DeepSpeed runs the model "
                "in its own precision and partitions",
                "use --distributed ddp to validate",
            )

    @property
    def validates(self) -> bool:
        return bool(self.validation_split) or self.validation_dir is not None

    @property
    def validation_interval(self) -> int:
        """Steps between validations: --validation-every, else --save-interval, else a tenth of the run."""
        return self.validation_every or self.save_interval or max(1, self.max_train_steps // 10)

    def _check_ema(self) -> None:
        if self.ema_decay is None:
            if self.export_ema:
                raise UserError("--export-ema needs --ema-decay", "add e.g. --ema-decay 0.999")
            return
        if not 0 < self.ema_decay < 1:
            raise UserError(f"--ema-decay must be between 0 and 1 (got {self.ema_decay})", "e.g. 0.999 or 0.9999")
        if self.ema_device not in EMA_DEVICES:
            raise UserError(f"--ema-device {self.ema_device!r} is unknown", "use gpu or cpu")
        if self.ema_start_step < 0:
            raise UserError(f"--ema-start-step must not be negative (got {self.ema_start_step})", "0 starts at once")
        if self.deepspeed:
            raise UserError(
                f"--ema-decay and --distributed {self.distributed}: DeepSpeed partitions the weights the average "
                "would follow",
                "use --distributed ddp with --ema-decay",
            )
        if self.export_ema is None:
            object.__setattr__(self, "export_ema", True)

    def _check_loss(self) -> None:
        object.__setattr__(self, "loss", {"smooth_l1": "smooth-l1"}.get(self.loss, self.loss))  # kohya's spelling
        if self.loss not in LOSSES:
            raise UserError(f"--loss {self.loss!r} is unknown", f"use {' | '.join(LOSSES)}")
        if self.huber_schedule is not None and self.huber_schedule not in HUBER_SCHEDULES:
            raise UserError(
                f"--huber-schedule {self.huber_schedule!r} is unknown", f"use {' | '.join(HUBER_SCHEDULES)}"
            )
        if not 0 < self.huber_c <= 1:
            raise UserError(f"--huber-c must be in (0, 1] (got {self.huber_c})", "0.1 is kohya's default")
        if not self.huber_scale > 0:
            raise UserError(f"--huber-scale must be positive (got {self.huber_scale})", "1.0 is kohya's default")
        if self.multires_noise_iterations < 0:
            raise UserError(
                f"--multires-noise-iterations must not be negative (got {self.multires_noise_iterations})",
                "0 turns it off; 6 to 10 are usual",
            )
        if not 0 < self.multires_noise_discount < 1:
            raise UserError(
                f"--multires-noise-discount must be between 0 and 1 (got {self.multires_noise_discount})",
                "0.3 is kohya's default, 0.1 a weaker one",
            )

    def _check_flow_matching(self) -> None:
        if self.timestep_sampling is not None and self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise UserError(
                f"--timestep-sampling {self.timestep_sampling!r} is unknown", f"use {' | '.join(TIMESTEP_SAMPLING)}"
            )
        if self.flow_weighting not in FLOW_WEIGHTING:
            raise UserError(f"--flow-weighting {self.flow_weighting!r} is unknown", f"use {' | '.join(FLOW_WEIGHTING)}")
        for name in ("flow_shift", "logit_std"):
            if not getattr(self, name) > 0:
                raise UserError(f"{flag(name)} must be positive (got {getattr(self, name)})", "e.g. 3.0 and 1.0")
        if self.guidance_scale < 0:
            raise UserError(f"--guidance-scale must not be negative (got {self.guidance_scale})", "e.g. 1.0")
        if self.max_token_length not in (75, 150, 225):
            raise UserError(
                f"--max-token-length {self.max_token_length} is not 75, 150 or 225",
                "CLIP reads 75 tokens at a time: 150 and 225 read two and three such chunks",
            )
        if self.t5_max_length is not None and not 1 <= self.t5_max_length <= 512:
            raise UserError(f"--t5-max-length must be in 1…512 (got {self.t5_max_length})", "dev: 512, schnell: 256")

    def _check_captions_and_buckets(self) -> None:
        if self.caption_extension is not None:
            ext = self.caption_extension.strip()
            ext = ext if ext.startswith(".") else "." + ext
            if ext == "." or "/" in ext or "\\" in ext:
                raise UserError(
                    f"--caption-extension {self.caption_extension!r} is not a file extension", "e.g. .txt or .caption"
                )
            object.__setattr__(self, "caption_extension", ext)
        if not 0 <= self.caption_dropout < 1:
            raise UserError(
                f"--caption-dropout must be in [0, 1) (got {self.caption_dropout})", "e.g. 0.1, or 0 for none"
            )
        given = [flag(n) for n in ("bucket_min_side", "bucket_max_side", "bucket_step") if getattr(self, n) is not None]
        if not self.buckets:
            if given:
                raise UserError(f"{given[0]} needs --buckets", "add --buckets, or drop it")
            return
        step = 64 if self.bucket_step is None else self.bucket_step
        if step < 8 or step % 8:
            raise UserError(f"--bucket-step must be a positive multiple of 8 (got {step})", "64 suits SD and SDXL")
        if self.resolution % step:
            lower, upper = max(step, self.resolution // step * step), -(-self.resolution // step) * step
            raise UserError(
                f"--buckets: --resolution {self.resolution} is not a multiple of {step} (--bucket-step)",
                f"pass --resolution {lower} or {upper}",
            )
        low = min(256, self.resolution) if self.bucket_min_side is None else self.bucket_min_side
        high = 2 * self.resolution if self.bucket_max_side is None else self.bucket_max_side
        for name, value in (("bucket_min_side", low), ("bucket_max_side", high)):
            if value < step or value % step:
                raise UserError(f"{flag(name)} {value} is not a multiple of --bucket-step {step}", "e.g. 256 or 1024")
        if not low <= self.resolution <= high:
            raise UserError(
                f"--bucket-min-side {low} … --bucket-max-side {high} must include --resolution {self.resolution}",
                "e.g. --bucket-min-side 256 --bucket-max-side 1024 for --resolution 512",
            )
        object.__setattr__(self, "bucket_min_side", low)
        object.__setattr__(self, "bucket_max_side", high)
        object.__setattr__(self, "bucket_step", step)

    def _check_adapter(self) -> None:
        if self.adapter not in ADAPTERS:
            raise UserError(f"--adapter {self.adapter!r} is unknown", f"use {' | '.join(ADAPTERS)}")
        if self.lora_targets is not None:
            tokens = self.lora_targets.split(",") if isinstance(self.lora_targets, str) else self.lora_targets
            targets = tuple(dict.fromkeys(t.strip() for t in tokens if str(t).strip()))
            if not targets:
                raise UserError("--lora-targets is empty", "e.g. --lora-targets attention,feed-forward")
            object.__setattr__(self, "lora_targets", targets)
        if self.lora_rank < 1:
            raise UserError(f"--lora-rank must be at least 1 (got {self.lora_rank})", "e.g. --lora-rank 16")
        if self.lora_conv_rank < 0:
            raise UserError(f"--lora-conv-rank must not be negative (got {self.lora_conv_rank})", "0 turns it off")
        if self.lora_alpha is None:
            object.__setattr__(self, "lora_alpha", float(self.lora_rank))
        if self.lora_conv_alpha is None:
            object.__setattr__(self, "lora_conv_alpha", float(self.lora_conv_rank))
        for name in ("lora_alpha", "lora_conv_alpha"):
            if getattr(self, name) <= 0 and (name == "lora_alpha" or self.lora_conv_rank):
                raise UserError(
                    f"{flag(name)} must be positive (got {getattr(self, name)})",
                    "the LoRA's scale is alpha / rank; omit it for alpha = rank",
                )
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"--lora-dropout must be in [0, 1) (got {self.lora_dropout})", "e.g. 0.1, or 0 for none")
        self._check_lycoris()
        if self.adapter in LORA_KINDS and self.distributed == "deepspeed-zero3":
            raise UserError(
                f"--adapter {self.adapter} with --distributed deepspeed-zero3 is not supported (ZeRO-3 shards the "
                "frozen base)",
                "use --distributed deepspeed-zero2 or ddp: a LoRA's optimizer state is small anyway",
            )

    def _check_lycoris(self) -> None:
        """DoRA and LyCORIS' LoHa/LoKr: what peft can build, and over which stored base."""
        if self.lora_dora and self.adapter != "lora":
            raise UserError(f"--lora-dora is for --adapter lora (got --adapter {self.adapter})",
                            "add --adapter lora, or drop --lora-dora")  # fmt: skip
        if self.lokr_factor is not None and self.adapter != "lokr":
            raise UserError(f"--lokr-factor is for --adapter lokr (got --adapter {self.adapter})",
                            "add --adapter lokr, or drop --lokr-factor")  # fmt: skip
        if self.adapter == "lokr" and self.lokr_factor is None:
            object.__setattr__(self, "lokr_factor", -1)
        if self.lokr_factor is not None and (self.lokr_factor == 0 or self.lokr_factor < -1):
            raise UserError(f"--lokr-factor must be -1 or at least 1 (got {self.lokr_factor})",
                            "-1 splits each dimension as evenly as it divides")  # fmt: skip
        if self.adapter in ("loha", "lokr") and self.lora_dropout:
            # peft's LoHa/LoKr have rank and module dropout, not LoRA's dropout on the layer's input
            raise UserError(f"--lora-dropout is for --adapter lora (peft's {self.adapter} has no input dropout)",
                            "drop --lora-dropout")  # fmt: skip
        if self.adapter in ("loha", "lokr") and self.base_precision in ("int8", "nf4"):
            # peft's LoHa/LoKr layers reshape their product to the base weight's shape, which bitsandbytes packs
            raise UserError(f"--adapter {self.adapter} cannot train over --base-precision {self.base_precision} "
                            "(peft wraps bitsandbytes layers with LoRA only)",
                            "use --adapter lora, or --base-precision fp8")  # fmt: skip
        if self.lora_dora and (self.base_precision in ("fp8", "int8", "nf4") or self.blocks_to_swap):
            # DoRA normalises the base weight itself on every step: it must be a plain tensor on the GPU
            lever = f"--base-precision {self.base_precision}" if not self.blocks_to_swap else "--blocks-to-swap"
            raise UserError(f"--lora-dora reads the whole base weight every step, which {lever} does not keep",
                            f"drop {lever}, or --lora-dora")  # fmt: skip

    def _check_optimizer(self) -> None:
        """--optimizer in our spelling; --use-8bit-adam and --paged-adam are its aliases, kept in step with it."""
        if self.paged_adam and not self.use_8bit_adam:
            raise UserError(
                "--paged-adam pages bitsandbytes' 8-bit states", "add --use-8bit-adam, or drop --paged-adam"
            )
        aliased = "paged-adamw8bit" if self.paged_adam else "adamw8bit" if self.use_8bit_adam else None
        name = optimizers.normalise(self.optimizer) if self.optimizer is not None else aliased or "adamw"
        if aliased is not None and name not in (aliased, "paged-adamw8bit"):
            raise UserError(
                f"--{'paged-adam' if self.paged_adam else 'use-8bit-adam'} means --optimizer {aliased}, and "
                f"--optimizer {name} was given",
                "drop one of them",
            )
        object.__setattr__(self, "optimizer", name)
        object.__setattr__(self, "use_8bit_adam", name in ("adamw8bit", "paged-adamw8bit"))
        object.__setattr__(self, "paged_adam", name == "paged-adamw8bit")
        object.__setattr__(self, "optimizer_args", optimizers.split_args(self.optimizer_args))
        optimizers.parse_args(self.optimizer_args, name)  # checks the keys and values
        kind = optimizers.KINDS[name]
        ignored = [flag(f) for f in ("adam_beta1", "adam_beta2", "adam_epsilon") if f in self.explicit]
        if ignored and not kind.adam_settings:
            raise UserError(
                f"{ignored[0]} is AdamW's, and --optimizer {name} has settings of its own",
                f"pass them as --optimizer-args (it takes {', '.join(kind.keys)})",
            )
        if name == "prodigy":
            if self.scale_lr:
                raise UserError(
                    "--scale-lr and --optimizer prodigy: Prodigy estimates the step size itself, and --learning-rate "
                    "is a factor on it",
                    "drop --scale-lr (keep --learning-rate at 1.0)",
                )
            if self.train_text_encoder and self.text_encoder_lr is not None and self.text_encoder_lr != self.lr:
                raise UserError(
                    f"--text-encoder-lr {self.text_encoder_lr} and --optimizer prodigy: Prodigy takes one learning "
                    "rate for all weights (a factor on the step size it estimates)",
                    "drop --text-encoder-lr",
                )
        if kind.eval_mode:
            if self.lr_scheduler not in ("constant", "constant_with_warmup"):
                raise UserError(
                    f"--lr-scheduler {self.lr_scheduler} and --optimizer {name}: schedule-free needs no schedule (it "
                    "averages the weights instead)",
                    "pass --lr-scheduler constant, or constant_with_warmup with --lr-warmup-steps",
                )
            if self.ema_decay is not None:
                raise UserError(
                    f"--ema-decay and --optimizer {name}: schedule-free averages the weights itself (checkpoints and "
                    "exports hold its average)",
                    "drop --ema-decay",
                )

    def _check_speed_levers(self) -> None:
        if self.report_to not in REPORT_TO:
            raise UserError(f"--report-to {self.report_to!r} is unknown", f"use {' | '.join(REPORT_TO)}")
        if self.adam_impl not in ADAM_IMPLS:
            raise UserError(f"--adam-impl {self.adam_impl!r} is unknown", f"use {' | '.join(ADAM_IMPLS)}")
        if self.adam_impl != "auto" and self.optimizer != "adamw":
            raise UserError(
                f"--adam-impl {self.adam_impl} chooses torch AdamW's kernels, and --optimizer {self.optimizer} "
                f"{'(--use-8bit-adam) ' if self.use_8bit_adam else ''}is another optimizer",
                "drop one of them",
            )
        if not self.fused_backward:
            return
        why = "--fused-backward (part of --low-vram) updates each weight as soon as its gradient exists, so it"
        cannot = optimizers.KINDS[self.optimizer].not_per_weight
        if cannot:
            raise UserError(
                f"{why} cannot run --optimizer {self.optimizer}: {cannot}",
                "pass --no-fused-backward, or an optimizer that steps each weight on its own (adamw, adamw8bit, "
                "paged-adamw8bit, adafactor, came, lion8bit)",
            )
        if self.gradient_accumulation_steps > 1:
            raise UserError(
                f"{why} cannot accumulate gradients over "
                f"--gradient-accumulation-steps {self.gradient_accumulation_steps}",
                "drop --gradient-accumulation-steps (raise --train-batch-size instead), or pass --no-fused-backward",
            )
        if self.max_grad_norm > 0:
            raise UserError(
                f"{why} cannot clip them to --max-grad-norm {self.max_grad_norm} (that needs all of them first)",
                "pass --max-grad-norm 0 (what --low-vram sets when not given), or --no-fused-backward",
            )
        if self.num_processes > 1 or self.num_machines > 1 or self.distributed != "ddp":
            raise UserError(
                f"{why} runs in one process only (each process would update before the gradients are averaged)",
                "train in one process, or pass --no-fused-backward",
            )

    def _check_scaling(self) -> None:
        if self.accelerate_config is not None:
            object.__setattr__(self, "accelerate_config", Path(self.accelerate_config))
        for name in ("num_processes", "num_machines"):
            if getattr(self, name) < 1:
                raise UserError(f"{flag(name)} must be at least 1 (got {getattr(self, name)})", "e.g. 2")
        if self.num_processes % self.num_machines:
            raise UserError(
                f"--num-processes {self.num_processes} cannot be spread evenly over --num-machines {self.num_machines}",
                "--num-processes counts the processes of all machines together: 2 machines × 4 GPUs is 8",
            )
        if not 0 <= self.machine_rank < self.num_machines:
            raise UserError(
                f"--machine-rank {self.machine_rank} is outside 0…{self.num_machines - 1}",
                "number the machines 0, 1, …; the one with rank 0 is --main-process-ip",
            )
        if self.num_machines > 1 and not self.main_process_ip:
            raise UserError(
                f"--num-machines {self.num_machines} needs --main-process-ip",
                "pass the address (IP or host name) of the machine with --machine-rank 0, the same on every machine",
            )
        if self.main_process_port is not None and not 0 < self.main_process_port < 65536:
            raise UserError(f"--main-process-port {self.main_process_port} is not a port", "e.g. 29500")
        if self.distributed not in DISTRIBUTED:
            raise UserError(f"--distributed {self.distributed!r} is unknown", f"use {' | '.join(DISTRIBUTED)}")
        if self.offload_optimizer not in OFFLOAD:
            raise UserError(f"--offload-optimizer {self.offload_optimizer!r} is unknown", "use none | cpu")
        if self.offload_optimizer != "none" and not self.deepspeed:
            raise UserError(
                "--offload-optimizer cpu needs DeepSpeed", "add --distributed deepspeed-zero2 (or deepspeed-zero3)"
            )
        if self.deepspeed and self.train_text_encoder:
            # accelerate hands DeepSpeed one model per engine; the text encoder would be a second one
            raise UserError(
                f"--distributed {self.distributed} trains the UNet only, and --train-text-encoder is set",
                "drop --train-text-encoder, or use --distributed ddp",
            )
        if self.offload_optimizer != "none" and self.optimizer != "adamw":
            raise UserError(
                f"--optimizer {self.optimizer} and --offload-optimizer cpu: DeepSpeed's CPU offload runs its own "
                "AdamW on the CPU",
                "keep one: --offload-optimizer cpu moves the whole (AdamW) optimizer to the CPU",
            )
        cannot = optimizers.KINDS[self.optimizer].not_deepspeed
        if self.deepspeed and cannot:
            raise UserError(
                f"--optimizer {self.optimizer} and --distributed {self.distributed}: {cannot}",
                "use --distributed ddp, or --optimizer adamw, adamw8bit or lion8bit",
            )

    @property
    def launches_processes(self) -> bool:
        """Whether `dreambooth train` starts processes through accelerate rather than training in itself.

        DeepSpeed always runs under the launcher, even as one process: it needs the rendezvous (RANK, MASTER_ADDR)
        that the launcher sets up."""
        return self.num_processes > 1 or self.num_machines > 1 or self.accelerate_config is not None or self.deepspeed

    @property
    def deepspeed(self) -> bool:
        """--distributed deepspeed-zero2 or deepspeed-zero3."""
        return self.distributed.startswith("deepspeed")

    @property
    def cache(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else self.output / "cache"

    @property
    def lr(self) -> float:
        """--learning-rate, or when it is not given the adapter's default as the optimizer takes it (Prodigy 1.0, Lion
        a third; the report says which)."""
        if self.learning_rate is not None:
            return self.learning_rate
        return optimizers.default_lr(self.optimizer, DEFAULT_LEARNING_RATE[self.adapter])

    @property
    def lr_source(self) -> str:
        if self.learning_rate is None:
            if self.lr != DEFAULT_LEARNING_RATE[self.adapter]:
                return f"the default for --optimizer {self.optimizer} with --adapter {self.adapter}"
            return f"the default for --adapter {self.adapter}"
        if self.preset and "learning_rate" not in self.explicit:
            return f"--preset {self.preset}"
        return "--learning-rate"

    def to_dict(self) -> dict:
        data = asdict(self)
        return json.loads(json.dumps(data, default=str))

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """The settings `to_dict` wrote (a checkpoint's, the launcher's), paths made paths again."""
        data = dict(data)
        concepts = tuple(Concept(**c) for c in data.pop("concepts"))
        for name in PATH_SETTINGS:  # JSON has no paths: give Path fields theirs back
            if isinstance(data.get(name), str):
                data[name] = Path(data[name])
        known = {f.name for f in fields(cls)}
        return cls(concepts=concepts, **{k: v for k, v in data.items() if k in known})


FIELD_NAMES = {f.name for f in fields(TrainConfig)} - {"concepts", "explicit"}
# the settings that are paths (`Path` or `Path | None`): a config file's are relative to the file
PATH_SETTINGS = frozenset(f.name for f in fields(TrainConfig) if Path in (f.type, *typing.get_args(f.type)))
SINGLE_CONCEPT = ("instance_data_dir", "instance_prompt", "class_data_dir", "class_prompt")


def _normalise_keys(data: dict, where: str) -> dict:
    out = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        name = {"pretrained_model_name_or_path": "model", "output_dir": "output",
                "pretrained_vae_name_or_path": "vae", "optimizer_type": "optimizer"}.get(name, name)  # fmt: skip
        if name not in FIELD_NAMES and name not in SINGLE_CONCEPT and name not in ("concepts_list", "concepts"):
            raise UserError(f"{where}: unknown setting {key!r}", "see `dreambooth train --help` for the names")
        out[name] = value
    return out


def _folder_name(prompt: str) -> str:
    """'a photo of dog' → 'a-photo-of-dog': a class prompt as a folder name."""
    return "-".join("".join(ch if ch.isalnum() else " " for ch in prompt.lower()).split())[:80] or "class"


def _yield_to_optimizer(profile: dict, settings: dict) -> dict:
    """A preset's or profile's settings less those an --optimizer the user named replaces (--use-8bit-adam,
    --paged-adam) or cannot combine with (the step inside backward, for an optimizer that needs all gradients)."""
    if settings.get("optimizer") is None:
        return profile
    drop = {"use_8bit_adam", "paged_adam"}
    if optimizers.KINDS[optimizers.normalise(settings["optimizer"])].not_per_weight:
        drop |= {"fused_backward", "max_grad_norm"}
    return {k: v for k, v in profile.items() if k not in drop}


def presets() -> dict[str, dict]:
    """The shipped presets by name (dreambooth/assets/presets/NAME.toml): their settings and a `description`."""
    from importlib import resources

    folder = resources.files("dreambooth") / "assets" / "presets"
    found = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            found[entry.name.removesuffix(".toml")] = tomllib.loads(entry.read_text(encoding="utf-8"))
    return found


def load_preset(name: str) -> dict:
    """A preset's settings (without its description); an unknown name is one line that lists the known ones."""
    known = presets()
    if name not in known:
        raise UserError(
            f"--preset {name!r} is unknown", f"use one of: {', '.join(known)} (`dreambooth train --list-presets`)"
        )
    return _normalise_keys({k: v for k, v in known[name].items() if k != "description"}, f"preset {name}")


def read_toml(path: Path) -> dict:
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"--config {path}: file not found", "pass the path of your run.toml") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"--config {path}: not valid TOML ({exc})", "fix the file's syntax") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8 by definition; tomllib lets the decoder's error through
        raise UserError(
            f"--config {path}: not UTF-8 text (byte {exc.start} is {exc.object[exc.start : exc.start + 1]!r})",
            "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)",
        ) from None
    # settings may sit at the top level or under [train]; both are accepted
    train = data.pop("train", {})
    if not isinstance(train, dict):
        raise UserError(f"--config {path}: [train] must be a table", "write the settings under a [train] header")
    data = {k: v for k, v in data.items() if not isinstance(v, dict)}
    settings = _normalise_keys({**data, **train}, f"--config {path}")
    base = path.parent  # relative paths in a config file are relative to the file, like in any config format
    for key in (*sorted(PATH_SETTINGS), "concepts_list", "instance_data_dir", "class_data_dir"):
        if isinstance(settings.get(key), str):
            settings[key] = base / settings[key]
    if "concepts" in settings:
        if not isinstance(settings["concepts"], list):
            raise UserError(f"--config {path}: concepts must be an array of tables", "write [[train.concepts]] blocks")
        concepts = []
        for i, entry in enumerate(settings["concepts"]):
            if isinstance(entry, dict):
                entry = {
                    k: (str(base / v) if k.endswith("_dir") and isinstance(v, str) else v) for k, v in entry.items()
                }
            concepts.append(_concept_from_dict(entry, f"--config {path}: concepts entry {i}"))
        settings["concepts"] = tuple(concepts)
    return settings


def build_train_config(
    config_file: Path | None, flags: dict[str, Any], *, class_images_root: Path | None = None
) -> TrainConfig:
    """Merge the config file (if any) and the flags (flags win) into one checked TrainConfig.

    `flags` holds only the flags the user gave (None means "not given"). With `class_images_root` (what
    `dreambooth run` passes), a concept with a class prompt but no class folder gets ROOT/<class prompt>.
    """
    settings = read_toml(config_file) if config_file is not None else {}
    given = {k: v for k, v in flags.items() if v is not None}
    settings.update(_normalise_keys(given, "flags"))
    settings["explicit"] = tuple(sorted(k for k in settings if k in FIELD_NAMES and k != "preset"))
    if settings.get("preset"):  # a preset fills in what neither the file nor the flags set
        settings = {**_yield_to_optimizer(load_preset(settings["preset"]), settings), **settings}
    if settings.get("low_vram"):  # a profile: it fills in what neither the file nor the flags set
        settings = {**_yield_to_optimizer(LOW_VRAM, settings), **settings}
    if "save_sample_prompt" in settings and isinstance(settings["save_sample_prompt"], str):
        settings["save_sample_prompt"] = (settings["save_sample_prompt"],)

    single = {k: settings.pop(k) for k in SINGLE_CONCEPT if k in settings}
    concepts_list = settings.pop("concepts_list", None)
    concepts = settings.pop("concepts", ())
    if concepts_list is not None:
        if single.get("instance_data_dir") is not None and "instance_data_dir" in given:
            raise UserError(
                "--concepts-list and --instance-data-dir both given", "use one: the list, or the single-concept flags"
            )
        concepts = load_concepts_list(Path(concepts_list))
    elif single:
        if not single.get("instance_data_dir"):
            raise UserError("--instance-prompt given without --instance-data-dir", "pass the folder of your photos")
        if not single.get("instance_prompt"):
            raise UserError("--instance-data-dir given without --instance-prompt", "e.g. --instance-prompt 'sks dog'")
        concepts = (
            Concept(
                instance_prompt=single["instance_prompt"],
                instance_data_dir=Path(single["instance_data_dir"]),
                class_prompt=single.get("class_prompt") or None,
                class_data_dir=Path(single["class_data_dir"]) if single.get("class_data_dir") else None,
            ),
        )
    if class_images_root is not None:
        concepts = tuple(
            replace(c, class_data_dir=Path(class_images_root) / _folder_name(c.class_prompt))
            if c.class_prompt and c.class_data_dir is None
            else c
            for c in concepts
        )
    if "model" not in settings:
        raise UserError("no base model given", "pass --model (a diffusers folder, or a .ckpt/.safetensors file)")
    try:
        return TrainConfig(concepts=concepts, **settings)
    except TypeError as exc:  # a TOML value of the wrong type reaches a comparison
        raise UserError(f"a setting has the wrong type: {exc}", "check the values in your config file") from None
