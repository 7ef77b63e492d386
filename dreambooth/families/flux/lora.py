"""A Flux LoRA as the files users load: kohya's layout (ComfyUI, Forge, InvokeAI, diffusers and kohya read it),
diffusers' own, or merged into the transformer.

We train LoRA layers on diffusers' modules (to_q, to_k, to_v, proj_mlp, …). Black Forest Labs' layout, which
kohya's names follow (`lora_unet_double_blocks_0_img_attn_qkv`), fuses some of them into one module: q, k and v of
each double block's image and text attention, and q, k, v and the MLP's input of each single block (`linear1`).
A LoRA on the k parts of a fused module is written losslessly as one LoRA on it: the k downs stacked ([k·r, in]),
the k ups as one block-diagonal up ([Σ out, k·r], zero where a part of the module did not train), and alpha
multiplied by k so that alpha / rank, the scale every loader applies, stays what it was. Every module carries
`.alpha` (ComfyUI applies alpha / rank only where that key exists). Parts trained at different scales (a rank or
alpha pattern) get their own scale multiplied into their up block instead, and alpha = rank.
"""

import json
from functools import partial
from pathlib import Path
from typing import Any

import torch

from dreambooth.checkpoint import lycoris
from dreambooth.checkpoint.keymap import kohya_module_name
from dreambooth.errors import UserError
from dreambooth.families.flux.files import IMPLEMENTATION, MODELSPEC_ARCHITECTURE, TITLES
from dreambooth.families.flux.layout import linear_modules

PREFIX = "lora_unet"
# LoHa, LoKr and DoRA modules keep diffusers' names (OneTrainer's prefix; ComfyUI maps each onto its slice of the
# fused BFL weight): a Hadamard or Kronecker product, or a magnitude per part, does not fuse into one module
SPLIT_PREFIX = "lora_transformer"
TEXT_PREFIX = "lora_te1"  # CLIP-L, in the Hugging Face layout of transformers 4 (`text_model.…`)
_DOWN, _UP = ".lora_A.weight", ".lora_B.weight"
# the out features of a fused part that did not train (its rows of the up are zero): from the transformer's width
MLP_PARTS = ("proj_mlp",)


def transformer_layout(transformer) -> dict:
    """What names the transformer's modules in BFL's layout and sizes its fused ones (lora.json keeps it)."""
    config = transformer.config
    inner = config.num_attention_heads * config.attention_head_dim
    return {
        "num_layers": config.num_layers,
        "num_single_layers": config.num_single_layers,
        "guidance_embeds": bool(config.guidance_embeds),
        "inner_dim": inner,
        "mlp_dim": transformer.single_transformer_blocks[0].proj_mlp.out_features if config.num_single_layers else 0,
    }


def _out_features(part: str, layout: dict) -> int:
    return layout["mlp_dim"] if part.endswith(MLP_PARTS) else layout["inner_dim"]


def fused(
    parts: tuple[str, ...], state: dict[str, torch.Tensor], ranks: dict, alphas: dict, layout: dict
) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(down, up, alpha) of one BFL module made of `parts` (diffusers module paths); None if none of them trained."""
    trained = [p for p in parts if p + _DOWN in state]
    if not trained:
        return None
    if len(parts) == 1:
        part = parts[0]
        return state[part + _DOWN], state[part + _UP], float(alphas[part])
    scales = {float(alphas[p]) / ranks[p] for p in trained}
    same = len(scales) == 1 and len({ranks[p] for p in trained}) == 1
    rank = sum(ranks[p] for p in trained)
    down = torch.cat([state[p + _DOWN] for p in trained], dim=0)
    up = torch.zeros(sum(_out_features(p, layout) for p in parts), rank, dtype=down.dtype, device=down.device)
    row, column = 0, 0
    for part in parts:
        out = _out_features(part, layout)
        if part in trained:
            block = state[part + _UP]
            if block.shape[0] != out:
                raise ValueError(f"{part}: {block.shape[0]} out features, the layout says {out}")
            r = ranks[part]
            up[row : row + out, column : column + r] = block if same else block * (float(alphas[part]) / r)
            column += r
        row += out
    # the same scale for every part: alpha × k keeps alpha / rank exact; else each part's scale is in its block
    alpha = float(alphas[trained[0]]) * len(trained) if same else float(rank)
    return down, up, alpha


def to_kohya(info: dict, states: dict[str, dict[str, torch.Tensor]], norms: dict | None = None) -> dict:
    """peft keys of the transformer (and CLIP-L) → kohya's Flux names, fused where BFL fuses; LoHa, LoKr and DoRA
    under diffusers' module names (`lora_transformer_…`), one module each."""
    kind = lycoris.kind_of(info)
    if kind != "lora":
        return _split_to_kohya(info, states, kind, norms or {})
    out: dict[str, torch.Tensor] = {}
    layout = info["transformer_layout"]
    for component, state in states.items():
        ranks, alphas = info["components"][component]["ranks"], info["components"][component]["alphas"]
        if component == "transformer":
            modules = {original: parts for original, parts in linear_modules(layout).items()}
            names = {original: f"{PREFIX}_{original.replace('.', '_')}" for original in modules}
        elif component == "text_encoder":
            modules = {m: (m,) for m in sorted(k.removesuffix(_DOWN) for k in state if k.endswith(_DOWN))}
            names = {m: kohya_module_name(TEXT_PREFIX, component, m) for m in modules}
        else:
            raise ValueError(f"a Flux LoRA has no kohya name for {component!r}")
        covered = set()
        for original, parts in modules.items():
            made = fused(parts, state, ranks, alphas, layout)
            if made is None:
                continue
            down, up, alpha = made
            covered |= set(parts)
            name = names[original]
            out[f"{name}.lora_down.weight"] = down
            out[f"{name}.lora_up.weight"] = up
            out[f"{name}.alpha"] = torch.tensor(alpha, dtype=down.dtype)
        left = {k.removesuffix(_DOWN) for k in state if k.endswith(_DOWN)} - covered
        if left:  # a module outside the blocks' tables: no file layout would load it
            raise ValueError(f"{component} LoRA modules with no place in BFL's layout: {sorted(left)[:3]}")
    return out


