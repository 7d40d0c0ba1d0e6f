"""Open Inference Protocol (KServe v2) tensors over HTTP: JSON and the binary tensor extension.

A request body is a JSON object, optionally followed by raw tensor bytes; the header
`Inference-Header-Content-Length` gives the JSON's length, and each input sent as bytes has
`parameters.binary_data_size` (little-endian, row-major, in the order of `inputs`). A response
is built the same way: outputs asked for as binary (`outputs[i].parameters.binary_data`, or the
request parameter `binary_data_output`) follow the JSON in the order of `outputs`.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from unetpp.core.errors import InvalidInput

DATATYPES: dict[str, np.dtype] = {
    name: np.dtype(code)
    for name, code in {
        "BOOL": "?",
        "UINT8": "<u1",
        "UINT16": "<u2",
        "UINT32": "<u4",
        "UINT64": "<u8",
        "INT8": "<i1",
        "INT16": "<i2",
        "INT32": "<i4",
        "INT64": "<i8",
        "FP16": "<f2",
        "FP32": "<f4",
        "FP64": "<f8",
    }.items()
}
HEADER_LENGTH = "Inference-Header-Content-Length"


class InvalidTensor(InvalidInput):
    """A v2 request body that does not follow the protocol (JSON, shapes, sizes, datatypes)."""

    status_code = 400
    error = "invalid_tensor"


@dataclass(frozen=True)
class Tensor:
    name: str
    array: np.ndarray


def datatype_of(array: np.ndarray) -> str:
    kind = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    for name, dtype in DATATYPES.items():
        if dtype == kind:
            return name
    raise TypeError(f"no v2 datatype for {array.dtype}")


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    ):
        raise InvalidTensor(f"{where}: 'shape' must be a list of non-negative integers")
    return tuple(value)


def parameters(spec: dict[str, Any], where: str) -> dict[str, Any]:
    """An input's or output's `parameters` object ({} when absent)."""
    value = spec.get("parameters") or {}
    if not isinstance(value, dict):
        raise InvalidTensor(f"{where}: 'parameters' must be an object")
    return value


def _decimal(text: str) -> bool:
    """ASCII digits only (`str.isdigit` also takes '١' and '²'), at most 20 of them."""
    return text.isascii() and text.isdigit() and len(text) <= 20


def _json(data: bytes) -> Any:
    """The JSON header; nesting deeper than the interpreter's recursion limit (about 1,000) and
    integers above 4,300 digits (`sys.get_int_max_str_digits`) are refused like bad JSON."""
    try:
        return json.loads(data)
    except RecursionError:
        raise InvalidTensor("the inference request's JSON is nested too deeply") from None
    except json.JSONDecodeError as exc:  # before ValueError, its base
        raise InvalidTensor(f"the inference request is not valid JSON: {exc}") from None
    except ValueError as exc:  # not UTF-8, or an integer too long to convert
        what = "UTF-8" if isinstance(exc, UnicodeDecodeError) else "an integer with too many digits"
        raise InvalidTensor(f"the inference request is not valid JSON: {what}") from None


def _distinct_outputs(asked: Any) -> None:
    """Each output asked for at most once: a repeated one would be computed and sent again."""
    if isinstance(asked, list):
        names = Counter(
            spec["name"]
            for spec in asked
            if isinstance(spec, dict) and isinstance(spec.get("name"), str)
        )
        repeated = [name[:40] for name, count in names.items() if count > 1]
        if repeated:
            raise InvalidTensor(
                f"outputs: {', '.join(map(repr, repeated[:3]))} asked for more than once"
            )


def parse_request(body: bytes, header_length: str | None) -> tuple[dict[str, Any], list[Tensor]]:
    """The request's JSON object and its input tensors (binary or JSON data)."""
    if header_length is None:
        length = len(body)
    elif _decimal(header_length) and 0 < int(header_length) <= len(body):
        length = int(header_length)
    else:
        raise InvalidTensor(
            f"{HEADER_LENGTH} must be the length of the JSON header, 1..{len(body)} bytes in "
            f"ASCII digits; got {header_length[:40]!r}"
        )
    header = _json(body[:length])
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise InvalidTensor("the inference request must be a JSON object with a list 'inputs'")
    _distinct_outputs(header.get("outputs"))
    binary = memoryview(body)[length:]
    offset = 0
    tensors = []
    for i, spec in enumerate(header["inputs"]):
        if not isinstance(spec, dict):
            raise InvalidTensor(f"inputs[{i}] must be an object")
        name = spec.get("name")
        where = f"input {name!r}" if isinstance(name, str) else f"inputs[{i}]"
        dtype = DATATYPES.get(spec.get("datatype"))  # type: ignore[arg-type]
        if dtype is None:
            raise InvalidTensor(
                f"{where}: datatype {spec.get('datatype')!r} is not one of {', '.join(DATATYPES)}"
            )
        shape = _shape(spec.get("shape"), where)
        count = math.prod(shape)
        size = parameters(spec, where).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size != count * dtype.itemsize:
                raise InvalidTensor(
                    f"{where}: binary_data_size {size!r} does not match shape {list(shape)} of "
                    f"{spec['datatype']} ({count * dtype.itemsize} bytes)"
                )
            if offset + size > len(binary):
                raise InvalidTensor(
                    f"{where}: {size} bytes of binary data announced, {len(binary) - offset} left"
                )
            array = np.frombuffer(binary, dtype, count, offset)
            offset += size
        elif "data" in spec:
            try:
                array = np.asarray(spec["data"], dtype=dtype).reshape(-1)
            except (ValueError, TypeError, OverflowError) as exc:
                raise InvalidTensor(f"{where}: 'data' is not {spec['datatype']} numbers") from exc
            if array.size != count:
                raise InvalidTensor(
                    f"{where}: {array.size} values for shape {list(shape)} ({count} values)"
                )
        else:
            raise InvalidTensor(f"{where}: neither 'data' nor parameters.binary_data_size")
        tensors.append(Tensor(name if isinstance(name, str) else "", array.reshape(shape)))
    if offset != len(binary):
        raise InvalidTensor(f"{len(binary) - offset} bytes of binary data belong to no input")
    return header, tensors


def encode_response(
    body: dict[str, Any], outputs: list[tuple[Tensor, bool]]
) -> tuple[bytes, int | None]:
    """The response bytes and, when some output is binary, the JSON header's length."""
    chunks = []
    body = {**body, "outputs": []}
    for tensor, binary in outputs:
        array = tensor.array
        out: dict[str, Any] = {
            "name": tensor.name,
            "datatype": datatype_of(array),
            "shape": list(array.shape),
        }
        if binary:
            raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            out["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            out["data"] = array.reshape(-1).tolist()
        body["outputs"].append(out)
    header = json.dumps(body, separators=(",", ":")).encode()
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)
