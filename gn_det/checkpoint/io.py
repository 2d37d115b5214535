"""Checkpoint file I/O that never runs code from a file, and never leaves a partial file behind.

Three formats, recognised by content (magic bytes), not by file name:

* ``"torch"``: ``torch.save`` output (zip archive, or the legacy pre-1.6 pickle stream), loaded with
  ``torch.load(..., weights_only=True)``.
* ``"pickle"``: Detectron / Caffe2 and detectron2 model-zoo ``.pkl`` files: a pickled dict of numpy
  arrays. Loaded by an unpickler that only builds numpy arrays, dtypes, scalars and
  ``OrderedDict`` (see ``_PICKLE_GLOBALS``); numpy arrays are returned as numpy arrays.
* ``"safetensors"``: a flat dict of tensors plus an optional ``str -> str`` metadata dict, which
  ``load_checkpoint_file`` leaves out; read it with ``load_safetensors_metadata``.

Every failure is a ``CheckpointError`` whose message is one line, ``"<path>: <problem>"``; content
that would run code or build objects outside the allow-lists is an ``UnsafeCheckpointError``.

``save_checkpoint_file`` writes a temporary file in the target folder, fsyncs it and renames it
onto the target, so a reader sees either the old file or the complete new one.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import tempfile
import zipfile
from collections import OrderedDict
from typing import Any, Callable

import numpy as np
import safetensors
import safetensors.torch
import torch

from .errors import CheckpointError, UnsafeCheckpointError, _describe, _error
from .safe_pickle import load_pickle

__all__ = [
    "FORMATS",
    "SAVE_FORMATS",
    "CheckpointError",
    "UnsafeCheckpointError",
    "detect_format",
    "load_checkpoint_file",
    "load_safetensors_metadata",
    "replace_atomically",
    "save_checkpoint_file",
    "write_text_atomically",
]

logger = logging.getLogger(__name__)

FORMATS = ("torch", "pickle", "safetensors")  # what detect_format returns
SAVE_FORMATS = ("pth", "pkl", "safetensors")  # what save_checkpoint_file takes


# ---------------------------------------------------------------------------------------------
# Format detection

_ZIP_MAGIC = b"PK\x03\x04"
# torch.save's legacy (non-zip) format starts with this number, pickled as LONG1.
_LEGACY_TORCH_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_SAFETENSORS_MAX_HEADER = 100_000_000  # the limit safetensors itself enforces
# Protocol 0/1 pickles of a dict (py2 Detectron files may use them): "(dp0", "}q\x00(", or a
# GLOBAL ("ccollections\nOrderedDict\n").
_OLD_PICKLE_START = re.compile(rb"\(dp|\}|c[A-Za-z_][\w.]*\n\w+\n")


def _read_head(path: str, size: int) -> tuple[bytes, int]:
    """The first ``size`` bytes of the file and its length; CheckpointError if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(size), os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise _error(path, "no such file") from None
    except IsADirectoryError:
        raise _error(path, "is a directory, not a checkpoint file") from None
    except PermissionError:
        raise _error(path, "permission denied") from None
    except OSError as e:
        raise _error(path, f"cannot read: {e.strerror or e}") from None


