"""Block swapping (`--blocks-to-swap N`): the frozen weights of the denoiser's last N blocks live in host memory
(pinned, so copies run asynchronously) and come to the GPU just before their block computes, forward and backward.

kohya's sd-scripts and musubi-tuner edit the model's forward to swap blocks; here nothing of the model changes. Each
swapped layer is a storage.StoredLinear / StoredConv2d, whose weight is fetched per use by its autograd function (in
forward, and again in backward for the input's gradient), and this class answers the fetch:

- a block's weights are copied to the device once for all its layers (the first fetch, or a forward pre-hook);
- while a block computes, the next one in the current direction (forward: the next block, backward or a gradient
  checkpoint's recomputation: the previous one) is copied on a side CUDA stream, so the copy overlaps compute;
- every other block's copies are dropped: at most two swapped blocks take device memory at any time.

Only frozen weights move (a LoRA's layers stay on the device with their gradients and optimizer state): the copy on
the host never changes, so dropping a device copy costs nothing, and what is computed is exactly what an unswapped
model computes. Gradient checkpointing works unchanged: a recomputed block asks for its weights like any other.
"""

import torch
from torch import nn

from dreambooth.storage import stored_layers


def in_backward() -> bool:
    """Whether autograd is running a backward pass on this thread (a checkpoint's recomputation included)."""
    return torch._C._current_graph_task_id() != -1


class BlockSwap:
    def __init__(self, blocks: list[nn.Module], count: int, device: torch.device) -> None:
        self.blocks = blocks
        self.count = count
        self.first = len(blocks) - count  # the last `count` blocks are swapped (kohya swaps from the end too)
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.layers: dict[int, list[nn.Module]] = {}
        self.block_of: dict[int, int] = {}  # id(layer) → its block
        self.block_bytes: dict[int, int] = {}
        for i in range(self.first, len(blocks)):
            layers = stored_layers(blocks[i])
            self.layers[i] = layers
            self.block_bytes[i] = 0
            for layer in layers:
                layer.stored = self._to_host(layer.stored)
                layer.swap = self
                self.block_of[id(layer)] = i
                self.block_bytes[i] += layer.stored.numel() * layer.stored.element_size()
        self.resident: dict[int, dict[int, torch.Tensor]] = {}  # block → id(layer) → its device copy
        self.events: dict[int, torch.cuda.Event] = {}  # copies still in flight on the side stream
        self.last = -1
        self.direction = 1
        self.loads = 0  # block copies to the device, in all
        self.bytes_moved = 0
        self.handles = [block.register_forward_pre_hook(self._hook(i)) for i, block in enumerate(blocks)]

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        host = tensor.detach().to("cpu")
        return host.pin_memory() if self.stream is not None else host

    def _hook(self, i: int):
        def pre_forward(module, args):
            self.request(i)

        return pre_forward

    # ─────────────────────────── what a layer asks for ───────────────────────────

    def fetch(self, layer: nn.Module, device: torch.device, backward: bool = False) -> torch.Tensor:
        """The layer's weight on the compute device, its block brought over (and the next one prefetched)."""
        i = self.block_of[id(layer)]
        self.request(i, backward or in_backward())
        self._ready(i)
        return self.resident[i][id(layer)]

    def request(self, i: int, backward: bool | None = None) -> None:
        """Block `i` is about to compute: make it resident, prefetch the next one, drop the rest."""
        backward = in_backward() if backward is None else backward
        if backward:
            self.direction = -1
        elif i != self.last:
            self.direction = 1 if i > self.last else -1
        self.last = i
        if i >= self.first and i not in self.resident:
            self._load(i)
        after = i + self.direction
        keep = {i, after}
        for j in [j for j in self.resident if j not in keep]:
            self._drop(j)
        if self.first <= after < len(self.blocks) and after not in self.resident:
            self._load(after)

    # ─────────────────────────── copies ───────────────────────────

    def _load(self, i: int) -> None:
        layers = self.layers[i]
        if self.stream is None:  # no GPU: a copy all the same, so that what is counted is what a GPU run moves
            self.resident[i] = {id(layer): layer.stored.to(self.device, copy=True) for layer in layers}
        else:
            with torch.cuda.stream(self.stream):
                self.resident[i] = {id(layer): layer.stored.to(self.device, non_blocking=True) for layer in layers}
                event = torch.cuda.Event()
                event.record(self.stream)
            self.events[i] = event
        self.loads += 1
        self.bytes_moved += self.block_bytes[i]

    def _ready(self, i: int) -> None:
        """Before the compute stream reads block i's copies: wait for them, and tell the allocator who reads them
        (so that their memory is not reused, once dropped, before that work is done)."""
        event = self.events.pop(i, None)
        if event is None:
            return
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        for tensor in self.resident[i].values():
            tensor.record_stream(current)

    def _drop(self, i: int) -> None:
        self._ready(i)  # a prefetch never waited for: its copies were still written by the side stream
        del self.resident[i]

    # ─────────────────────────── reports ───────────────────────────

    def swapped_bytes(self) -> int:
        return sum(self.block_bytes.values())

    def describe(self) -> dict:
        return {
            "blocks_swapped": self.count,
            "blocks": len(self.blocks),
            "swapped_bytes": self.swapped_bytes(),
            "block_copies": self.loads,
            "bytes_moved": self.bytes_moved,
        }

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
