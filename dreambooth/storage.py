"""How the frozen base is stored (`--base-precision`) and where its weights live (`--blocks-to-swap`).

What trains never changes here: a LoRA's layers, or a full fine-tune's model, keep their own precision. The frozen
weights of the big layers (the denoiser's blocks, the frozen text encoders) may be stored

- in bf16 / fp16 (what `auto` picks from --mixed-precision, as before),
- in float8_e4m3fn, one byte per weight, upcast layer by layer to the compute precision (kohya's --fp8_base),
- in 8 or 4 bits through bitsandbytes (LLM.int8, NF4 with double quantisation: QLoRA, as diffusers' Flux recipe).

fp8 layers, and every layer of a swapped block, become `StoredLinear` / `StoredConv2d`: they hold their weight as
a plain tensor (not a parameter: accelerate, DDP and optimizers have nothing to do with it) and compute through
`_FrozenLinear` / `_FrozenConv`, which fetch the weight in the compute precision (and on the compute device) when
forward needs it and again when backward needs it. Nothing keeps the upcast copy in between, so an fp8 base costs
one byte per weight plus one layer's copy at a time, with or without gradient checkpointing. The same fetch is what
block swapping hooks into (blockswap.py): a swapped layer's weight lives in host memory and comes over per use.

They are subclasses of nn.Linear / nn.Conv2d so that peft wraps them with LoRA like any other layer; their
`compute_dtype` tells peft which precision the LoRA layers start in (what a bf16 base would have given).
"""

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

PRECISIONS = ("auto", "bf16", "fp16", "fp8", "int8", "nf4")
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
FP8 = torch.float8_e4m3fn
BITSANDBYTES = ("int8", "nf4")
# bytes per stored weight, for estimates (NF4: 4 bits + a 1-byte absmax per 64 weights with double quantisation;
# int8: + a 4-byte scale per row, counted separately)
BYTES_PER_WEIGHT = {"fp8": 1.0, "int8": 1.0, "nf4": 0.5 + 1 / 64}
NF4_BLOCK = 64  # weights per NF4 block (one absmax each)


