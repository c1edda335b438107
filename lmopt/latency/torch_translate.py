"""A small ONNX -> torch.nn.Module translator for the ops lmopt's blocks and models contain.

Why a translator of our own rather than onnx2torch: onnx2torch has had no release since 2024,
pins to older onnx/torch behaviour, and pulls in torchvision (hundreds of MB, another version
pin to keep in step with torch) for a handful of ops; its converters also build one submodule
per node with name-mangled parameters, which we would still have to check op by op. The ops
lmopt needs are few and map one-to-one onto torch.nn.functional, so a ~300-line interpreter
whose numerics are tested against onnxruntime (tests/test_gpu.py) is easier to trust and keep.

Supported: Conv (groups, dilation, asymmetric pads, auto_pad), Gemm (transA/transB, alpha,
beta), MatMul, Add, Sub, Mul, Div, Relu, Clip (min/max from inputs or attributes), LeakyRelu,
PRelu, Sigmoid, Tanh, HardSigmoid, HardSwish, Erf, Gelu, BatchNormalization (inference),
MaxPool, AveragePool, GlobalAveragePool, Flatten, Reshape, Transpose, Concat, Gather,
LayerNormalization, Softmax, Identity, Dropout (inference), Constant, and the ops of a transformer
encoder's mask and pooling: Unsqueeze, ReduceSum, ReduceMean, ReduceL2 (constant axes), Cast, Expand,
Where, And, Not, Equal, Max, Min, CumSum, Sqrt, Pow, Neg, Exp. Anything else raises LmoptError naming the op.

Initializers and Constant values become registered buffers, so module.to(device) and
module.half() move and convert them with the module.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import LmoptError

# An op builder: (module, node, attributes) -> a callable computing the node's first output from its inputs.
Builder = Callable[[Any, onnx.NodeProto, dict], Callable[..., Any]]


def _torch() -> tuple[Any, Any]:
    """torch and torch.nn.functional, imported on first use (torch is optional)."""
    import torch
    import torch.nn.functional as F

    return torch, F


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 1


def _pads_split(pads: list[int] | None, n: int) -> tuple[list[int], list[int]]:
    pads = list(pads) if pads else [0] * (2 * n)
    return pads[:n], pads[n:]


def _torch_pad_list(begin: list[int], end: list[int]) -> list[int]:
    """ONNX [b1..bn], [e1..en] -> F.pad's [bn, en, ..., b1, e1] (last dim first)."""
    out = []
    for b, e in zip(reversed(begin), reversed(end)):
        out += [int(b), int(e)]
    return out


