"""Training configuration: frozen dataclasses that check their own values, built from TOML, JSON and flags.

Only values are checked here (ranges, combinations, the concepts file's shape). Whether folders, images and
models on disk are usable is checked by `train.preflight`, still before any heavy work.
"""

import json
import tomllib
from dataclasses import asdict, dataclass, fields, replace
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
ADAPTERS = ("full", "lora")
# --base-precision: how the frozen base's big layers are stored (dreambooth/storage.py); auto: as --mixed-precision
BASE_PRECISIONS = ("auto", "bf16", "fp16", "fp8", "int8", "nf4")
# flow matching (dreambooth/objectives.py): how σ is drawn, and how the loss is weighted over σ
TIMESTEP_SAMPLING = ("uniform", "sigmoid", "logit-normal", "shift", "flux-shift")
FLOW_WEIGHTING = ("none", "sigma-sqrt", "cosmap")
LOSSES = ("l2", "huber", "smooth-l1")  # --loss (kohya's --loss_type; smooth_l1 is accepted too)
HUBER_SCHEDULES = ("constant", "exponential", "snr")
# what diffusers' and kohya's LoRA trainers use as the learning rate of a LoRA; the full fine-tune's is 5e-6
DEFAULT_LEARNING_RATE = {"full": 5e-6, "lora": 1e-4}
CONCEPT_KEYS = ("instance_prompt", "class_prompt", "instance_data_dir", "class_data_dir")


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
    """Everything `dreambooth train` needs. Field names are the flags' names in snake_case."""

    model: Path
    concepts: tuple[Concept, ...]
    output: Path = Path("output")
    vae: Path | None = None
    cache_dir: Path | None = None  # converted single files go here; default <output>/cache
    # prior preservation
    with_prior_preservation: bool = False
    prior_loss_weight: float = 1.0
    num_class_images: int = 100
    sample_batch_size: int = 4
    class_inference_steps: int = 50
    # data
    resolution: int = 512
    center_crop: bool = False
    random_flip: bool = False
    caption_extension: str | None = None  # ".txt": each image's caption from photo.txt beside photo.jpg
    caption_dropout: float = 0.0  # this share of instance examples trains with the empty caption
    buckets: bool = False  # aspect-ratio buckets of about resolution² pixels instead of square crops
    bucket_min_side: int | None = None  # 256, or --resolution when that is smaller
    bucket_max_side: int | None = None  # 2 × --resolution
    bucket_step: int | None = None  # 64: the sides' multiple (the VAE's 8 × the UNet's 8 for SD and SDXL)
    # optimisation
    seed: int | None = None
    train_batch_size: int = 1
    max_train_steps: int = 800
    learning_rate: float | None = None  # DEFAULT_LEARNING_RATE of the adapter when not given
    text_encoder_lr: float | None = None  # --learning-rate when not given
    scale_lr: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    # the optimizer (dreambooth/optimizers.py): adamw, adamw8bit, paged-adamw8bit, prodigy, adafactor,
    # schedulefree-adamw, came, lion8bit (kohya's spellings too); None: adamw, or what --use-8bit-adam/--paged-adam say
    optimizer: str | None = None
    # its constructor's own settings as kohya writes them: "key=value" items, values Python literals
    # ("weight_decay=0.01 betas=0.9,0.99 decouple=True"); a key the optimizer does not take is refused
    optimizer_args: tuple[str, ...] = ()
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    use_8bit_adam: bool = False
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    attention: str = "sdpa"
    train_text_encoder: bool = False
    text_encoder_steps: int | None = None  # train the text encoder only for the first N steps
    cache_latents: bool = True
    offset_noise: float = 0.0
    snr_gamma: float | None = None
    zero_terminal_snr: bool = False
    # the loss (dreambooth/objectives.py, train.elementwise_loss): L2, or kohya's pseudo-Huber / smooth L1 with a
    # threshold scheduled over the timesteps (None: "snr" for DDPM, "exponential" for flow matching)
    loss: str = "l2"
    huber_schedule: str | None = None
    huber_c: float = 0.1
    huber_scale: float = 1.0
    debiased_estimation: bool = False  # weight each example by 1/√SNR (DDPM)
    multires_noise_iterations: int = 0  # multi-resolution noise levels (DDPM); 0: off
    multires_noise_discount: float = 0.3
    # flow matching (Flux): how σ is drawn (None: the family's choice), and the dev model's guidance input
    timestep_sampling: str | None = None
    flow_shift: float = 3.0  # for --timestep-sampling shift
    logit_mean: float = 0.0
    logit_std: float = 1.0
    flow_weighting: str = "none"
    guidance_scale: float = 1.0  # FLUX.1-dev's distilled-guidance input while training (kohya's recommendation)
    t5_max_length: int | None = None  # T5's tokens per prompt: None is the family's (dev 512, schnell 256)
    # CLIP prompts of SD/SDXL read in 75-token chunks up to this many tokens (kohya's --max_token_length)
    max_token_length: int = 75
    # the text encoders and VAE of a model given as its transformer's single file (ComfyUI keeps Flux in four)
    clip_l: Path | None = None
    t5xxl: Path | None = None
    ae: Path | None = None
    # what trains (dreambooth/adapters.py): the whole model, or LoRA layers beside the frozen base
    adapter: str = "full"
    # a full fine-tune's weights kept in bf16, no fp32 master copy (kohya's --full_bf16); None: the family's choice
    # (Flux: on with --mixed-precision bf16, where fp32 masters of 12 B parameters would need 48 GB more)
    full_bf16: bool | None = None
    lora_rank: int = 16
    lora_alpha: float | None = None  # = --lora-rank when not given (scale 1)
    lora_dropout: float = 0.0
    # the family's groups (attention, feed-forward, …) or module names; None: the family's default (its module tables
    # live with the family, which expands and checks them once the model is known)
    lora_targets: tuple[str, ...] | None = None
    lora_conv_rank: int = 0  # > 0: LoCon, the ResNet and resampling 3×3 convolutions too
    lora_conv_alpha: float | None = None  # = --lora-conv-rank when not given
    # the frozen base (dreambooth/storage.py, blockswap.py): how its big layers are stored, how many of the
    # denoiser's blocks live in host memory, and the GPU memory the run must fit (dreambooth/plan.py picks levers)
    base_precision: str = "auto"
    blocks_to_swap: int = 0
    vram_budget: str | None = None  # "12GB" (GiB, as cards are sold)
    # speed and memory (dreambooth/performance.py); all off unless asked, --low-vram turns on the memory ones
    low_vram: bool = False
    paged_adam: bool = False
    fused_backward: bool = False
    torch_compile: bool = False
    channels_last: bool = False
    adam_impl: str = "auto"
    report_to: str = "none"
    # saving
    save_interval: int = 500
    save_min_steps: int = 0
    save_fp16: bool = False
    export_single_file: bool = False
    keep_last: int | None = None
    save_sample_prompt: tuple[str, ...] = ()
    save_sample_negative_prompt: str | None = None
    n_save_sample: int = 4
    save_guidance_scale: float | None = None  # None: the family's (SD 7.5; Flux.1-dev its distilled 3.5)
    save_infer_steps: int | None = None  # None: the family's (20; Flux.1-schnell 4)
    resume: bool = False
    # scaling out (dreambooth/launch.py starts the processes through accelerate; train.py shards the work)
    num_processes: int = 1  # over all machines together, as accelerate counts: 2 machines × 4 GPUs = 8
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str | None = None
    main_process_port: int | None = None
    accelerate_config: Path | None = None  # an `accelerate config` YAML, passed through to `accelerate launch`
    distributed: str = "ddp"
    offload_optimizer: str = "none"
    # held-out images (dreambooth/validation.py): their loss at fixed noise levels and fixed noise, every N steps
    validation_split: float = 0.0  # this share of the instance images is held out
    validation_dir: Path | None = None  # or a folder of its own
    validation_every: int | None = None  # None: --save-interval, else a tenth of the run
    # an exponential moving average of the trained weights (dreambooth/ema.py); exports and samples from it
    ema_decay: float | None = None
    ema_device: str = "gpu"  # gpu (the training device) | cpu
    ema_start_step: int = 0
    export_ema: bool | None = None  # None: on with --ema-decay
    preset: str | None = None  # --preset: the shipped settings (assets/presets/NAME.toml) this run started from
    # the settings the user gave (config file or flags), so that profiles chosen later never override them
    explicit: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.validation_dir is not None and not isinstance(self.validation_dir, Path):
            object.__setattr__(self, "validation_dir", Path(self.validation_dir))
        for name in ("model", "output"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        for name in ("vae", "cache_dir", "clip_l", "t5xxl", "ae"):
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
        if self.ema_device not in ("gpu", "cpu"):
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
        if self.adapter == "lora" and self.distributed == "deepspeed-zero3":
            raise UserError(
                "--adapter lora with --distributed deepspeed-zero3 is not supported (ZeRO-3 shards the frozen base)",
                "use --distributed deepspeed-zero2 or ddp: a LoRA's optimizer state is small anyway",
            )

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
        import typing

        data = dict(data)
        concepts = tuple(Concept(**c) for c in data.pop("concepts"))
        for f in fields(cls):  # JSON has no paths: give Path fields theirs back
            if isinstance(data.get(f.name), str) and Path in (f.type, *typing.get_args(f.type)):
                data[f.name] = Path(data[f.name])
        known = {f.name for f in fields(cls)}
        return cls(concepts=concepts, **{k: v for k, v in data.items() if k in known})


FIELD_NAMES = {f.name for f in fields(TrainConfig)} - {"concepts", "explicit"}
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
    for key in ("model", "output", "vae", "cache_dir", "concepts_list", "instance_data_dir", "class_data_dir",
                "accelerate_config", "clip_l", "t5xxl", "ae"):  # fmt: skip
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
