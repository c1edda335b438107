"""Standard CNN/MLP models written as PyTorch's ONNX exporter writes them, built with numpy + onnx.helper.

No torch and no downloads: the architectures are torchvision's (ResNet-18/34/50 v1.5,
MobileNetV2 1.0/1.4, VGG-19-BN) plus a ViT-Tiny-like stack of transformer MLP blocks.
The graphs look like an opset-17 TorchScript export made without BatchNorm folding:

* input ``input`` (N, 3, H, W), output ``logits`` (N, 1000), shapes on both;
* node names ``/layer1/layer1.0/conv1/Conv``, tensors ``/layer1/layer1.0/conv1/Conv_output_0``,
  parameters ``layer1.0.conv1.weight``, ``layer1.0.bn1.running_var``, ...;
* Conv (no bias, except VGG whose torchvision convs carry one) followed by a separate
  ``BatchNormalization`` (epsilon 1e-5, momentum 0.9, training_mode 0);
* ReLU6 as ``Clip`` whose min/max come from ``Constant`` nodes, Linear as ``Gemm(transB=1)``
  (or ``MatMul`` + ``Add(bias, .)`` on 3-D token inputs), GELU in its Erf form,
  ``AdaptiveAvgPool2d((7, 7))`` of VGG as the ``AveragePool`` torch writes for it.

Weights are random but numerically sane: He-normal conv/fc weights, then every BatchNorm's
running statistics are set from the activations that reach it on a few smooth random images
(LSUV-like, in topological order), so ReLUs cut about half their inputs; the classifier's bias
absorbs the mean pooled feature so logits vary from input to input with a std of about 3.
Everything is deterministic in (name, seed, image_size, batch), byte for byte and across
machines: the calibration pass runs in float64 numpy, not in onnxruntime (see calibrate()).
"""
from __future__ import annotations

import math
import zlib
from collections import Counter
from typing import Callable, Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lmopt.onnxio import DEFAULT_OPSET, runtime_compatible

NAMES: tuple[str, ...] = (
    "resnet18",
    "resnet34",
    "resnet50",
    "mobilenetv2_1.0",
    "mobilenetv2_1.4",
    "vgg19_bn",
    "vit_tiny_mlp",
)

NUM_CLASSES = 1000
BN_EPS = 1e-5
BN_MOMENTUM = 0.9  # torch exports 1 - module.momentum (0.1)
LN_EPS = 1e-6  # timm's ViT LayerNorm


# --------------------------------------------------------------------------- graph writer


def _scope(path: str) -> str:
    """torch's ONNX scope for a module path: 'features.1.conv.0.0' -> '/features/features.1/conv/conv.0/conv.0.0'."""
    if not path:
        return ""
    shown: list[str] = []
    for part in path.split("."):
        if part.isdigit() and shown:
            shown.append(f"{shown[-1]}.{part}")
        else:
            shown.append(part)
    return "/" + "/".join(shown)


