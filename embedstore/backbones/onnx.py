"""ONNX backbones run with onnxruntime.

Classification graphs end in logits; the embedding is the globally pooled tensor before the
classifier. At load time the graph is inspected (in memory, nothing is written): the last
``GlobalAveragePool`` / ``QLinearGlobalAveragePool`` node is found, the ``Flatten`` /
``Reshape`` / ``Squeeze`` that consumes it is followed, and that tensor is added as an extra
graph output. In int8 graphs it is quantised (``QLinear*`` output with a scale and zero point):
it is dequantised to float32 as ``(q - zero_point) * scale``. A spec may instead name the tensor
with ``kwargs={"output": NAME}`` (float tensors only).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import BackboneError, WeightsNotFoundError
from ._weights import file_sha256
from .backbone import Backbone
from .spec import BackboneSpec

__all__ = ["PooledOutput", "OnnxBackbone", "find_pooled_output", "expose_output",
           "resolve_onnx_path", "probe_onnx", "dequantise"]

_POOLS = ("GlobalAveragePool", "QLinearGlobalAveragePool")
_SHAPE_OPS = ("Flatten", "Reshape", "Squeeze")
_MODEL_DIR_ENV = "EMBEDSTORE_MODEL_DIR"


@dataclasses.dataclass(frozen=True)
class PooledOutput:
    """The graph tensor used as the embedding and how to turn it into float32."""

    name: str                 # tensor name in the graph
    elem_type: int            # onnx.TensorProto element type of that tensor
    scale: float | None       # dequantisation scale; None for a float tensor
    zero_point: int | None    # dequantisation zero point; None for a float tensor


def find_pooled_output(model: Any, output: str | None = None) -> PooledOutput:
    """Locate the pooled embedding tensor of an ONNX `model` (an ``onnx.ModelProto``)."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    if output is not None:
        return PooledOutput(output, onnx.TensorProto.FLOAT, None, None)
    pools = [n for n in graph.node if n.op_type in _POOLS]
    if not pools:
        raise BackboneError("no GlobalAveragePool node in the ONNX graph; register a spec with "
                            "kwargs={'output': TENSOR_NAME} naming the embedding tensor")
    pool = pools[-1]  # graph nodes are topologically sorted: the last pool feeds the head
    name = pool.output[0]
    for node in graph.node:
        if node.op_type in _SHAPE_OPS and node.input and node.input[0] == name:
            name = node.output[0]
            break
    if pool.op_type == "GlobalAveragePool":
        return PooledOutput(name, onnx.TensorProto.FLOAT, None, None)
    inits = {t.name: t for t in graph.initializer}
    scale_name, zp_name = pool.input[3], pool.input[4]  # y_scale, y_zero_point
    if scale_name not in inits or zp_name not in inits:
        raise BackboneError(f"quantised pool {pool.name!r} has no constant output scale/zero point")
    scale = numpy_helper.to_array(inits[scale_name])
    zero_point = numpy_helper.to_array(inits[zp_name])
    if scale.size != 1 or zero_point.size != 1:
        raise BackboneError(f"quantised pool {pool.name!r} has per-channel output quantisation")
    return PooledOutput(name, inits[zp_name].data_type, float(scale.reshape(())),
                        int(zero_point.reshape(())))