def _split_to_kohya(info: dict, states: dict, kind: str, norms: dict) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for component, state in states.items():
        if component not in ("transformer", "text_encoder"):
            raise ValueError(f"a Flux LoRA has no kohya name for {component!r}")
        ranks, alphas = info["components"][component]["ranks"], info["components"][component]["alphas"]
        for module in lycoris.module_paths(state, kind):
            if component == "transformer":
                name = f"{SPLIT_PREFIX}_{module.replace('.', '_')}"
            else:
                name = kohya_module_name(TEXT_PREFIX, component, module)
            tensors = lycoris.file_tensors(kind, state, module, ranks[module], alphas[module], norms.get(component))
            out |= {name + suffix: tensor for suffix, tensor in tensors.items()}
    return out


def kohya_metadata(info: dict) -> dict[str, str]:
    """What kohya's Flux LoRAs say about themselves (train_network.py, flux_train_network.py, sai_model_spec.py)."""
    model_type = info["family"]
    trigger = info.get("trigger") or ""
    resolution = int(info.get("resolution") or 512)
    meta = {
        "ss_network_module": "lycoris.kohya" if lycoris.kind_of(info) in ("loha", "lokr") else "networks.lora_flux",
        "ss_network_dim": str(info["rank"]),
        "ss_network_alpha": str(float(info["alpha"])),
        "ss_network_train_unet_only": str(not info.get("text_encoder_targets")),
        "ss_base_model_version": "flux1",
        "ss_model_type": model_type,
        "ss_v2": "False",
        "ss_output_name": str(info.get("output_name") or "lora"),
        "ss_resolution": str((resolution, resolution)),
        "ss_steps": str(info.get("step", 0)),
        "ss_seed": str(info.get("seed")),
        "ss_sd_model_name": Path(str(info.get("base") or "")).name,
        "ss_guidance_scale": str(info.get("guidance_scale")),
        "ss_timestep_sampling": str(info.get("timestep_sampling")),
        "ss_discrete_flow_shift": str(info.get("flow_shift")),
        "ss_model_prediction_type": "raw",
        "ss_tag_frequency": json.dumps({"instance": {trigger: 1}} if trigger else {}),
        "dreambooth.family": model_type,
        "dreambooth.model_type": model_type,
        "dreambooth.prediction_type": "flow",
        "dreambooth.trigger": trigger,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{MODELSPEC_ARCHITECTURE[model_type]}/lora",
        "modelspec.implementation": IMPLEMENTATION,
        "modelspec.title": str(info.get("output_name") or f"{TITLES[model_type]} LoRA"),
        "modelspec.resolution": f"{resolution}x{resolution}",
    }
    kind = lycoris.kind_of(info)
    if kind != "lora":
        args = {"dora": {"dora_wd": "True"}, "loha": {"algo": "loha"}}.get(kind)
        meta["ss_network_args"] = json.dumps(args or {"algo": "lokr", "factor": str(info.get("lokr_factor") or -1)})
    if trigger:
        meta["modelspec.trigger_phrase"] = trigger
    if info.get("base_sha256"):
        meta["dreambooth.base_model_sha256"] = info["base_sha256"]
    return meta


