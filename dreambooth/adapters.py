"""Adapters: what trains, what a checkpoint stores and restores, and what export writes.

`Full` fine-tunes the UNet (and the text encoder with --train-text-encoder) and saves complete diffusers folders;
`Lora` freezes the base model, injects peft LoRA layers and saves only them (megabytes, not gigabytes), exported as
the kohya/A1111 file the WebUI and ComfyUI load. The training loop asks the adapter; it never tests which one it has.
"""

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from dreambooth import __version__, optimizers
from dreambooth.checkpoint.folders import PROVENANCE_FILE, WEIGHT_FILES
from dreambooth.checkpoints import link_or_copy
from dreambooth.config import TrainConfig
from dreambooth.errors import UserError
from dreambooth.families.base import Components, Dtypes, Family, ResolvedModel
from dreambooth.families.sd.convert import EXTRAS_FILE
from dreambooth.fileio import write_json
from dreambooth.storage import HALF, BaseStorage, is_stored, return_freed_memory, store, stored_bytes

COPIED = ("tokenizer", "scheduler")  # frozen folders a full checkpoint carries as they are


def trainable(models: dict[str, torch.nn.Module]) -> list[torch.nn.Parameter]:
    return [p for m in models.values() for p in m.parameters() if p.requires_grad]


def _bytes(models: dict[str, torch.nn.Module], only_trainable: bool) -> int:
    return sum(p.numel() * p.element_size() for m in models.values() for p in m.parameters()
               if p.requires_grad or not only_trainable)  # fmt: skip


def _optimizer_state_bytes(trained: dict[str, torch.nn.Module], cfg: TrainConfig) -> int:
    """What the training state keeps for the optimizer: its state (dreambooth/optimizers.py), and for schedule-free
    the weights it trains at besides the averaged ones the files hold."""
    tensors = [p for m in trained.values() for p in m.parameters() if p.requires_grad]
    kept = _bytes(trained, only_trainable=True) if optimizers.KINDS[cfg.optimizer].eval_mode else 0
    settings = optimizers.parse_args(cfg.optimizer_args, cfg.optimizer)
    return optimizers.state_bytes(cfg.optimizer, tensors, settings) + kept


def _provenance(c: Components, step: int, seed: int, **extra) -> dict:
    provenance = {}
    if c.model_dir is not None and (c.model_dir / PROVENANCE_FILE).is_file():
        provenance = json.loads((c.model_dir / PROVENANCE_FILE).read_text())
    base = c.extra["base"]
    provenance["trained"] = {"by": f"dreambooth {__version__}", "step": step, "base": str(base_path(base)),
                             "seed": seed, **extra}  # fmt: skip
    if base.folder is None:  # original files: what the checkpoint needs besides its own weights
        provenance["base_model"] = base.describe()
    provenance.setdefault("family", c.extra["family"])
    return provenance


def base_path(base: ResolvedModel) -> Path:
    """The base as one path: its folder, or its transformer's file (Flux's original files)."""
    return base.folder if base.folder is not None else base.parts["transformer"].path


