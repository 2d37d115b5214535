"""Checkpoint file I/O that never runs code from a file, and never leaves a partial file behind.

Formats, recognised by content: ``"torch"`` (``torch.save``, read with ``weights_only=True``),
``"pickle"`` (``.pkl``, read by :mod:`.safe_pickle`) and ``"safetensors"``. Every failure is a
one-line ``CheckpointError``; content that would run code is an ``UnsafeCheckpointError``.
"""

from __future__ import annotations

import contextlib
import functools
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

_ZIP_MAGIC = b"PK\x03\x04"
# torch.save's legacy (non-zip) format starts with this number, pickled as LONG1.
_LEGACY_TORCH_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_SAFETENSORS_MAX_HEADER = 100_000_000  # the limit safetensors itself enforces
# Protocol 0/1 pickles of a dict (py2 Detectron files may use them): "(dp0", "}q\x00(", or a
# GLOBAL ("ccollections\nOrderedDict\n").
_OLD_PICKLE_START = re.compile(rb"\(dp|\}|c[A-Za-z_][\w.]*\n\w+\n")


def detect_format(path) -> str:
    """A checkpoint file's format from its content: ``"torch"``, ``"pickle"`` or ``"safetensors"``.

    Raises:
        CheckpointError: the file is missing, unreadable, empty, of an unknown format, or visibly
            truncated.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            head, size = f.read(64), os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise _error(path, "no such file") from None
    except IsADirectoryError:
        raise _error(path, "is a directory, not a checkpoint file") from None
    except PermissionError:
        raise _error(path, "permission denied") from None
    except OSError as e:
        raise _error(path, f"cannot read: {e.strerror or e}") from None
    if size == 0:
        raise _error(path, "empty file")
    if head.startswith(_ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except Exception as e:  # a damaged zip raises many kinds, not only BadZipFile
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
            if (needed := 8 + header_size) > size:
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
        if match := _TORCH_REFUSED_GLOBAL.search(str(e)):
            refused = f"refused to load global '{match.group(1)}'"
        elif match := _TORCH_REFUSED_OTHER.search(str(e)):
            refused = f"refused: {match.group(1).strip()}"
        else:
            inner = _TORCH_INNER_MESSAGE.search(str(e))
            problem = _describe(inner.group(1) if inner else e)
            raise _error(path, f"truncated or corrupt torch checkpoint ({problem})") from None
        raise _error(
            path,
            f"{refused}: a .pth checkpoint may only hold tensors, numbers, strings and "
            "containers (torch.load weights_only=True)",
            UnsafeCheckpointError,
        ) from None
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

    Tensors are on the CPU; a ``.pkl`` file's numpy arrays stay numpy arrays; a safetensors file
    gives its flat ``{name: tensor}`` dict without its metadata (:func:`load_safetensors_metadata`).

    Raises:
        UnsafeCheckpointError: the file would run code or build objects outside the allow-list.
        CheckpointError: the file cannot be read as a checkpoint, or does not hold a dict.
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


class _Unstorable(Exception):
    """A value the requested format cannot hold; ``args`` = (key path, what it is)."""


_KEY_TYPES = (str, int, float, type(None))
_PRIMITIVES = (str, bytes, int, float, bool, type(None))


def _map_tree(obj, file_format: str, key_path: str = ""):
    """A copy of a dict/list/tuple tree, leaves as :func:`_leaf` makes them; dict subclasses other
    than OrderedDict become dicts (their class would not load back)."""
    if isinstance(obj, dict):
        out = OrderedDict() if isinstance(obj, OrderedDict) else {}
        for key, value in obj.items():
            child = f"{key_path}.{key}" if key_path else str(key)
            if not isinstance(key, _KEY_TYPES):
                raise _Unstorable(child, f"a {type(key).__name__} key")
            out[key] = _map_tree(value, file_format, child)
        return out
    if isinstance(obj, (list, tuple)):
        items = [_map_tree(v, file_format, f"{key_path}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    return _leaf(obj, key_path, file_format)


def _leaf(value, key_path: str, file_format: str):
    """``value`` for a .pth file (numpy as tensors: ``weights_only=True`` refuses numpy) or a .pkl
    one (tensors as numpy arrays, detectron2's model-zoo format: torch objects would not load)."""
    if isinstance(value, (np.ndarray, np.generic)):
        if value.dtype.hasobject:
            raise _Unstorable(key_path, "a numpy object array")
        if file_format == "pkl":
            return value
        try:
            return torch.tensor(np.asarray(value))
        except (TypeError, RuntimeError):
            raise _Unstorable(key_path, f"a numpy {value.dtype} array (no torch dtype)") from None
    if isinstance(value, torch.Tensor) and file_format == "pkl":
        try:
            return value.detach().cpu().resolve_conj().resolve_neg().numpy()
        except (TypeError, RuntimeError):
            raise _Unstorable(key_path, f"a {value.dtype} tensor (no numpy dtype)") from None
    torch_values = (torch.Tensor, torch.dtype, torch.device) if file_format == "pth" else ()
    if isinstance(value, _PRIMITIVES + torch_values):
        return value
    raise _Unstorable(key_path, f"a {type(value).__qualname__}")


def _safetensors_payload(obj: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata): tensors from ``obj["model"]`` if that is a dict, else from ``obj``;
    str values beside them become metadata. Tensors sharing memory are copied apart."""
    model = obj.get("model")
    nested = isinstance(model, dict)
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    storages: set[int] = set()
    for key, value in (model if nested else obj).items():
        key_path = f"model.{key}" if nested else str(key)
        if not isinstance(key, str):
            raise _Unstorable(key_path, f"a {type(key).__name__} key")
        if isinstance(value, np.ndarray):
            value = _leaf(value, key_path, "pth")
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().contiguous()
            if value.untyped_storage().data_ptr() in storages and value.numel() > 0:
                value = value.clone()
            storages.add(value.untyped_storage().data_ptr())
            tensors[key] = value
        elif not nested and isinstance(value, str):
            metadata[key] = value
        else:
            raise _Unstorable(key_path, f"a {type(value).__qualname__}")
    for key, value in obj.items() if nested else ():
        if key != "model":
            if not (isinstance(key, str) and isinstance(value, str)):
                what = f"a {type(value).__qualname__} (only str goes to metadata)"
                raise _Unstorable(str(key), what)
            metadata[key] = value
    return tensors, metadata


def _write_through(fd: int, serialize: Callable[[Any], None]) -> None:
    """``serialize(file)`` on ``fd``, then fsync; ``fd`` is closed whatever happens."""
    try:
        f = os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        serialize(f)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(payload, file_format: str, fd: int, temp_path: str) -> None:
    if file_format == "pth":
        _write_through(fd, lambda f: torch.save(payload, f))
    elif file_format == "pkl":
        _write_through(fd, lambda f: pickle.dump(payload, f, protocol=2))
    else:
        os.close(fd)  # safetensors writes by path
        tensors, metadata = payload
        safetensors.torch.save_file(tensors, temp_path, metadata=metadata or None)
        _fsync(temp_path)


def _umask() -> int:
    # /proc avoids os.umask()'s set-and-restore, which races with threads creating files.
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _replace_atomically(path: str, folder: str, write: Callable[[int, str], None]) -> None:
    """Write a temporary file in ``folder`` with ``write(fd, temp_path)`` (which owns ``fd``) and
    rename it onto ``path``; on any exception it is removed instead and ``path`` left untouched."""
    fd, temp_path = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.",
                                     suffix=".tmp")
    try:
        write(fd, temp_path)
        os.chmod(temp_path, 0o666 & ~_umask())  # mkstemp creates 0600
        os.replace(temp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_path)
        raise
    with contextlib.suppress(OSError):  # best effort: not every platform can open a directory
        _fsync(folder)  # makes the rename durable


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
    """Write the checkpoint dict ``obj`` to ``path``, whose folder must exist, atomically: the
    target is either untouched (whatever fails, KeyboardInterrupt too) or complete.

    Args:
        file_format: ``"pth"`` (``torch.save``; numpy values become tensors, so that the file
            loads with ``weights_only=True``), ``"pkl"`` (pickle protocol 2, tensors as numpy
            arrays: detectron2's model-zoo format) or ``"safetensors"`` (tensors from
            ``obj["model"]`` when that is a dict, else from ``obj``; other ``str`` values in
            ``obj`` go to the file's metadata).
        overwrite: replace an existing file (the CLI's ``--force``).

    Raises:
        CheckpointError: unknown ``file_format``; a value the format cannot hold back safely,
            found before anything is written; an existing output without ``overwrite``; a
            missing folder; a failed write.
    """
    path = os.fspath(path)
    if file_format not in SAVE_FORMATS:
        expected = ", ".join(SAVE_FORMATS)
        raise _error(path, f"unknown file_format {file_format!r} (expected one of {expected})")
    if not isinstance(obj, dict):
        raise _error(path, f"can only save a dict, got a {type(obj).__name__}")
    try:
        if file_format == "safetensors":
            payload = _safetensors_payload(obj)
        else:
            payload = _map_tree(obj, file_format)
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
        _replace_atomically(path, folder, functools.partial(_write, payload, file_format))
    except OSError as e:
        raise _error(path, f"cannot write: {e.strerror or _describe(e)}") from e
    except Exception as e:
        raise _error(path, f"cannot write as {file_format}: {_describe(e)}") from e
    logger.info("Saved %s checkpoint to %s.", file_format, path)
