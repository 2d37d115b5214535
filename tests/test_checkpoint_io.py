"""Tests for gn_det/checkpoint/io.py: format detection, safe loading, atomic saving.

Files are written with the libraries themselves (``pickle``, ``torch.save``, safetensors) or by hand
(the Python 2 pickle), not with the code under test, wherever the test is about reading.
"""

import builtins
import errno
import os
import pickle
import struct
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import safetensors.torch
import torch

from gn_det.checkpoint.io import (
    CheckpointError,
    UnsafeCheckpointError,
    detect_format,
    load_checkpoint_file,
    load_safetensors_metadata,
    save_checkpoint_file,
)

FORMATS = ["pth", "pkl", "safetensors"]
DETECTED = {"pth": "torch", "pkl": "pickle", "safetensors": "safetensors"}


def _state_dict():
    return OrderedDict(
        [
            ("backbone.conv1.weight", torch.randn(4, 3, 3, 3)),
            ("backbone.conv1.norm.bias", torch.randn(4)),
            ("roi_heads.box_predictor.bbox_pred.weight", torch.randn(8, 4, dtype=torch.float64)),
            ("pixel_count", torch.tensor([7, 9], dtype=torch.int64)),
        ]
    )


def _checkpoint(file_format):
    """A detectron2 model-zoo style checkpoint; safetensors metadata only takes str values."""
    checkpoint = {"model": _state_dict(), "__author__": "gn_det"}
    if file_format != "safetensors":
        checkpoint["matching_heuristics"] = True
    return checkpoint


def _assert_one_line_about(error, path):
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")


def _files(folder):
    return sorted(os.listdir(folder))


# ---------------------------------------------------------------------------------------------
# Format detection


def test_detect_format_reads_content_not_extension(tmp_path):
    pkl_named_pth = tmp_path / "model.pth"
    with open(pkl_named_pth, "wb") as f:
        pickle.dump({"model": {"w": np.ones(3, dtype=np.float32)}}, f, protocol=2)
    pth_named_pkl = tmp_path / "model.pkl"
    torch.save({"model": {"w": torch.ones(3)}}, pth_named_pkl)
    legacy_torch = tmp_path / "legacy.pkl"
    torch.save({"w": torch.ones(3)}, legacy_torch, _use_new_zipfile_serialization=False)
    safetensors_named_bin = tmp_path / "model.bin"
    safetensors.torch.save_file({"w": torch.ones(3)}, safetensors_named_bin)

    assert detect_format(pkl_named_pth) == "pickle"
    assert detect_format(str(pth_named_pkl)) == "torch"
    assert detect_format(legacy_torch) == "torch"
    assert detect_format(safetensors_named_bin) == "safetensors"
    np.testing.assert_array_equal(load_checkpoint_file(pkl_named_pth)["model"]["w"], np.ones(3))
    assert torch.equal(load_checkpoint_file(pth_named_pkl)["model"]["w"], torch.ones(3))
    assert torch.equal(load_checkpoint_file(legacy_torch)["w"], torch.ones(3))
    assert torch.equal(load_checkpoint_file(safetensors_named_bin)["w"], torch.ones(3))


@pytest.mark.parametrize("protocol", [0, 1, 2, 4, 5])
def test_pickles_of_every_protocol_are_detected_and_load(tmp_path, protocol):
    path = tmp_path / "plain.pkl"
    stored = OrderedDict([("iteration", 12), ("name", "R-50"), ("lr", [0.1, 0.01])])
    path.write_bytes(pickle.dumps(stored, protocol=protocol))
    assert detect_format(path) == "pickle"
    assert load_checkpoint_file(path) == stored


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"", "empty file"),
        (b"MODEL: {WEIGHTS: x}\n", "unknown checkpoint format"),
        (b"\x93NUMPY\x01\x00", "unknown checkpoint format"),
    ],
)
def test_unknown_or_empty_files_are_refused(tmp_path, content, problem):
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=problem) as error:
        detect_format(path)
    _assert_one_line_about(error, path)