def compute_dtype_of(x: torch.Tensor) -> torch.dtype:
    """The precision a layer computes in for input `x`: autocast's, when it is on, else the input's."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class _FrozenLinear(torch.autograd.Function):
    """y = x Wᵀ + b with W fetched on use, in forward and again in backward: nothing but the layer is saved."""

    @staticmethod
    def forward(ctx, x, layer, bias):
        dtype = compute_dtype_of(x)
        ctx.layer, ctx.dtype, ctx.x_dtype = layer, dtype, x.dtype
        weight = layer.fetch(dtype, x.device)
        return F.linear(x.to(dtype), weight, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = ctx.layer.fetch(ctx.dtype, grad.device, backward=True)
            grad_x = grad.to(ctx.dtype).matmul(weight).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, grad_bias


class _FrozenConv(torch.autograd.Function):
    """A 2-D convolution with its weight fetched on use (forward, and backward for the input's gradient)."""

    @staticmethod
    def forward(ctx, x, layer, bias):
        dtype = compute_dtype_of(x)
        ctx.layer, ctx.dtype, ctx.x_dtype, ctx.x_shape = layer, dtype, x.dtype, x.shape
        weight = layer.fetch(dtype, x.device)
        return layer.convolve(x.to(dtype), weight, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        layer = ctx.layer
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[2]):
            return None, None, None
        weight = layer.fetch(ctx.dtype, grad.device, backward=True)
        grad = grad.to(ctx.dtype)
        # autograd's own convolution backward (so the gradients are bit for bit a plain Conv2d's); the input is only
        # read for the weight's gradient, which is never asked for: an expanded scalar stands in for it
        stand_in = grad.new_zeros(()).expand(ctx.x_shape)
        grad_x, _, grad_bias = torch.ops.aten.convolution_backward(
            grad, stand_in, weight, [weight.shape[0]], layer.stride, layer.padding, layer.dilation, False, [0, 0],
            layer.groups, [ctx.needs_input_grad[0], False, ctx.needs_input_grad[2]],
        )  # fmt: skip
        return (None if grad_x is None else grad_x.to(ctx.x_dtype)), None, grad_bias


class _Stored:
    """What StoredLinear and StoredConv2d share: the stored weight, where it lives, and the fetch."""

    stored: torch.Tensor
    compute_dtype: torch.dtype
    swap = None  # a blockswap.BlockSwap when this layer's block is swapped: the weight lives in host memory

    @property
    def weight(self) -> torch.Tensor:
        """The stored weight (its dtype and shape are what peft and the reports read)."""
        return self.stored

    def fetch(self, dtype: torch.dtype, device: torch.device, backward: bool = False) -> torch.Tensor:
        weight = self.swap.fetch(self, device, backward) if self.swap is not None else self.stored
        return weight.to(dtype)

    def _apply(self, fn, recurse=True):
        # .to(device) moves the stored weight with the module, unless its block is swapped (it stays on the host);
        # a dtype cast never changes how it is stored
        super()._apply(fn, recurse)
        if self.swap is None:
            moved = fn(self.stored)
            self.stored = moved if moved.dtype == self.stored.dtype else moved.to(self.stored.dtype)
        return self


class StoredLinear(_Stored, nn.Linear):
    def __init__(self, linear: nn.Linear, dtype: torch.dtype, compute_dtype: torch.dtype) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.stored = linear.weight.detach().to(dtype)
        self.bias = linear.bias
        self.compute_dtype = compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FrozenLinear.apply(x, self, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, stored={self.stored.dtype}"


class StoredConv2d(_Stored, nn.Conv2d):
    def __new__(cls, *args, **kwargs):
        # peft makes a LoRA's convolutions with its base layer's class and nn.Conv2d's arguments: those get a plain
        # nn.Conv2d (a LoRA's own layers train, nothing of them is stored)
        if args and isinstance(args[0], nn.Conv2d):
            return super().__new__(cls)
        return nn.Conv2d(*args, **kwargs)

    def __init__(self, conv: nn.Conv2d, dtype: torch.dtype, compute_dtype: torch.dtype) -> None:
        nn.Module.__init__(self)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                     "padding_mode", "transposed", "output_padding", "_reversed_padding_repeated_twice"):  # fmt: skip
            setattr(self, name, getattr(conv, name))
        self.stored = conv.weight.detach().to(dtype)
        self.bias = conv.bias
        self.compute_dtype = compute_dtype

    def convolve(self, x, weight, bias):
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FrozenConv.apply(x, self, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stored={self.stored.dtype}"


def to_bitsandbytes(linear: nn.Linear, precision: str, compute_dtype: torch.dtype) -> nn.Module:
    """The layer quantised by bitsandbytes where it is (CPU or GPU): LLM.int8 (outlier threshold 6, diffusers'
    default) or NF4 with double quantisation (QLoRA's)."""
    import bitsandbytes as bnb

    weight, device = linear.weight.detach(), linear.weight.device
    has_bias = linear.bias is not None
    if precision == "nf4":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=compute_dtype,
                                  quant_type="nf4", compress_statistics=True, device="meta")  # fmt: skip
        layer.weight = bnb.nn.Params4bit(weight.to(compute_dtype), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)  # fmt: skip
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False,
                                    threshold=6.0, device="meta")  # fmt: skip
        layer.weight = bnb.nn.Int8Params(weight.to(compute_dtype), requires_grad=False, has_fp16_weights=False)
    layer.bias = linear.bias
    return layer.to(device)  # quantises here (bitsandbytes quantises on the first move)


def store_layer(module: nn.Module, precision: str, compute_dtype: torch.dtype) -> nn.Module:
    """One frozen Linear or Conv2d as `precision` stores it (fp8, or the compute dtype for a swapped layer)."""
    if is_stored(module):
        return module
    if precision in BITSANDBYTES:
        return to_bitsandbytes(module, precision, compute_dtype)
    dtype = FP8 if precision == "fp8" else compute_dtype
    if isinstance(module, nn.Conv2d):
        return StoredConv2d(module, dtype, compute_dtype)
    return StoredLinear(module, dtype, compute_dtype)


@dataclass(frozen=True)
class BaseStorage:
    """What --base-precision stores, and in which of a model's parts (by role: the frozen ones)."""

    precision: str = "auto"
    frozen: frozenset[str] = frozenset()

    @property
    def stores(self) -> bool:
        """Whether layers change form (fp8, int8, NF4); bf16 and fp16 are a load dtype like any other."""
        return self.precision in ("fp8", *BITSANDBYTES)

    def layers(self, role: str, model: nn.Module, roots: Iterable[nn.Module]) -> list[str]:
        """The names of the layers of part `role` to store."""
        if not self.stores or role not in self.frozen:
            return []
        return storable(model, roots, self.precision)


