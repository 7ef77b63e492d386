"""Speed and memory levers of `dreambooth train`. All are off by default (the default run is the one the resume
and determinism tests pin down); `--low-vram` turns on the memory ones, and `bench/train.py` measures each.

- The optimizer step fused into backward (`--fused-backward`): each weight is updated, and its gradient freed, the
  moment backward has produced it, so the UNet's gradients (3.4 GB in fp32 for SD 1.5) never exist all at once.
  Whatever needs every gradient of a step before the first update cannot combine with it: gradient clipping (the
  global norm) and gradient accumulation (several backward passes per update); so can't several processes (each
  would update before the gradients are averaged).
- Regional `torch.compile` (`--torch-compile`): the UNet's repeated transformer and ResNet blocks are compiled one by
  one, so compiling costs a handful of distinct blocks rather than the whole UNet, and gradient checkpointing (which
  wraps the calls of those blocks) keeps working.
- channels_last (`--channels-last`): NHWC convolutions, the layout tensor cores read without transposing.
- AdamW's implementation (`--adam-impl`): one kernel per tensor (for-loop), one per operation over all tensors
  (foreach), or one for everything (fused). torch picks foreach on a GPU when left to itself (auto).
"""

from collections.abc import Callable

import torch


def adamw_kwargs(impl: str) -> dict:
    """torch.optim.AdamW's switches for --adam-impl; auto passes none, which keeps torch's own choice."""
    return {"auto": {}, "for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[impl]


class LossScale:
    """Dynamic fp16 loss scaling for the step inside backward, where torch's GradScaler cannot work (it unscales and
    checks all gradients together, after backward). Each gradient is unscaled and checked on its own as it arrives;
    one that overflowed is not applied, and the scale halves for the next step. Checking costs a host sync per
    weight, which only fp16 pays: bf16 and fp32 need no scaling.
    """

    def __init__(self, scale: float = 2.0**16, growth_interval: int = 2000) -> None:
        self.scale = scale
        self.growth_interval = growth_interval
        self.good_steps = 0
        self.found_inf = False

    def unscale_(self, grad: torch.Tensor) -> bool:
        """Unscale one gradient in place; False if it overflowed (then it must not be applied)."""
        grad.mul_(1.0 / self.scale)
        if bool(torch.isfinite(grad).all()):
            return True
        self.found_inf = True
        return False

    def update(self) -> bool:
        """After backward: adapt the scale; True if this step overflowed somewhere."""
        overflowed, self.found_inf = self.found_inf, False
        if overflowed:
            self.scale, self.good_steps = self.scale / 2, 0
        else:
            self.good_steps += 1
            if self.good_steps == self.growth_interval:
                self.scale, self.good_steps = self.scale * 2, 0
        return overflowed

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = state["scale"], state["good_steps"]


class FusedBackwardOptimizer(torch.optim.Optimizer):
    """One small optimizer per weight, stepped by a hook the moment backward has accumulated that weight's gradient;
    the gradient is dropped right after. `step()` and `zero_grad()` are then (almost) no-ops, so the training loop
    reads the same either way, and an lr scheduler drives it as usual: `param_groups` are the small optimizers' own.

    Its state_dict has the layout of one optimizer over the same weights in the same order (one param group), so a
    checkpoint written with it resumes without it, and the other way round.
    """

    def __init__(
        self,
        groups: list[dict],
        make_one: Callable[[list[dict]], torch.optim.Optimizer],
        loss_scale: LossScale | None = None,
    ) -> None:
        """`groups`: torch param groups ({"params": [...], "lr": ...}); each weight keeps its group's settings."""
        groups = [g if isinstance(g, dict) else {"params": [g]} for g in groups]  # or plain weights
        settings = [(p, {k: v for k, v in g.items() if k != "params"}) for g in groups for p in g["params"]]
        params = [p for p, _ in settings]
        self.inner = [make_one([{"params": [p], **extra}]) for p, extra in settings]
        self.loss_scale = loss_scale
        self.step_was_skipped = False
        super().__init__(params, {})
        # the inner optimizers' groups themselves: what a scheduler writes into them is what they use
        self.param_groups = [opt.param_groups[0] for opt in self.inner]
        self._index = {p: i for i, p in enumerate(params)}  # tensors hash by identity
        self._hooks = [p.register_post_accumulate_grad_hook(self._update) for p in params]

    def _update(self, param: torch.nn.Parameter) -> None:
        if self.loss_scale is None or self.loss_scale.unscale_(param.grad):
            self.inner[self._index[param]].step()
        param.grad = None  # freed now, not at the end of backward: the point of it all

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss if self.loss_scale is None else loss * self.loss_scale.scale

    @torch.no_grad()
    def step(self, closure=None) -> None:
        """The updates happened during backward; what is left is the loss scale's bookkeeping."""
        self.step_was_skipped = self.loss_scale.update() if self.loss_scale is not None else False

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.inner:  # nothing to do unless a backward ran without stepping (e.g. an exception)
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        states = [opt.state_dict() for opt in self.inner]
        settings = {k: v for k, v in states[0]["param_groups"][0].items() if k != "params"} if states else {}
        out = {
            "state": {i: s["state"][0] for i, s in enumerate(states) if 0 in s["state"]},
            "param_groups": [{**settings, "params": list(range(len(states)))}],
        }
        if self.loss_scale is not None:
            out["loss_scale"] = self.loss_scale.state_dict()
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict["param_groups"]
        ids = [i for g in groups for i in g["params"]]
        if len(ids) != len(self.inner):
            raise ValueError(f"optimizer state for {len(ids)} weights, and {len(self.inner)} train here")
        settings = {k: v for k, v in groups[0].items() if k != "params"}
        for opt, i in zip(self.inner, ids, strict=True):
            one = {"state": {0: state_dict["state"][i]} if i in state_dict["state"] else {}}
            opt.load_state_dict({**one, "param_groups": [{**settings, "params": [0]}]})
        # loading replaces each inner optimizer's group with a new dict: point ours (what schedulers set) at those
        self.param_groups = [opt.param_groups[0] for opt in self.inner]
        if self.loss_scale is not None and "loss_scale" in state_dict:
            self.loss_scale.load_state_dict(state_dict["loss_scale"])


def fit_scheduler_state(state: dict, num_groups: int) -> dict:
    """An lr scheduler's state saved with one param group, loaded for one group per weight (or back): the
    schedule is the same for all, so the per-group lists are repeated (or cut)."""
    out = dict(state)
    for key in ("base_lrs", "_last_lr", "lr_lambdas"):
        value = out.get(key)
        if isinstance(value, list) and value and len(value) != num_groups and all(v == value[0] for v in value):
            out[key] = [value[0]] * num_groups
    return out


def use_channels_last(unet: torch.nn.Module) -> None:
    """NHWC weights; inputs follow (the loop converts the noisy latents), activations follow the convolutions."""
    unet.to(memory_format=torch.channels_last)


def compile_blocks(blocks: list[torch.nn.Module]) -> None:
    """Compile the denoiser's repeated blocks in place (the family names them; state_dict keys stay as they are).
    Blocks of one kind and size share their compiled code."""
    for block in blocks:
        block.compile()


def enable_gradient_checkpointing(model, denoiser: bool) -> None:
    """Recompute activations in backward: far less memory for ~25 % more time."""
    if denoiser:  # a diffusers model (UNet or transformer): checkpoints its own blocks
        model.enable_gradient_checkpointing()
    else:
        # non-reentrant: with a frozen embedding (LoRA) the reentrant form would give the layers' LoRA no gradient
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
