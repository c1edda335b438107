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
LayerNormalization, Softmax, Identity, Dropout (inference), Constant. Anything else raises
LmoptError naming the op.

Initializers and Constant values become registered buffers, so module.to(device) and
module.half() move and convert them with the module.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import LmoptError

SUPPORTED_OPS = frozenset("""
Conv Gemm MatMul Add Sub Mul Div Relu Clip LeakyRelu PRelu Sigmoid Tanh HardSigmoid HardSwish Erf Gelu
BatchNormalization MaxPool AveragePool GlobalAveragePool Flatten Reshape Transpose Concat Gather
LayerNormalization Softmax Identity Dropout Constant
""".split())


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 1


def _pads_split(pads, n):
    pads = list(pads) if pads else [0] * (2 * n)
    return pads[:n], pads[n:]


def _torch_pad_list(begin, end):
    """ONNX [b1..bn], [e1..en] -> F.pad's [bn, en, ..., b1, e1] (last dim first)."""
    out = []
    for b, e in zip(reversed(begin), reversed(end)):
        out += [int(b), int(e)]
    return out


def _same_pads(in_sizes, kernel, strides, dilations, upper: bool):
    begin, end = [], []
    for size, k, s, d in zip(in_sizes, kernel, strides, dilations):
        out = math.ceil(size / s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small = total // 2
        begin.append(small if upper else total - small)
        end.append(total - small if upper else small)
    return begin, end


def translate(model: onnx.ModelProto):
    """An nn.Module computing `model`; forward(*inputs) returns a tuple of the graph's outputs."""
    import torch
    import torch.nn.functional as F

    graph = model.graph
    opset = _opset(model)
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            raise LmoptError(f"the torch-cuda backend cannot translate op {node.domain}::{node.op_type}")
        if node.op_type not in SUPPORTED_OPS:
            raise LmoptError(f"the torch-cuda backend cannot translate op {node.op_type} (node {node.name!r})")

    initializer_names = {t.name for t in graph.initializer}
    input_names = [vi.name for vi in graph.input if vi.name not in initializer_names]
    output_names = [vi.name for vi in graph.output]

    class Translated(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self._slot: dict[str, str] = {}  # tensor name -> buffer attribute
            self.constants: dict[str, np.ndarray] = {}  # host copies, for shape-like inputs
            for tensor in graph.initializer:
                self._add_constant(tensor.name, numpy_helper.to_array(tensor))
            for node in graph.node:
                if node.op_type == "Constant":
                    self._add_constant(node.output[0], _constant_value(node))
            self.steps = [self._compile(node) for node in graph.node if node.op_type != "Constant"]

        def _add_constant(self, name, array):
            array = np.array(array)  # writable, owned
            self.constants[name] = array
            slot = f"c{len(self._slot)}"
            self._slot[name] = slot
            tensor = torch.from_numpy(array) if array.dtype != np.bool_ else torch.from_numpy(array.astype(np.bool_))
            self.register_buffer(slot, tensor, persistent=False)

        def const(self, name):
            return self.constants.get(name)

        def _compile(self, node):
            fn = _OPS[node.op_type](self, node, _attrs(node))
            return node.input, node.output, fn

        def forward(self, *inputs):
            env = {name: getattr(self, slot) for name, slot in self._slot.items()}
            env.update(zip(input_names, inputs))
            for ins, outs, fn in self.steps:
                args = [env[n] if n else None for n in ins]
                result = fn(*args)
                env[outs[0]] = result
            return tuple(env[name] for name in output_names)

    # --- op builders: (module, node, attrs) -> callable(*inputs) -------------------------------
    def conv(m, node, a):
        weight = m.const(node.input[1])
        nd = (weight.ndim - 2) if weight is not None else len(a.get("kernel_shape", [1, 1]))
        fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(nd)
        if fn is None:
            raise LmoptError(f"Conv with {nd} spatial dims is not supported by the torch-cuda backend")
        strides = a.get("strides", [1] * nd)
        dilations = a.get("dilations", [1] * nd)
        group = a.get("group", 1)
        auto_pad = a.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        begin, end = _pads_split(a.get("pads"), nd)

        def run(x, w, b=None):
            if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                pb, pe = _same_pads(x.shape[2:], w.shape[2:], strides, dilations, auto_pad == "SAME_UPPER")
            elif auto_pad == "VALID":
                pb, pe = [0] * nd, [0] * nd
            else:
                pb, pe = begin, end
            if list(pb) == list(pe):
                return fn(x, w, b, stride=strides, padding=list(pb), dilation=dilations, groups=group)
            x = F.pad(x, _torch_pad_list(pb, pe))
            return fn(x, w, b, stride=strides, padding=0, dilation=dilations, groups=group)
        return run

    def gemm(m, node, a):
        alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
        trans_a, trans_b = a.get("transA", 0), a.get("transB", 0)

        def run(x, w, c=None):
            if trans_a:
                x = x.t()
            if trans_b:
                y = F.linear(x, w)  # x @ w.T
            else:
                y = x @ w
            if alpha != 1.0:
                y = y * alpha
            if c is not None:
                y = y + (c * beta if beta != 1.0 else c)
            return y
        return run

    def clip(m, node, a):
        lo, hi = a.get("min"), a.get("max")  # opset < 11
        if len(node.input) > 1 and node.input[1]:
            value = m.const(node.input[1])
            lo = None if value is None else float(value)
            dyn_lo = value is None
        else:
            dyn_lo = False
        if len(node.input) > 2 and node.input[2]:
            value = m.const(node.input[2])
            hi = None if value is None else float(value)
            dyn_hi = value is None
        else:
            dyn_hi = False

        def run(x, min_t=None, max_t=None):
            low = min_t if dyn_lo else lo
            high = max_t if dyn_hi else hi
            if low is None and high is None:
                return x
            return torch.clamp(x, low, high)
        return run

    def prelu(m, node, a):
        return lambda x, slope: torch.where(x >= 0, x, x * slope)

    def hard_sigmoid(m, node, a):
        alpha, beta = a.get("alpha", 0.2), a.get("beta", 0.5)
        return lambda x: torch.clamp(x * alpha + beta, 0.0, 1.0)

    def gelu(m, node, a):
        approximate = a.get("approximate", b"none")
        approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
        return lambda x: F.gelu(x, approximate=approximate)

    def batchnorm(m, node, a):
        if len(node.output) > 1 and any(node.output[1:]):
            raise LmoptError("BatchNormalization in training mode (extra outputs) is not supported")
        eps = a.get("epsilon", 1e-5)
        return lambda x, scale, bias, mean, var: F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)

    def pool(m, node, a, kind):
        if len(node.output) > 1 and any(node.output[1:]):
            raise LmoptError("MaxPool with an Indices output is not supported")
        kernel = a["kernel_shape"]
        nd = len(kernel)
        strides = a.get("strides", [1] * nd)
        dilations = a.get("dilations", [1] * nd)
        ceil = bool(a.get("ceil_mode", 0))
        include_pad = bool(a.get("count_include_pad", 0))
        auto_pad = a.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        begin, end = _pads_split(a.get("pads"), nd)
        max_fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
        avg_fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
        if kind == "avg" and any(d != 1 for d in dilations):
            raise LmoptError("AveragePool with dilations is not supported by the torch-cuda backend")

        def run(x):
            if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                pb, pe = _same_pads(x.shape[2:], kernel, strides, dilations, auto_pad == "SAME_UPPER")
            elif auto_pad == "VALID":
                pb, pe = [0] * nd, [0] * nd
            else:
                pb, pe = begin, end
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

    def flatten(m, node, a):
        axis = a.get("axis", 1)

        def run(x):
            ax = axis if axis >= 0 else axis + x.dim()
            lead = int(np.prod(x.shape[:ax])) if ax > 0 else 1
            return x.reshape(lead, -1)
        return run

    def reshape(m, node, a):
        allowzero = a.get("allowzero", 0)
        fixed = m.const(node.input[1])

        def run(x, shape_t):
            shape = [int(v) for v in (fixed if fixed is not None else shape_t.tolist())]
            if not allowzero:
                shape = [x.shape[i] if v == 0 else v for i, v in enumerate(shape)]
            return x.reshape(shape)
        return run

    def transpose(m, node, a):
        perm = a.get("perm")
        return lambda x: x.permute(*(perm if perm is not None else reversed(range(x.dim()))))

    def concat(m, node, a):
        axis = a["axis"]
        return lambda *xs: torch.cat([x for x in xs if x is not None], dim=axis)

    def gather(m, node, a):
        axis = a.get("axis", 0)

        def run(x, idx):  # a constant index is a buffer already on the module's device
            ax = axis if axis >= 0 else axis + x.dim()
            indices = idx.long()
            indices = torch.where(indices < 0, indices + x.shape[ax], indices)
            out = torch.index_select(x, ax, indices.reshape(-1))
            return out.reshape(tuple(x.shape[:ax]) + tuple(indices.shape) + tuple(x.shape[ax + 1:]))
        return run

    def layernorm(m, node, a):
        if len(node.output) > 1 and any(node.output[1:]):
            raise LmoptError("LayerNormalization with Mean/InvStdDev outputs is not supported")
        axis, eps = a.get("axis", -1), a.get("epsilon", 1e-5)

        def run(x, scale, bias=None):
            ax = axis if axis >= 0 else axis + x.dim()
            shape = tuple(x.shape[ax:])
            return F.layer_norm(x, shape, scale.expand(shape), None if bias is None else bias.expand(shape), eps)
        return run

    def softmax(m, node, a):
        if opset >= 13:
            axis = a.get("axis", -1)
            return lambda x: torch.softmax(x, dim=axis)
        axis = a.get("axis", 1)

        def run(x):  # opset < 13: flatten to 2-D at axis
            ax = axis if axis >= 0 else axis + x.dim()
            return torch.softmax(x.reshape(int(np.prod(x.shape[:ax])), -1), dim=1).reshape(x.shape)
        return run

    def div(m, node, a):
        def run(x, y):
            if x.dtype.is_floating_point:
                return x / y
            return torch.div(x, y, rounding_mode="trunc")
        return run

    def dropout(m, node, a):
        if len(node.output) > 1 and any(node.output[1:]):
            raise LmoptError("Dropout with a mask output is not supported")
        return lambda x, *rest: x

    _OPS = {
        "Conv": conv, "Gemm": gemm, "Clip": clip, "PRelu": prelu, "HardSigmoid": hard_sigmoid, "Gelu": gelu,
        "BatchNormalization": batchnorm, "Flatten": flatten, "Reshape": reshape, "Transpose": transpose,
        "Concat": concat, "Gather": gather, "LayerNormalization": layernorm, "Softmax": softmax,
        "Div": div, "Dropout": dropout,
        "MaxPool": lambda m, n, a: pool(m, n, a, "max"),
        "AveragePool": lambda m, n, a: pool(m, n, a, "avg"),
        "GlobalAveragePool": lambda m, n, a: (lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True)),
        "MatMul": lambda m, n, a: torch.matmul,
        "Add": lambda m, n, a: torch.add,
        "Sub": lambda m, n, a: torch.sub,
        "Mul": lambda m, n, a: torch.mul,
        "Relu": lambda m, n, a: torch.relu,
        "Sigmoid": lambda m, n, a: torch.sigmoid,
        "Tanh": lambda m, n, a: torch.tanh,
        "Erf": lambda m, n, a: torch.erf,
        "HardSwish": lambda m, n, a: F.hardswish,
        "LeakyRelu": lambda m, n, a: (lambda x, alpha=a.get("alpha", 0.01): F.leaky_relu(x, alpha)),
        "Identity": lambda m, n, a: (lambda x: x),
    }

    return Translated().eval()


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
