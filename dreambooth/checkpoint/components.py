"""Turn an original single file's tensors into diffusers component state dicts, and check them.

The key mappings are diffusers' own (`diffusers.loaders.single_file_utils`), which work on plain dicts. We skip
building the models — which is what makes `from_single_file` slow — and instead check every component against
the state-dict shapes of a model built on the `meta` device (no memory, no init).
"""

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from dreambooth.checkpoint.families import FAMILIES
from dreambooth.errors import UserError

COMPONENTS = ("unet", "vae", "text_encoder")  # SD 1.x/2.x; a family's own list: families.Family.components


@dataclass
class Component:
    name: str
    config: dict
    state: dict[str, torch.Tensor]

    @property
    def num_params(self) -> int:
        return sum(t.numel() for t in self.state.values())


def build_model(name: str, config: dict) -> torch.nn.Module:
    if name == "unet":
        return UNet2DConditionModel.from_config(config)
    if name == "vae":
        return AutoencoderKL.from_config(config)
    if name == "text_encoder_2":  # SDXL's OpenCLIP bigG: its pooled output goes through text_projection
        return CLIPTextModelWithProjection(CLIPTextConfig(**config))
    return CLIPTextModel(CLIPTextConfig(**config))


def expected_shapes(name: str, config: dict) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = build_model(name, config)
    return {k: v.shape for k, v in model.state_dict().items()}


def checked(name: str, config: dict, state: dict, source: str, expected: dict | None = None) -> Component:
    """Keep exactly the model's keys; refuse missing or misshapen weights with a message naming the file."""
    expected = expected or expected_shapes(name, config)
    missing = [k for k in expected if state.get(k) is None]
    if missing:
        raise UserError(
            f"{source} lacks {len(missing)} of the {len(expected)} {name} weights this architecture needs "
            f"(first: {missing[0]})",
            "the file is incomplete (a partial download?) or a different model architecture",
        )
    wrong = [k for k, shape in expected.items() if state[k].shape != shape]
    if wrong:
        k = wrong[0]
        raise UserError(
            f"{source}: {len(wrong)} {name} weights have unexpected shapes "
            f"(first: {k} is {tuple(state[k].shape)}, expected {tuple(expected[k])})",
            "the file is a different architecture; pass --model-type / --original-config if it was mis-detected",
        )
    return Component(name, config, {k: state[k] for k in expected})


def unet_from_original(tensors: dict, config: dict, *, ema: bool, source: str) -> Component:
    state = sfu.convert_ldm_unet_checkpoint(tensors, config, extract_ema=ema)
    return checked("unet", config, state, source)


def vae_from_original(tensors: dict, config: dict, *, source: str) -> Component:
    state = sfu.convert_ldm_vae_checkpoint(tensors, config)
    return checked("vae", config, state, source)


def text_from_original(
    tensors: dict, config: dict, family: str, *, source: str, name: str = "text_encoder"
) -> Component:
    encoder = FAMILIES[family].text_encoders[name]
    if encoder.kind == "clip":
        state = sfu.convert_ldm_clip_checkpoint(tensors, remove_prefix=encoder.prefix)
    else:
        # the function only reads `text_model.config.hidden_size`, so no model needs to be built
        stand_in = SimpleNamespace(config=SimpleNamespace(hidden_size=config["hidden_size"]))
        state = sfu.convert_open_clip_checkpoint(stand_in, tensors, prefix=encoder.prefix)
    # diffusers names keys as transformers 4 did (`text_model.…`); match whatever the installed version uses
    expected = expected_shapes(name, config)  # built once: a meta bigG takes a moment
    if not any(k.startswith("text_model.") for k in expected):
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    return checked(name, config, state, source, expected)