class Full:
    """The whole UNet (and text encoder) trains; a checkpoint is a complete diffusers folder."""

    name = "full"

    def dtypes(self, cfg: TrainConfig, weight_dtype: torch.dtype) -> Dtypes:
        # what trains stays fp32 ("master weights"): fp16 gradients cannot be unscaled in place, which is the
        # "Attempting to unscale FP16 gradients" failure; the frozen parts run in half precision
        trained = torch.bfloat16 if cfg.full_bf16 else torch.float32  # --full-bf16: no master copy at all
        frozen = HALF.get(cfg.base_precision, weight_dtype)  # --base-precision bf16|fp16; else as computed
        text = trained if cfg.train_text_encoder else frozen
        return Dtypes(denoiser=trained, trained_text=text, frozen=frozen)

    def trains_whole(self, cfg: TrainConfig, family: Family) -> set[str]:
        """The parts that train whole (never stored by --base-precision)."""
        return {family.denoiser_name, *(family.trainable_text if cfg.train_text_encoder else ())}

    def prepare(self, c: Components, cfg: TrainConfig, family: Family) -> dict[str, torch.nn.Module]:
        c.vae.requires_grad_(False)
        c.denoiser.requires_grad_(True)
        text = trained_text_encoders(c, cfg, family)
        for name, encoder in c.text_encoders.items():
            encoder.requires_grad_(name in text)
        return {c.denoiser_name: c.denoiser, **text}

    def restore(self, c: Components, checkpoint: Path, state: dict) -> None:
        from safetensors.torch import load_file

        master = state.get("master_weights", {})  # the checkpoint's files are fp16: the exact fp32 weights
        for name, model in c.models.items():
            if name in master:
                model.load_state_dict(master[name])
            elif name == c.denoiser_name or state["config"].get("train_text_encoder"):
                model.load_state_dict(load_file(checkpoint / name / f"{WEIGHT_FILES[name]}.safetensors"))

    def checkpoint_bytes(self, c: Components, trained: dict, cfg: TrainConfig) -> int:
        """What one checkpoint costs on disk: trained weights (fp32, or fp16 + fp32 master copies), Adam's moments,
        and the frozen parts (hard links where the filesystem allows; counted anyway)."""
        weights = _bytes(trained, only_trainable=True)
        frozen = _bytes({n: m for n, m in c.models.items() if n not in trained}, False) + _bytes({"vae": c.vae}, False)
        return int(weights * (1.5 if cfg.save_fp16 else 1.0) + _optimizer_state_bytes(trained, cfg) + frozen)

    def export_bytes(self, c: Components, trained: dict) -> int:
        return (_bytes(c.models, False) + _bytes({"vae": c.vae}, False)) // 2  # fp16

    def save(
        self, tmp: Path, c: Components, trained: dict, cfg: TrainConfig, step: int, seed: int, family: Family
    ) -> dict:
        """A complete diffusers folder (SD, SDXL), or what trained and a record of the base (Flux, whose frozen T5
        alone is 9.5 GB); returns what the training state must add (fp32 master weights)."""
        from safetensors.torch import load_file, save_file

        for name in trained:
            trained[name].save_pretrained(tmp / name, safe_serialization=True)
        if family.checkpoint_holds_base:
            self._link_base(tmp, c, trained)
        write_json(tmp / PROVENANCE_FILE, _provenance(c, step, seed))
        if not cfg.save_fp16:
            return {}
        for name in trained:
            for path in (tmp / name).glob("*.safetensors"):
                half = {k: (v.to(family.half) if v.is_floating_point() else v) for k, v in load_file(path).items()}
                save_file(half, path, metadata={"format": "pt"})
        return {"master_weights": {name: model.state_dict() for name, model in trained.items()}}

    def _link_base(self, tmp: Path, c: Components, trained: dict) -> None:
        """The frozen parts, the tokenizers and the schedule, hard-linked from the base where the disk allows."""
        from safetensors.torch import load_file, save_file

        for name in c.models:
            if name not in trained:
                shutil.copytree(c.model_dir / name, tmp / name, copy_function=link_or_copy)
        shutil.copytree(c.vae_dir or c.model_dir / "vae", tmp / "vae", copy_function=link_or_copy)
        for folder in (f for f in c.model_dir.iterdir() if f.name.startswith(COPIED)):
            shutil.copytree(folder, tmp / folder.name, copy_function=link_or_copy)
        shutil.copy2(c.model_dir / "model_index.json", tmp / "model_index.json")
        if c.extra.get("zero_terminal_snr"):
            # the model now expects the rescaled schedule, sampled from its last step ("trailing"); write_json
            # replaces the file, so a hard link to the base's copy is never written through
            config = json.loads((tmp / "scheduler" / "scheduler_config.json").read_text())
            config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
            write_json(tmp / "scheduler" / "scheduler_config.json", config)
        extras = c.model_dir / EXTRAS_FILE
        if extras.is_file():
            # the original file's EMA copy describes the untrained UNet: a trained checkpoint must not carry it
            kept = {k: v for k, v in load_file(extras).items() if not k.startswith("model_ema.")}
            if kept:
                save_file(kept, tmp / EXTRAS_FILE, metadata={"format": "pt"})

    def export(self, checkpoint: Path, export_dir: Path, name: str, step: int) -> dict:
        from dreambooth.formats.export import ExportOptions, export

        return export(checkpoint, export_dir / f"{name}-step-{step}.safetensors", ExportOptions(half=True))

    def describe(self, cfg: TrainConfig) -> dict:
        return {"adapter": "full"}


