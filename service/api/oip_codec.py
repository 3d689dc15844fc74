"""Tensors of the Open Inference Protocol v2 (KServe, Triton), with no knowledge of HTTP.

``decode_infer_request`` / ``encode_infer_response`` read and write the
protocol's inference messages: a JSON document whose tensors carry their
elements in row-major ``data``, or, with the binary tensor data extension, a
JSON header followed by the raw little-endian bytes of each tensor, the
header's length travelling beside the message (``Inference-Header-Content-Length``
in HTTP). :func:`feeds_for_model` checks decoded tensors against a model
card, and :func:`tensor_metadata` describes a card's tensors as the
protocol's model metadata does.

Protocol: https://github.com/kserve/open-inference-protocol (REST, v2) and
Triton's ``binary_tensor_data`` extension.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.contract.cards import ModelCard
from service.errors import InvalidRequestError

#: Protocol datatype of each numpy dtype name the cards use, and back.
DATATYPE_BY_DTYPE: dict[str, str] = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
}
DTYPE_BY_DATATYPE: dict[str, str] = {v: k for k, v in DATATYPE_BY_DTYPE.items()}
#: Request and output parameters of the binary tensor data extension.
BINARY_DATA_SIZE = "binary_data_size"
BINARY_DATA = "binary_data"
BINARY_DATA_OUTPUT = "binary_data_output"


class _TensorModel(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    shape: list[int] = Field(description="Dimensions; every one non-negative.")
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: Any = None


class _RequestedOutputModel(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class _InferRequestModel(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[_TensorModel] = Field(min_length=1)
    outputs: list[_RequestedOutputModel] | None = None


@dataclass(frozen=True)
class RequestedOutput:
    """An output the client asked for, and whether it wants it as binary data."""

    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    """A decoded inference request: its tensors as numpy arrays of their declared shapes."""

    id: str | None
    parameters: dict[str, Any]
    inputs: dict[str, NDArray[Any]]
    outputs: list[RequestedOutput] | None
    """None: every output, binary when the request's ``binary_data_output`` says so."""
    binary_output: bool = False
    """The request's ``binary_data_output`` parameter: the default for unnamed outputs."""


@dataclass(frozen=True)
class InferResponse:
    """An encoded response: the bytes, and the JSON header's length when binary data follows."""

    body: bytes
    header_length: int | None = None


def decode_infer_request(header: bytes, binary: bytes = b"") -> InferRequest:
    """Decode an inference request: JSON tensors, or a header followed by binary tensors.

    Parameters
    ----------
    header : bytes
        The JSON document (the whole body without the binary extension).
    binary : bytes
        The bytes after the header, holding each input that declares a
        ``binary_data_size`` parameter, in the order of ``inputs``.

    Raises
    ------
    InvalidRequestError
        Not JSON, not an inference request, a datatype the service does not
        read, or elements that do not fill the declared shape.
    """
    try:
        document = json.loads(header)
        request = _InferRequestModel.model_validate(document)
    except (ValueError, ValidationError) as exc:
        raise InvalidRequestError(f"the body is not an inference request: {exc}") from exc
    names = [tensor.name for tensor in request.inputs]
    if len(set(names)) != len(names):
        raise InvalidRequestError(f"got inputs {names}; each input may appear once")
    inputs: dict[str, NDArray[Any]] = {}
    offset = 0
    for tensor in request.inputs:
        inputs[tensor.name], offset = _decode_tensor(tensor, binary, offset)
    if offset != len(binary):
        raise InvalidRequestError(
            f"got {len(binary)} bytes of binary tensor data; the inputs declare {offset}"
        )
    binary_output = bool(request.parameters.get(BINARY_DATA_OUTPUT, False))
    outputs = None
    if request.outputs is not None:
        outputs = [
            RequestedOutput(o.name, bool(o.parameters.get(BINARY_DATA, binary_output)))
            for o in request.outputs
        ]
    return InferRequest(request.id, request.parameters, inputs, outputs, binary_output)


def _decode_tensor(tensor: _TensorModel, binary: bytes, offset: int) -> tuple[NDArray[Any], int]:
    """One input as an array of its shape, and the offset after its binary bytes."""
    dtype_name = DTYPE_BY_DATATYPE.get(tensor.datatype)
    if dtype_name is None:
        raise InvalidRequestError(
            f"input {tensor.name!r} has datatype {tensor.datatype!r}; accepted: "
            f"{', '.join(DTYPE_BY_DATATYPE)}"
        )
    if any(dim < 0 for dim in tensor.shape):
        raise InvalidRequestError(f"input {tensor.name!r} has shape {tensor.shape}")
    dtype = np.dtype(dtype_name).newbyteorder("<")
    count = math.prod(tensor.shape)
    size = tensor.parameters.get(BINARY_DATA_SIZE)
    if size is not None:
        if not isinstance(size, int) or size != count * dtype.itemsize:
            raise InvalidRequestError(
                f"input {tensor.name!r} declares {size} bytes; shape {tensor.shape} of "
                f"{tensor.datatype} takes {count * dtype.itemsize}"
            )
        if offset + size > len(binary):
            raise InvalidRequestError(f"the binary data ends inside input {tensor.name!r}")
        flat = np.frombuffer(binary, dtype=dtype, count=count, offset=offset)
        return flat.astype(dtype.newbyteorder("="), copy=True).reshape(tensor.shape), offset + size
    if tensor.data is None:
        raise InvalidRequestError(f"input {tensor.name!r} has neither data nor binary data")
    try:
        # Row-major elements, flat or nested, as the protocol allows.
        flat = np.asarray(tensor.data, dtype=dtype_name).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(
            f"input {tensor.name!r}: data are not {tensor.datatype} elements ({exc})"
        ) from exc
    if flat.size != count:
        raise InvalidRequestError(
            f"input {tensor.name!r} has {flat.size} elements; shape {tensor.shape} needs {count}"
        )
    return flat.reshape(tensor.shape), offset


