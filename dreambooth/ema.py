"""An exponential moving average of the trained weights (`--ema-decay`), for LoRA and full runs.

After every optimizer step that was not skipped, shadow ← decay · shadow + (1 − decay) · weight (before
`--ema-start-step` the shadow just follows the weights). The shadow is fp32, on the GPU or in host memory
(`--ema-device cpu`: one copy over per step, none of the GPU's memory). A checkpoint's weights — what `export`,
`sample` and samples during training read — are the EMA's when `--export-ema` (the default with EMA); the raw
weights and the shadow go into the training state, so that a resumed run continues both exactly.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def trained_parameters(trained: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    """The trained weights by a stable name: "<model>.<parameter>" (the same in every process and every run)."""
    return {
        f"{model_name}.{name}": p
        for model_name, model in trained.items()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


class EMA:
    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float, device: torch.device,
                 start_step: int = 0) -> None:  # fmt: skip
        self.params = params
        self.decay = decay
        self.start_step = start_step
        self.device = torch.device(device)
        self.restart()

    def restart(self) -> None:
        """The average starts from the weights as they are now."""
        self.shadow = {name: p.detach().to(self.device, torch.float32, copy=True) for name, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step `step` (1-based)."""
        weight = 1.0 if step <= self.start_step else 1.0 - self.decay
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach().to(self.device, torch.float32), weight)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The trained weights replaced by the shadow (in their own dtype and place) for what runs inside: saving,
        samples; put back afterwards."""
        raw = raw_weights(self.params)  # in host memory: a GPU holds no second copy of a full model
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.shadow[name].to(p.device, p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(raw[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().cpu().clone() for name, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = self.shadow.keys() - state.keys()
        if missing:
            raise KeyError(f"the checkpoint's EMA lacks {sorted(missing)[0]}")
        for name in self.shadow:
            self.shadow[name] = state[name].to(self.device, torch.float32)


def raw_weights(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """The trained weights as they are (a checkpoint's files hold the EMA's): what a resumed run continues from."""
    return {name: p.detach().cpu().clone() for name, p in params.items()}


@torch.no_grad()
def load_raw_weights(params: dict[str, torch.nn.Parameter], state: dict[str, torch.Tensor]) -> None:
    for name, p in params.items():
        p.copy_(state[name].to(p.device, p.dtype))
