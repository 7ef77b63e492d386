"""Turn an original single file's tensors into diffusers component state dicts, and check them.

The keys come from our key tables (`keymap`), read backwards: each component key is cut out of the original
tensors by name, with no tensor read (they may be `tensorfile.StoredTensor` byte ranges). Every component is then
checked against the state-dict shapes its diffusers / transformers class has for that config (`shapes`): exactly
those keys, each with its shape, or one UserError naming the file and the first key that is wrong.
"""

from dataclasses import dataclass
from typing import Any

from dreambooth.checkpoint.keymap import from_original
from dreambooth.errors import UserError
from dreambooth.families.sd.layout import ema_key, text_sources, unet_sources, vae_sources
from dreambooth.families.sd.shapes import build_model, expected_shapes
from dreambooth.families.sd.spec import FAMILIES

COMPONENTS = ("unet", "vae", "text_encoder")  # SD 1.x/2.x; a family's own list: families.Family.components
__all__ = ["COMPONENTS", "Component", "build_model", "checked", "expected_shapes"]


@dataclass
class Component:
    name: str
    config: dict
    state: dict[str, Any]  # torch tensors, or StoredTensor byte ranges of the original file

    @property
    def num_params(self) -> int:
        return sum(t.numel() for t in self.state.values())


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
    wrong = [k for k, shape in expected.items() if tuple(state[k].shape) != tuple(shape)]
    if wrong:
        k = wrong[0]
        raise UserError(
            f"{source}: {len(wrong)} {name} weights have unexpected shapes "
            f"(first: {k} is {tuple(state[k].shape)}, expected {tuple(expected[k])})",
            "the file is a different architecture; pass --model-type / --original-config if it was mis-detected",
        )
    return Component(name, config, {k: state[k] for k in expected})


def _cut(name: str, config: dict, tensors: dict, sources: dict, source: str, expected: dict) -> Component:
    state, missing = from_original(sources, tensors, expected)
    if missing:
        raise UserError(
            f"{source} lacks {len(missing)} of the {len(sources)} original {name} weights this architecture needs "
            f"(first: {missing[0]})",
            "the file is incomplete (a partial download?) or a different model architecture",
        )
    return checked(name, config, state, source, expected)


def unet_from_original(tensors: dict, config: dict, *, ema: bool, source: str) -> Component:
    expected = expected_shapes("unet", config)
    sources = unet_sources(list(expected), config)
    if ema:  # LitEma's flattened names (`model_ema.diffusion_modelinput_blocks00weight`)
        sources = {ema_key(original): src for original, src in sources.items()}
    return _cut("unet", config, tensors, sources, source, expected)


def vae_from_original(tensors: dict, config: dict, *, source: str) -> Component:
    expected = expected_shapes("vae", config)
    return _cut("vae", config, tensors, vae_sources(list(expected), config), source, expected)


def text_from_original(
    tensors: dict, config: dict, family: str, *, source: str, name: str = "text_encoder"
) -> Component:
    encoder = FAMILIES[family].text_encoders[name]
    expected = expected_shapes(name, config)
    sources = text_sources(list(expected), config, encoder.kind, encoder.prefix)
    return _cut(name, config, tensors, sources, source, expected)