def diffusers_layers(info: dict, states: dict, half: bool) -> dict[str, Any]:
    """save_lora_weights' arguments for FluxPipeline: peft's keys, each module's alpha / rank multiplied into its
    up (lora_B), so that alpha = rank holds whatever loads it (diffusers, ComfyUI's `transformer.` names)."""
    kwargs = {}
    for component, state in states.items():
        ranks, alphas = info["components"][component]["ranks"], info["components"][component]["alphas"]
        baked = {}
        for key, value in state.items():
            module = key.removesuffix(_UP)
            scale = float(alphas[module]) / ranks[module] if key.endswith(_UP) else 1.0
            baked[key] = (value.float() * scale).to(torch.float16 if half else torch.float32)
        if component == "text_encoder":  # the published layout keeps transformers 4's `text_model.` level
            baked = {"text_model." + k.removeprefix("text_model."): v for k, v in baked.items()}
            # transformers' loader finds a DoRA magnitude as a parameter's name
            baked = {k + (".weight" if k.endswith(".lora_magnitude_vector") else ""): v for k, v in baked.items()}
        modules = {m.removeprefix("text_model."): r for m, r in ranks.items()}
        rank = max(modules.values())
        metadata = {"r": rank, "lora_alpha": rank, "target_modules": sorted(modules), "rank_pattern": modules,
                    "alpha_pattern": modules, "use_dora": bool(info.get("dora")), "lora_bias": False}  # fmt: skip
        kwargs[f"{component}_lora_layers"] = baked
        kwargs[f"{component}_lora_adapter_metadata"] = metadata
    return kwargs


def check_base(info: dict, base_family: str, source: str) -> None:
    """A LoRA merged onto the other Flux variant (dev ⇄ schnell) is refused: their transformers differ (guidance
    embedding, distillation) and the result would be neither."""
    if base_family != info["family"]:
        raise UserError(
            f"--base {source} is {TITLES.get(base_family, base_family)}, and the LoRA was trained on "
            f"{TITLES.get(info['family'], info['family'])}",
            "merge onto the model the LoRA was trained on (lora.json: base), or load the LoRA in your UI instead",
        )


# ───────────────────────────── merged into the base ─────────────────────────────


def _base_transformer(base: dict) -> tuple[dict, dict[str, Any], str]:
    """(config, BFL-keyed tensors, where) of the base's transformer: its original file's ranges, or a diffusers
    folder's put into BFL's layout as they are written."""
    from dreambooth.checkpoint.load import open_checkpoint
    from dreambooth.families.flux import files, parts

    if base.get("folder"):
        config, state = files.read_transformer_folder(Path(base["folder"]) / "transformer")
        return config, files.original_transformer(config, state), base["folder"]
    path = Path(base["parts"]["transformer"])
    ckpt = open_checkpoint(path)
    prefix = parts.identify(ckpt.tensors).get("transformer")
    if prefix is None:
        raise UserError(f"--base {path} holds no Flux transformer", "pass the transformer the LoRA was trained on")
    tensors = parts.strip(ckpt.tensors, prefix)
    config = parts.part_config("transformer", tensors, "flux-dev", str(path), ckpt.metadata)
    return config, tensors, str(path)


def _merged(weight: Any, rows: dict[str, int], merge: dict[str, Any], dtype_name: str):
    """The base weight with its trained parts merged, made when it is written. `rows` is every part of the (fused)
    weight in row order with its row count; `merge` maps each trained part to (its rows in fp32 → merged rows)."""
    from dreambooth.checkpoint.tensorfile import TORCH_NAMES, LazyTensor, StoredTensor

    def make():
        base = weight.make() if isinstance(weight, LazyTensor) else weight
        base = (base.to_torch() if isinstance(base, StoredTensor) else base).float()
        split = base.split(list(rows.values()))
        made = [merge[part](r) if part in merge else r for part, r in zip(rows, split, strict=True)]
        return torch.cat(made).to(getattr(torch, TORCH_NAMES[dtype_name]))

    return LazyTensor(tuple(weight.shape), dtype_name, make)


def _part_rows(original: str, parts: tuple[str, ...], weight: Any, layout: dict, source: str) -> dict[str, int]:
    """Each diffusers part of an original module → its rows of the (fused) weight; a base of another size refused."""
    rows = {parts[0]: weight.shape[0]} if len(parts) == 1 else {p: _out_features(p, layout) for p in parts}
    if sum(rows.values()) != weight.shape[0]:
        raise UserError(
            f"--base {source}: {original} has {weight.shape[0]} rows, the adapter was trained on "
            f"{sum(rows.values())}: a model of another size",
            "merge onto the model the adapter was trained on (lora.json: base)",
        )
    return rows


