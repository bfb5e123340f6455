"""Static check that a graph stays inside what TensorRT's ONNX parser accepts.

Runs on CPU (no TensorRT needed), so CI catches a graph change that would break
`onsight build --backend tensorrt` on a Jetson or GPU server.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper

# Ops of onnx-tensorrt's support matrix that our graphs may use (TensorRT 10).
TRT_SUPPORTED_OPS = frozenset(
    """Abs Add And ArgMax ArgMin Cast Ceil Clip Concat Constant ConstantOfShape Conv Cos CumSum Div
    DequantizeLinear QuantizeLinear
    Einsum Equal Erf Exp Expand Flatten Floor Gather GatherElements GatherND Gelu Gemm Greater
    GreaterOrEqual Identity LayerNormalization Less LessOrEqual Log MatMul Max Mean Min Mod Mul Neg
    Not Or Pow Range Reciprocal ReduceL2 ReduceMax ReduceMean ReduceMin ReduceSum Relu Reshape
    ScatterElements ScatterND Shape Sigmoid Sin Slice Softmax Split Sqrt Squeeze Sub Tanh Tile TopK
    Transpose Trilu Unsqueeze Where Xor""".split()
)
INT8 = onnx.TensorProto.INT8
# Ops whose output shape depends on data: TensorRT cannot build static-shape engines with them.
DATA_DEPENDENT_OPS = frozenset({"NonZero", "Unique", "NonMaxSuppression", "Compress"})


@dataclass(frozen=True)
class Problem:
    graph: str
    node: str
    op: str
    why: str

    def __str__(self) -> str:
        return f"{self.graph}: {self.op} node {self.node!r}: {self.why}"


def _constants(g: onnx.GraphProto) -> set[str]:
    names = {i.name for i in g.initializer}
    names |= {o for n in g.node if n.op_type == "Constant" for o in n.output}
    return names


def check_graph(path: str | Path) -> list[Problem]:
    """Problems that would stop TensorRT from parsing or building this graph."""
    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    name = Path(path).name
    consts = _constants(g)
    inits = {i.name: i for i in g.initializer}
    inferred = onnx.shape_inference.infer_shapes(model)
    elem_type = {
        vi.name: vi.type.tensor_type.elem_type
        for vi in list(inferred.graph.value_info) + list(g.input) + list(g.output)
    }
    problems: list[Problem] = []
    for n in g.node:
        if n.op_type in DATA_DEPENDENT_OPS:
            problems.append(Problem(name, n.name, n.op_type, "data-dependent output shape"))
        elif n.op_type not in TRT_SUPPORTED_OPS:
            problems.append(Problem(name, n.name, n.op_type, "not in TensorRT's ONNX op set"))
        if n.op_type == "TopK":
            if len(n.input) < 2 or n.input[1] not in consts:
                problems.append(
                    Problem(name, n.name, "TopK", "k must be a constant (static top-k)")
                )
            if elem_type.get(n.input[0]) in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
                problems.append(Problem(name, n.name, "TopK", "sorting integers is unsupported"))
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            # TensorRT quantizes symmetrically: constant scales, zero points of 0
            if n.input[1] not in consts:
                problems.append(Problem(name, n.name, n.op_type, "the scale must be a constant"))
            zp = inits.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
            if zp is not None and zp.data_type != INT8:
                problems.append(Problem(name, n.name, n.op_type, "zero points must be int8"))
            elif zp is not None and zp.data_location != onnx.TensorProto.EXTERNAL:
                # (zero points in external data are not loaded here; small ones never are)
                if np.any(onnx.numpy_helper.to_array(zp) != 0):
                    problems.append(Problem(name, n.name, n.op_type, "zero points must be 0"))
            x = inits.get(n.input[0])
            if n.op_type == "DequantizeLinear" and x is not None and x.data_type != INT8:
                problems.append(Problem(name, n.name, n.op_type, "only int8 is dequantized"))
        if n.op_type == "Cast":
            to = next((a.i for a in n.attribute if a.name == "to"), None)
            if to in (onnx.TensorProto.DOUBLE, onnx.TensorProto.STRING):
                problems.append(
                    Problem(name, n.name, "Cast", "cast to double/string is unsupported")
                )
    for vi in list(g.input) + list(g.output):
        if vi.type.tensor_type.elem_type == onnx.TensorProto.DOUBLE:
            problems.append(Problem(name, vi.name, "io", "float64 tensors are unsupported"))
    return problems