class _Writer:
    """Accumulates nodes and initializers with torch-like names and a per-tensor seeded RNG."""

    def __init__(self, model_name: str, seed: int):
        self.model_name = model_name
        self.seed = int(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._init_names: set[str] = set()
        self._node_names: dict[str, int] = {}
        self._scope_uses: dict[str, int] = {}

    # -- randomness: one generator per parameter, so a tensor's values depend only on its name
    def rng(self, tensor_name: str) -> np.random.Generator:
        key = [self.seed, zlib.crc32(self.model_name.encode()), zlib.crc32(tensor_name.encode())]
        return np.random.default_rng(key)

    def param(self, name: str, array: np.ndarray) -> str:
        if name in self._init_names:
            raise ValueError(f"duplicate initializer {name}")
        self._init_names.add(name)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def module_scope(self, path: str) -> str:
        """Scope of one call of module `path`; a module called twice gets '_1', '_2' (torch's rule)."""
        base = _scope(path)
        uses = self._scope_uses.get(base, 0)
        self._scope_uses[base] = uses + 1
        return base if uses == 0 else f"{base}_{uses}"

    def node(self, op: str, inputs: Sequence[str], scope: str = "", n_out: int = 1, **attrs) -> str | list[str]:
        base = f"{scope}/{op}"
        count = self._node_names.get(base, 0)
        self._node_names[base] = count + 1
        name = base if count == 0 else f"{base}_{count}"
        outputs = [f"{name}_output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outputs, name=name, **attrs))
        return outputs[0] if n_out == 1 else outputs

    def const(self, value, scope: str = "", dtype=np.float32) -> str:
        tensor = numpy_helper.from_array(np.asarray(value, dtype=dtype))
        return self.node("Constant", [], scope, value=tensor)

    # -- layers, each named as torch names the module at `path`
    def conv(self, x: str, path: str, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
             bias: bool = False, pad: int | None = None) -> str:
        pad = (k - 1) // 2 if pad is None else pad
        fan_in = cin // groups * k * k
        w = self.rng(f"{path}.weight").standard_normal((cout, cin // groups, k, k), dtype=np.float32)
        w *= np.float32(math.sqrt(2.0 / fan_in))
        inputs = [x, self.param(f"{path}.weight", w)]
        if bias:
            b = self.rng(f"{path}.bias").normal(0.0, 0.1, cout).astype(np.float32)
            inputs.append(self.param(f"{path}.bias", b))
        return self.node("Conv", inputs, self.module_scope(path), dilations=[1, 1], group=groups,
                         kernel_shape=[k, k], pads=[pad] * 4, strides=[stride, stride])

    def bn(self, x: str, path: str, channels: int, gamma_range: tuple[float, float] = (0.8, 1.2)) -> str:
        rng = self.rng(f"{path}.weight")
        gamma = rng.uniform(*gamma_range, channels).astype(np.float32)
        beta = self.rng(f"{path}.bias").normal(0.0, 0.1, channels).astype(np.float32)
        inputs = [x, self.param(f"{path}.weight", gamma), self.param(f"{path}.bias", beta),
                  # placeholders; calibrate() sets them from data
                  self.param(f"{path}.running_mean", np.zeros(channels, np.float32)),
                  self.param(f"{path}.running_var", np.ones(channels, np.float32))]
        return self.node("BatchNormalization", inputs, self.module_scope(path), epsilon=BN_EPS,
                         momentum=BN_MOMENTUM, training_mode=0)

    def relu(self, x: str, path: str) -> str:
        return self.node("Relu", [x], self.module_scope(path))

    def relu6(self, x: str, path: str) -> str:
        scope = self.module_scope(path)
        lo = self.const(0.0, scope)
        hi = self.const(6.0, scope)
        return self.node("Clip", [x, lo, hi], scope)

    def linear(self, x: str, path: str, fin: int, fout: int, gain: float = 2.0) -> str:
        w = self.rng(f"{path}.weight").standard_normal((fout, fin), dtype=np.float32)
        w *= np.float32(math.sqrt(gain / fin))
        bound = 1.0 / math.sqrt(fin)
        b = self.rng(f"{path}.bias").uniform(-bound, bound, fout).astype(np.float32)
        return self.node("Gemm", [x, self.param(f"{path}.weight", w), self.param(f"{path}.bias", b)],
                         self.module_scope(path), alpha=1.0, beta=1.0, transB=1)

    def model(self, graph_name: str, x_name: str, x_shape: Sequence[int], y: str, y_shape: Sequence[int],
              doc: str) -> onnx.ModelProto:
        # rename the final tensor to "logits" (torch's output_names does the same)
        for node in self.nodes:
            node.output[:] = ["logits" if o == y else o for o in node.output]
        graph = helper.make_graph(
            self.nodes, graph_name,
            [helper.make_tensor_value_info(x_name, TensorProto.FLOAT, list(x_shape))],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, list(y_shape))],
            initializer=self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)],
                                  producer_name="lmopt.models", producer_version="0.1.0", doc_string=doc)
        return runtime_compatible(model)


# --------------------------------------------------------------------------- architectures