def feeds_for_model(
    card: ModelCard, inputs: Mapping[str, NDArray[Any]], *, defaults: Mapping[str, NDArray[Any]]
) -> dict[str, NDArray[Any]]:
    """The onnxruntime feeds of a request, checked against the model's card.

    Parameters
    ----------
    card : ModelCard
        The model's card: its image input and extra inputs.
    inputs : mapping of str to ndarray
        The request's decoded inputs.
    defaults : mapping of str to ndarray
        Values of extra inputs a request may leave out (e.g. ``num_samples``).

    Raises
    ------
    InvalidRequestError
        An unknown or missing input, another datatype, or a shape the card
        does not accept (the batch axis is free; a scalar may come as [1]).
    """
    specs = {card.input.name: (card.input.shape, card.input.dtype)}
    specs.update({extra.name: (extra.shape, extra.dtype) for extra in card.extra_inputs})
    unknown = sorted(set(inputs) - set(specs))
    if unknown:
        raise InvalidRequestError(
            f"model {card.name!r} has no input {unknown}; its inputs: {sorted(specs)}"
        )
    feeds: dict[str, NDArray[Any]] = {}
    for name, (shape, dtype) in specs.items():
        value = inputs.get(name, defaults.get(name))
        if value is None:
            raise InvalidRequestError(f"model {card.name!r} needs input {name!r}")
        if value.dtype != np.dtype(dtype):
            raise InvalidRequestError(
                f"input {name!r} is {DATATYPE_BY_DTYPE.get(value.dtype.name, value.dtype.name)}; "
                f"model {card.name!r} takes {DATATYPE_BY_DTYPE.get(dtype, dtype)}"
            )
        feeds[name] = _fit_shape(card.name, name, value, shape)
    return feeds


def _fit_shape(
    model: str, name: str, value: NDArray[Any], shape: Sequence[int | None]
) -> NDArray[Any]:
    if not shape:
        if value.size != 1:
            raise InvalidRequestError(f"input {name!r} of model {model!r} is a scalar, shape []")
        return value.reshape(())
    fits = len(value.shape) == len(shape) and all(
        want is None or want == got for want, got in zip(shape, value.shape, strict=True)
    )
    if not fits or value.shape[0] == 0:
        wanted = [-1 if dim is None else dim for dim in shape]
        raise InvalidRequestError(
            f"input {name!r} of model {model!r} has shape {list(value.shape)}; it takes "
            f"{wanted} (-1: any size, at least 1)"
        )
    return np.ascontiguousarray(value)


def tensor_metadata(card: ModelCard) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The protocol's metadata of a card's inputs and outputs: name, datatype, shape (-1: free)."""

    def describe(name: str, dtype: str, shape: Sequence[int | None]) -> dict[str, Any]:
        return {
            "name": name,
            "datatype": DATATYPE_BY_DTYPE.get(dtype, dtype.upper()),
            "shape": [-1 if dim is None else dim for dim in shape],
        }

    inputs = [describe(card.input.name, card.input.dtype, card.input.shape)]
    inputs += [describe(e.name, e.dtype, e.shape) for e in card.extra_inputs]
    outputs = [describe(o.name, o.dtype, o.shape) for o in card.outputs]
    return inputs, outputs


def encode_infer_response(
    request: InferRequest,
    *,
    model_name: str,
    model_version: str,
    outputs: Mapping[str, NDArray[Any]],
) -> InferResponse:
    """Encode the outputs a request asked for, as JSON data or as binary tensor data.

    Raises
    ------
    InvalidRequestError
        The request names an output the model does not have.
    """
    wanted = request.outputs or [RequestedOutput(n, request.binary_output) for n in outputs]
    unknown = sorted({o.name for o in wanted} - set(outputs))
    if unknown:
        raise InvalidRequestError(
            f"model {model_name!r} has no output {unknown}; its outputs: {sorted(outputs)}"
        )
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for requested in wanted:
        value = np.ascontiguousarray(outputs[requested.name])
        datatype = DATATYPE_BY_DTYPE[value.dtype.name]
        tensor: dict[str, Any] = {
            "name": requested.name,
            "datatype": datatype,
            "shape": list(value.shape),
        }
        if requested.binary:
            blob = value.astype(value.dtype.newbyteorder("<"), copy=False).tobytes()
            tensor["parameters"] = {BINARY_DATA_SIZE: len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = value.reshape(-1).tolist()
        tensors.append(tensor)
    document: dict[str, Any] = {
        "model_name": model_name,
        "model_version": model_version,
        "outputs": tensors,
    }
    if request.id is not None:
        document["id"] = request.id
    header = json.dumps(document, separators=(",", ":")).encode()
    if not blobs:
        return InferResponse(header)
    return InferResponse(header + b"".join(blobs), header_length=len(header))
