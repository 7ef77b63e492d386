"""Checks that run before any heavy work, and the inputs they resolve: the base model (a single file is converted
once into the cache), the VAE, the output folder, the instance and class image folders.

Every stage that takes a model folder or writes an output checks it here, so the messages are the same everywhere.
"""

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

from dreambooth import events
from dreambooth.checkpoint.folders import WEIGHT_FILES
from dreambooth.config import TrainConfig
from dreambooth.data import check_instance_dir, scan_images
from dreambooth.errors import UserError
from dreambooth.families.base import ResolvedModel
from dreambooth.families.flux import parts as flux_parts
from dreambooth.families.folders import folder_family
from dreambooth.families.sdxl.family import refuse_refiner
from dreambooth.fileio import atomic_dir, write_json

# what a diffusers folder of each family holds: (components, tokenizers and the files each needs)
CLIP_TOKENIZER = ("vocab.json", "merges.txt")
T5_TOKENIZER = ("tokenizer.json",)
FOLDER_PARTS = {
    "sd": (("unet", "vae", "text_encoder"), {"tokenizer": CLIP_TOKENIZER}),
    "sdxl": (("unet", "vae", "text_encoder", "text_encoder_2"),
             {"tokenizer": CLIP_TOKENIZER, "tokenizer_2": CLIP_TOKENIZER}),
    "flux": (("transformer", "vae", "text_encoder", "text_encoder_2"),
             {"tokenizer": CLIP_TOKENIZER, "tokenizer_2": T5_TOKENIZER}),
}  # fmt: skip


def check_model_folder(folder: Path, flag: str) -> None:
    """A diffusers folder with everything training needs; the message names what is missing."""
    if not folder.is_dir():
        raise UserError(f"{flag} {folder} is not a folder", "pass a diffusers folder or a .ckpt/.safetensors file")
    family = folder_family(folder)
    if family == "sdxl-refiner":
        refuse_refiner(folder)
    missing = [] if (folder / "model_index.json").is_file() else ["model_index.json"]
    needed, tokenizers = FOLDER_PARTS["flux" if family.startswith("flux") else family if family == "sdxl" else "sd"]
    for name in needed:
        weights = WEIGHT_FILES.get(name, "model")
        if not (folder / name / "config.json").is_file():
            missing.append(f"{name}/config.json")
        if not any(
            p.name.startswith(weights) for p in (folder / name).glob("*") if p.suffix in (".safetensors", ".bin")
        ):
            missing.append(f"{name}/{weights}.safetensors")
    for tokenizer, files in tokenizers.items():
        if not all((folder / tokenizer / f).is_file() for f in files):
            missing.append(f"{tokenizer}/{' + '.join(files)}")
    if not (folder / "scheduler" / "scheduler_config.json").is_file():
        missing.append("scheduler/scheduler_config.json")
    if missing:
        raise UserError(
            f"{flag} {folder} is an incomplete diffusers folder: missing {', '.join(missing)}",
            "point it at the folder's top (the one with model_index.json), or re-run `dreambooth convert`",
        )


def check_output(output: Path) -> None:
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--output {output} cannot be created ({exc.strerror})", "choose a writable folder") from None
    if not output.is_dir() or not os.access(output, os.W_OK | os.X_OK):
        raise UserError(f"--output {output} is not writable", "choose a writable folder, or fix its permissions")