def expose_output(model: Any, pooled: PooledOutput) -> Any:
    """A copy of `model` with `pooled` added as a graph output (shape left to onnxruntime)."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    if pooled.name not in {o.name for o in out.graph.output}:
        out.graph.output.append(onnx.helper.make_tensor_value_info(pooled.name, pooled.elem_type, None))
    return out


def dequantise(q: np.ndarray, pooled: PooledOutput) -> np.ndarray:
    """``q: (n, ...)`` graph output -> ``(n, dim) float32``."""
    x = q.reshape(q.shape[0], -1)
    if pooled.scale is None or pooled.zero_point is None:
        return x.astype(np.float32, copy=False)
    return ((x.astype(np.float32) - np.float32(pooled.zero_point)) * np.float32(pooled.scale))


def resolve_onnx_path(spec: BackboneSpec, weights: str | os.PathLike[str] | None = None) -> Path:
    """``weights`` > ``spec.model_id`` as a path > $EMBEDSTORE_MODEL_DIR > shipped sample_data/models."""
    if weights is not None:
        candidates = [Path(weights).expanduser()]
    else:
        candidates = [Path(spec.model_id).expanduser()]
        if os.environ.get(_MODEL_DIR_ENV):
            candidates.append(Path(os.environ[_MODEL_DIR_ENV]).expanduser() / spec.model_id)
        candidates.append(Path(__file__).resolve().parents[2] / "sample_data" / "models" / spec.model_id)
    for path in candidates:
        if path.is_file():
            return path
    raise WeightsNotFoundError(f"ONNX model {spec.model_id} for backbone {spec.name!r} not found "
                               f"(looked in {', '.join(str(c) for c in candidates)}); pass "
                               f"weights=FILE (CLI --weights FILE) or set {_MODEL_DIR_ENV}")


def _session(model: Any, device: torch.device, num_threads: int | None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    # spinning worker threads steal the cores DataLoader workers decode on (measured: ~35%
    # slower end to end on 2 cores with the default)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # an explicit count, torch's when not given: left at 0, onnxruntime pins its threads to
    # cores, which then cannot make room for decoding (measured on 2 cores: end to end 4-7%
    # slower than an explicit count of the same size) and ignores a taskset/cgroup CPU mask
    options.intra_op_num_threads = int(num_threads) if num_threads else torch.get_num_threads()
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackboneError("onnxruntime has no CUDAExecutionProvider here; install "
                                "onnxruntime-gpu or use device='cpu'")
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=providers)


def _load_graph(path: Path, output: str | None) -> tuple[Any, PooledOutput]:
    import onnx

    try:
        model = onnx.load(str(path))
    except Exception as exc:   # noqa: BLE001  (protobuf's DecodeError, onnx's own checks)
        raise BackboneError(f"{path} is not a readable ONNX model ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:200]}); pass an exported .onnx file") from None
    pooled = find_pooled_output(model, output)
    return expose_output(model, pooled), pooled


def probe_onnx(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(input_size, dim)`` of an ONNX classifier file: static input side and pooled width."""
    model, pooled = _load_graph(Path(path), None)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    size = dims[-1].dim_value if len(dims) == 4 and dims[-1].dim_value > 0 else 224
    session = _session(model, torch.device("cpu"), 1)
    x = np.zeros((1, 3, size, size), dtype=np.float32)
    q = session.run([pooled.name], {session.get_inputs()[0].name: x})[0]
    return int(size), int(np.prod(q.shape[1:]))


class OnnxBackbone(Backbone):
    """An onnxruntime session returning the dequantised pooled tensor (see module docstring)."""

    input_format = torch.contiguous_format     # onnxruntime takes NCHW float32 as it lies

    def __init__(self, spec: BackboneSpec, *, weights: str | os.PathLike[str] | None = None,
                 device: str | torch.device = "cpu", num_threads: int | None = None) -> None:
        self.path = resolve_onnx_path(spec, weights)
        super().__init__(spec, file_sha256(self.path), torch.device(device))
        output = spec.model_kwargs.get("output")
        self.graph, self.pooled = _load_graph(self.path, output)
        self.num_threads = num_threads
        self.to(self._device)

    def to(self, device: str | torch.device) -> OnnxBackbone:
        self._device = torch.device(device)
        self.session = _session(self.graph, self._device, self.num_threads)
        self.input_name: str = self.session.get_inputs()[0].name
        return self

    def run(self, x: torch.Tensor, names: list[str]) -> list[np.ndarray]:
        """Raw graph outputs `names` for a preprocessed ``x: (n, 3, S, S) float32``."""
        arr = np.ascontiguousarray(x.detach().contiguous().cpu().numpy(), dtype=np.float32)
        outputs: list[np.ndarray] = self.session.run(names, {self.input_name: arr})
        return outputs

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        q = self.run(x, [self.pooled.name])[0]
        return torch.from_numpy(dequantise(q, self.pooled))
