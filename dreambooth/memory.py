"""What one training step's tensors take, measured without memory: the denoiser runs forward and backward on fake
tensors (shapes and dtypes only, no data, no GPU), and every tensor it makes is counted while it lives.

This is how `dreambooth plan` knows activations: they depend on the architecture, the batch, the resolution, the
attention kernel and gradient checkpointing in ways no formula keeps up with, and running the real graph on fake
tensors takes seconds even for a 12 B transformer. What it cannot see (the CUDA context, the allocator's rounding and
fragmentation, cuDNN/cuBLAS workspaces) plan.py adds and says so.
"""

import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the storages that operations create, from creation to release (weakref finalizers),
    and their peak. A storage first seen as an input (the weights, the batch) was there before: not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen = WeakIdKeyDictionary()

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                self._seen.setdefault(t.untyped_storage(), 0)
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage in self._seen:
                    continue
                nbytes = storage.nbytes()
                self._seen[storage] = nbytes
                self.live += nbytes
                weakref.finalize(storage, self._release, nbytes)
        self.peak = max(self.peak, self.live)
        return out


@dataclass(frozen=True)
class StepMemory:
    """Bytes: the peak of what a step made (activations, gradients and temporaries), and what was still alive after
    backward (the trained weights' gradients)."""

    peak: int
    gradients: int

    @property
    def activations(self) -> int:
        return max(0, self.peak - self.gradients)


def measure_step(step, autocast_dtype: torch.dtype | None) -> StepMemory:
    """Run `step()` (it must build its inputs, run forward and call backward) under fake tensors' counting."""
    counter = LiveBytes()
    with counter:
        if autocast_dtype is None:
            step()
        else:
            with torch.autocast("cpu", dtype=autocast_dtype):
                step()
    return StepMemory(counter.peak, counter.live)


def measure_inference(run) -> int:
    """The peak bytes `run()` makes without gradients (the VAE encoding a batch while latents are cached)."""
    counter = LiveBytes()
    with torch.no_grad(), counter:
        run()
    return counter.peak
