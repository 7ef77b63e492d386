"""The state-dict shapes of each component's model class, for checking a conversion without building a model.

The shapes of `UNet2DConditionModel`, `AutoencoderKL` and the CLIP text models for a config are what a model built
on the `meta` device has (no memory, no init), but importing diffusers and transformers to build one takes longer
than converting a model. So the shapes of the released architectures (SD 1.x, SD 2.x, SDXL base and refiner) ship
in dreambooth/assets/shapes/, made by the installed versions of diffusers and transformers:

    python -m dreambooth.families.sd.shapes    # rewrite the tables (after the lock changes either library)

A table is used only for the config it was made from (fields left at the class's defaults do not count: a
config read off a file's shapes spells out some that the bundled one leaves out) and only with the versions it was
made with; anything else (a tiny test model, a pruned text encoder, another diffusers) builds the meta model. A
test checks every table against the models.
"""

import json
from functools import cache
from importlib import metadata, resources
from pathlib import Path
from typing import Any

from dreambooth.families.sd.spec import FAMILIES, bundled_config, family_of

TABLES = ("sd1", "sd2", "sdxl", "sdxl-refiner")  # the model types whose bundled configs get a table
LIBRARIES = ("diffusers", "transformers")  # whose classes the shapes are of
IGNORED = ("sample_size",)  # config fields that change no shape


def build_model(name: str, config: dict) -> Any:
    """The component's diffusers / transformers model for `config` (on the current default device)."""
    if name == "unet":
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_config(config)
    if name == "vae":
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_config(config)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if name == "text_encoder_2":  # SDXL's OpenCLIP bigG: its pooled output goes through text_projection
        return CLIPTextModelWithProjection(CLIPTextConfig(**config))
    return CLIPTextModel(CLIPTextConfig(**config))


def model_shapes(name: str, config: dict) -> dict[str, tuple[int, ...]]:
    import torch

    with torch.device("meta"):
        model = build_model(name, config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def expected_shapes(name: str, config: dict) -> dict[str, tuple[int, ...]]:
    """Component key → shape, in the model's state-dict order: from a bundled table when one fits, else a model."""
    table = bundled_shapes(name, config)
    return dict(table) if table is not None else model_shapes(name, config)


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples → lists, as a config read from JSON has them


def _key(config: dict, defaults: dict) -> str:
    """The config's fields that shape the model: not private, not IGNORED, not left at the class's default."""
    fields = {k: _plain(v) for k, v in config.items() if not k.startswith("_") and k not in IGNORED}
    return json.dumps({k: v for k, v in fields.items() if k not in defaults or defaults[k] != v}, sort_keys=True)


def class_defaults(name: str) -> dict:
    """The defaults of the component class's config (what a config that leaves a field out gets)."""
    if name in ("unet", "vae"):
        import inspect

        from diffusers import AutoencoderKL, UNet2DConditionModel

        cls = UNet2DConditionModel if name == "unet" else AutoencoderKL
        parameters = inspect.signature(cls.__init__).parameters.values()
        return {p.name: _plain(p.default) for p in parameters if p.default is not inspect.Parameter.empty}
    from transformers import CLIPTextConfig

    return _plain({k: v for k, v in CLIPTextConfig().to_dict().items() if not k.startswith("_")})


def installed_versions() -> dict[str, str]:
    return {name: metadata.version(name) for name in LIBRARIES}


@cache
def _tables() -> list[tuple[str, dict, str, dict[str, tuple[int, ...]]]]:
    """(component, its class's defaults, config key, shapes) of the bundled tables made with the installed
    libraries."""
    versions = installed_versions()
    found = []
    for file in sorted((resources.files("dreambooth") / "assets" / "shapes").iterdir(), key=lambda f: f.name):
        if not file.name.endswith(".json"):
            continue
        table = json.loads(file.read_text())
        if table["made_with"] != versions:
            continue
        for name, entry in table["components"].items():
            shapes = {k: tuple(v) for k, v in entry["shapes"].items()}
            found.append((name, entry["defaults"], _key(entry["config"], entry["defaults"]), shapes))
    return found


def bundled_shapes(name: str, config: dict) -> dict[str, tuple[int, ...]] | None:
    for component, defaults, key, shapes in _tables():
        if component == name and _key(config, defaults) == key:
            return shapes
    return None


def make_table(model_type: str) -> dict:
    components = {}
    for name in FAMILIES[family_of(model_type)].components:
        config = bundled_config(model_type, name)
        shapes = {k: list(v) for k, v in model_shapes(name, config).items()}
        components[name] = {"config": config, "defaults": class_defaults(name), "shapes": shapes}
    return {"made_with": installed_versions(), "components": components}


def write_tables(folder: Path) -> None:
    for model_type in TABLES:
        text = json.dumps(make_table(model_type), separators=(",", ":"))
        (folder / f"{model_type}.json").write_text(text + "\n")


if __name__ == "__main__":
    write_tables(Path(__file__).resolve().parents[1] / "assets" / "shapes")
