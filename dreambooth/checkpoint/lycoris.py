"""One trained module of a LoRA, DoRA, LoHa or LoKr: peft's tensors as the file the WebUI and ComfyUI load holds
them (kohya's and LyCORIS' names), and the weight the module makes of its base weight (what a merge writes).

peft's tensors and the file's are the same matrices, with no transposes:
- LoRA: `lora_A.weight` [r, in(, k, k)] → `lora_down.weight`, `lora_B.weight` [out, r(, 1, 1)] → `lora_up.weight`;
  ΔW = up @ down · alpha / r.
- DoRA adds `lora_magnitude_vector` m (one per output row): W' = m · (W + ΔW) / ‖W + ΔW‖ (the norm per output
  row). ComfyUI reads `dora_scale` of shape [out, 1(, 1, 1)] as "on the output axis" and today divides by the
  base's norm ‖W‖ instead (comfy/weight_adapter/base.py `weight_decompose`), so the file holds
  m · ‖W‖ / ‖W + ΔW‖, from the norms the checkpoint records: ComfyUI then makes exactly peft's W'.
- LoHa: `hada_w1_a` [out, r], `hada_w1_b` [r, in·k·k], `hada_w2_a`, `hada_w2_b` alike; ΔW = (w1a @ w1b) ⊙
  (w2a @ w2b) · alpha / r.
- LoKr: `lokr_w1` (or `lokr_w1_a` @ `lokr_w1_b`) and `lokr_w2` (or `lokr_w2_a` @ `lokr_w2_b`); ΔW = w1 ⊗ w2 ·
  alpha / r in peft. Loaders apply alpha / r only when a factor is decomposed (r is read off `_b`), and 1 when both
  are whole: the file then carries the scale inside `lokr_w2`.
Every module carries `.alpha` (ComfyUI applies alpha / r only where that key exists).
"""

import torch

KINDS = ("lora", "dora", "loha", "lokr")
# peft's state-dict suffix → the file's, per kind (DoRA's magnitude is rewritten, see above)
SUFFIXES = {
    "lora": {".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight"},
    "loha": {s: s for s in (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b")},
    "lokr": {s: s for s in (".lokr_w1", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b")},
}
SUFFIXES["dora"] = {**SUFFIXES["lora"], ".lora_magnitude_vector": ".dora_scale"}
# the one suffix every module of a kind has: its module path is the key without it
FIRST = {"lora": ".lora_A.weight", "dora": ".lora_A.weight", "loha": ".hada_w1_a", "lokr": ".lokr_w1"}
# the checkpoint's record of a DoRA module's row norms (lora/<component>.norms.safetensors)
BASE_NORM, WEIGHT_NORM = ".base_norm", ".weight_norm"


def kind_of(info: dict) -> str:
    """lora.json's adapter: lora, dora, loha or lokr (a checkpoint without the field is a LoRA)."""
    adapter = info.get("adapter", "lora")
    return "dora" if adapter == "lora" and info.get("dora") else adapter


def module_paths(state: dict[str, torch.Tensor], kind: str) -> list[str]:
    """The module paths of one component's peft state dict (each module's first factor names it)."""
    firsts = {"lokr": (".lokr_w1", ".lokr_w1_a")}.get(kind, (FIRST[kind],))
    return sorted({key[: -len(s)] for key in state for s in firsts if key.endswith(s)})


def module_scales(info: dict, component: str, state: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each trained module of one component → the scale its product is applied with, alpha / r (lora.json records
    both per module: a rank or alpha pattern makes them differ)."""
    record = info["components"][component]
    return {m: float(record["alphas"][m]) / record["ranks"][m] for m in module_paths(state, kind_of(info))}


def file_tensors(kind: str, state: dict, module: str, rank: int, alpha: float, norms: dict | None = None) -> dict:
    """One module's tensors in the file (suffix → tensor), `.alpha` included."""
    out = {}
    for peft_suffix, file_suffix in SUFFIXES[kind].items():
        if module + peft_suffix in state:
            out[file_suffix] = state[module + peft_suffix]
    dtype = next(iter(out.values())).dtype
    if kind == "dora":
        down = out[".lora_down.weight"]
        magnitude = out[".dora_scale"].float().reshape(-1)
        if norms is None or module + BASE_NORM not in norms:
            raise ValueError(f"{module}: a DoRA module needs the norms its checkpoint records")
        ratio = norms[module + BASE_NORM].float() / norms[module + WEIGHT_NORM].float()
        out[".dora_scale"] = (magnitude * ratio).reshape(-1, *[1] * (down.dim() - 1)).to(dtype)
    if kind == "lokr" and ".lokr_w1" in out and ".lokr_w2" in out:
        out[".lokr_w2"] = (out[".lokr_w2"].float() * (alpha / rank)).to(dtype)  # loaders' scale is 1 here
    out[".alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return out


def delta(kind: str, state: dict, module: str, scale: float, shape: torch.Size) -> torch.Tensor:
    """ΔW of one module (fp32) in peft's arithmetic; DoRA's is its LoRA part (see `merged`)."""
    t = {s: state[module + s].float() for s in SUFFIXES[kind] if module + s in state}
    if kind in ("lora", "dora"):
        made = t[".lora_B.weight"].flatten(1) @ t[".lora_A.weight"].flatten(1)
    elif kind == "loha":
        made = (t[".hada_w1_a"] @ t[".hada_w1_b"]) * (t[".hada_w2_a"] @ t[".hada_w2_b"])
    else:
        w1 = t[".lokr_w1"] if ".lokr_w1" in t else t[".lokr_w1_a"] @ t[".lokr_w1_b"]
        w2 = t[".lokr_w2"] if ".lokr_w2" in t else t[".lokr_w2_a"] @ t[".lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        made = torch.kron(w1, w2)
    return made.reshape(shape) * scale


def merged(kind: str, state: dict, module: str, scale: float, weight: torch.Tensor) -> torch.Tensor:
    """The module's weight with the adapter merged (fp32), as peft's merge_and_unload makes it."""
    base = weight.float()
    combined = base + delta(kind, state, module, scale, base.shape)
    if kind != "dora":
        return combined
    magnitude = state[module + ".lora_magnitude_vector"].float().reshape(-1, *[1] * (base.dim() - 1))
    return combined * (magnitude / row_norms(combined).reshape(magnitude.shape))


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    """‖W‖ per output row (a convolution's row is its in·k·k weights), as DoRA measures a weight."""
    return weight.float().reshape(weight.shape[0], -1).norm(dim=1)