def _resnet(w: _Writer, x: str, kind: str) -> str:
    """torchvision ResNet v1.5 (stride on the 3x3 of the bottleneck). Returns the fc output."""
    blocks = {"resnet18": [2, 2, 2, 2], "resnet34": [3, 4, 6, 3], "resnet50": [3, 4, 6, 3]}[kind]
    bottleneck = kind == "resnet50"
    expansion = 4 if bottleneck else 1
    y = w.conv(x, "conv1", 3, 64, 7, stride=2, pad=3)
    y = w.bn(y, "bn1", 64)
    y = w.relu(y, "relu")
    y = w.node("MaxPool", [y], w.module_scope("maxpool"), ceil_mode=0, dilations=[1, 1], kernel_shape=[3, 3],
               pads=[1, 1, 1, 1], strides=[2, 2])
    cin = 64
    for stage, (planes, n) in enumerate(zip([64, 128, 256, 512], blocks), start=1):
        for i in range(n):
            p = f"layer{stage}.{i}"
            stride = 2 if (stage > 1 and i == 0) else 1
            cout = planes * expansion
            identity = y
            if bottleneck:
                out = w.conv(y, f"{p}.conv1", cin, planes, 1)
                out = w.relu(w.bn(out, f"{p}.bn1", planes), f"{p}.relu")
                out = w.conv(out, f"{p}.conv2", planes, planes, 3, stride=stride)
                out = w.relu(w.bn(out, f"{p}.bn2", planes), f"{p}.relu")
                out = w.conv(out, f"{p}.conv3", planes, cout, 1)
                out = w.bn(out, f"{p}.bn3", cout, gamma_range=(0.2, 0.5))
            else:
                out = w.conv(y, f"{p}.conv1", cin, planes, 3, stride=stride)
                out = w.relu(w.bn(out, f"{p}.bn1", planes), f"{p}.relu")
                out = w.conv(out, f"{p}.conv2", planes, cout, 3)
                out = w.bn(out, f"{p}.bn2", cout, gamma_range=(0.2, 0.5))
            if stride != 1 or cin != cout:
                identity = w.conv(y, f"{p}.downsample.0", cin, cout, 1, stride=stride)
                identity = w.bn(identity, f"{p}.downsample.1", cout)
            out = w.node("Add", [out, identity], _scope(p))
            y = w.relu(out, f"{p}.relu")
            cin = cout
    y = w.node("GlobalAveragePool", [y], w.module_scope("avgpool"))
    y = w.node("Flatten", [y], "", axis=1)
    return w.linear(y, "fc", cin, NUM_CLASSES, gain=1.0)


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _conv_bn_act(w: _Writer, x: str, path: str, cin: int, cout: int, k: int, stride: int = 1,
                 groups: int = 1) -> str:
    """torchvision Conv2dNormActivation(ReLU6): path.0 conv, path.1 BN, path.2 ReLU6."""
    y = w.conv(x, f"{path}.0", cin, cout, k, stride=stride, groups=groups)
    y = w.bn(y, f"{path}.1", cout)
    return w.relu6(y, f"{path}.2")


