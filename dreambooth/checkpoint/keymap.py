"""Table-driven renaming between a model's diffusers state dict and an original single-file layout.

A family's table (families/sd/layout.py for the LDM/SGM layout of SD 1.x/2.x/XL, families/flux/layout.py for
Black Forest Labs' Flux) maps each original tensor to a `Source`: the diffusers keys it is made of and how they
combine. One table serves both directions: export builds each original tensor from its `Source`
(`build_original`), convert cuts the component's tensors back out of the original ones (`from_original`), each
combination declaring its inverse: a copy is a copy, a reshape to 1×1 convolution is undone by the component's own
shape, a transpose by a transpose, rows stacked (a fused q/k/v, Flux's linear1) are cut by the parts' row counts,
halves swapped (Flux's final modulation) are swapped back.

Nothing here imports torch unless a tensor must really be made (concatenation, a swap): the tensors are torch's or
`tensorfile.StoredTensor` (byte ranges of a file), and only indexing, `reshape` and `.T` are used on them.
"""

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Source:
    """Where one original tensor comes from: diffusers keys of one component, and how they combine."""

    keys: tuple[str, ...]
    combine: Callable[..., Any]


def copy(t: Any) -> Any:
    return t


def as_conv1x1(t: Any) -> Any:
    # The LDM VAE's attention uses 1x1 convolutions where diffusers uses linear layers: same numbers, 2 more dims.
    return t.reshape(*t.shape, 1, 1) if t.ndim == 2 else t


def transpose(t: Any) -> Any:
    # open_clip applies text_projection as x @ P ([hidden, proj]); HF stores a Linear weight ([proj, hidden])
    return t.T


def concat_rows(*parts: Any) -> Any:
    # open_clip keeps q, k, v as one fused in_proj (nn.MultiheadAttention), Flux its qkv and linear1; diffusers/HF
    # split them. The inverse (from_original) cuts the rows back out by the parts' shapes.
    import torch

    return torch.cat(parts, dim=0)


def swap_halves(t: Any) -> Any:
    # Flux's final modulation: (shift, scale) in the original, (scale, shift) in diffusers; its own inverse
    import torch

    if not isinstance(t, torch.Tensor):  # a StoredTensor: the two halves change places, so the bytes are read
        t = t.to_torch()
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def rename(key: str, table: dict[str, tuple[str, dict[str, str]]]) -> tuple[str, dict[str, str]] | None:
    """Find the table's module prefix of `key`; return (original key, inner renames that applied)."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in table:
            original, inner = table[prefix]
            rest = ".".join(parts[cut:])
            for old, new in inner.items():
                if rest.startswith(old + "."):
                    return f"{original}.{new}{rest[len(old) :]}", inner
            return f"{original}.{rest}", inner
    return None


def renamed(keys: list[str], table: dict, what: str) -> Iterator[tuple[str, str, dict[str, str]]]:
    for key in keys:
        found = rename(key, table)
        if found is None:
            raise KeyError(f"{what} key {key} has no place in the original layout")
        yield key, *found


def build_original(sources: dict[str, Source], state: dict[str, Any]) -> dict[str, Any]:
    return {name: src.combine(*(state[k] for k in src.keys)) for name, src in sources.items()}


def from_original(
    sources: dict[str, Source], tensors: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]
) -> tuple[dict[str, Any], list[str]]:
    """The inverse of `build_original`: each component key's tensor cut out of the original tensors, and the
    original keys that are missing. `shapes` (the component's own) says where a fused q/k/v splits and what a
    1x1 convolution's weight is as a linear one; every other tensor is taken as it is (its shape checked later)."""
    state: dict[str, Any] = {}
    missing = []
    for original, src in sources.items():
        t = tensors.get(original)
        if t is None:
            missing.append(original)
        elif src.combine is concat_rows:  # rows of the fused tensor, in order
            start = 0
            for key in src.keys:
                state[key], start = t[start : start + shapes[key][0]], start + shapes[key][0]
        elif src.combine is transpose:
            state[src.keys[0]] = t.T
        elif src.combine is swap_halves:
            state[src.keys[0]] = swap_halves(t)
        elif src.combine is as_conv1x1 and t.ndim == 4 and len(shapes[src.keys[0]]) == 2:
            state[src.keys[0]] = t.reshape(*shapes[src.keys[0]])
        else:
            state[src.keys[0]] = t
    return state, missing


# transformers 5 dropped CLIPTextModel's `text_model.` level from module paths; the published names keep it
TEXT_MODEL = "text_model."


def kohya_module_name(prefix: str, component: str, module: str) -> str:
    """kohya's (and the WebUI's, ComfyUI's) LoRA module name: the prefix and the module path with "." as "_";
    a text encoder's path in transformers 4's layout (`lora_te1_text_model_encoder_layers_0_…`)."""
    if component.startswith("text_encoder") and not module.startswith(TEXT_MODEL):
        module = TEXT_MODEL + module
    return f"{prefix}_{module.replace('.', '_')}"
