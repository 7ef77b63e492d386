"""Tensors of a .safetensors file as byte ranges, and a writer that copies those ranges file to file.

Converting a single file into a diffusers folder renames tensors; it rarely changes their bytes (a reshape, rows
of a fused q/k/v, now and then a transpose). So `dreambooth convert` and `inspect` do not need torch at all: the
header says where each tensor is, and the kernel copies the bytes (`os.copy_file_range`, page cache to page cache,
no trip through Python). Importing torch alone takes longer than copying a 2 GB model (bench/convert.py process).

`write_safetensors` lays files out as safetensors itself does (the same header, order and padding, so a file
written here has the same bytes as `safetensors.torch.save_file` of the same tensors, which a test checks), and
also takes torch tensors, which it reaches only when the caller has them (a pickled .ckpt, a replacement VAE), and
`LazyTensor`s, computed one at a time as they are written (a merged or re-fused model bigger than the memory).
"""

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

# safetensors' dtype names, in the order of its Dtype enum: files list their tensors by dtype, this order reversed
DTYPE_ORDER = (
    "BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64",
)  # fmt: skip
# → bytes per element; the ones torch can hold (F8_E8M0, F4, F6 … cannot be loaded): `load.check_safetensors`
# refuses a file with any other
ELEMENT_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8,
}  # fmt: skip
# safetensors' name → torch's (`torch.float16`); the floating ones are what `is_floating_point` means
TORCH_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn",
    "I16": "int16", "U16": "uint16", "F16": "float16", "BF16": "bfloat16", "I32": "int32", "U32": "uint32",
    "F32": "float32", "F64": "float64", "I64": "int64", "U64": "uint64",
}  # fmt: skip
FLOATING = {"F8_E5M2", "F8_E4M3", "F16", "BF16", "F32", "F64"}


class TensorFacts:
    """What a tensor is without its values: its shape and safetensors dtype, its size."""

    shape: tuple[int, ...]
    dtype_name: str  # safetensors' name: F16, BF16, F32, …

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return ELEMENT_BYTES[self.dtype_name]

    def is_floating_point(self) -> bool:
        return self.dtype_name in FLOATING