def test_a_zip_that_is_not_a_torch_checkpoint_is_refused(tmp_path):
    path = tmp_path / "arrays.pth"
    np.savez(tmp_path / "arrays.npz", w=np.ones(2))
    os.replace(tmp_path / "arrays.npz", path)
    with pytest.raises(CheckpointError, match="not a torch.save checkpoint") as error:
        load_checkpoint_file(path)
    _assert_one_line_about(error, path)


def test_missing_file_and_directory_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such file") as error:
        load_checkpoint_file(tmp_path / "missing.pth")
    _assert_one_line_about(error, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="is a directory") as error:
        load_checkpoint_file(tmp_path)
    _assert_one_line_about(error, tmp_path)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"w": torch.ones(1)}, path)
    path.chmod(0)
    with pytest.raises(CheckpointError, match="permission denied") as error:
        load_checkpoint_file(path)
    _assert_one_line_about(error, path)


def test_top_level_must_be_a_dict(tmp_path):
    path = tmp_path / "list.pkl"
    path.write_bytes(pickle.dumps([np.ones(2)], protocol=2))
    with pytest.raises(CheckpointError, match="holds a list, expected a dict") as error:
        load_checkpoint_file(path)
    _assert_one_line_about(error, path)


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("file_format", FORMATS)
def test_round_trip(tmp_path, file_format):
    checkpoint = _checkpoint(file_format)
    path = tmp_path / f"model.{file_format}"
    save_checkpoint_file(checkpoint, path, file_format=file_format)

    assert detect_format(path) == DETECTED[file_format]
    loaded = load_checkpoint_file(path)
    if file_format == "safetensors":
        model = loaded
        assert load_safetensors_metadata(path) == {"__author__": "gn_det"}
    else:
        model = loaded["model"]
        assert loaded["__author__"] == "gn_det"
        assert loaded["matching_heuristics"] is True
    if file_format == "safetensors":  # safetensors orders tensors by itself
        assert sorted(model) == sorted(checkpoint["model"])
    else:
        assert list(model) == list(checkpoint["model"])
    for name, expected in checkpoint["model"].items():
        value = model[name]
        if file_format == "pkl":  # detectron2's model-zoo format holds numpy arrays
            assert isinstance(value, np.ndarray)
            value = torch.from_numpy(value)
        assert value.dtype == expected.dtype
        assert torch.equal(value, expected), name


def test_pkl_is_protocol_2_of_numpy_arrays_readable_by_plain_pickle(tmp_path):
    """detectron2 reads model-zoo files with pickle.load(f, encoding="latin1")."""
    checkpoint = _checkpoint("pkl")
    path = tmp_path / "model.pkl"
    save_checkpoint_file(checkpoint, path, file_format="pkl")
    data = path.read_bytes()
    assert data[:2] == b"\x80\x02"
    reference = pickle.loads(data, encoding="latin1")
    assert reference["matching_heuristics"] is True
    for name, expected in checkpoint["model"].items():
        np.testing.assert_array_equal(reference["model"][name], expected.numpy())


def test_pth_stores_numpy_arrays_as_tensors(tmp_path):
    path = tmp_path / "model.pth"
    save_checkpoint_file({"model": {"w": np.arange(3, dtype=np.float32)}}, path, file_format="pth")
    assert torch.equal(load_checkpoint_file(path)["model"]["w"], torch.arange(3.0))


def test_safetensors_takes_a_flat_state_dict_and_copies_shared_tensors(tmp_path):
    weight = torch.randn(3, 2)
    path = tmp_path / "model.safetensors"
    save_checkpoint_file(
        {"a.weight": weight, "tied.weight": weight, "note": "tied"}, path, file_format="safetensors"
    )
    loaded = load_checkpoint_file(path)
    assert set(loaded) == {"a.weight", "tied.weight"}
    assert torch.equal(loaded["a.weight"], weight) and torch.equal(loaded["tied.weight"], weight)
    assert load_safetensors_metadata(path) == {"note": "tied"}


def _py2_str(data: bytes) -> bytes:
    """A Python 2 ``str`` in a protocol-2 pickle (SHORT_BINSTRING / BINSTRING)."""
    if len(data) < 256:
        return b"U" + bytes([len(data)]) + data
    return b"T" + struct.pack("<I", len(data)) + data