class Lora:
    """The base model stays frozen (in half precision on a GPU); LoRA layers (peft) train in fp32 beside it.
    `loha` and `lokr` are LyCORIS' Hadamard and Kronecker products in the same place (peft's LoHa and LoKr), and
    --lora-dora makes a LoRA a DoRA; all of them are saved, restored and exported by the same code."""

    def __init__(self, name: str = "lora") -> None:
        self.name = name

    def dtypes(self, cfg: TrainConfig, weight_dtype: torch.dtype) -> Dtypes:
        base = HALF.get(cfg.base_precision, weight_dtype)  # --base-precision bf16|fp16; else as computed
        return Dtypes(denoiser=base, trained_text=base, frozen=base)

    def trains_whole(self, cfg: TrainConfig, family: Family) -> set[str]:
        return set()  # the whole base stays frozen: LoRA layers train beside it

    def prepare(self, c: Components, cfg: TrainConfig, family: Family) -> dict[str, torch.nn.Module]:
        from peft import inject_adapter_in_model

        c.vae.requires_grad_(False)
        trained = {c.denoiser_name: c.denoiser, **trained_text_encoders(c, cfg, family)}
        targets = family.lora_targets(cfg.lora_targets)
        c.extra["lora_targets"] = targets  # lora.json records the modules the groups expanded to
        for name, model in c.models.items():
            model.requires_grad_(False)
            if name not in trained:
                continue
            linear, convs = lora_modules(model, cfg, family, targets, text=name != c.denoiser_name)
            # exact module names (escaped: peft reads pattern keys as regular expressions); convs at their own rank
            config = peft_config(
                cfg,
                target_modules=linear + convs,
                rank_pattern={re.escape(m): cfg.lora_conv_rank for m in convs},
                alpha_pattern={re.escape(m): cfg.lora_conv_alpha for m in convs},
            )
            inject_adapter_in_model(config, model)
            for p in model.parameters():
                if p.requires_grad:  # only the LoRA weights: fp32 for the optimizer, whatever the base runs in
                    p.data = p.data.float()
        return trained

    def restore(self, c: Components, checkpoint: Path, state: dict) -> None:
        from dreambooth.formats.lora import load_adapter

        trains_text = state["config"].get("train_text_encoder")
        load_adapter(checkpoint, {n: m for n, m in c.models.items() if n == c.denoiser_name or (
            trains_text and n in trainable_text_encoders(c))})  # fmt: skip

    def checkpoint_bytes(self, c: Components, trained: dict, cfg: TrainConfig) -> int:
        weights = _bytes(trained, only_trainable=True)
        return int(weights + _optimizer_state_bytes(trained, cfg))

    def export_bytes(self, c: Components, trained: dict) -> int:
        return _bytes(trained, only_trainable=True) // 2

    def save(
        self, tmp: Path, c: Components, trained: dict, cfg: TrainConfig, step: int, seed: int, family: Family
    ) -> dict:
        from dreambooth.formats.lora import save_adapter

        concept = cfg.concepts[0]
        targets = c.extra["lora_targets"]
        info = {
            "family": c.extra["family"],
            "model_type": c.extra["model_type"],
            "prediction_type": c.prediction_type,
            "base": str(base_path(c.extra["base"])),
            "base_model": c.extra["base"].describe(),
            "base_sha256": _provenance(c, step, seed).get("sha256"),
            "step": step,
            "seed": seed,
            "resolution": cfg.resolution,
            "trigger": concept.instance_prompt,
            "output_name": cfg.output.resolve().name or "dreambooth",
            "adapter": self.name,
            "dora": cfg.lora_dora,
            "lokr_factor": cfg.lokr_factor,
            "rank": cfg.lora_rank,
            "alpha": cfg.lora_alpha,
            "dropout": cfg.lora_dropout,
            "conv_rank": cfg.lora_conv_rank,
            "conv_alpha": cfg.lora_conv_alpha,
            "targets": list(targets.denoiser),
            "text_encoder_targets": list(targets.text) if cfg.train_text_encoder else [],
        }
        # what names the denoiser's modules in the original layout (SDXL's and Flux's kohya files use it)
        info |= family.lora_info(trained[c.denoiser_name], cfg)
        save_adapter(tmp, trained, info)
        write_json(tmp / PROVENANCE_FILE, _provenance(c, step, seed, adapter=self.name))
        return {}

    def export(self, checkpoint: Path, export_dir: Path, name: str, step: int) -> dict:
        from dreambooth.formats.lora import export_lora

        return export_lora(checkpoint, export_dir / f"{name}-{self.name}-step-{step}.safetensors")

    def describe(self, cfg: TrainConfig) -> dict:
        kind = {"lora_dora": True} if cfg.lora_dora else {"lokr_factor": cfg.lokr_factor} if cfg.lokr_factor else {}
        return {
            "adapter": self.name,
            **kind,
            "lora_rank": cfg.lora_rank,
            "lora_alpha": cfg.lora_alpha,
            "lora_dropout": cfg.lora_dropout,
            "lora_targets": list(cfg.lora_targets),
            "lora_conv_rank": cfg.lora_conv_rank,
            "lora_conv_alpha": cfg.lora_conv_alpha,
        }