def _mobilenetv2(w: _Writer, x: str, width: float) -> str:
    setting = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
               (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    cin = _make_divisible(32 * width)
    last = _make_divisible(1280 * max(1.0, width))
    y = _conv_bn_act(w, x, "features.0", 3, cin, 3, stride=2)
    idx = 1
    for t, c, n, s in setting:
        cout = _make_divisible(c * width)
        for i in range(n):
            stride = s if i == 0 else 1
            p = f"features.{idx}"
            hidden = int(round(cin * t))
            residual = stride == 1 and cin == cout
            out, j = y, 0
            if t != 1:
                out = _conv_bn_act(w, out, f"{p}.conv.{j}", cin, hidden, 1)
                j += 1
            out = _conv_bn_act(w, out, f"{p}.conv.{j}", hidden, hidden, 3, stride=stride, groups=hidden)
            out = w.conv(out, f"{p}.conv.{j + 1}", hidden, cout, 1)
            out = w.bn(out, f"{p}.conv.{j + 2}", cout, gamma_range=(0.2, 0.5) if residual else (0.8, 1.2))
            y = w.node("Add", [y, out], _scope(p)) if residual else out
            cin = cout
            idx += 1
    y = _conv_bn_act(w, y, f"features.{idx}", cin, last, 1)
    y = w.node("GlobalAveragePool", [y], "")  # nn.functional.adaptive_avg_pool2d(x, (1, 1))
    y = w.node("Flatten", [y], "", axis=1)
    # classifier.0 is Dropout(0.2): an eval-mode torch export drops it
    return w.linear(y, "classifier.1", last, NUM_CLASSES, gain=1.0)


def _vgg19_bn(w: _Writer, x: str, image_size: int) -> str:
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
           512, 512, 512, 512, "M"]
    y, cin, idx, size = x, 3, 0, image_size
    for v in cfg:
        if v == "M":
            y = w.node("MaxPool", [y], w.module_scope(f"features.{idx}"), ceil_mode=0, dilations=[1, 1],
                       kernel_shape=[2, 2], pads=[0, 0, 0, 0], strides=[2, 2])
            size //= 2
            idx += 1
        else:
            y = w.conv(y, f"features.{idx}", cin, v, 3, bias=True)  # torchvision's VGG convs keep a bias
            y = w.bn(y, f"features.{idx + 1}", v)
            y = w.relu(y, f"features.{idx + 2}")
            cin, idx = v, idx + 3
    # AdaptiveAvgPool2d((7, 7)): torch writes AveragePool(kernel=stride=size/7) when 7 divides the map
    # (a 1x1 no-op pool at 224); other sizes flatten the map as it is, so the classifier shrinks.
    if size % 7 == 0:
        k = size // 7
        y = w.node("AveragePool", [y], w.module_scope("avgpool"), ceil_mode=0, kernel_shape=[k, k],
                   pads=[0, 0, 0, 0], strides=[k, k])
        size = 7
    y = w.node("Flatten", [y], "", axis=1)
    features = cin * size * size
    for i, (fin, fout) in enumerate([(features, 4096), (4096, 4096)]):
        y = w.linear(y, f"classifier.{3 * i}", fin, fout)
        y = w.relu(y, f"classifier.{3 * i + 1}")
        scope = w.module_scope(f"classifier.{3 * i + 2}")
        y = w.node("Dropout", [y, w.const(0.5, scope)], scope)  # left in, as some exporters do
    return w.linear(y, "classifier.6", 4096, NUM_CLASSES, gain=1.0)


def _vit_tiny_mlp(w: _Writer, x: str, depth: int = 12, dim: int = 192, hidden: int = 768) -> str:
    """Pre-norm transformer MLP blocks of ViT-Tiny (attention left out), as torch exports them at opset 17."""

    def layernorm(y: str, path: str) -> str:
        g = w.rng(f"{path}.weight").uniform(0.8, 1.2, dim).astype(np.float32)
        b = w.rng(f"{path}.bias").normal(0.0, 0.1, dim).astype(np.float32)
        return w.node("LayerNormalization", [y, w.param(f"{path}.weight", g), w.param(f"{path}.bias", b)],
                      w.module_scope(path), axis=-1, epsilon=LN_EPS)

    def linear3d(y: str, path: str, fin: int, fout: int, std: float) -> str:
        # torch writes Linear on a 3-D input as MatMul with the transposed weight, then Add(bias, .)
        wt = w.rng(f"{path}.weight").standard_normal((fin, fout), dtype=np.float32) * np.float32(std)
        b = w.rng(f"{path}.bias").normal(0.0, 0.02, fout).astype(np.float32)
        scope = w.module_scope(path)
        y = w.node("MatMul", [y, w.param(f"{path}.weight_t", wt)], scope)
        return w.node("Add", [w.param(f"{path}.bias", b), y], scope)

    def gelu(y: str, path: str) -> str:
        scope = w.module_scope(path)
        t = w.node("Div", [y, w.const(math.sqrt(2.0), scope)], scope)
        t = w.node("Erf", [t], scope)
        t = w.node("Add", [t, w.const(1.0, scope)], scope)
        t = w.node("Mul", [y, t], scope)
        return w.node("Mul", [t, w.const(0.5, scope)], scope)

    y = x
    for i in range(depth):
        p = f"blocks.{i}"
        h = layernorm(y, f"{p}.norm1")
        h = linear3d(h, f"{p}.mlp.fc1", dim, hidden, math.sqrt(2.0 / dim))
        h = gelu(h, f"{p}.mlp.act")
        h = linear3d(h, f"{p}.mlp.fc2", hidden, dim, 0.5 / math.sqrt(hidden))
        y = w.node("Add", [y, h], _scope(p))
    y = layernorm(y, "norm")
    y = w.node("Gather", [y, w.const(0, "", dtype=np.int64)], "", axis=1)  # x[:, 0]: the class token
    return w.linear(y, "head", dim, NUM_CLASSES, gain=4.0)


# --------------------------------------------------------------------------- calibration