def _py2_ndarray(array: np.ndarray) -> bytes:
    """``cPickle.dumps(array, 2)`` as Python 2 numpy writes it: raw data is a py2 str."""
    assert array.dtype.byteorder in "<=|" and array.flags.c_contiguous
    ints = b"".join(
        b"K" + bytes([n]) if n < 256 else b"M" + struct.pack("<H", n) for n in array.shape
    )
    dtype = (
        b"cnumpy\ndtype\n"
        + _py2_str(array.dtype.str[1:].encode())
        + b"\x89\x88\x87R"
        + b"(K\x03"
        + _py2_str(b"<")
        + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    )
    return (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85"
        + _py2_str(b"b")
        + b"\x87R"
        + b"(K\x01("
        + ints
        + b"t"
        + dtype
        + b"\x89"
        + _py2_str(array.tobytes())
        + b"tb"
    )


def test_detectron_py2_pickle_of_numpy_arrays_loads(tmp_path):
    blobs = {
        "conv1_w": np.array([[1.5, -2.25, 3e-5], [0.1, 7.0, -1e9]], dtype=np.float32),
        "res_conv1_bn_s": np.linspace(0, 1, 300).astype(np.float64),  # > 255 bytes: BINSTRING
        "fc1000_b": np.array([3, 200, 7], dtype=np.int32),
    }
    items = b"".join(_py2_str(name.encode()) + _py2_ndarray(a) for name, a in blobs.items())
    data = (
        b"\x80\x02}("
        + _py2_str(b"blobs")
        + b"}("
        + items
        + b"u"
        + _py2_str(b"cfg")
        + _py2_str(b"MODEL: {}")
        + b"u."
    )
    assert any(byte >= 0x80 for byte in blobs["conv1_w"].tobytes())  # needs latin1, not ASCII
    path = tmp_path / "R-50.pkl"
    path.write_bytes(data)
    reference = pickle.loads(data, encoding="latin1")  # the stream is valid for the stdlib too

    loaded = load_checkpoint_file(path)
    assert loaded["cfg"] == "MODEL: {}"
    assert set(loaded["blobs"]) == set(blobs)
    for name, expected in blobs.items():
        assert isinstance(loaded["blobs"][name], np.ndarray)
        assert loaded["blobs"][name].dtype == expected.dtype
        np.testing.assert_array_equal(loaded["blobs"][name], expected)
        np.testing.assert_array_equal(reference["blobs"][name], expected)


# ---------------------------------------------------------------------------------------------
# Code in files is never run


class _RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _OpensFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


def test_pickle_that_runs_a_command_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": _RunsCommand(f"touch {marker}")}}, protocol=2))
    with pytest.raises(UnsafeCheckpointError, match=f"{os.system.__module__}.system") as error:
        load_checkpoint_file(path)
    _assert_one_line_about(error, path)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_pickle_that_opens_a_file_is_refused(tmp_path, protocol):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"  # the name does not matter: detected as a pickle
    path.write_bytes(pickle.dumps({"model": _OpensFile(str(marker))}, protocol=protocol))
    with pytest.raises(UnsafeCheckpointError, match=f"{builtins.open.__module__}.open") as error:
        load_checkpoint_file(path)
    _assert_one_line_about(error, path)
    assert not marker.exists()


def test_pickle_calling_a_codec_other_than_latin1_is_refused(tmp_path):
    # _codecs.encode is allowed only for how Python 3 writes bytes into protocol-2 pickles.
    path = tmp_path / "codec.pkl"
    path.write_bytes(  # {"w": _codecs.encode("x", "rot13")}
        b"\x80\x02}(X\x01\x00\x00\x00wc_codecs\nencode\n"
        b"X\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86Ru."
    )
    with pytest.raises(UnsafeCheckpointError, match="rot13") as error:
        load_checkpoint_file(path)
    _assert_one_line_about(error, path)


