"""Checkpoint files in and out: lazy readers for safetensors / PyTorch `.bin` shards, a streaming writer.

Readers index every tensor (name -> shape, dtype, file) from the file headers alone, so that the
converter can check the whole checkpoint before it reads a byte of weights. Tensor data is then read
one tensor at a time:
  * safetensors: parsed by hand and read with plain `readinto` at the tensor's offset, not mmap. A
    mapped file counts every touched page in the process RSS until it is unmapped, so reading a whole
    shard through `safe_open` would hold the shard in RSS; a plain read holds only the one tensor.
  * `.bin`: `torch.load(mmap=True, weights_only=True)`, one shard loaded at a time; the converter
    releases a shard once no remaining tensor needs it. torch is imported only when a `.bin` is met.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the file, key or field at fault."""


# safetensors dtype names <-> numpy dtypes. Only floating formats are weights we can convert.
NUMPY_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
SAFETENSORS_DTYPE_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_INTEGER_DTYPE_SIZES = {"I8": 1, "U8": 1, "BOOL": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8,
                        "F8_E4M3": 1, "F8_E5M2": 1}
# Rows of a tensor are cast and written this many bytes at a time.
_BLOCK_BYTES = 16 << 20
# A header longer than this is not a safetensors header (the format itself caps it at 100 MB).
_MAX_HEADER_BYTES = 100_000_000

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one source tensor lives. `offset` is the absolute byte offset (safetensors only)."""

    shape: tuple[int, ...]
    dtype: str  # safetensors name: F32, BF16, F16, ... (anything else is reported as unsupported)
    file: Path
    offset: int = -1
    nbytes: int = 0


class Checkpoint:
    """Index of a checkpoint's tensors plus lazy, tensor-by-tensor reads."""

    format_name = "?"

    def __init__(self, tensors: dict[str, TensorInfo], files: list[Path]):
        self.tensors = tensors
        self.files = files

    def read(self, key: str) -> np.ndarray:
        raise NotImplementedError

    def release(self, file: Path) -> None:
        """Drops whatever is held for `file` (no tensor of it will be read again)."""

    def close(self) -> None:
        for file in self.files:
            self.release(file)