def smooth_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """`n` deterministic smooth random 3-channel images (pink-noise octaves), per-channel standardised."""
    rng = np.random.default_rng([seed, 0x1A6E5])
    img = np.zeros((n, 3, size, size), np.float64)
    res = 2
    while res <= size:
        low = rng.standard_normal((n, 3, res, res))
        pos = (np.arange(size) + 0.5) * res / size - 0.5
        lo = np.clip(np.floor(pos).astype(int), 0, res - 1)
        hi = np.clip(lo + 1, 0, res - 1)
        frac = np.clip(pos - lo, 0.0, 1.0)
        up = np.zeros((size, res))
        up[np.arange(size), lo] += 1 - frac
        up[np.arange(size), hi] += frac
        img += (up @ low @ up.T) / res  # amplitude ~ 1/frequency
        res *= 2
    img -= img.mean(axis=(0, 2, 3), keepdims=True)
    img /= img.std(axis=(0, 2, 3), keepdims=True) + 1e-12
    return img.astype(np.float32)


def _round_mantissa(x: np.ndarray, bits: int = 12) -> np.ndarray:
    """Round to `bits` mantissa bits, so last-bit differences of the float64 arithmetic cannot show."""
    m, e = np.frexp(np.asarray(x, dtype=np.float64))
    return np.ldexp(np.round(m * (1 << bits)) / (1 << bits), e).astype(np.float32)


# A float64 numpy evaluator for the ops the zoo writes. Calibration runs here rather than in
# onnxruntime: ORT's float32 results depend on the CPU's kernels and thread count, and a BN
# statistic that rounds differently changes every later one, so the saved bytes would differ
# between machines. In float64 the differences stay ~1e-16, far below the 12-bit rounding.


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _windows(x: np.ndarray, k: int, stride: int, pads: Sequence[int], fill: float = 0.0) -> np.ndarray:
    """(N, C, H, W) -> strided view (N, C, Ho, Wo, k, k) of the padded input."""
    top, left, bottom, right = pads[0], pads[1], pads[2], pads[3]
    if any(pads):
        x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=fill)
    view = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))
    return view[:, :, ::stride, ::stride]


def _conv(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, a: dict) -> np.ndarray:
    k, stride, group = int(w.shape[2]), int(a.get("strides", [1, 1])[0]), int(a.get("group", 1))
    pads = list(a.get("pads", [0, 0, 0, 0]))
    n, c = x.shape[:2]
    if k == 1 and not any(pads) and group == 1:
        xs = x[:, :, ::stride, ::stride]
        y = np.einsum("nchw,oc->nohw", xs, w[:, :, 0, 0], optimize=True)
    elif group == 1:
        win = _windows(x, k, stride, pads)  # N C Ho Wo k k
        ho, wo = win.shape[2:4]
        cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * k * k)
        y = (cols @ w.reshape(w.shape[0], -1).T).reshape(n, ho, wo, -1).transpose(0, 3, 1, 2)
    elif group == c == w.shape[0]:  # depthwise
        win = _windows(x, k, stride, pads)
        y = np.einsum("nchwij,cij->nchw", win, w[:, 0], optimize=True)
    else:
        raise NotImplementedError(f"grouped conv with group={group}")
    y = np.ascontiguousarray(y)
    if b is not None:
        y += b.reshape(1, -1, 1, 1)
    return y


def _erf(x: np.ndarray) -> np.ndarray:
    # Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7): plenty for statistics, and deterministic
    t = 1.0 / (1.0 + 0.3275911 * np.abs(x))
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return np.sign(x) * (1.0 - poly * np.exp(-x * x))