def cache_entry(root: Path, src: Path) -> Path:
    """Where a conversion of the file `src` lives under `root`: keyed on path, size and mtime, because hashing
    gigabytes on every run would cost more than it saves."""
    stat = src.stat()
    key = hashlib.sha256(f"{src.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return root / f"{src.stem}-{key}"


def resolve_model(cfg: TrainConfig) -> ResolvedModel:
    """The base model, resolved once: a diffusers folder (an SD/SDXL single file is converted once into the cache),
    or Flux's original files by role (its transformer, CLIP-L, T5-XXL and VAE, or one all-in-one checkpoint);
    with the replacement VAE (--vae) as a folder."""
    src = cfg.model
    if src.is_dir():
        check_model_folder(src, "--model")
        model = ResolvedModel.of_folder(src)
    elif not src.exists():
        raise UserError(f"--model {src} does not exist", "pass a diffusers folder or a .ckpt/.safetensors file")
    elif src.suffix.lower() not in (".ckpt", ".safetensors"):
        raise UserError(f"--model {src} is neither a folder nor a .ckpt/.safetensors file", "convert it first")
    elif src.suffix.lower() == ".safetensors" and flux_parts.is_flux_file(src):
        model = resolve_flux_files(cfg, src)
    else:
        model = ResolvedModel.of_folder(convert_into_cache(cfg, src))
    check_flux_flags(cfg, model)
    vae = resolve_vae(cfg, model)
    return replace(model, vae=vae)


def convert_into_cache(cfg: TrainConfig, src: Path) -> Path:
    from dreambooth.formats.convert import ConvertOptions, convert

    dest = cache_entry(cfg.cache / "converted", src)
    if not (dest / "model_index.json").is_file():
        with events.stage(f"converting {src.name} into {dest}"):
            convert(src, dest, ConvertOptions(overwrite=True))
    check_model_folder(dest, "--model")
    return dest


def resolve_flux_files(cfg: TrainConfig, src: Path) -> ResolvedModel:
    """Flux from its transformer's file and the --clip-l / --t5xxl / --ae files (or one all-in-one checkpoint):
    read in place, never copied (a 12 B transformer and T5-XXL are 33 GB)."""
    ae = cfg.ae
    given = {"text_encoder": cfg.clip_l, "text_encoder_2": cfg.t5xxl, "vae": ae if ae and not ae.is_dir() else None}
    for role, path in given.items():
        if path is not None and not path.exists():
            flag = flux_parts.ROLES[role][0]
            raise UserError(f"{flag} {path} does not exist", f"pass {flux_parts.ROLES[role][1]}")
    parts = flux_parts.resolve(src, given)
    from dreambooth.checkpoint.load import open_safetensors_file

    transformer = parts["transformer"]
    guidance = f"{transformer.prefix}guidance_in.in_layer.weight" in open_safetensors_file(transformer.path)
    return ResolvedModel("flux-dev" if guidance else "flux-schnell", parts=parts)


def check_flux_flags(cfg: TrainConfig, model: ResolvedModel) -> None:
    """--clip-l, --t5xxl and --ae name the parts of a Flux transformer file; anything else does not take them."""
    given = [flag for flag, value in (("--clip-l", cfg.clip_l), ("--t5xxl", cfg.t5xxl), ("--ae", cfg.ae)) if value]
    if not given:
        return
    if not model.family.startswith("flux"):
        raise UserError(
            f"{given[0]} names a part of a Flux.1 model, and --model {cfg.model} is {model.family}",
            f"drop {given[0]} (a Stable Diffusion file holds its own text encoders and VAE; --vae replaces the VAE)",
        )
    if model.folder is not None and given != ["--ae"]:
        raise UserError(
            f"{given[0]}: --model {cfg.model} is a diffusers folder, which holds its own text encoders",
            f"drop {given[0]}; it goes with the transformer's single file (flux1-dev.safetensors)",
        )


def resolve_vae(cfg: TrainConfig, model: ResolvedModel) -> Path | None:
    """--vae as a diffusers VAE folder: given as one (or a model folder with vae/), or a single file (e.g.
    vae-ft-mse-840000-ema-pruned.safetensors) converted once into the cache. Checkpoints and exports carry it.
    Flux: --ae given as a folder is the same; its single file is one of the model's parts (resolve_flux_files)."""
    src = cfg.vae
    if src is None and model.family.startswith("flux") and cfg.ae is not None and cfg.ae.is_dir():
        src = cfg.ae
    if src is None:
        return None
    if model.family.startswith("flux") and not src.is_dir():
        raise UserError(
            f"--vae {src}: a Flux VAE file goes with --ae (as ComfyUI's ae.safetensors); --vae takes a folder",
            f"pass --ae {src}",
        )
    if src.is_dir():
        folder = src / "vae" if (src / "vae" / "config.json").is_file() else src
        if not (folder / "config.json").is_file() or not any(folder.glob("diffusion_pytorch_model*")):
            raise UserError(
                f"--vae {src} is not a diffusers VAE folder (config.json + diffusion_pytorch_model.safetensors)",
                "pass e.g. MODEL/vae, or a single VAE file (.safetensors/.ckpt)",
            )
    elif not src.exists():
        raise UserError(f"--vae {src} does not exist", "pass a diffusers VAE folder or a .safetensors/.ckpt file")
    elif src.suffix.lower() not in (".ckpt", ".safetensors", ".pt"):
        raise UserError(f"--vae {src} is neither a folder nor a .safetensors/.ckpt/.pt file", "pass a VAE file")
    else:
        from dreambooth.families.sd.convert import component_config_file
        from dreambooth.families.sd.vae_file import load_vae

        family = "sdxl" if model.family.startswith("sdxl") else "sd1"
        folder = cache_entry(cfg.cache / "vae", src)
        if family != "sd1":  # the same file, converted with SDXL's scaling factor, is another entry
            folder = folder.with_name(f"{folder.name}-{family}")
        if not (folder / "config.json").is_file():
            from dreambooth.checkpoint.tensorfile import write_safetensors

            with events.stage(f"converting the VAE {src.name} into {folder}"):
                # one architecture, but SDXL's VAE has its own scaling factor (0.13025; SD 1.x/2.x: 0.18215)
                vae = load_vae(src, family)
                with atomic_dir(folder, overwrite=True) as tmp:
                    write_safetensors(tmp / "diffusion_pytorch_model.safetensors", vae.state, {"format": "pt"})
                    write_json(tmp / "config.json", component_config_file("vae", vae.config))
    vae_config = json.loads((folder / "config.json").read_text())
    channels = latent_channels(model)
    if vae_config.get("latent_channels", 4) != channels:
        raise UserError(
            f"--vae {src} makes {vae_config.get('latent_channels')}-channel latents, and {model.family}'s denoiser "
            f"takes {channels}",
            "pass a VAE of the model's family (Stable Diffusion 1.x/2.x/XL VAEs make 4 channels, Flux.1's 16)",
        )
    if model.folder is None:
        return folder
    model_vae = json.loads((model.folder / "vae" / "config.json").read_text())
    ours, theirs = model_vae.get("scaling_factor"), vae_config.get("scaling_factor")
    if ours and theirs and abs(ours - theirs) > 1e-6:
        raise UserError(
            f"--vae {src} is a VAE of another model family (latent scaling factor {theirs}; the model's VAE has "
            f"{ours})",
            "pass a VAE made for this model: SDXL takes an SDXL VAE (e.g. sdxl-vae-fp16-fix), SD 1.x/2.x theirs",
        )
    return folder


def latent_channels(model: ResolvedModel) -> int:
    """The latent channels the model's denoiser works on: its UNet's input, or Flux's packed input / 4."""
    if model.family.startswith("flux"):
        return flux_parts.LATENT_CHANNELS
    return json.loads((model.folder / "unet" / "config.json").read_text()).get("in_channels", 4)


def preflight(cfg: TrainConfig) -> dict[int, list[Path]]:
    """Inputs the user gave, checked cheaply: instance folders and their images, class folders, output."""
    check_output(cfg.output)
    images = {}
    for i, concept in enumerate(cfg.concepts):
        flag = "--instance-data-dir" if len(cfg.concepts) == 1 else f"--concepts-list entry {i} instance_data_dir"
        images[i] = check_instance_dir(concept.instance_data_dir, cfg.resolution, flag)
    if cfg.with_prior_preservation:
        check_class_dirs_writable(cfg, missing_class_images(cfg))
    return images


def missing_class_images(cfg: TrainConfig) -> dict[int, int]:
    """Concept index → how many class images still have to be made."""
    missing = {}
    for i, concept in enumerate(cfg.concepts):
        folder = concept.class_data_dir
        have = len(scan_images(folder, cfg.resolution, "--class-data-dir", warn=False)) if folder.is_dir() else 0
        if have < cfg.num_class_images:
            missing[i] = cfg.num_class_images - have
    return missing


def check_class_dirs_writable(cfg: TrainConfig, missing: dict[int, int]) -> None:
    for i in missing:
        folder = cfg.concepts[i].class_data_dir
        parent = folder if folder.exists() else next((p for p in folder.parents if p.exists()), Path("/"))
        if (folder.exists() and not folder.is_dir()) or not os.access(parent, os.W_OK):
            raise UserError(
                f"--class-data-dir {folder} needs {missing[i]} more class images but cannot be written",
                "make it writable, point --class-data-dir elsewhere, or lower --num-class-images",
            )
