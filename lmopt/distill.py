"""Label-free distillation of a compressed model (`--distill`, needs the `lmopt[torch]` extra).

The original ONNX model is the teacher (run in ONNX Runtime once, its outputs and its values at the
ends of the changed blocks kept). The student is the compressed graph itself, translated to torch
with the weights of its linear layers (Conv, Gemm, MatMul and their biases) and LayerNorms as
parameters: structure, and so measured latency, do not change. It learns to match the teacher's
output distribution (KL, or normalised MSE for outputs that are not class scores, such as
embeddings) and its features at those block ends, on the calibration data; models with several
inputs (token ids, masks) train as well as image models. Weights are checked on held-out calibration
data after every epoch and the best are written back into the ONNX initializers; if no epoch beats
the starting point, nothing changes. Anchors: hardware-aware knowledge distillation (HAKD), few-shot
block dropping (PRACTISE).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import LmoptError
from .metrics import compare, damage, is_classifier
from .repair import run_with_outputs
from .runtime import free_batch, separable_batch

log = logging.getLogger("lmopt.distill")

FEATURE_WEIGHT = 1.0   # feature loss beside the output loss (both normalised to ~1 at the start)


@dataclass
class DistillReport:
    minutes: float
    epochs: int
    check_damage_before: float
    check_damage_after: float

    def to_json(self) -> dict:
        return {"minutes": round(self.minutes, 2), "epochs": self.epochs,
                "check_damage_before": self.check_damage_before, "check_damage_after": self.check_damage_after}


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name not in existing:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return model


def _trainable(model: onnx.ModelProto) -> list[str]:
    """Initializer names of the float32 weights and biases of the linear layers (Conv, Gemm, the
    constant operand of a MatMul and the constant added to its result) and of LayerNormalization."""
    floats = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    producers = {out: node.op_type for node in model.graph.node for out in node.output}
    names: list[str] = []
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "LayerNormalization"):
            names += [n for n in node.input[1:3] if n in floats]
        elif node.op_type == "MatMul":
            names += [n for n in node.input if n in floats]
        elif node.op_type == "Add" and any(producers.get(n) in ("MatMul", "Gemm") for n in node.input):
            names += [n for n in node.input if n in floats]
    return list(dict.fromkeys(names))


def _write_back(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for init in model.graph.initializer:
        if init.name in values:
            old = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(values[init.name].astype(old.dtype).reshape(old.shape), init.name))
    return model


def _stack(feeds: list[dict]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]}


def _require_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise LmoptError("--distill needs PyTorch: pip install 'lmopt[torch]'") from None
    return torch


class _Check:
    """Damage on the held-out calibration data, against the teacher's output there."""

    def __init__(self, original: onnx.ModelProto, feeds: list[dict], kind: str | None):
        self.feeds, self.kind = feeds, kind
        self.reference = run_with_outputs(original, feeds, [])[0]
        self.classifier = kind != "embedding" and is_classifier(
            self.reference[None] if self.reference.ndim == 2 else self.reference)

    def damage(self, model: onnx.ModelProto) -> float:
        return damage(compare(self.reference, run_with_outputs(model, self.feeds, [])[0], kind=self.kind))


def _shared_features(compressed: onnx.ModelProto, features: list[str]) -> list[str]:
    """The block-end tensors present in both graphs (a removed residual branch leaves none), in
    order, without duplicates or graph outputs."""
    existing = {o.name for o in compressed.graph.output}
    produced = {name for node in compressed.graph.node for name in node.output}
    return [name for name in dict.fromkeys(features) if name in produced and name not in existing]


class _Student:
    """A translated graph whose initializers `names` (Conv/Gemm weights and biases) become float
    parameters; the other constants stay fixed."""

    def __init__(self, module: Any, names: list[str]):
        import torch

        self.module, self.names = module, names
        self.params = []
        for name in self.names:
            slot = self.module.slots[name]
            value = getattr(self.module, slot).clone().float()
            delattr(self.module, slot)
            param = torch.nn.Parameter(value)
            self.module.register_parameter(slot, param)
            self.params.append(param)

    def weights(self) -> dict[str, np.ndarray]:
        return {name: p.detach().numpy().copy() for name, p in zip(self.names, self.params)}

    def run(self, inputs: list[Any], index: Any, mode: str) -> tuple:
        """The outputs for the samples `index` of `inputs` (the batch-1 feeds concatenated on dim 0),
        run as one batch ("batch": the graph's batch is free), mapped over the samples ("vmap":
        torch.vmap over the batch-1 graph), or one by one ("single"); samples on dim 0 either way."""
        import torch

        if mode == "batch":
            return self.module(*[x[index] for x in inputs])
        if mode == "vmap":
            outputs = torch.vmap(self.module)(*[x[index].unsqueeze(1) for x in inputs])
            return tuple(out.flatten(0, 1) for out in outputs)
        runs = [self.module(*[x[i:i + 1] for x in inputs]) for i in index.tolist()]
        return tuple(torch.cat(outs) for outs in zip(*runs))

    def mode(self, inputs: list[Any], batched: bool) -> str:
        """How batches run: "batch" where the graph's batch is free, else "vmap" where mapping the
        batch-1 graph over two samples gives what running them alone gives (a graph that reads
        values as shapes cannot be mapped), else "single"."""
        import torch

        if batched:
            return "batch"
        pair = torch.arange(min(2, len(inputs[0])))
        with torch.no_grad():
            alone = self.run(inputs, pair, "single")
            try:
                mapped = self.run(inputs, pair, "vmap")
            except Exception:  # any failure to map means: run one by one
                return "single"
        same = all(a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5)
                   for a, b in zip(alone, mapped))
        return "vmap" if same else "single"