@dataclass(frozen=True)
class StoredTensor(TensorFacts):
    """One tensor of a .safetensors file, not read: where its bytes are, and how to view them.

    It answers what conversion asks of a tensor (`shape`, `numel()`, `element_size()`, `is_floating_point()`,
    a reshape, rows along the first dimension, the transpose of a matrix) without reading a byte."""

    path: Path
    name: str  # its key in the file
    dtype_name: str  # safetensors' name: F16, BF16, F32, …
    shape: tuple[int, ...]
    begin: int  # absolute offsets in the file
    end: int
    transposed: bool = False  # the bytes are this matrix's transpose (written out by `write_safetensors`)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self) -> str:
        """torch's name for the dtype (`float16`), for summaries; the file's own name is `dtype_name`."""
        return TORCH_NAMES[self.dtype_name]

    def reshape(self, *shape: int) -> "StoredTensor":
        if math.prod(shape) != self.numel() or self.transposed:
            raise ValueError(f"cannot view {self.name} {self.shape} as {shape}")
        return replace(self, shape=tuple(shape))

    def __getitem__(self, rows: slice) -> "StoredTensor":
        """Rows `a:b` of the first dimension: a contiguous part of the bytes (how a fused q/k/v is split)."""
        start, stop, step = rows.indices(self.shape[0])
        if step != 1 or self.transposed:
            raise ValueError(f"cannot take rows {rows} of {self.name}")
        row = math.prod(self.shape[1:]) * self.element_size()
        begin = self.begin + start * row
        return replace(
            self, shape=(max(stop - start, 0), *self.shape[1:]), begin=begin, end=begin + row * (stop - start)
        )

    @property
    def T(self) -> "StoredTensor":  # torch's name for the transpose
        if self.ndim != 2:
            raise ValueError(f"{self.name} is not a matrix")
        return replace(self, shape=self.shape[::-1], transposed=not self.transposed)

    def read(self) -> bytes:
        """The bytes, laid out as `shape` says (a transposed view is transposed here: numpy, only then)."""
        with self.path.open("rb") as f:
            f.seek(self.begin)
            data = f.read(self.end - self.begin)
        if not self.transposed:
            return data
        import numpy as np

        width = np.dtype(f"u{self.element_size()}")  # a transpose moves elements, whatever they mean
        return np.frombuffer(data, dtype=width).reshape(self.shape[::-1]).T.tobytes()

    def to_torch(self) -> Any:
        """This tensor as a torch tensor (when torch is needed anyway, e.g. to run the UNet)."""
        import torch

        data = bytearray(self.read())  # writable: torch.frombuffer warns on read-only memory
        dtype = getattr(torch, self.dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(self.shape) if data else torch.empty(self.shape, dtype=dtype)


@dataclass(frozen=True)
class LazyTensor(TensorFacts):
    """A tensor made only when it is written: its shape and dtype known up front (the header needs them), its
    values computed by `make` (torch) one tensor at a time, so a file of many computed tensors (a model with a LoRA
    merged in, a fused layout put back together) never holds more than one of them in memory."""

    shape: tuple[int, ...]
    dtype_name: str  # safetensors' name
    make: Any  # () -> torch tensor of that shape and dtype


def safetensors_dtype(torch_dtype: Any) -> str:
    """safetensors' name of a torch dtype (torch.bfloat16 → BF16)."""
    name = str(torch_dtype).removeprefix("torch.")
    for safetensors_name, torch_name in TORCH_NAMES.items():
        if torch_name == name:
            return safetensors_name
    raise ValueError(f"no safetensors dtype for {torch_dtype}")


def read_tensors(path: Path, header: dict) -> dict[str, StoredTensor]:
    """The tensors of a .safetensors file whose header (already checked: `load.check_safetensors`) is `header`."""
    path = Path(path)
    with path.open("rb") as f:
        data_start = 8 + int.from_bytes(f.read(8), "little")
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        tensors[name] = StoredTensor(
            path, name, entry["dtype"], tuple(entry["shape"]), data_start + begin, data_start + end
        )
    return tensors


def _torch_dtype_name(tensor: Any) -> str:
    return safetensors_dtype(tensor.dtype)


def _entry(tensor: Any) -> tuple[str, tuple[int, ...], int]:
    if isinstance(tensor, StoredTensor):
        return tensor.dtype_name, tensor.shape, tensor.end - tensor.begin
    if isinstance(tensor, LazyTensor):
        return tensor.dtype_name, tensor.shape, tensor.numel() * tensor.element_size()
    return _torch_dtype_name(tensor), tuple(tensor.shape), tensor.numel() * tensor.element_size()


def write_safetensors(path: Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (StoredTensor or torch tensors) as one .safetensors file, laid out as safetensors does:
    tensors ordered by dtype (widest first) then name, the header JSON padded with spaces to 8 bytes."""
    entries = {name: _entry(t) for name, t in tensors.items()}
    order = sorted(entries, key=lambda n: (-DTYPE_ORDER.index(entries[n][0]), n))
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for name in order:
        dtype, shape, nbytes = entries[name]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    sources: dict[Path, int] = {}
    try:
        with Path(path).open("wb") as out:
            out.write(len(raw).to_bytes(8, "little") + raw)
            for name in order:
                _write_tensor(out, tensors[name], sources)
    finally:
        for fd in sources.values():
            os.close(fd)


def _write_tensor(out, tensor: Any, sources: dict[Path, int]) -> None:
    if isinstance(tensor, LazyTensor):
        made = tensor.make()
        if tuple(made.shape) != tuple(tensor.shape) or _torch_dtype_name(made) != tensor.dtype_name:
            raise ValueError(
                f"a LazyTensor made {tuple(made.shape)} {made.dtype}, not {tensor.shape} {tensor.dtype_name}"
            )
        out.write(_torch_bytes(made))
        return
    if not isinstance(tensor, StoredTensor):
        out.write(_torch_bytes(tensor))
        return
    if tensor.transposed:
        out.write(tensor.read())
        return
    if tensor.path not in sources:
        sources[tensor.path] = os.open(tensor.path, os.O_RDONLY)
    out.flush()
    _copy_range(sources[tensor.path], out.fileno(), tensor.begin, tensor.end - tensor.begin)
    out.seek(0, os.SEEK_END)  # the kernel moved the file's end, not this file object's position


def _copy_range(src: int, dst: int, begin: int, count: int) -> None:
    """`count` bytes of `src` from `begin`, appended to `dst`: in the kernel where it can, else read and write."""
    done = 0
    while done < count:
        try:
            n = os.copy_file_range(src, dst, count - done, begin + done)
        except OSError:  # another file system, an old kernel: the plain way
            n = 0
        if n == 0:
            break
        done += n
    while done < count:
        block = os.pread(src, min(count - done, 64 << 20), begin + done)
        if not block:
            raise OSError(f"the source file ended {count - done} bytes early")
        view = memoryview(block)
        while view:
            view = view[os.write(dst, view) :]
        done += len(block)


def _torch_bytes(tensor: Any) -> Any:
    """A torch tensor's bytes, as a buffer over its memory (no copy unless it was not contiguous)."""
    import torch

    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy() if flat.numel() else b""