def _dtype_name(t: Any, half: bool) -> str:
    from dreambooth.checkpoint.tensorfile import LazyTensor, StoredTensor, safetensors_dtype

    if half:
        return "BF16"
    return t.dtype_name if isinstance(t, StoredTensor | LazyTensor) else safetensors_dtype(t.dtype)


def export_merged(info: dict, states: dict, dest: Path, *, half: bool, base: Path | None) -> dict:
    """The base transformer with the adapter merged as peft merges it (LoRA's scale · up @ down, DoRA's
    renormalised rows, LoHa's and LoKr's products), each diffusers module onto its rows of BFL's fused weight
    (what ComfyUI computes from the file), written as BFL's single file one tensor at a time; and CLIP-L's file
    beside it when CLIP-L trained."""
    from dreambooth.checkpoint.load import sort_safetensors_metadata
    from dreambooth.checkpoint.tensorfile import write_safetensors
    from dreambooth.families.flux import files
    from dreambooth.families.flux.layout import variant
    from dreambooth.fileio import atomic_path

    described = info.get("base_model") or {}
    if base is not None:
        base = Path(base)
        described = {"folder": str(base)} if base.is_dir() else {"parts": {"transformer": str(base)}}
    if not described:
        raise UserError("the checkpoint does not record its base model", "pass --base with the Flux transformer")
    config, tensors, where = _base_transformer(described)
    check_base(info, variant(config), where)
    kind, state = lycoris.kind_of(info), states["transformer"]
    scales = lycoris.module_scales(info, "transformer", state)
    trained = set(scales)
    merged = {
        key: (t if not half or not t.is_floating_point() else files._cast(t, "BF16")) for key, t in tensors.items()
    }
    for original, parts in linear_modules(info["transformer_layout"]).items():
        if not trained.intersection(parts):
            continue
        weight = tensors[f"{original}.weight"]
        merge = {p: partial(lycoris.merged, kind, state, p, scales[p]) for p in parts if p in trained}
        rows = _part_rows(original, parts, weight, info["transformer_layout"], where)
        merged[f"{original}.weight"] = _merged(weight, rows, merge, _dtype_name(weight, half))
        trained -= set(parts)
    if trained:  # a module outside the blocks' tables: no place in BFL's layout to merge it
        raise ValueError(f"transformer adapter modules with no place in BFL's layout: {sorted(trained)[:3]}")
    training = {"lora": {k: info.get(k) for k in ("step", "seed", "trigger", "rank", "alpha", "base")}}
    with atomic_path(dest) as tmp:
        write_safetensors(tmp, merged, metadata=files.transformer_metadata(config, training))
        sort_safetensors_metadata(tmp)
    summary = {"file": str(dest), "size_bytes": dest.stat().st_size, "tensors": len(merged), "half": half}
    if "text_encoder" in states:
        summary["clip_l"] = str(_export_merged_clip(info, states["text_encoder"], described, dest, half))
    return summary


def _export_merged_clip(info: dict, state: dict, base: dict, dest: Path, half: bool) -> Path:
    """CLIP-L with its adapter merged, as clip_l.safetensors (Hugging Face names, `text_model.…`)."""
    from safetensors.torch import save_file

    from dreambooth.checkpoint.load import load_safetensors_file, open_checkpoint
    from dreambooth.families.flux import parts
    from dreambooth.fileio import atomic_path

    if base.get("folder"):
        folder = Path(base["folder"]) / "text_encoder"
        weights = load_safetensors_file(folder / "model.safetensors")
        config = json.loads((folder / "config.json").read_text())
    else:
        path = Path(base["parts"]["text_encoder"])
        ckpt = open_checkpoint(path)
        tensors = parts.strip(ckpt.tensors, parts.identify(ckpt.tensors)["text_encoder"])
        config = parts.part_config("text_encoder", tensors, info["family"], str(path), ckpt.metadata)
        weights = load_safetensors_file(path)
        weights = parts.strip(weights, parts.identify(weights)["text_encoder"])
    weights = {"text_model." + k.removeprefix("text_model."): v for k, v in weights.items()}
    kind = lycoris.kind_of(info)
    for module, scale in lycoris.module_scales(info, "text_encoder", state).items():
        target = "text_model." + module.removeprefix("text_model.") + ".weight"
        made = lycoris.merged(kind, state, module, scale, weights[target])
        weights[target] = made.to(weights[target].dtype)
    if half:
        weights = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in weights.items()}
    out = dest.with_name(f"{dest.stem}-clip_l.safetensors")
    config = {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}
    metadata = {"format": "pt", "dreambooth.configs": json.dumps({"text_encoder": config}, sort_keys=True)}
    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in weights.items()}, tmp, metadata=metadata)
    return out