class _Loss:
    """The output loss (KL for class scores, else MSE over the teacher's mean square) plus
    FEATURE_WEIGHT times the mean feature loss (each feature's MSE over its mean square). `teacher`
    holds the teacher's first output, then its value of each feature; the student's outputs from
    `first_feature` on are its features in the same order."""

    def __init__(self, teacher: list[np.ndarray], first_feature: int, classifier: bool):
        import torch

        self.targets = [torch.from_numpy(t.astype(np.float32)) for t in teacher]
        self.scales = [float((t ** 2).mean()) + 1e-12 for t in self.targets]
        self.first_feature, self.classifier = first_feature, classifier

    def __call__(self, outputs: tuple, index: Any) -> Any:
        import torch

        logits, feats = outputs[0], outputs[self.first_feature:]
        goal = self.targets[0][index]
        if self.classifier:
            out_loss = torch.nn.functional.kl_div(torch.log_softmax(logits.flatten(1), -1),
                                                  torch.log_softmax(goal.flatten(1), -1),
                                                  log_target=True, reduction="batchmean")
        else:
            out_loss = ((logits - goal) ** 2).mean() / self.scales[0]
        feat_loss = sum(((f - t[index]) ** 2).mean() / s
                        for f, t, s in zip(feats, self.targets[1:], self.scales[1:]))
        return out_loss + FEATURE_WEIGHT * feat_loss / max(len(self.targets) - 1, 1)


def _epoch(student: _Student, optimizer: Any, loss_of: _Loss, inputs: list[Any], mode: str, batch_size: int,
           generator: Any, deadline: float) -> float:
    """One pass over the training samples in a random order, cut short at `deadline`; the mean
    training loss."""
    import torch

    student.module.train()
    losses = []
    for index in torch.randperm(len(inputs[0]), generator=generator).split(batch_size):
        optimizer.zero_grad()
        loss = loss_of(student.run(inputs, index, mode), index)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if time.perf_counter() >= deadline:
            break
    return float(np.mean(losses))


def distill(original: onnx.ModelProto, compressed: onnx.ModelProto, features: list[str], train_feeds: list[dict],
            check_feeds: list[dict], minutes: float, batch_size: int = 32, lr: float = 1e-4,
            output_kind: str | None = None, progress: bool = False) -> tuple[onnx.ModelProto, DistillReport]:
    """Distil `original` into `compressed`'s weights for about `minutes` (see the module's text).
    `output_kind`: the first output's kind, as metrics.compare takes it ("embedding": trained by MSE and
    checked by cosine similarity, never as class scores)."""
    torch = _require_torch()
    from tqdm import tqdm

    from .latency.torch_translate import translate

    started = time.perf_counter()
    if len(train_feeds) < 2 or not check_feeds:
        raise LmoptError("--distill needs at least 2 calibration samples for training and 1 for checking")
    check = _Check(original, check_feeds, output_kind)
    features = _shared_features(compressed, features)
    batched = separable_batch(compressed, train_feeds) is not None
    # The student outputs the features after the graph's own outputs.
    student = _Student(translate(_with_outputs(free_batch(compressed) if batched else compressed, features)),
                       _trainable(compressed))
    optimizer = torch.optim.Adam(student.params, lr=lr)
    teacher = run_with_outputs(original, train_feeds, features)
    stacked = _stack(train_feeds)
    inputs = [torch.from_numpy(stacked[name]) for name in student.module.input_names]
    loss_of = _Loss(teacher, len(compressed.graph.output), check.classifier)
    mode = student.mode(inputs, batched)
    log.info("distill: %d training samples, batches run as %s", len(train_feeds), mode)

    best_damage = before = check.damage(compressed)
    best_weights, epochs = None, 0
    deadline = started + 60 * minutes
    bar = tqdm(total=round(60 * minutes), desc="distilling", unit="s", disable=not progress, leave=False)
    generator = torch.Generator().manual_seed(0)
    while time.perf_counter() < deadline:
        loss = _epoch(student, optimizer, loss_of, inputs, mode, batch_size, generator, deadline)
        epochs += 1
        weights = student.weights()
        trial = check.damage(_write_back(compressed, weights))
        log.info("distill epoch %d: training loss %.4g, check damage %.4g (best %.4g)", epochs, loss, trial,
                 best_damage)
        if trial < best_damage:
            best_damage, best_weights = trial, weights
        bar.n = min(bar.total, round(time.perf_counter() - started))
        bar.refresh()
    bar.close()
    result = compressed if best_weights is None else _write_back(compressed, best_weights)
    return result, DistillReport((time.perf_counter() - started) / 60, epochs, before, best_damage)