def _same_pads(in_sizes: Any, kernel: Any, strides: list[int], dilations: list[int],
               upper: bool) -> tuple[list[int], list[int]]:
    begin, end = [], []
    for size, k, s, d in zip(in_sizes, kernel, strides, dilations):
        out = math.ceil(size / s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small = total // 2
        begin.append(small if upper else total - small)
        end.append(total - small if upper else small)
    return begin, end


def translate(model: onnx.ModelProto) -> Any:
    """An nn.Module (eval mode) computing `model`; forward(*inputs) returns a tuple of the graph's outputs."""
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            raise LmoptError(f"the torch translator (torch-cuda backend, --distill) cannot translate op "
                              f"{node.domain}::{node.op_type}")
        if node.op_type not in SUPPORTED_OPS:
            raise LmoptError(f"the torch translator (torch-cuda backend, --distill) cannot translate op "
                              f"{node.op_type} (node {node.name!r})")
    return _module_class()(model).eval()


@functools.lru_cache(maxsize=1)
def _module_class() -> type:
    """The nn.Module class of translated graphs (defined once torch is imported)."""
    torch, _ = _torch()

    class Translated(torch.nn.Module):
        """Initializers and Constant values as buffers (slots c0, c1, ...), nodes run in graph order."""

        def __init__(self, model: onnx.ModelProto):
            super().__init__()
            graph = model.graph
            self.opset = _opset(model)
            initializer_names = {t.name for t in graph.initializer}
            self.input_names = [vi.name for vi in graph.input if vi.name not in initializer_names]
            self.output_names = [vi.name for vi in graph.output]
            # tensor name -> attribute holding it (a buffer; distillation makes weights parameters)
            self.slots: dict[str, str] = {}
            self.constants: dict[str, np.ndarray] = {}  # host copies, for shape-like inputs
            for tensor in graph.initializer:
                self._add_constant(tensor.name, numpy_helper.to_array(tensor))
            for node in graph.node:
                if node.op_type == "Constant":
                    self._add_constant(node.output[0], _constant_value(node))
            self.steps = [(node.input, node.output, _OPS[node.op_type](self, node, _attrs(node)))
                          for node in graph.node if node.op_type != "Constant"]

        def _add_constant(self, name: str, array: np.ndarray) -> None:
            array = np.array(array)  # writable, owned
            self.constants[name] = array
            slot = f"c{len(self.slots)}"
            self.slots[name] = slot
            self.register_buffer(slot, torch.from_numpy(array), persistent=False)

        def const(self, name: str) -> np.ndarray | None:
            """The host value of a constant tensor, None for a computed one."""
            return self.constants.get(name)

        def forward(self, *inputs: Any) -> tuple:
            env = {name: getattr(self, slot) for name, slot in self.slots.items()}
            env.update(zip(self.input_names, inputs))
            for ins, outs, fn in self.steps:
                env[outs[0]] = fn(*[env[n] if n else None for n in ins])
            return tuple(env[name] for name in self.output_names)

    return Translated


def _decoded(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def _explicit_pads(x_sizes: Any, kernel: Any, strides: list[int], dilations: list[int], auto_pad: str,
                   begin: list[int], end: list[int]) -> tuple[list[int], list[int]]:
    """Begin and end pads per spatial dim for the node's auto_pad (SAME_*, VALID) or its explicit pads."""
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return _same_pads(x_sizes, kernel, strides, dilations, auto_pad == "SAME_UPPER")
    if auto_pad == "VALID":
        return [0] * len(begin), [0] * len(end)
    return begin, end


# --- op builders: (module, node, attrs) -> callable(*inputs) -----------------------------------------

def _conv(m: Any, node: onnx.NodeProto, a: dict) -> Callable[..., Any]:
    _, F = _torch()
    weight = m.const(node.input[1])
    nd = (weight.ndim - 2) if weight is not None else len(a.get("kernel_shape", [1, 1]))
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(nd)
    if fn is None:
        raise LmoptError(f"Conv with {nd} spatial dims is not supported by the torch-cuda backend")
    strides = a.get("strides", [1] * nd)
    dilations = a.get("dilations", [1] * nd)
    group = a.get("group", 1)
    auto_pad = _decoded(a.get("auto_pad", b"NOTSET"))
    begin, end = _pads_split(a.get("pads"), nd)

    def run(x: Any, w: Any, b: Any = None) -> Any:
        pb, pe = _explicit_pads(x.shape[2:], w.shape[2:], strides, dilations, auto_pad, begin, end)
        if list(pb) == list(pe):
            return fn(x, w, b, stride=strides, padding=list(pb), dilation=dilations, groups=group)
        x = F.pad(x, _torch_pad_list(pb, pe))
        return fn(x, w, b, stride=strides, padding=0, dilation=dilations, groups=group)
    return run


def _gemm(m: Any, node: onnx.NodeProto, a: dict) -> Callable[..., Any]:
    _, F = _torch()
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    trans_a, trans_b = a.get("transA", 0), a.get("transB", 0)

    def run(x: Any, w: Any, c: Any = None) -> Any:
        if trans_a:
            x = x.t()
        y = F.linear(x, w) if trans_b else x @ w  # F.linear(x, w) is x @ w.T
        if alpha != 1.0:
            y = y * alpha
        if c is not None:
            y = y + (c * beta if beta != 1.0 else c)
        return y
    return run


def _clip(m: Any, node: onnx.NodeProto, a: dict) -> Callable[..., Any]:
    torch, _ = _torch()
    bounds = [a.get("min"), a.get("max")]  # opset < 11: attributes
    dynamic = [False, False]
    for k in (0, 1):  # opset >= 11: inputs 1 and 2, constant or computed
        if len(node.input) > k + 1 and node.input[k + 1]:
            value = m.const(node.input[k + 1])
            bounds[k] = None if value is None else float(value)
            dynamic[k] = value is None

    def run(x: Any, min_t: Any = None, max_t: Any = None) -> Any:
        low = min_t if dynamic[0] else bounds[0]
        high = max_t if dynamic[1] else bounds[1]
        if low is None and high is None:
            return x
        return torch.clamp(x, low, high)
    return run


def _prelu(m: Any, node: onnx.NodeProto, a: dict) -> Callable[..., Any]:
    torch, _ = _torch()
    return lambda x, slope: torch.where(x >= 0, x, x * slope)


def _hard_sigmoid(m: Any, node: onnx.NodeProto, a: dict) -> Callable[..., Any]:
    torch, _ = _torch()
    alpha, beta = a.get("alpha", 0.2), a.get("beta", 0.5)
    return lambda x: torch.clamp(x * alpha + beta, 0.0, 1.0)


def _gelu(m: Any, node: onnx.NodeProto, a: dict) -> Callable[..., Any]:
    _, F = _torch()
    approximate = _decoded(a.get("approximate", b"none"))
    return lambda x: F.gelu(x, approximate=approximate)


def _leaky_relu(m: Any, node: onnx.NodeProto, a: dict) -> Callable[..., Any]:
    _, F = _torch()
    alpha = a.get("alpha", 0.01)
    return lambda x: F.leaky_relu(x, alpha)


def _batchnorm(m: Any, node: onnx.NodeProto, a: dict) -> Callable[..., Any]:
    _, F = _torch()
    if len(node.output) > 1 and any(node.output[1:]):
        raise LmoptError("BatchNormalization in training mode (extra outputs) is not supported")
    eps = a.get("epsilon", 1e-5)
    return lambda x, scale, bias, mean, var: F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)


def _pool(m: Any, node: onnx.NodeProto, a: dict) -> Callable[..., Any]:
    """MaxPool and AveragePool; asymmetric pads (or pads over half the kernel) become an explicit F.pad."""
    torch, F = _torch()
    if len(node.output) > 1 and any(node.output[1:]):
        raise LmoptError("MaxPool with an Indices output is not supported")
    kind = "max" if node.op_type == "MaxPool" else "avg"
    kernel = a["kernel_shape"]
    nd = len(kernel)
    strides = a.get("strides", [1] * nd)
    dilations = a.get("dilations", [1] * nd)
    ceil = bool(a.get("ceil_mode", 0))
    include_pad = bool(a.get("count_include_pad", 0))
    auto_pad = _decoded(a.get("auto_pad", b"NOTSET"))
    begin, end = _pads_split(a.get("pads"), nd)
    max_fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
    avg_fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
    if kind == "avg" and any(d != 1 for d in dilations):
        raise LmoptError("AveragePool with dilations is not supported by the torch-cuda backend")

    def run(x: Any) -> Any:
        pb, pe = _explicit_pads(x.shape[2:], kernel, strides, dilations, auto_pad, begin, end)
        symmetric = list(pb) == list(pe) and all(2 * p <= k for p, k in zip(pb, kernel))
        if kind == "max":
            if symmetric:
                return max_fn(x, kernel, strides, list(pb), dilations, ceil_mode=ceil)
            x = F.pad(x, _torch_pad_list(pb, pe), value=-math.inf)
            return max_fn(x, kernel, strides, 0, dilations, ceil_mode=ceil)
        if symmetric:
            return avg_fn(x, kernel, strides, list(pb), ceil_mode=ceil, count_include_pad=include_pad)
        padded = F.pad(x, _torch_pad_list(pb, pe))
        y = avg_fn(padded, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
        if include_pad:
            return y
        ones = F.pad(torch.ones_like(x[:1, :1]), _torch_pad_list(pb, pe))
        return y / avg_fn(ones, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
    return run


def _global_average_pool(m: Any, node: onnx.NodeProto, a: dict) -> Callable[..., Any]:
    return lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


def _flatten(m: Any, node: onnx.NodeProto, a: dict) -> Callable[..., Any]:
    axis = a.get("axis", 1)

    def run(x: Any) -> Any:
        ax = axis if axis >= 0 else axis + x.dim()
        lead = int(np.prod(x.shape[:ax])) if ax > 0 else 1
        return x.reshape(lead, -1)
    return run


def _reshape(m: Any, node: onnx.NodeProto, a: dict) -> Callable[..., Any]:
    allowzero = a.get("allowzero", 0)
    fixed = m.const(node.input[1])

    def run(x: Any, shape_t: Any) -> Any:
        shape = [int(v) for v in (fixed if fixed is not None else shape_t.tolist())]
        if not allowzero:
            shape = [x.shape[i] if v == 0 else v for i, v in enumerate(shape)]
        return x.reshape(shape)
    return run


def _transpose(m: Any, node: onnx.NodeProto, a: dict) -> Callable[..., Any]:
    perm = a.get("perm")
    return lambda x: x.permute(*(perm if perm is not None else reversed(range(x.dim()))))


def _concat(m: Any, node: onnx.NodeProto, a: dict) -> Callable[..., Any]:
    torch, _ = _torch()
    axis = a["axis"]
    return lambda *xs: torch.cat([x for x in xs if x is not None], dim=axis)


def _gather(m: Any, node: onnx.NodeProto, a: dict) -> Callable[..., Any]:
    torch, _ = _torch()
    axis = a.get("axis", 0)

    def run(x: Any, idx: Any) -> Any:  # a constant index is a buffer already on the module's device
        ax = axis if axis >= 0 else axis + x.dim()
        indices = idx.long()
        indices = torch.where(indices < 0, indices + x.shape[ax], indices)
        out = torch.index_select(x, ax, indices.reshape(-1))
        return out.reshape(tuple(x.shape[:ax]) + tuple(indices.shape) + tuple(x.shape[ax + 1:]))
    return run


def _layernorm(m: Any, node: onnx.NodeProto, a: dict) -> Callable[..., Any]:
    _, F = _torch()
    if len(node.output) > 1 and any(node.output[1:]):
        raise LmoptError("LayerNormalization with Mean/InvStdDev outputs is not supported")
    axis, eps = a.get("axis", -1), a.get("epsilon", 1e-5)

    def run(x: Any, scale: Any, bias: Any = None) -> Any:
        ax = axis if axis >= 0 else axis + x.dim()
        shape = tuple(x.shape[ax:])
        return F.layer_norm(x, shape, scale.expand(shape), None if bias is None else bias.expand(shape), eps)
    return run


def _softmax(m: Any, node: onnx.NodeProto, a: dict) -> Callable[..., Any]:
    torch, _ = _torch()
    if m.opset >= 13:
        axis = a.get("axis", -1)
        return lambda x: torch.softmax(x, dim=axis)
    axis = a.get("axis", 1)

    def run(x: Any) -> Any:  # opset < 13: flatten to 2-D at axis
        ax = axis if axis >= 0 else axis + x.dim()
        return torch.softmax(x.reshape(int(np.prod(x.shape[:ax])), -1), dim=1).reshape(x.shape)
    return run


def _div(m: Any, node: onnx.NodeProto, a: dict) -> Callable[..., Any]:
    torch, _ = _torch()

    def run(x: Any, y: Any) -> Any:
        if x.dtype.is_floating_point:
            return x / y
        return torch.div(x, y, rounding_mode="trunc")
    return run


def _dropout(m: Any, node: onnx.NodeProto, a: dict) -> Callable[..., Any]:
    if len(node.output) > 1 and any(node.output[1:]):
        raise LmoptError("Dropout with a mask output is not supported")
    return lambda x, *rest: x


def _identity(m: Any, node: onnx.NodeProto, a: dict) -> Callable[..., Any]:
    return lambda x: x


def _axes(m: Any, node: onnx.NodeProto, a: dict, position: int) -> list[int] | None:
    """An op's axes: the attribute (older opsets) or the constant input at `position` (newer ones)."""
    if "axes" in a:
        return [int(v) for v in a["axes"]]
    if len(node.input) > position and node.input[position]:
        value = m.const(node.input[position])
        if value is None:
            raise LmoptError(f"{node.op_type} with computed axes is not supported (node {node.name!r})")
        return [int(v) for v in np.atleast_1d(value)]
    return None


def _unsqueeze(m: Any, node: onnx.NodeProto, a: dict) -> Callable[..., Any]:
    axes = _axes(m, node, a, 1)

    def run(x: Any, *_: Any) -> Any:
        rank = x.dim() + len(axes)
        for ax in sorted(v % rank for v in axes):
            x = x.unsqueeze(ax)
        return x
    return run


def _reduce(m: Any, node: onnx.NodeProto, a: dict) -> Callable[..., Any]:
    """ReduceSum, ReduceMean and ReduceL2 over constant axes (all axes when none are given)."""
    torch, _ = _torch()
    axes = _axes(m, node, a, 1)
    keep = bool(a.get("keepdims", 1))
    if axes is None and a.get("noop_with_empty_axes", 0):
        return lambda x, *_: x
    reduce = {"ReduceSum": torch.sum, "ReduceMean": torch.mean,
              "ReduceL2": lambda x, dim, keepdim: torch.linalg.vector_norm(x, 2, dim=dim, keepdim=keepdim)}
    fn = reduce[node.op_type]
    return lambda x, *_: fn(x, dim=tuple(range(x.dim())) if axes is None else tuple(axes), keepdim=keep)


def _cast(m: Any, node: onnx.NodeProto, a: dict) -> Callable[..., Any]:
    torch, _ = _torch()
    numpy_type = helper.tensor_dtype_to_np_dtype(a["to"])
    dtype = torch.bool if numpy_type == np.bool_ else getattr(torch, np.dtype(numpy_type).name)
    return lambda x: x.to(dtype)


def _expand(m: Any, node: onnx.NodeProto, a: dict) -> Callable[..., Any]:
    torch, _ = _torch()
    fixed = m.const(node.input[1])

    def run(x: Any, shape_t: Any) -> Any:  # bidirectional broadcast, as ONNX Expand
        shape = [int(v) for v in (fixed if fixed is not None else shape_t.tolist())]
        return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(shape)))
    return run


def _where(m: Any, node: onnx.NodeProto, a: dict) -> Callable[..., Any]:
    torch, _ = _torch()
    return lambda condition, x, y: torch.where(condition.bool(), x, y)


def _min_max(m: Any, node: onnx.NodeProto, a: dict) -> Callable[..., Any]:
    """Max and Min of any number of inputs, broadcast."""
    torch, _ = _torch()
    pair = torch.maximum if node.op_type == "Max" else torch.minimum
    return lambda *xs: functools.reduce(pair, xs)


def _cumsum(m: Any, node: onnx.NodeProto, a: dict) -> Callable[..., Any]:
    """CumSum along a constant axis, with ONNX's exclusive and reverse modes (position ids from a mask)."""
    torch, _ = _torch()
    axis = m.const(node.input[1])
    if axis is None:
        raise LmoptError(f"CumSum with a computed axis is not supported (node {node.name!r})")
    axis, exclusive, reverse = int(np.ravel(axis)[0]), bool(a.get("exclusive", 0)), bool(a.get("reverse", 0))

    def run(x: Any, *_: Any) -> Any:
        y = x.flip(axis) if reverse else x
        total = torch.cumsum(y, dim=axis)
        if exclusive:
            total = total - y
        return total.flip(axis) if reverse else total
    return run


def _and(m: Any, node: onnx.NodeProto, a: dict) -> Callable[..., Any]:
    torch, _ = _torch()
    return lambda x, y: torch.logical_and(x.bool(), y.bool())


# Ops that are one torch function of their inputs, looked up when the block is translated.
_TORCH_FUNCTIONS = {"MatMul": "matmul", "Add": "add", "Sub": "sub", "Mul": "mul", "Relu": "relu",
                    "Sigmoid": "sigmoid", "Tanh": "tanh", "Erf": "erf", "Sqrt": "sqrt", "Pow": "pow", "Neg": "neg",
                    "Exp": "exp", "Equal": "eq", "Not": "logical_not"}


def _torch_function(m: Any, node: onnx.NodeProto, a: dict) -> Callable[..., Any]:
    torch, _ = _torch()
    return getattr(torch, _TORCH_FUNCTIONS[node.op_type])


def _hard_swish(m: Any, node: onnx.NodeProto, a: dict) -> Callable[..., Any]:
    _, F = _torch()
    return F.hardswish


_OPS: dict[str, Builder] = {
    "Conv": _conv, "Gemm": _gemm, "Clip": _clip, "PRelu": _prelu, "HardSigmoid": _hard_sigmoid, "Gelu": _gelu,
    "LeakyRelu": _leaky_relu, "HardSwish": _hard_swish, "BatchNormalization": _batchnorm,
    "MaxPool": _pool, "AveragePool": _pool, "GlobalAveragePool": _global_average_pool,
    "Flatten": _flatten, "Reshape": _reshape, "Transpose": _transpose, "Concat": _concat, "Gather": _gather,
    "LayerNormalization": _layernorm, "Softmax": _softmax, "Div": _div, "Dropout": _dropout,
    "Identity": _identity, "Unsqueeze": _unsqueeze, "ReduceSum": _reduce, "ReduceMean": _reduce, "ReduceL2": _reduce,
    "Cast": _cast, "Expand": _expand, "Where": _where, "And": _and, "Max": _min_max, "Min": _min_max,
    "CumSum": _cumsum, **dict.fromkeys(_TORCH_FUNCTIONS, _torch_function),
}
SUPPORTED_OPS = frozenset([*_OPS, "Constant"])


def _constant_value(node: onnx.NodeProto) -> np.ndarray:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    raise LmoptError(f"Constant node {node.name!r} has no supported value attribute")