def test_pth_that_runs_a_command_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(1)}, "extra": _RunsCommand(f"touch {marker}")}, path)
    with pytest.raises(UnsafeCheckpointError, match=f"{os.system.__module__}.system") as error:
        load_checkpoint_file(path)
    _assert_one_line_about(error, path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Truncated and corrupt files


def _truncate_half(data):
    return data[: len(data) // 2]


def _truncate_last_byte(data):
    return data[:-1]


def _corrupt_structure(data):
    """Damage bytes every format reads: a pickle opcode (a .pth's data.pkl too), the JSON header."""
    if data.startswith((b"PK", b"\x80")):
        opcode = data.index(b"\x80\x02") + 2
        return data[:opcode] + b"\xff" + data[opcode + 1 :]  # not a pickle opcode
    return data[:12] + b"\xff\xfe" + data[14:]  # inside the JSON header


@pytest.mark.parametrize("damage", [_truncate_half, _truncate_last_byte, _corrupt_structure])
@pytest.mark.parametrize("file_format", FORMATS)
def test_truncated_or_corrupt_files_are_checkpoint_errors(tmp_path, file_format, damage):
    path = tmp_path / f"model.{file_format}"
    save_checkpoint_file(_checkpoint(file_format), path, file_format=file_format)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint_file(path)
    assert not isinstance(error.value, UnsafeCheckpointError)
    _assert_one_line_about(error, path)


# ---------------------------------------------------------------------------------------------
# Saving: refusals, permissions, atomicity


@pytest.mark.parametrize("file_format", FORMATS)
def test_existing_output_is_kept_unless_overwrite(tmp_path, file_format):
    path = tmp_path / f"model.{file_format}"
    path.write_bytes(b"previous")
    with pytest.raises(CheckpointError, match="exists; pass --force to overwrite") as error:
        save_checkpoint_file(_checkpoint(file_format), path, file_format=file_format)
    _assert_one_line_about(error, path)
    assert path.read_bytes() == b"previous"

    save_checkpoint_file(_checkpoint(file_format), path, file_format=file_format, overwrite=True)
    assert detect_format(path) == DETECTED[file_format]
    assert _files(tmp_path) == [path.name]


def test_output_permissions_follow_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        save_checkpoint_file({"w": torch.ones(1)}, tmp_path / "model.pth", file_format="pth")
    finally:
        os.umask(previous)
    assert (tmp_path / "model.pth").stat().st_mode & 0o777 == 0o640


def test_missing_output_folder_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "no_such_folder" / "model.pth"
    with pytest.raises(CheckpointError, match="does not exist") as error:
        save_checkpoint_file({"w": torch.ones(1)}, path, file_format="pth")
    _assert_one_line_about(error, path)


@pytest.mark.parametrize(
    "checkpoint, file_format, problem",
    [
        ({"model": {"w": torch.ones(1)}, "matching_heuristics": True}, "safetensors", "bool"),
        ({"model": {"w": torch.ones(1)}, "step": 3}, "safetensors", "int"),
        ({"model": {"w": torch.ones(1, dtype=torch.bfloat16)}}, "pkl", "bfloat16"),
        ({"model": {"w": torch.ones(1)}, "cfg": object()}, "pkl", "object"),
        ({"model": {"w": torch.ones(1)}, "optimizer": torch.optim.SGD}, "pth", "type"),
        ({"model": {"w": torch.ones(1)}}, "onnx", "unknown file_format"),
    ],
)
def test_unstorable_values_are_refused_before_writing(tmp_path, checkpoint, file_format, problem):
    path = tmp_path / "model.out"
    with pytest.raises(CheckpointError, match=problem) as error:
        save_checkpoint_file(checkpoint, path, file_format=file_format)
    _assert_one_line_about(error, path)
    assert _files(tmp_path) == []


def _fail_midway(exception):
    """A serializer stand-in that writes part of a file, then raises ``exception``."""

    def write_part(*args, **kwargs):
        target = args[1]
        if isinstance(target, (str, os.PathLike)):  # safetensors writes by path
            with open(target, "wb") as f:
                f.write(b"\x00" * 4096)
        else:
            target.write(b"\x00" * 4096)
            target.flush()
        raise exception

    return write_part


def _patch_serializer(monkeypatch, file_format, replacement):
    if file_format == "pth":
        monkeypatch.setattr(torch, "save", replacement)
    elif file_format == "pkl":
        monkeypatch.setattr(pickle, "dump", replacement)
    else:
        monkeypatch.setattr(safetensors.torch, "save_file", replacement)


@pytest.mark.parametrize("file_format", FORMATS)
def test_interrupted_write_keeps_existing_target(tmp_path, monkeypatch, file_format):
    path = tmp_path / f"model.{file_format}"
    path.write_bytes(b"previous")
    _patch_serializer(monkeypatch, file_format, _fail_midway(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint_file(
            _checkpoint(file_format), path, file_format=file_format, overwrite=True
        )
    assert path.read_bytes() == b"previous"
    assert _files(tmp_path) == [path.name]  # no temporary file left


@pytest.mark.parametrize("file_format", FORMATS)
def test_failed_write_leaves_no_file(tmp_path, monkeypatch, file_format):
    path = tmp_path / f"model.{file_format}"
    disk_full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    _patch_serializer(monkeypatch, file_format, _fail_midway(disk_full))
    with pytest.raises(CheckpointError, match=os.strerror(errno.ENOSPC)) as error:
        save_checkpoint_file(_checkpoint(file_format), path, file_format=file_format)
    _assert_one_line_about(error, path)
    assert _files(tmp_path) == []


def test_zip_check_matches_torch_layout(tmp_path):
    """detect_format's torch check relies on torch.save writing '<archive>/data.pkl'."""
    path = tmp_path / "model.pth"
    torch.save({"w": torch.ones(1)}, path)
    with zipfile.ZipFile(path) as archive:
        assert any(name.endswith("/data.pkl") for name in archive.namelist())


# ---------------------------------------------------------------------------------------------
# Random damage: every file that cannot be read is a CheckpointError, never another exception


def _write_sources(folder):
    """One small file of each supported kind, written by the libraries themselves."""
    state = _state_dict()
    arrays = {k: v.numpy() for k, v in state.items()}
    files = {
        "detectron2.pth": lambda p: torch.save({"model": state, "iteration": 9}, p),
        "model_zoo.pkl": lambda p: p.write_bytes(
            pickle.dumps({"model": arrays, "__author__": "Detectron2 Model Zoo"}, protocol=2)
        ),
        "caffe2.pkl": lambda p: p.write_bytes(pickle.dumps({"blobs": arrays}, protocol=2)),
        "model.safetensors": lambda p: safetensors.torch.save_file(dict(state), str(p)),
    }
    sources = {}
    for name, write in files.items():
        write(folder / name)
        sources[name] = (folder / name).read_bytes()
    return sources


def _mutate(rng, data: bytes) -> bytes:
    """Flip, cut or insert bytes at random places (1-4 edits)."""
    data = bytearray(data)
    for _ in range(rng.integers(1, 5)):
        kind = rng.integers(3)
        at = int(rng.integers(len(data) + 1))
        if kind == 0 and at < len(data):
            data[at] ^= int(rng.integers(1, 256))
        elif kind == 1:
            data = data[:at] + data[at + int(rng.integers(1, 64)) :]
        else:
            data = (
                data[:at]
                + bytes(rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8))
                + data[at:]
            )
    return bytes(data)


def test_randomly_damaged_checkpoints_load_or_raise_checkpoint_error(tmp_path):
    from gn_det.checkpoint.weights import read_weights

    rng = np.random.default_rng(12)
    sources = _write_sources(tmp_path)
    outcomes = {"loaded": 0, "refused": 0}
    for case in range(400):
        name = list(sources)[case % len(sources)]
        path = tmp_path / f"case{case}_{name}"
        path.write_bytes(_mutate(rng, sources[name]))
        for read in (load_checkpoint_file, read_weights):
            try:
                read(path)
            except CheckpointError as e:
                assert "\n" not in str(e) and str(e).startswith(f"{path}: "), (name, str(e))
                outcomes["refused"] += 1
            else:
                outcomes["loaded"] += 1
        path.unlink()
    # Both outcomes occur: the mutations reach past the format checks into the payloads.
    assert outcomes["refused"] > 100 and outcomes["loaded"] > 0, outcomes