def _eval_node(node: onnx.NodeProto, ins: list[np.ndarray | None]) -> np.ndarray:
    op, a = node.op_type, _attrs(node)
    x = ins[0] if ins else None
    if op == "Conv":
        return _conv(x, ins[1], ins[2] if len(ins) > 2 else None, a)
    if op == "Relu":
        return np.maximum(x, 0.0)
    if op == "Clip":
        return np.clip(x, ins[1], ins[2])
    if op in ("MaxPool", "AveragePool"):
        k, stride = a["kernel_shape"][0], a["strides"][0]
        pads = a.get("pads", [0, 0, 0, 0])
        if op == "MaxPool":
            return _windows(x, k, stride, pads, fill=-np.inf).max(axis=(4, 5))
        if any(pads):
            raise NotImplementedError("padded AveragePool")
        return _windows(x, k, stride, pads).mean(axis=(4, 5))
    if op == "GlobalAveragePool":
        return x.mean(axis=(2, 3), keepdims=True)
    if op == "Flatten":
        axis = a.get("axis", 1)
        return x.reshape(int(np.prod(x.shape[:axis])), -1)
    if op == "Gemm":
        w = ins[1].T if a.get("transB", 0) else ins[1]
        y = (x.T if a.get("transA", 0) else x) @ w * a.get("alpha", 1.0)
        return y + a.get("beta", 1.0) * ins[2] if len(ins) > 2 else y
    if op == "MatMul":
        return x @ ins[1]
    if op == "Add":
        return x + ins[1]
    if op == "Mul":
        return x * ins[1]
    if op == "Div":
        return x / ins[1]
    if op == "Erf":
        return _erf(x)
    if op == "Dropout":
        return x
    if op == "Gather":
        return np.take(x, ins[1].astype(np.int64), axis=a.get("axis", 0))
    if op == "LayerNormalization":
        mean = x.mean(axis=-1, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
        return (x - mean) / np.sqrt(var + a.get("epsilon", 1e-5)) * ins[1] + ins[2]
    raise NotImplementedError(f"the calibration evaluator has no {op}")


def calibrate(model: onnx.ModelProto, inputs: np.ndarray, target_std: float = 3.0) -> onnx.ModelProto:
    """Set data-dependent statistics of a zoo model on the batch `inputs` (in place), in one forward pass.

    * every BatchNormalization's running mean/var becomes the per-channel statistics of its input,
      in graph (topological) order, so each BN sees activations already normalised upstream (LSUV-like);
    * the classifier: a random network maps every image to nearly the same pooled features, so its
      logits would be one fixed pattern plus a small input-dependent part and its top-1 would hardly
      change between inputs. The features' mean over `inputs` is folded into the final Gemm's bias and
      its weight is scaled so the logits vary from input to input with a std of about `target_std`.

    The pass runs in float64 numpy; statistics are rounded to 12 mantissa bits, so the result is the
    same on every machine.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    arrays: dict[str, np.ndarray] = {}

    def init_array(name: str) -> np.ndarray:
        if name not in arrays:
            arrays[name] = numpy_helper.to_array(inits[name]).astype(np.float64)
        return arrays[name]

    def set_init(name: str, value: np.ndarray) -> None:
        inits[name].CopyFrom(numpy_helper.from_array(np.asarray(value, np.float32), name))
        arrays.pop(name, None)

    head = next(n for n in graph.node if "logits" in n.output)
    if head.op_type != "Gemm" or not _attrs(head).get("transB", 0):
        raise ValueError("the logits must come from a Gemm with transB=1")
    values: dict[str, np.ndarray] = {graph.input[0].name: np.asarray(inputs, np.float64)}
    uses: Counter = Counter(i for n in graph.node for i in n.input)
    for node in graph.node:
        if node is head:
            break
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
            continue
        ins = [values[i] if i in values else init_array(i) if i else None for i in node.input]
        if node.op_type == "BatchNormalization":
            x = ins[0]
            axes = tuple(d for d in range(x.ndim) if d != 1)
            mean = x.mean(axis=axes)
            var = x.var(axis=axes)
            var = np.maximum(var, 1e-3 * float(np.median(var)) + 1e-6)  # no dead channel blows up
            mean, var = _round_mantissa(mean), _round_mantissa(var)
            set_init(node.input[3], mean)
            set_init(node.input[4], var)
            shape = (1, -1) + (1,) * (x.ndim - 2)
            scale = ins[1] / np.sqrt(var.astype(np.float64) + _attrs(node).get("epsilon", 1e-5))
            out = (x - mean.reshape(shape)) * scale.reshape(shape) + ins[2].reshape(shape)
        else:
            out = _eval_node(node, ins)
        values[node.output[0]] = out
        for name in node.input:  # drop activations nothing else reads
            uses[name] -= 1
            if uses[name] == 0 and name in values:
                del values[name]
    feats = values[head.input[0]]
    mu = _round_mantissa(feats.mean(axis=0)).astype(np.float64)
    weight = init_array(head.input[1])
    spread = float(((feats - mu) @ weight.T).std())  # the input-dependent part of the logits
    gain = float(_round_mantissa(np.array([target_std / max(spread, 1e-12)]), bits=6)[0])
    weight = (weight * gain).astype(np.float32)
    bias = init_array(head.input[2]) - weight.astype(np.float64) @ mu
    set_init(head.input[1], weight)
    set_init(head.input[2], bias)
    return model


def _calibration_count(size: int) -> int:
    """Images for the statistics: 4 at 224, more at small sizes so late maps still give samples."""
    return int(max(4, min(16, math.ceil(4 * (224 / size) ** 2))))


# --------------------------------------------------------------------------- public API


_BUILDERS: dict[str, Callable[[_Writer, str, int], str]] = {
    "resnet18": lambda w, x, s: _resnet(w, x, "resnet18"),
    "resnet34": lambda w, x, s: _resnet(w, x, "resnet34"),
    "resnet50": lambda w, x, s: _resnet(w, x, "resnet50"),
    "mobilenetv2_1.0": lambda w, x, s: _mobilenetv2(w, x, 1.0),
    "mobilenetv2_1.4": lambda w, x, s: _mobilenetv2(w, x, 1.4),
    "vgg19_bn": lambda w, x, s: _vgg19_bn(w, x, s),
    "vit_tiny_mlp": lambda w, x, s: _vit_tiny_mlp(w, x),
}


def input_shape(name: str, *, image_size: int | None = None, batch: int = 1) -> tuple[int, ...]:
    """Shape of the model's `input` (for vit_tiny_mlp: tokens = (image_size // 16)**2 + 1, 197 at 224)."""
    _check_name(name)
    size = 224 if image_size is None else int(image_size)
    if name == "vit_tiny_mlp":
        return (batch, (size // 16) ** 2 + 1, 192)
    return (batch, 3, size, size)


def _check_name(name: str) -> None:
    if name not in NAMES:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(NAMES)}")


def check_arguments(name: str, *, image_size: int | None = None, batch: int = 1) -> int:
    """Raise ValueError for an unknown name or a bad size/batch; returns the image size to use."""
    _check_name(name)
    size = 224 if image_size is None else int(image_size)
    min_size = 16 if name == "vit_tiny_mlp" else 32
    if size < min_size:
        raise ValueError(f"{name}: image_size must be at least {min_size}, got {size}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    return size


def build(name: str, *, image_size: int | None = None, batch: int = 1, seed: int = 0) -> onnx.ModelProto:
    """Build model `name` (one of NAMES) as an ONNX ModelProto; deterministic in all arguments.

    image_size: spatial size of the input (default 224, at least 32); for vit_tiny_mlp it sets the
    token count as a ViT-16 would ((image_size // 16)**2 + 1).
    """
    size = check_arguments(name, image_size=image_size, batch=batch)
    x_shape = input_shape(name, image_size=size, batch=batch)
    w = _Writer(name, seed)
    y = _BUILDERS[name](w, "input", size)
    doc = (f"{name}: random-weight replica of the torchvision/timm architecture written as an opset-"
           f"{DEFAULT_OPSET} PyTorch export (BatchNorm not folded); built by lmopt models/zoo.py, "
           f"seed {seed}, input {list(x_shape)}.")
    model = w.model(name, "input", x_shape, y, (batch, NUM_CLASSES), doc)
    if name == "vit_tiny_mlp":
        # the blocks act on each token alone and the head reads token 0: one token per sample suffices
        samples = np.random.default_rng([seed, 0x70CE5]).standard_normal((32, 1, x_shape[2]))
    else:
        samples = smooth_images(_calibration_count(size), size, seed=seed)
    calibrate(model, samples)
    helper.set_model_props(model, {"lmopt.zoo.name": name, "lmopt.zoo.seed": str(seed),
                                   "lmopt.zoo.image_size": str(size)})
    return model


def count_params(model: onnx.ModelProto) -> int:
    """Number of values in the float initializers (BN running statistics included)."""
    return int(sum(np.prod(t.dims, dtype=np.int64) for t in model.graph.initializer))


__all__: Iterable[str] = ["NAMES", "build", "input_shape", "smooth_images", "calibrate", "count_params"]
