"""Detectron / Caffe2 and detectron2 model-zoo ``.pkl`` files, read without running code: an
unpickler that only builds numpy arrays, dtypes, scalars and ``OrderedDict``
(``_PICKLE_GLOBALS``); anything else is an :class:`UnsafeCheckpointError`."""

from __future__ import annotations

import pickle
import re
from collections import OrderedDict
from typing import Any

import numpy as np

from .errors import CheckpointError, UnsafeCheckpointError, _describe, _error

__all__ = ["load_pickle"]


class _RefusedCall(Exception):
    """An allowed global called with arguments outside what checkpoints use."""


_LATIN1_NAMES = {"latin1", "latin-1", "latin_1", "iso-8859-1", "iso8859-1", "iso_8859_1", "l1"}


def _latin1_encode(text, encoding="utf-8", errors="strict"):
    # How Python 3 pickles ``bytes`` (numpy array data) at protocol 2; other codecs have no place
    # in a checkpoint. The name is compared, not looked up: a codec lookup may import modules.
    if not isinstance(text, str) or encoding.lower() not in _LATIN1_NAMES or errors != "strict":
        raise _RefusedCall(f"_codecs.encode({type(text).__name__}, {encoding!r}, {errors!r})")
    return text.encode("latin1")


# numpy's own unpickling trusts its input: a damaged .pkl can crash the process inside it (a
# segmentation fault from three flipped bytes). So the globals a pickle may name build checked
# stand-ins, and an array is made only from a plain dtype and a buffer of exactly its size.

_PLAIN_DTYPE = re.compile(r"[biufc]\d{1,2}")  # b1 i1..i8 u1..u8 f2..f8 c8 c16, no objects


class _NumpyArrayType:
    """What a pickle's ``numpy.ndarray`` stands for: only ``_reconstruct`` may use it."""


class _DtypeStub:
    """``numpy.dtype(spec, align, copy)`` of a plain numeric type; BUILD sets its byte order."""

    def __init__(self, spec, align=False, copy=False):
        if not (isinstance(spec, str) and _PLAIN_DTYPE.fullmatch(spec)):
            raise _RefusedCall(f"numpy.dtype({spec!r}): only plain numeric dtypes are allowed")
        self.dtype = np.dtype(spec)

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) >= 5 and state[1] in ("<", ">", "|", "=")
                and state[2:5] == (None, None, None)):
            raise ValueError(f"bad dtype state {state!r:.80}")
        if state[1] in "<>":
            self.dtype = self.dtype.newbyteorder(state[1])


def _raw_bytes(data, what: str) -> bytes:
    if isinstance(data, str):  # Python 2 str, decoded as latin1 by the unpickler
        data = data.encode("latin1")
    if not isinstance(data, bytes):
        raise ValueError(f"{what} data is a {type(data).__name__}, not bytes")
    return data


def _plain_dtype(value) -> np.dtype:
    if not isinstance(value, _DtypeStub):
        raise ValueError(f"array dtype is a {type(value).__name__}")
    return value.dtype


class _ArrayStub:
    """``numpy.core.multiarray._reconstruct(ndarray, ...)``; BUILD gives it shape, dtype, data."""

    array = None

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5):
            raise ValueError("bad array state")
        _, shape, dtype, fortran, data = state
        dtype, data = _plain_dtype(dtype), _raw_bytes(data, "array")
        if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)):
            raise ValueError(f"bad array shape {shape!r:.80}")
        if len(data) != int(np.prod(shape, dtype=np.float64)) * dtype.itemsize:
            raise ValueError(f"array of shape {shape} and dtype {dtype} with {len(data)} "
                             "bytes of data")
        flat = np.frombuffer(data, dtype=dtype) if data else np.empty(0, dtype)
        self.array = flat.reshape(shape, order="F" if fortran else "C").copy()


def _reconstruct(cls, shape, typecode):
    if cls is not _NumpyArrayType:
        raise _RefusedCall(f"numpy.core.multiarray._reconstruct({cls!r:.60}, ...)")
    return _ArrayStub()


def _scalar(dtype, data=None):
    dtype, data = _plain_dtype(dtype), _raw_bytes(data, "scalar")
    if len(data) != dtype.itemsize:
        raise ValueError(f"scalar of dtype {dtype} with {len(data)} bytes of data")
    return np.frombuffer(data, dtype=dtype)[0]


def _finish(obj):
    """Replace the stand-ins in what the unpickler built by numpy arrays and dtypes."""
    if isinstance(obj, _ArrayStub):
        if obj.array is None:
            raise ValueError("array without data")
        return obj.array
    if isinstance(obj, _DtypeStub):
        return obj.dtype
    if isinstance(obj, dict):
        return type(obj)((key, _finish(value)) for key, value in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_finish(value) for value in obj)
    return obj


_PICKLE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): _NumpyArrayType,
    ("numpy", "dtype"): _DtypeStub,
    ("collections", "OrderedDict"): OrderedDict,
    ("_codecs", "encode"): _latin1_encode,
    **{
        (f"{core}.multiarray", name): function
        for core in ("numpy.core", "numpy._core")  # numpy 1 and numpy 2 spellings
        for name, function in (("_reconstruct", _reconstruct), ("scalar", _scalar))
    },
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds only dict/list/tuple/str/numbers, numpy arrays, dtypes, scalars and OrderedDict."""

    def __init__(self, file, path: str):
        super().__init__(file, encoding="latin1")  # Detectron's py2 pickles: array data as str
        self._path = path

    def find_class(self, module: str, name: str):
        try:
            return _PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise _error(
                self._path,
                f"refused to load global '{module}.{name}': a .pkl checkpoint may only hold numpy "
                "arrays, numbers, strings and containers",
                UnsafeCheckpointError,
            ) from None


def load_pickle(path: str):
    """The object a ``.pkl`` file holds (numpy arrays stay numpy arrays)."""
    try:
        with open(path, "rb") as f:
            return _finish(_RestrictedUnpickler(f, path).load())
    except CheckpointError:
        raise
    except _RefusedCall as e:
        raise _error(path, f"refused to call {e}", UnsafeCheckpointError) from None
    except (EOFError, pickle.UnpicklingError) as e:
        raise _error(path, f"truncated or corrupt pickle ({_describe(e)})") from None
    except OSError as e:
        raise _error(path, f"cannot read: {e.strerror or e}") from None
    except Exception as e:  # numpy/pickle raise many types on malformed data
        raise _error(path, f"corrupt pickle ({type(e).__name__}: {_describe(e)})") from None
