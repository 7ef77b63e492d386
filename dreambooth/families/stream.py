"""A diffusers folder's part loaded into stored layers (--base-precision fp8 / int8 / nf4) tensor by tensor.

`from_pretrained` reads a whole part in the load precision before anything can be stored: a 12 B transformer would
hold 24 GB of host memory to end up as 12 GB of fp8. Here the part is built on the meta device from its
config.json, and its safetensors file(s) are read one tensor at a time, each layer stored as soon as its weights
are in (storage.assign_streamed), so loading peaks near the stored size. A folder this cannot read exactly (legacy
key names, a pickle, a tied weight the file leaves out) is loaded by from_pretrained and stored afterwards.
"""

import json
from pathlib import Path

import torch

from dreambooth.checkpoint.folders import WEIGHT_FILES
from dreambooth.checkpoint.load import open_checkpoint
from dreambooth.storage import BaseStorage, assign_streamed


def weight_files(folder: Path, role: str) -> list[Path] | None:
    """The part's safetensors files: one, or the shards its index names; None when it has neither."""
    stem = WEIGHT_FILES.get(role, "model")
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in shards]
    return None


def build_empty(cls, folder: Path) -> torch.nn.Module:
    """The part's model from its config.json, its parameters on the meta device (buffers made as usual)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        if hasattr(cls, "load_config"):  # diffusers
            return cls.from_config(cls.load_config(folder))
        from transformers import AutoConfig

        model = cls(AutoConfig.from_pretrained(folder))
    model.tie_weights()  # what from_pretrained ties (T5's embedding under two names) is one tensor from the start
    return model


def load_part(cls, folder: Path, role: str, dtype: torch.dtype, storage: BaseStorage | None, roots=None):
    """Part `role` of a folder in `dtype`, its layers that `storage` stores stored on the way (`roots(model)`: the
    modules whose layers may be stored, default the whole model). Without storing: from_pretrained as always."""
    if storage is None or not storage.stores or role not in storage.frozen:
        return cls.from_pretrained(folder, dtype=dtype)
    files = weight_files(folder, role)
    model = build_empty(cls, folder) if files else None
    state = _state_by_name(model, files) if files else None
    if state is None:
        return cls.from_pretrained(folder, dtype=dtype)  # stored afterwards, by adapters.store_base
    names = storage.layers(role, model, roots(model) if roots else [model])
    tied = _tied(model)
    assign_streamed(model, state, dtype, names, storage.precision)
    for alias, primary in tied.items():  # one tensor under both names again (T5's shared / embed_tokens)
        parent, _, leaf = alias.rpartition(".")
        model.get_submodule(parent)._parameters[leaf] = model.get_parameter(primary)
    return model.eval()


def _tied(model: torch.nn.Module) -> dict[str, str]:
    """alias → primary name, for parameters the model holds under more than one name."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def _state_by_name(model: torch.nn.Module, files: list[Path]) -> dict | None:
    """The files' tensors (not read yet) under the model's state-dict names; None unless every name is there with
    its shape. transformers 5's CLIP text model has no `text_model.` level its files still have."""
    tied = _tied(model)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}
    state = {}
    for path in files:
        for key, tensor in open_checkpoint(path).tensors.items():
            name = key if key in expected or key in tied else key.removeprefix("text_model.")
            name = tied.get(name, name)  # a tied weight under its alias: the same tensor
            if name in expected:
                state.setdefault(name, tensor)
    if state.keys() != expected.keys() or any(tuple(state[k].shape) != shape for k, shape in expected.items()):
        return None
    return state
