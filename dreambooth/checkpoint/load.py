"""Read single-file checkpoints safely: `.safetensors`, or `.ckpt` through `torch.load(weights_only=True)` only.

A `.ckpt` is a pickle, and a pickle can run any code while it loads. We never unpickle anything but tensors,
containers and a short allow-list of inert stand-ins for the foreign names that real SD 1.x releases contain.

A `.safetensors` header is read and checked here before safetensors sees the file (`check_safetensors`): its
length, its JSON, every dtype, shape and byte range, against the file's real size. A header that lies (a range
past the end, two tensors on the same bytes, a shape of 2**40 elements) is one UserError naming the file and the
tensor, before anything is allocated for it.

`open_checkpoint` reads a .safetensors file's header only: its tensors are `tensorfile.StoredTensor` byte ranges,
and torch is not imported (what `dreambooth convert` and `inspect` need). `load_checkpoint` gives torch tensors.
"""

from __future__ import annotations

import itertools
import json
import math
import pickle
import pickletools
import re
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import safe_open

from dreambooth.checkpoint.tensorfile import ELEMENT_BYTES, StoredTensor, read_tensors
from dreambooth.errors import UserError

if TYPE_CHECKING:
    import torch

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class _Inert:
    """Stands in for a foreign class in a pickle: can be built and given state, does nothing, is never used."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass


def _inert_scalar(*args: object) -> None:
    """numpy scalars (training metrics in Lightning's callback state): not needed, so not rebuilt."""
    return None


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode`, which protocol-2 pickles use to carry bytes; only the byte-preserving codec."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin1")


# The released SD 1.x .ckpt files pickle Lightning's ModelCheckpoint class (a key of `callbacks`) and numpy
# scalars. These names, and only these, resolve to the inert stand-ins above. Lightning is never imported.
ALLOWED_FOREIGN_GLOBALS = [
    (_Inert, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    (_Inert, "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint"),
    (_inert_scalar, "numpy.core.multiarray.scalar"),
    (_inert_scalar, "numpy._core.multiarray.scalar"),
    (_Inert, "numpy.dtype"),
    (_latin1_encode, "_codecs.encode"),
]


@dataclass
class Checkpoint:
    """The tensors of a single-file checkpoint, with what else the file said about itself."""

    path: Path
    tensors: dict[str, torch.Tensor | StoredTensor]
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors header metadata
    file_format: str = "safetensors"  # or "pickle"
    other_entries: dict[str, Any] = field(default_factory=dict)  # e.g. global_step of a .ckpt


def sniff_format(path: Path) -> str:
    """Tell the container format from the first bytes, not the extension (files get renamed)."""
    with path.open("rb") as f:
        head = f.read(16)
    size = path.stat().st_size
    # safetensors first: its header length is little-endian, so its first byte is 0x80 (a pickle's first byte) for
    # one file in 256; a pickle's next 8 bytes are neither a length below the file's size nor followed by "{"
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 0 < header_len < size and head[8:9] == b"{":
            return "safetensors"
    if head[:4] == b"PK\x03\x04":
        return "pickle"  # torch's zip format (torch.save since 1.6)
    if head[:1] == b"\x80":
        return "pickle"  # torch's legacy format / raw pickle
    if head.lstrip()[:1] in (b"{", b"["):
        return "json"
    if head[8:9] == b"{" or path.suffix.lower() == ".safetensors":
        return "safetensors"  # with a header that lies about its length, or is not JSON: the check says which
    return "unknown"


def check_input_file(path: Path, what: str = "checkpoint") -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} {path} does not exist", "check the path (inside the container, /models/…)")
    if path.is_dir():
        raise UserError(
            f"{what} {path} is a folder, not a single .ckpt/.safetensors file",
            "to turn a diffusers folder into one file use `dreambooth export`",
        )
    if path.stat().st_size == 0:
        raise UserError(f"{what} {path} is empty (0 bytes)", "download or copy the file again")
    return path


def load_checkpoint(path: Path) -> Checkpoint:
    """Load every tensor of a single-file checkpoint; refuse anything that is not a plain checkpoint."""
    return _open(path, lazy=False)


def open_checkpoint(path: Path) -> Checkpoint:
    """`load_checkpoint`, but a .safetensors file's tensors stay in the file (StoredTensor); a pickle is loaded."""
    return _open(path, lazy=True)


def _open(path: Path, *, lazy: bool) -> Checkpoint:
    path = check_input_file(path)
    kind = sniff_format(path)
    if kind == "safetensors" and lazy:
        header = check_safetensors(path)
        ckpt = Checkpoint(path, read_tensors(path, header), dict(header.get("__metadata__", {})), "safetensors")
    elif kind == "safetensors":
        ckpt = _load_safetensors(path)
    elif kind == "pickle":
        ckpt = _load_pickle(path)
    elif kind == "json":
        raise UserError(
            f"{path} is a JSON file, not a model checkpoint",
            "pass the .safetensors/.ckpt weights file (a config .json/.yaml goes to --original-config)",
        )
    else:
        raise UserError(
            f"{path} is neither a .safetensors file nor a PyTorch checkpoint (unrecognised first bytes)",
            "the file is corrupt or not a model; download it again",
        )
    if not ckpt.tensors:
        raise UserError(f"{path} holds no tensors", "pass a Stable Diffusion model file")
    return ckpt


MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


def check_safetensors(path: Path, what: str = "") -> dict:
    """Read and check a .safetensors header against the file; the parsed header, or one UserError.

    Only the 8-byte length and the header itself are read: nothing is allocated from what the header claims."""
    label = f"{what} {path}" if what else str(path)
    fix = "the file is truncated or corrupt (or not a model); download it again"
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{label} is not a .safetensors file: {size} bytes, shorter than the 8-byte header", fix)
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise UserError(
                f"{label}: the .safetensors header claims {header_len:,} bytes, but the file has {size - 8:,} after"
                " the length field",
                fix,
            )
        if header_len > MAX_HEADER_BYTES:
            raise UserError(f"{label}: the .safetensors header claims {header_len:,} bytes (over 100 MB)", fix)
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except ValueError:
        raise UserError(f"{label}: the .safetensors header is not JSON", fix) from None
    if not isinstance(header, dict):
        raise UserError(f"{label}: the .safetensors header is a JSON {type(header).__name__}, not an object", fix)
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UserError(f"{label}: the .safetensors `__metadata__` is not a table of strings", fix)
    data_bytes = size - 8 - header_len
    ranges = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{label}: tensor {name[:100]!r}"
        if not isinstance(entry, dict):
            raise UserError(f"{where} has no dtype/shape/data_offsets entry in the header", fix)
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in ELEMENT_BYTES:
            raise UserError(
                f"{where} has dtype {str(dtype)[:20]!r}, which is not one this program can load",
                "convert the file to F16/BF16/F32 weights with the tool that made it",
            )
        if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
            raise UserError(f"{where} has shape {str(shape)[:60]}, not a list of sizes", fix)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int and n >= 0 for n in offsets)):
            raise UserError(f"{where} has data_offsets {str(offsets)[:60]}, not [begin, end]", fix)
        begin, end = offsets
        if not begin <= end <= data_bytes:
            raise UserError(
                f"{where} claims bytes {begin:,}–{end:,}, outside the {data_bytes:,} data bytes of the file", fix
            )
        elements = math.prod(shape)
        if elements * ELEMENT_BYTES[dtype] != end - begin:
            raise UserError(
                f"{where}: shape {shape} of {dtype} ({elements:,} elements) needs "
                f"{elements * ELEMENT_BYTES[dtype]:,} bytes, but its data_offsets span {end - begin:,}",
                fix,
            )
        ranges.append((begin, end, name))
    ranges.sort()
    for (_, end, first), (begin, _, second) in itertools.pairwise(ranges):
        if begin < end:
            raise UserError(f"{label}: tensors {first[:100]!r} and {second[:100]!r} share bytes of the file", fix)
    return header


def sort_safetensors_metadata(path: Path) -> None:
    """safetensors writes a file's metadata in hash-map order, which changes from process to process: the same
    weights and metadata would make files with different bytes (and a different A1111 model hash) depending on the
    run that wrote them. Rewrite the header in place with the metadata sorted: the same length, so no byte of the
    tensors moves (nothing is changed if it would not fit)."""
    with Path(path).open("r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        if not header.get("__metadata__"):
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))  # tensors keep their order
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(raw) <= length:
            f.seek(8)
            f.write(raw + b" " * (length - len(raw)))  # safetensors pads its header with spaces, too


def load_safetensors_file(path: Path, what: str = "") -> dict[str, torch.Tensor]:
    """`safetensors.torch.load_file`, after `check_safetensors`: a file that lies is one UserError."""
    path = check_input_file(path, what or "file")
    check_safetensors(path, what)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as exc:
        raise UserError(
            f"{path} is not a readable .safetensors file ({_first_line(exc)})",
            "the file is truncated or corrupt; download it again",
        ) from exc


def open_safetensors_file(path: Path, what: str = "") -> dict[str, StoredTensor]:
    """`load_safetensors_file` without reading the tensors: where each one is in the file."""
    path = check_input_file(path, what or "file")
    return read_tensors(path, check_safetensors(path, what))


def _load_safetensors(path: Path) -> Checkpoint:
    check_safetensors(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as exc:  # safetensors raises its own error types for truncated/garbled files
        raise UserError(
            f"{path} is not a readable .safetensors file ({_first_line(exc)})",
            "the file is truncated or corrupt; download it again",
        ) from exc
    return Checkpoint(path, tensors, metadata, "safetensors")


# ───────────────────────────── the pickle pre-scan ─────────────────────────────
#
# torch.load(weights_only=True) refuses a global it does not know only when it meets it, and it allocates every
# storage a pickle claims as it goes (a legacy .ckpt: `UntypedStorage(nbytes)` with nbytes from the pickle). So the
# pickle is read first with pickletools, which runs nothing and allocates nothing: every global it names must be on
# the allow-list (torch's own weights-only names and ALLOWED_FOREIGN_GLOBALS), and every storage it claims must fit
# in the bytes the file has for it (its zip entry, or the whole file for the legacy format).

_PICKLE_FIX = "the file is corrupt or was made to attack (or not a model); get the .safetensors version of this model"
_MAX_PICKLES = 5  # legacy format: magic number, protocol, system info, the object, the storage keys


def _allowed_globals() -> set[str]:
    from torch._weights_only_unpickler import _get_allowed_globals

    return set(_get_allowed_globals()) | {name for _, name in ALLOWED_FOREIGN_GLOBALS}


class _Mark:
    """Stands for pickle's MARK on the simulated stack."""


class _Global(str):
    """A global a pickle names (module.name), as a value on the simulated stack."""


_CONSTANT_OPS = {
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "STRING", "BINSTRING", "SHORT_BINSTRING",
    "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "FLOAT",
    "BINFLOAT",
}  # fmt: skip


def scan_pickle(ops, allowed: set[str], where: str) -> list[tuple]:
    """Walk one pickle's opcodes on a simulated stack (constants, tuples and globals only; every other value is a
    placeholder). Refuses a global off the allow-list; returns the persistent ids (torch's storage records)."""
    stack: list = []
    memo: dict = {}
    records = []

    def pop_to_mark() -> list:
        items = []
        while stack:
            item = stack.pop()
            if isinstance(item, _Mark):
                return items[::-1]
            items.append(item)
        raise ValueError("MARK missing")

    for op, arg, _ in ops:
        name = op.name
        if name in ("GLOBAL", "INST", "STACK_GLOBAL"):
            if name == "STACK_GLOBAL":
                attr = stack.pop()
                module = stack.pop()
                if not (isinstance(module, str) and isinstance(attr, str)):
                    raise UserError(
                        f"refusing to load {where}: it builds the name of a global at load time", _PICKLE_FIX
                    )
                found = f"{module}.{attr}"
            else:
                module, _, attr = str(arg).partition(" ")
                found = f"{module}.{attr}"
                if name == "INST":
                    pop_to_mark()
            if found not in allowed:
                raise UserError(
                    f"refusing to load {where}: it needs more than tensors to unpickle (it references "
                    f"`{found[:120]}`, which is not on the allow-list), and a pickle like that can run code on your "
                    "machine",
                    "get the .safetensors version of this model, or convert it on a machine you can risk",
                )
            stack.append(_Global(found))
        elif name in _CONSTANT_OPS:
            stack.append(arg)
        elif name in ("NONE", "NEWTRUE", "NEWFALSE"):
            stack.append({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[name])
        elif name == "MARK":
            stack.append(_Mark())
        elif name == "TUPLE":
            stack.append(tuple(pop_to_mark()))
        elif name == "EMPTY_TUPLE":
            stack.append(())
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            items = stack[-n:]
            if len(items) < n:
                raise ValueError("stack underflow")
            del stack[-n:]
            stack.append(tuple(items))
        elif name in ("BINPERSID", "PERSID"):
            records.append(stack.pop() if name == "BINPERSID" else arg)
            stack.append(None)
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1]
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(arg))
        else:  # anything else: pop what it takes, push placeholders for what it makes
            before = op.stack_before
            if pickletools.markobject in before:
                pop_to_mark()
                before = before[: before.index(pickletools.markobject)]
            for _ in before:
                stack.pop()
            stack.extend([None] * len(op.stack_after))
    return records


def _storage_bytes(record: tuple, where: str) -> tuple[str, int]:
    """(key, bytes) of a torch storage record ('storage', type, key, location, numel[, view])."""
    if not (isinstance(record, tuple) and len(record) >= 5 and record[0] == "storage"):
        raise UserError(
            f"refusing to load {where}: it holds a persistent object that is not a tensor storage", _PICKLE_FIX
        )
    storage_type, key, numel = record[1], record[2], record[4]
    if not isinstance(storage_type, _Global) or not isinstance(numel, int) or numel < 0:
        raise UserError(f"refusing to load {where}: a tensor storage record is malformed", _PICKLE_FIX)
    kind = storage_type.rsplit(".", 1)[-1].removesuffix("Storage")
    return str(key), numel * _STORAGE_ITEMSIZE.get(kind, 1)  # unknown: counted as bytes, a lower bound


# bytes per element of torch's storage classes (torch.FloatStorage …), by name: asking the classes warns
_STORAGE_ITEMSIZE = {
    "Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2, "Char": 1, "Byte": 1,
    "Bool": 1, "ComplexDouble": 16, "ComplexFloat": 8, "QInt8": 1, "QUInt8": 1, "QInt32": 4, "Untyped": 1,
}  # fmt: skip


def prescan_pickle_checkpoint(path: Path) -> None:
    """Refuse a pickle checkpoint (zip or legacy .ckpt) before torch.load sees it: see the note above."""
    import io
    import zipfile

    where = str(path)
    allowed = _allowed_globals()
    size = path.stat().st_size
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                infos = {info.filename: info for info in archive.infolist()}
                pickles = [n for n in infos if n.endswith("/data.pkl") or n == "data.pkl"]
                if len(pickles) != 1:
                    raise UserError(f"{where} is a zip file, but not a PyTorch checkpoint (no data.pkl)", _PICKLE_FIX)
                (pkl,) = pickles
                if infos[pkl].file_size > min(size * 1000, 1 << 31):
                    raise UserError(f"refusing to load {where}: its data.pkl claims {infos[pkl].file_size:,} bytes",
                                    _PICKLE_FIX)  # fmt: skip
                records = scan_pickle(pickletools.genops(archive.read(pkl)), allowed, where)
                prefix = pkl[: -len("data.pkl")]
                for record in records:
                    key, claimed = _storage_bytes(record, where)
                    entry = infos.get(f"{prefix}data/{key}")
                    if entry is None:
                        raise UserError(
                            f"refusing to load {where}: tensor storage {key[:40]!r} is missing", _PICKLE_FIX
                        )
                    if claimed > entry.file_size:
                        raise UserError(
                            f"refusing to load {where}: tensor storage {key[:40]!r} claims {claimed:,} bytes, and the"
                            f" file holds {entry.file_size:,} for it",
                            _PICKLE_FIX,
                        )
            return
        with path.open("rb") as f:
            records = []
            for _ in range(_MAX_PICKLES):
                head = f.read(1)
                if head != b"\x80":
                    break  # the raw storage bytes begin (or the file ends)
                f.seek(-1, io.SEEK_CUR)
                records += scan_pickle(pickletools.genops(f), allowed, where)
    except UserError:
        raise
    except (ValueError, IndexError, EOFError, zipfile.BadZipFile, struct.error, OverflowError) as exc:
        raise UserError(f"{where} is not a readable PyTorch checkpoint ({_first_line(exc)})",
                        "the file is truncated or corrupt; download it again") from None  # fmt: skip
    claimed = {}
    for record in records:
        key, nbytes = _storage_bytes(record, where)
        claimed[key] = max(nbytes, claimed.get(key, 0))
    total = sum(claimed.values())
    if total > size:
        big = max(claimed, key=claimed.get)
        raise UserError(
            f"refusing to load {where}: its tensors claim {total:,} bytes (storage {big[:40]!r}: {claimed[big]:,}), "
            f"and the file has {size:,}",
            _PICKLE_FIX,
        )


def _load_pickle(path: Path) -> Checkpoint:
    import torch

    zipped = path.open("rb").read(4) == b"PK\x03\x04"
    prescan_pickle_checkpoint(path)  # globals and storage sizes, before torch.load allocates anything
    try:
        # torch warns about pickle protocols it may not read; we refuse or load in one line, so the warning goes
        with torch.serialization.safe_globals(ALLOWED_FOREIGN_GLOBALS), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            # mmap: tensors stay in the page cache instead of being copied (zip format only)
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as exc:
        name = re.search(r"GLOBAL ([\w.]+)", str(exc))
        culprit = f" (it references `{name.group(1)}`)" if name else ""
        raise UserError(
            f"refusing to load {path}: it needs more than tensors to unpickle{culprit}, and a pickle like that"
            " can run code on your machine",
            "get the .safetensors version of this model, or convert it on a machine you can risk",
        ) from exc
    except Exception as exc:  # zip errors, EOF, bad magic: all mean the bytes are not a full checkpoint
        raise UserError(
            f"{path} is not a readable PyTorch checkpoint ({_first_line(exc)})",
            "the file is truncated or corrupt; download it again",
        ) from exc
    tensors, other = _flatten_checkpoint_object(obj, path)
    return Checkpoint(path, tensors, {}, "pickle", other)


def _flatten_checkpoint_object(obj: object, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Find the state dict: top level, or nested under `state_dict` (Lightning) — tensors only."""
    import torch

    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a state dict", "pass a model checkpoint file")
    inner = obj.get("state_dict")
    state = inner if isinstance(inner, dict) else obj
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    other = {k: v for k, v in obj.items() if k != "state_dict" and isinstance(v, int | float | str)}
    return tensors, other


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def read_json_file(path: Path, what: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {what} {path}: {_first_line(exc)}", "check the file") from exc