def peft_config(cfg: TrainConfig, **targets):
    """peft's configuration of the adapter --adapter names: LoRA (DoRA with --lora-dora), LoHa or LoKr, at
    --lora-rank / --lora-alpha (scale alpha / rank for all three), starting from the base model exactly (LoRA's B,
    LoHa's hada_w2_b and LoKr's w1 start at zero)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if cfg.adapter == "loha":
        return LoHaConfig(r=cfg.lora_rank, alpha=cfg.lora_alpha, init_weights=True, **targets)
    if cfg.adapter == "lokr":
        return LoKrConfig(r=cfg.lora_rank, alpha=cfg.lora_alpha, decompose_factor=cfg.lokr_factor, init_weights=True,
                          **targets)  # fmt: skip
    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      use_dora=cfg.lora_dora, init_lora_weights=True, **targets)  # fmt: skip


def trainable_text_encoders(c: Components) -> dict[str, torch.nn.Module]:
    """The text encoders --train-text-encoder may train: all of SD's and SDXL's; Flux's CLIP-L, never its T5."""
    return {n: m for n, m in c.text_encoders.items() if n in c.extra.get("trainable_text", c.text_encoders)}


def trained_text_encoders(c: Components, cfg: TrainConfig, family: Family) -> dict[str, torch.nn.Module]:
    return trainable_text_encoders(c) if cfg.train_text_encoder else {}


def lora_modules(model: torch.nn.Module, cfg: TrainConfig, family: Family, targets, text: bool):
    """The full names of the modules that get LoRA layers: (linear and 1×1 ones at --lora-rank, 3×3 convolutions
    at --lora-conv-rank). The denoiser's are the family's choice (its --lora-targets groups); a text encoder's are
    its attention projections (and MLP, when the denoiser's feed-forward layers train)."""
    if not text:
        linear, convs = family.lora_modules(model, targets.denoiser, cfg.lora_conv_rank)
    else:
        linear = [
            name
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and any(name.endswith("." + s) for s in targets.text)
        ]
        convs = []  # fmt: skip
    if not linear:
        raise UserError(
            f"--lora-targets {','.join(cfg.lora_targets)} matches no module of the "
            f"{'text encoder' if text else family.title + ' ' + family.denoiser_name}",
            "name the family's groups or modules (see --help)",
        )
    return linear, convs


def load_trained(family: Family, adapter, model: ResolvedModel, cfg: TrainConfig, dtypes: Dtypes, *,
                 checkpoint: Path | None = None, state: dict | None = None):  # fmt: skip
    """The base loaded, its objective named, what trains prepared, and — from a checkpoint — restored: (components,
    objective, trained models by name). Training starts from here; `sample` draws a checkpoint from here too."""
    from dreambooth.families.sd.spec import model_type_of

    roles = {family.denoiser_name, *family.text_encoder_names}
    storage = BaseStorage(cfg.base_precision, frozenset(roles - adapter.trains_whole(cfg, family)))
    if storage.stores:
        return_freed_memory()  # so that loading tensor by tensor peaks near the stored size
    c = family.load(model, dtypes, storage)
    c.extra.update(base=model, family=family.name, model_type=model_type_of(family.name, c.prediction_type),
                   max_token_length=cfg.max_token_length, trainable_text=family.trainable_text)  # fmt: skip
    objective = family.objective(c, cfg)  # also what the family keeps of the settings (Flux: T5's length, guidance)
    c.extra["base_storage"] = store_base(c, family, storage, dtypes)
    trained = adapter.prepare(c, cfg, family)
    if state is not None:
        adapter.restore(c, checkpoint, state)
    return c, objective, trained


def store_base(c: Components, family: Family, storage: BaseStorage, dtypes: Dtypes) -> dict:
    """The frozen layers --base-precision stores (those a family's loader did not store as it read them), one at a
    time; what each part's stored layers take, for the report."""
    out = {}
    for role, model in c.models.items():
        roots = family.blocks(model) if role == c.denoiser_name else [model]
        dtype = dtypes.denoiser if role == c.denoiser_name else dtypes.frozen
        store(model, storage.layers(role, model, roots), storage.precision, dtype)
        layers = [m for m in model.modules() if is_stored(m) and isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
        if layers:
            out[role] = {"precision": storage.precision, "layers": len(layers),
                         "bytes": sum(stored_bytes(m) for m in layers)}  # fmt: skip
    return out


def with_family_defaults(cfg: TrainConfig, family) -> TrainConfig:
    """What the user left to the family: its LoRA targets, its samples' guidance and steps."""
    defaults = {
        "lora_targets": family.default_lora_targets,
        "save_guidance_scale": family.sample_guidance,
        "save_infer_steps": family.sample_steps,
        "full_bf16": family.full_bf16 and cfg.adapter == "full" and cfg.mixed_precision == "bf16",
    }
    cfg = replace(cfg, **{k: v for k, v in defaults.items() if getattr(cfg, k) is None})
    if cfg.low_vram:  # the family's part of the --low-vram profile, for what the user did not set
        cfg = replace(cfg, **{k: v for k, v in family.low_vram.items() if k not in cfg.explicit})
    return cfg


ADAPTERS = {"full": Full(), "lora": Lora("lora"), "loha": Lora("loha"), "lokr": Lora("lokr")}


def get(name: str):
    return ADAPTERS[name]
