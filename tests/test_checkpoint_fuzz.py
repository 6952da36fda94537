"""Damaged safetensors headers: each problem named with the file, and a fuzzer over ~600 mutations of a tiny valid
file (fields removed or replaced, absurd shapes, offsets out of the file or overlapping, bytes cut or flipped) that
lets nothing but a CheckpointError naming the file escape the reader."""
import json
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from flux_core.checkpoint import CheckpointError, load_safetensors

NAME = "fuzzed.safetensors"


def valid_file(path) -> tuple[dict, bytes]:
    """A tiny valid file's header (without __metadata__) and the bytes of its tensor data."""
    tensors = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(4, dtype=torch.bfloat16),
               "c": torch.arange(3, dtype=torch.int8), "empty": torch.zeros(0, 2)}  # fmt: skip
    save_file(tensors, str(path), metadata={"format": "pt"})
    blob = path.read_bytes()
    header_len = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8 : 8 + header_len])
    header.pop("__metadata__")
    return header, blob[8 + header_len :]


def file_bytes(header, data: bytes) -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw)) + raw + data


def test_the_valid_file_loads_unchanged(tmp_path):
    header, data = valid_file(tmp_path / NAME)
    (tmp_path / NAME).write_bytes(file_bytes(header, data))
    tensors = load_safetensors(tmp_path / NAME)
    assert tensors["a"].tolist() == [[0, 1, 2], [3, 4, 5]] and tensors["empty"].shape == (0, 2)


def _set(key, field, value):
    def change(header):
        header[key][field] = value

    return change


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda h: h["a"].pop("dtype"), r"damaged header \(tensor 'a': no dtype\)"),
        (_set("a", "shape", "2x3"), r"tensor 'a': shape 2x3 is not a list of sizes"),
        (_set("a", "shape", [1000000000000]), r"tensor 'a': shape \[1000000000000\] of F32 needs 4000000000000 bytes, not 24"),
        (_set("a", "data_offsets", [24, 0]), r"tensor 'a': data_offsets \[24, 0\] is not a \[begin, end\] byte range"),
        (_set("b", "data_offsets", [20, 28]), r"tensor 'b': its data overlaps the tensor before it"),
        (_set("b", "data_offsets", [28, 36]), r"tensor 'b': a gap before its data"),
        (lambda h: h.update(z={"dtype": "F32", "shape": [250], "data_offsets": [35, 1035]}), r"is truncated: its tensors need"),
        (_set("a", "dtype", "F4"), "tensor a has unsupported dtype F4"),
        (lambda h: h.update(a=[1, 2]), r"tensor 'a': no dtype"),
    ],
)  # fmt: skip
def test_damaged_headers_are_named(tmp_path, change, message):
    header, data = valid_file(tmp_path / NAME)
    change(header)
    (tmp_path / NAME).write_bytes(file_bytes(header, data))
    with pytest.raises(CheckpointError, match=f"{NAME}.*{message}"):
        load_safetensors(tmp_path / NAME)


def test_numbers_json_cannot_read_are_named(tmp_path):
    header, data = valid_file(tmp_path / NAME)
    raw = json.dumps(header).replace("[2, 3]", "[" + "9" * 5000 + "]").encode()  # over Python's int digit limit
    (tmp_path / NAME).write_bytes(file_bytes(raw, data))
    with pytest.raises(CheckpointError, match=f"{NAME} is not a safetensors file \\(unreadable header"):
        load_safetensors(tmp_path / NAME)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
fields = st.sampled_from(["dtype", "shape", "data_offsets"])
offsets = st.lists(st.integers(-4, 80), min_size=2, max_size=2)


@st.composite
def mutated_files(draw, header: dict, data: bytes) -> bytes:
    header = json.loads(json.dumps(header))
    key = draw(st.sampled_from(sorted(header)))
    kind = draw(st.sampled_from(["field", "drop field", "entry", "offsets", "shape", "bytes", "cut", "length"]))
    if kind == "field":
        header[key][draw(fields)] = draw(json_values)
    elif kind == "drop field":
        del header[key][draw(fields)]
    elif kind == "entry":
        header[draw(st.sampled_from([key, "new"]))] = draw(json_values)
    elif kind == "offsets":
        header[key]["data_offsets"] = draw(offsets)
    elif kind == "shape":
        header[key]["shape"] = draw(st.lists(st.integers(0, 10**13), max_size=4))
    blob = file_bytes(header, data)
    if kind == "bytes":  # within the header
        position = draw(st.integers(8, 8 + len(blob) - len(data) - 1))
        blob = blob[:position] + bytes([draw(st.integers(0, 255))]) + blob[position + 1 :]
    elif kind == "cut":
        blob = blob[: draw(st.integers(0, len(blob) - 1))]
    elif kind == "length":
        blob = struct.pack("<Q", draw(st.integers(0, 2**64 - 1) | st.integers(0, len(blob)))) + blob[8:]
    return blob


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    return valid_file(tmp_path_factory.mktemp("fuzz") / NAME)


@given(data=st.data())
@settings(max_examples=600, deadline=None, derandomize=True, database=None)
def test_fuzzed_headers_raise_only_named_checkpoint_errors(valid, tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / NAME
    path.write_bytes(data.draw(mutated_files(*valid)))
    try:
        tensors = load_safetensors(path)
    except CheckpointError as e:
        assert NAME in str(e)
    else:
        for tensor in tensors.values():
            tensor.clone()  # every tensor a loader accepts is readable, inside the file