def storable(model: nn.Module, roots: Iterable[nn.Module], precision: str) -> list[str]:
    """The names (in `model`) of the layers under `roots` that `precision` stores: Linear layers, and with fp8 (or
    a swap) 2-D convolutions too (bitsandbytes quantises Linear layers only). Layers the model keeps in fp32 (T5's
    `wo`, which overflows in half precision), a LoRA's own layers and layers stored already are left alone, and so
    is a layer NF4 cannot pack: its input width must be a whole number of NF4's 64-weight blocks (every layer of the
    released SD, SDXL and Flux models is; bitsandbytes' CPU kernels refuse the others)."""
    kinds = (nn.Linear,) if precision in BITSANDBYTES else (nn.Linear, nn.Conv2d)
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    names = {id(m): n for n, m in model.named_modules()}
    found = []
    for root in roots:
        for module in root.modules():
            name = names.get(id(module))
            if (
                name
                and isinstance(module, kinds)
                and not is_stored(module)
                and not any(part in keep for part in name.split("."))
                and not _is_wrapper_part(name)
                and not (precision == "nf4" and module.in_features % NF4_BLOCK)
                and getattr(module, "padding_mode", "zeros") == "zeros"  # what StoredConv2d computes
            ):
                found.append(name)
    return found


def is_stored(module: nn.Module) -> bool:
    return isinstance(module, _Stored) or type(module).__module__.startswith("bitsandbytes")


def _is_wrapper_part(name: str) -> bool:
    """A LoRA layer of peft's (its own A and B are trained, never stored)."""
    return any(part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B") for part in name.split("."))


def replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def store(model: nn.Module, names: list[str], precision: str, compute_dtype: torch.dtype) -> int:
    """Store the named layers one at a time (the old weight is freed before the next is converted, so memory never
    holds two copies of the model); returns the bytes the stored weights take."""
    total = 0
    for name in names:
        new = store_layer(model.get_submodule(name), precision, compute_dtype)
        replace(model, name, new)
        total += stored_bytes(new)
    return total


def stored_bytes(module: nn.Module) -> int:
    """The bytes a layer's frozen weight takes as stored (bitsandbytes' packed data and its statistics)."""
    if isinstance(module, _Stored):
        return module.stored.numel() * module.stored.element_size()
    weight = module.weight
    extra = 0
    state = getattr(weight, "quant_state", None)
    if state is not None:
        extra = state.absmax.numel() * state.absmax.element_size()
    scales = getattr(weight, "SCB", None)
    if scales is not None:
        extra = scales.numel() * scales.element_size()
    return weight.numel() * weight.element_size() + extra


def stored_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _Stored)]


# ───────────────────────────── loading into stored layers ─────────────────────────────


def return_freed_memory() -> None:
    """Have glibc give each large allocation its own mapping, unmapped when freed. By default it raises its mmap
    threshold every time a large block is freed, after which blocks of that size come from the heap and stay in the
    process once freed: loading a base tensor by tensor then peaks at ~1.5x its stored size (full-size SDXL, fp8:
    1.53x; 1.04x with the threshold fixed, bench/results/load-memory-sdxl-cpu-2core.md). Elsewhere: nothing."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD (fixed: no dynamic raise)
    except OSError:
        pass


def assign_streamed(model: nn.Module, state: dict, dtype: torch.dtype, stored: list[str], precision: str) -> None:
    """Put `state`'s tensors into `model` (built on the meta device) one at a time, each read (a file's tensor is
    read now) and cast to `dtype`; each layer named in `stored` is stored the moment all its weights are in. Memory
    holds the stored model and one layer in `dtype`, never two copies of the model."""
    waiting = {name: len(model.get_submodule(name).state_dict()) for name in stored}
    for key, t in state.items():
        t = t.to_torch() if hasattr(t, "to_torch") else t  # a checkpoint.tensorfile.StoredTensor: read it now
        module_name, _, leaf = key.rpartition(".")
        _assign(model.get_submodule(module_name), leaf, t.to(dtype) if t.is_floating_point() else t)
        if module_name in waiting:
            waiting[module_name] -= 1
            if not waiting[module_name]:  # all of this layer's weights are in: store it now
                replace(model, module_name, store_layer(model.get_submodule(module_name), precision, dtype))


def _assign(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """A parameter or buffer of `module` replaced by `tensor` (what load_state_dict(assign=True) does per key)."""
    if name in module._parameters:
        old = module._parameters[name]
        module._parameters[name] = nn.Parameter(tensor, requires_grad=old.requires_grad)
    else:
        module._buffers[name] = tensor