# ---- safetensors ---------------------------------------------------------------------------------


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parses and validates a safetensors header; a truncated or corrupt file is a ConversionError."""
    try:
        size = path.stat().st_size
        with path.open("rb") as file:
            prefix = file.read(8)
            if len(prefix) < 8:
                raise ConversionError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (header_bytes,) = struct.unpack("<Q", prefix)
            if header_bytes > min(_MAX_HEADER_BYTES, size - 8):
                raise ConversionError(f"{path}: truncated or not a safetensors file (header of {header_bytes} "
                                      f"bytes declared, file has {size} bytes)")
            raw = file.read(header_bytes)
    except OSError as error:
        raise ConversionError(f"{path}: cannot read ({error})") from error
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(f"{path}: corrupt safetensors header ({error})") from error
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + header_bytes
    tensors: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as error:
            raise ConversionError(f"{path}: corrupt safetensors header entry for {key!r}") from error
        itemsize = NUMPY_DTYPES[dtype].itemsize if dtype in NUMPY_DTYPES else _INTEGER_DTYPE_SIZES.get(dtype)
        if itemsize is not None and end - begin != math.prod(shape) * itemsize:
            raise ConversionError(f"{path}: corrupt safetensors header: {key!r} spans {end - begin} bytes but "
                                  f"{dtype}{list(shape)} needs {math.prod(shape) * itemsize}")
        if data_start + end > size:
            raise ConversionError(f"{path}: truncated safetensors file: tensor {key!r} ends at byte "
                                  f"{data_start + end} but the file has {size} bytes")
        tensors[key] = TensorInfo(shape, dtype, path, data_start + begin, end - begin)
    return tensors


class SafetensorsCheckpoint(Checkpoint):
    format_name = "safetensors"

    def __init__(self, tensors: dict[str, TensorInfo], files: list[Path]):
        super().__init__(tensors, files)
        self._handles: dict[Path, Any] = {}

    def read(self, key: str) -> np.ndarray:
        info = self.tensors[key]
        if info.dtype not in NUMPY_DTYPES:
            raise ConversionError(f"{key}: unsupported dtype {info.dtype}")
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = info.file.open("rb")
        buffer = np.empty(info.nbytes, dtype=np.uint8)
        handle.seek(info.offset)
        if handle.readinto(buffer) != info.nbytes:
            raise ConversionError(f"{info.file}: truncated while reading {key!r}")
        return buffer.view(NUMPY_DTYPES[info.dtype]).reshape(info.shape)

    def release(self, file: Path) -> None:
        handle = self._handles.pop(file, None)
        if handle is not None:
            handle.close()


# ---- PyTorch .bin --------------------------------------------------------------------------------


def _import_torch():
    try:
        import torch
    except ImportError as error:
        raise ConversionError("this checkpoint is in PyTorch .bin format, which needs torch to read; "
                              "install torch (CPU build is enough) or convert the checkpoint to safetensors") from error
    return torch


def _torch_dtype_name(torch, dtype) -> str:
    names = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    return names.get(dtype, str(dtype).removeprefix("torch."))


class BinCheckpoint(Checkpoint):
    format_name = "pytorch .bin"

    def __init__(self, files: list[Path]):
        self._torch = _import_torch()
        self._loaded: dict[Path, dict[str, Any]] = {}
        tensors: dict[str, TensorInfo] = {}
        for file in files:
            # Loading with mmap reads only the pickle, not the data: cheap enough to do twice.
            state = self._load(file)
            for key, tensor in state.items():
                tensors[key] = TensorInfo(tuple(tensor.shape), _torch_dtype_name(self._torch, tensor.dtype), file)
            del state
        super().__init__(tensors, files)

    def _load(self, file: Path) -> dict[str, Any]:
        torch = self._torch
        try:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:
                if "mmap" not in str(error):
                    raise
                # Files written before torch 1.6 (not zip archives) cannot be mapped: load them whole.
                state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many types for a corrupt archive
            raise ConversionError(f"{file}: cannot load PyTorch checkpoint ({type(error).__name__}: {error})"
                                  ) from error
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ConversionError(f"{file}: expected a flat state dict of tensors")
        return state

    def read(self, key: str) -> np.ndarray:
        info = self.tensors[key]
        if info.dtype not in NUMPY_DTYPES:
            raise ConversionError(f"{key}: unsupported dtype {info.dtype}")
        state = self._loaded.get(info.file)
        if state is None:
            state = self._loaded[info.file] = self._load(info.file)
        tensor = state[key].contiguous()
        if tensor.dtype == self._torch.bfloat16:
            # numpy has no bfloat16: reinterpret the bits as ml_dtypes.bfloat16.
            return tensor.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()

    def release(self, file: Path) -> None:
        # Dropping the state dict unmaps the file once the arrays made from it are gone.
        self._loaded.pop(file, None)


# ---- opening a checkpoint directory --------------------------------------------------------------


def _read_index(path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ConversionError(f"{path}: not a valid shard index ({error})") from error
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"{path}: 'weight_map' is empty")
    return weight_map


def _shard_files(directory: Path, index: Path) -> tuple[list[Path], dict[str, str]]:
    weight_map = _read_index(index)
    names = sorted(set(weight_map.values()))
    missing = [name for name in names if not (directory / name).is_file()]
    if missing:
        raise ConversionError(f"{index}: names shard files that are missing: {', '.join(missing)}")
    return [directory / name for name in names], weight_map


def _check_index(index: Path, weight_map: dict[str, str], tensors: dict[str, TensorInfo]) -> None:
    wrong = [f"{key} (index: {name})" for key, name in weight_map.items()
             if key not in tensors or tensors[key].file.name != name]
    if wrong:
        raise ConversionError(f"{index}: lists tensors that its shards do not hold: {cap_list(wrong)}")


def open_checkpoint(directory: Path) -> Checkpoint:
    """Finds the weights in `directory`: safetensors (single or sharded) first, then PyTorch .bin."""
    if (directory / SAFETENSORS_INDEX).is_file() or (directory / SAFETENSORS_SINGLE).is_file():
        if (directory / SAFETENSORS_INDEX).is_file():
            index = directory / SAFETENSORS_INDEX
            files, weight_map = _shard_files(directory, index)
        else:
            index, files, weight_map = None, [directory / SAFETENSORS_SINGLE], {}
        tensors: dict[str, TensorInfo] = {}
        duplicated = []
        for file in files:
            for key, info in read_safetensors_header(file).items():
                if key in tensors:
                    duplicated.append(f"{key} ({tensors[key].file.name}, {file.name})")
                tensors[key] = info
        if duplicated:
            raise ConversionError(f"{directory}: tensors stored in more than one shard: {cap_list(duplicated)}")
        if index is not None:
            _check_index(index, weight_map, tensors)
        return SafetensorsCheckpoint(tensors, files)
    if (directory / BIN_INDEX).is_file():
        files, weight_map = _shard_files(directory, directory / BIN_INDEX)
        checkpoint = BinCheckpoint(files)
        _check_index(directory / BIN_INDEX, weight_map, checkpoint.tensors)
        return checkpoint
    if (directory / BIN_SINGLE).is_file():
        return BinCheckpoint([directory / BIN_SINGLE])
    raise ConversionError(f"{directory}: no weights found (looked for {SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE}, "
                          f"{BIN_INDEX}, {BIN_SINGLE})")


def cap_list(items: Iterable[str], limit: int = 20, separator: str = ", ") -> str:
    """Joins at most `limit` items, saying how many more there were."""
    items = list(items)
    shown = separator.join(items[:limit])
    return shown + (f"{separator}... and {len(items) - limit} more" if len(items) > limit else "")


# ---- writing -------------------------------------------------------------------------------------


class SafetensorsWriter:
    """Writes a safetensors file tensor by tensor, in the order the entries were declared.

    The header (names, shapes, dtypes, offsets) is written first from the declared entries, so only one
    tensor is ever in memory; `write` then appends each tensor's bytes, checking it is the declared one.
    """

    def __init__(self, path: Path, entries: list[tuple[str, tuple[int, ...], str]],
                 metadata: dict[str, str] | None = None):
        self.path = path
        self._entries = entries
        self._next = 0
        header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for name, shape, dtype in entries:
            nbytes = math.prod(shape) * NUMPY_DTYPES[dtype].itemsize
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        self.data_bytes = offset
        encoded = json.dumps(header, separators=(",", ":")).encode()
        # The format wants the data 8-byte aligned: pad the header with spaces, as the reference writer does.
        encoded += b" " * (-len(encoded) % 8)
        self._file = path.open("wb")
        self._file.write(struct.pack("<Q", len(encoded)) + encoded)
        self.total_bytes = 8 + len(encoded) + offset

    def write(self, name: str, array: np.ndarray, convert: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        """Appends `array` (any strides), passing each block of rows through `convert` (e.g. a cast) first.

        Blocks of ~16 MB keep the extra memory small when `array` is a transposed view or needs a cast.
        """
        expected_name, shape, dtype = self._entries[self._next]
        if name != expected_name or array.shape != shape:
            raise AssertionError(f"writer expected {expected_name} {list(shape)}, got {name} {list(array.shape)}")
        row_bytes = max(1, array[:1].size * array.itemsize)
        rows = max(1, _BLOCK_BYTES // row_bytes)
        for start in range(0, array.shape[0], rows):
            block = array[start:start + rows]
            block = np.ascontiguousarray(convert(block) if convert else block)
            if block.dtype != NUMPY_DTYPES[dtype]:
                raise AssertionError(f"{name}: writer expected {dtype}, got {block.dtype}")
            self._file.write(block.reshape(-1).view(np.uint8).data)
        self._next += 1

    def close(self) -> None:
        self._file.close()
        if self._next != len(self._entries):
            raise AssertionError(f"{self.path}: {len(self._entries) - self._next} declared tensors not written")

    def abort(self) -> None:
        self._file.close()