def detect_format(path) -> str:
    """A checkpoint file's format from its content: ``"torch"``, ``"pickle"`` or ``"safetensors"``.

    Raises:
        CheckpointError: the file is missing, unreadable, empty, of an unknown format, or visibly
            truncated (a zip without its central directory, a safetensors file shorter than its
            header).
    """
    path = os.fspath(path)
    head, size = _read_head(path, 64)
    if size == 0:
        raise _error(path, "empty file")
    if head.startswith(_ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except Exception as e:  # BadZipFile, EOFError, OSError; UnicodeDecodeError (mangled
            # member names), NotImplementedError (unknown zip version), ... from a damaged file
            raise _error(path, f"truncated or corrupt zip archive ({_describe(e)})") from None
        if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            raise _error(path, "zip archive without data.pkl: not a torch.save checkpoint")
        return "torch"
    if len(head) >= 2 and head[0] == pickle.PROTO[0] and 2 <= head[1] <= pickle.HIGHEST_PROTOCOL:
        return "torch" if _LEGACY_TORCH_MAGIC in head[:32] else "pickle"
    if _OLD_PICKLE_START.match(head):
        return "pickle"
    if len(head) > 8 and head[8:9] == b"{":
        header_size = int.from_bytes(head[:8], "little")
        if header_size <= _SAFETENSORS_MAX_HEADER:
            if 8 + header_size > size:
                needed = 8 + header_size
                raise _error(path, f"truncated safetensors file ({size} bytes, needs {needed})")
            return "safetensors"
    raise _error(
        path,
        "unknown checkpoint format (not torch.save, pickle or safetensors; "
        f"starts with {head[:8]!r})",
    )


# Messages of torch's weights-only unpickler that mean "refused", not "corrupt".
_TORCH_REFUSED_GLOBAL = re.compile(r"(?:GLOBAL|Unsupported class) ([\w.]+)")  # torch>=2.4 | 2.3
_TORCH_REFUSED_OTHER = re.compile(
    r"(Trying to (?:call reduce|instantiate) [^.]*|Can only (?:create new object|build) [^.]*)"
)
_TORCH_INNER_MESSAGE = re.compile(r"WeightsUnpickler error: ([^\n]*)")


def _load_torch(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        message = str(e)
        problem = None
        if match := _TORCH_REFUSED_GLOBAL.search(message):
            problem = f"refused to load global '{match.group(1)}'"
        elif match := _TORCH_REFUSED_OTHER.search(message):
            problem = f"refused: {match.group(1).strip()}"
        if problem:
            raise _error(
                path,
                f"{problem}: a .pth checkpoint may only hold tensors, numbers, strings and "
                "containers (torch.load weights_only=True)",
                UnsafeCheckpointError,
            ) from None
        inner = _TORCH_INNER_MESSAGE.search(message)
        problem = _describe(inner.group(1) if inner else e)
        raise _error(path, f"truncated or corrupt torch checkpoint ({problem})") from None
    except OSError as e:
        raise _error(path, f"cannot read: {e.strerror or e}") from None
    except Exception as e:  # RuntimeError from the zip reader, EOFError, ...
        raise _error(path, f"truncated or corrupt torch checkpoint ({_describe(e)})") from None


def _load_safetensors(path: str):
    try:
        return safetensors.torch.load_file(path, device="cpu")
    except OSError as e:
        raise _error(path, f"cannot read: {e.strerror or e}") from None
    except Exception as e:  # SafetensorError
        raise _error(path, f"truncated or corrupt safetensors file ({_describe(e)})") from None


_LOADERS: dict[str, Callable[[str], Any]] = {
    "torch": _load_torch,
    "pickle": load_pickle,
    "safetensors": _load_safetensors,
}


def load_checkpoint_file(path) -> dict:
    """The top-level dict stored in a checkpoint file, loaded without running code from it.

    Returns:
        "torch": what ``torch.save`` stored (tensors on CPU). "pickle": the stored dict, with numpy
        arrays left as numpy arrays. "safetensors": the flat ``{name: tensor}`` dict (in the file's
        order, not the saved dict's); its string metadata is not included
        (``load_safetensors_metadata``).

    Raises:
        UnsafeCheckpointError: the file would run code or build objects outside the allow-list.
        CheckpointError: missing, unreadable, empty, truncated or corrupt file, unknown format, or
            a top-level object that is not a dict.
    """
    path = os.fspath(path)
    loaded = _LOADERS[detect_format(path)](path)
    if not isinstance(loaded, dict):
        raise _error(path, f"holds a {type(loaded).__name__}, expected a dict")
    return loaded


def load_safetensors_metadata(path) -> dict[str, str]:
    """The ``str -> str`` metadata of a safetensors file (empty if it has none)."""
    path = os.fspath(path)
    file_format = detect_format(path)
    if file_format != "safetensors":
        raise _error(path, f"not a safetensors file (content is {file_format})")
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise _error(path, f"truncated or corrupt safetensors file ({_describe(e)})") from None


# ---------------------------------------------------------------------------------------------
# Saving


class _Unstorable(Exception):
    """A value the requested format cannot hold; ``args`` = (key path, what it is)."""


_KEY_TYPES = (str, int, float, type(None))
_PRIMITIVES = (str, bytes, int, float, bool, type(None))


def _map_tree(obj, convert_leaf: Callable[[Any, str], Any], key_path: str = ""):
    """A copy of a dict/list/tuple tree with each leaf replaced by ``convert_leaf(leaf, key_path)``.

    dict subclasses other than OrderedDict become dicts (their class would not load back).
    """
    if isinstance(obj, dict):
        out = OrderedDict() if isinstance(obj, OrderedDict) else {}
        for key, value in obj.items():
            child = f"{key_path}.{key}" if key_path else str(key)
            if not isinstance(key, _KEY_TYPES):
                raise _Unstorable(child, f"a {type(key).__name__} key")
            out[key] = _map_tree(value, convert_leaf, child)
        return out
    if isinstance(obj, (list, tuple)):
        items = [_map_tree(v, convert_leaf, f"{key_path}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    return convert_leaf(obj, key_path)


def _numpy_to_tensor(value, key_path: str) -> torch.Tensor:
    if value.dtype.hasobject:
        raise _Unstorable(key_path, "a numpy object array")
    try:
        return torch.tensor(value)
    except (TypeError, RuntimeError):
        raise _Unstorable(key_path, f"a numpy {value.dtype} array (no torch dtype)") from None


def _pth_leaf(value, key_path: str):
    # torch.load(weights_only=True) refuses numpy objects: store them as tensors.
    if isinstance(value, (np.ndarray, np.generic)):
        return _numpy_to_tensor(np.asarray(value), key_path)
    if isinstance(value, (torch.Tensor, torch.Size, torch.dtype, torch.device) + _PRIMITIVES):
        return value
    raise _Unstorable(key_path, f"a {type(value).__qualname__}")


def _pkl_leaf(value, key_path: str):
    # detectron2's model-zoo format holds numpy arrays; torch objects would not load back.
    if isinstance(value, torch.Tensor):
        try:
            return value.detach().cpu().resolve_conj().resolve_neg().numpy()
        except (TypeError, RuntimeError):
            raise _Unstorable(key_path, f"a {value.dtype} tensor (no numpy dtype)") from None
    if isinstance(value, (np.ndarray, np.generic)):
        if value.dtype.hasobject:
            raise _Unstorable(key_path, "a numpy object array")
        return value
    if isinstance(value, _PRIMITIVES):
        return value
    raise _Unstorable(key_path, f"a {type(value).__qualname__}")


def _safetensors_payload(obj: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata): tensors from ``obj["model"]`` if that is a dict, else from ``obj``;
    str values beside them become metadata. Tensors sharing memory are copied apart."""
    model = obj.get("model")
    nested = isinstance(model, dict)
    source = model if nested else obj
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    storages: set[int] = set()
    for key, value in source.items():
        key_path = f"model.{key}" if nested else str(key)
        if not isinstance(key, str):
            raise _Unstorable(key_path, f"a {type(key).__name__} key")
        if isinstance(value, np.ndarray):
            value = _numpy_to_tensor(value, key_path)
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().contiguous()
            storage = value.untyped_storage().data_ptr()
            if storage in storages and value.numel() > 0:
                value = value.clone()
            storages.add(value.untyped_storage().data_ptr())
            tensors[key] = value
        elif not nested and isinstance(value, str):
            metadata[key] = value
        else:
            raise _Unstorable(key_path, f"a {type(value).__qualname__}")
    if nested:
        for key, value in obj.items():
            if key == "model":
                continue
            if not (isinstance(key, str) and isinstance(value, str)):
                what = f"a {type(value).__qualname__} (only str goes to metadata)"
                raise _Unstorable(str(key), what)
            metadata[key] = value
    return tensors, metadata


# Writers own the descriptor they are given and close it, whatever happens.


def _write_through(fd: int, serialize: Callable[[Any], None]) -> None:
    try:
        f = os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        serialize(f)
        f.flush()
        os.fsync(f.fileno())


def _write_pth(payload, fd: int, temp_path: str) -> None:
    _write_through(fd, lambda f: torch.save(payload, f))


def _write_pkl(payload, fd: int, temp_path: str) -> None:
    _write_through(fd, lambda f: pickle.dump(payload, f, protocol=2))


def _write_safetensors(payload, fd: int, temp_path: str) -> None:
    os.close(fd)  # safetensors writes by path
    tensors, metadata = payload
    safetensors.torch.save_file(tensors, temp_path, metadata=metadata or None)
    fd = os.open(temp_path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# file_format -> (prepare the object, write it to the open temporary file)
_WRITERS: dict[str, tuple[Callable[[dict], Any], Callable[[Any, int, str], None]]] = {
    "pth": (lambda obj: _map_tree(obj, _pth_leaf), _write_pth),
    "pkl": (lambda obj: _map_tree(obj, _pkl_leaf), _write_pkl),
    "safetensors": (_safetensors_payload, _write_safetensors),
}


def _umask() -> int:
    # /proc avoids os.umask()'s set-and-restore, which races with threads creating files.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_directory(folder: str) -> None:
    """Make the rename durable; best effort (not every platform can open a directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace_atomically(path: str, folder: str, write: Callable[[int, str], None]) -> None:
    """Write a temporary file in ``folder`` with ``write(fd, temp_path)`` (which owns and closes
    ``fd``), then rename it onto ``path``: readers see the old file or the complete new one. On
    any exception (KeyboardInterrupt too) the temporary file is removed and ``path`` untouched.
    """
    fd, temp_path = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.",
                                     suffix=".tmp")
    try:
        write(fd, temp_path)
        os.chmod(temp_path, 0o666 & ~_umask())  # mkstemp creates 0600
        os.replace(temp_path, path)
    except BaseException:
        try:
            os.unlink(temp_path)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(folder)


def replace_atomically(path, write: Callable[[Any], None]) -> None:
    """Call ``write(file)`` on a temporary binary file beside ``path``, fsync it, and rename it
    onto ``path`` (permissions from the umask): ``path`` is the old file or the complete new one.

    Raises:
        OSError: the folder is missing or not writable (``path`` is left as it was); whatever
            ``write`` raises, after removing the temporary file.
    """
    path = os.fspath(path)
    _replace_atomically(path, os.path.dirname(os.path.abspath(path)),
                        lambda fd, _: _write_through(fd, write))


def write_text_atomically(path, text: str) -> None:
    """Replace the text file ``path`` atomically (e.g. detectron2's ``last_checkpoint`` tag)."""
    data = text.encode("utf-8")
    replace_atomically(path, lambda f: f.write(data))


def save_checkpoint_file(obj: dict, path, *, file_format: str, overwrite: bool = False) -> None:
    """Write ``obj`` to ``path`` atomically: the target is either untouched or complete.

    Args:
        obj: the checkpoint dict.
        path: the output file; its folder must exist.
        file_format:
            ``"pth"``: ``torch.save``; numpy arrays and scalars are stored as tensors so that the
            file loads with ``weights_only=True``.
            ``"pkl"``: pickle protocol 2 with tensors converted to numpy arrays (detectron2's
            model-zoo format), e.g.
            ``{"model": {...}, "__author__": ..., "matching_heuristics": True}``.
            ``"safetensors"``: tensors from ``obj["model"]`` when that is a dict, else from ``obj``
            itself; other ``str`` values in ``obj`` go to the file's metadata. Any other value is
            an error.
            Values a format cannot hold back safely (other objects, bfloat16 tensors in a .pkl)
            are a CheckpointError before anything is written.
        overwrite: replace an existing file (the CLI's ``--force``).

    Raises:
        CheckpointError: unknown ``file_format``, unstorable value, existing output without
            ``overwrite``, missing folder, or a failed write. Any exception (KeyboardInterrupt too)
            removes the temporary file and leaves an existing target untouched.
    """
    path = os.fspath(path)
    if file_format not in _WRITERS:
        expected = ", ".join(SAVE_FORMATS)
        raise _error(path, f"unknown file_format {file_format!r} (expected one of {expected})")
    if not isinstance(obj, dict):
        raise _error(path, f"can only save a dict, got a {type(obj).__name__}")
    prepare, write = _WRITERS[file_format]
    try:
        payload = prepare(obj)
    except _Unstorable as e:
        key_path, what = e.args
        raise _error(path, f"cannot store {what} at '{key_path}' in a {file_format} file") from None

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise _error(path, f"folder {folder} does not exist")
    if os.path.isdir(path):
        raise _error(path, "is a directory")
    if os.path.lexists(path) and not overwrite:
        raise _error(path, "exists; pass --force to overwrite")

    try:
        _replace_atomically(path, folder, lambda fd, temp_path: write(payload, fd, temp_path))
    except OSError as e:
        raise _error(path, f"cannot write: {e.strerror or _describe(e)}") from e
    except Exception as e:
        raise _error(path, f"cannot write as {file_format}: {_describe(e)}") from e
    logger.info("Saved %s checkpoint to %s.", file_format, path)
