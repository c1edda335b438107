"""Label-free distillation of a compressed model (`--distill`, needs the `lmopt[torch]` extra).

The original ONNX model is the teacher (run in ONNX Runtime once, its outputs and its values at
the ends of the changed blocks kept). The student is the compressed graph itself, translated to
torch with the weights of its Conv/Gemm layers as parameters: structure, and so measured latency,
do not change. It learns to match the teacher's output distribution (KL, or normalised MSE for
outputs that are not class scores) and its features at those block ends, on the calibration
data. Weights are checked on held-out calibration data after every epoch and the best are
written back into the ONNX initializers; if no epoch beats the starting point, nothing changes.
Anchors: hardware-aware knowledge distillation (HAKD), few-shot block dropping (PRACTISE).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import LmoptError
from .repair import run_with_outputs
from .metrics import compare, damage, is_classifier
from .runtime import free_batch

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
    """Initializer names of the weights and biases of Conv and Gemm layers."""
    inits = {t.name for t in model.graph.initializer}
    names = []
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            names += [n for n in node.input[1:3] if n in inits and n not in names]
    return names


def _write_back(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for init in model.graph.initializer:
        if init.name in values:
            old = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(values[init.name].astype(old.dtype).reshape(old.shape), init.name))
    return model


def _stack(feeds: list[dict]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]}


def distill(original: onnx.ModelProto, compressed: onnx.ModelProto, features: list[str], train_feeds: list[dict],
            check_feeds: list[dict], minutes: float, batch_size: int = 32, lr: float = 1e-4,
            progress: bool = False) -> tuple[onnx.ModelProto, DistillReport]:
    """Distil `original` into `compressed`'s weights for about `minutes` (see the module's text)."""
    try:
        import torch
    except ImportError:
        raise LmoptError("--distill needs PyTorch: pip install 'lmopt[torch]'") from None
    from tqdm import tqdm

    from .latency.torch_translate import translate

    started = time.perf_counter()
    if len(compressed.graph.input) != 1 or len(train_feeds) < 2 or not check_feeds:
        raise LmoptError("--distill needs a single-input model and at least 2 calibration samples")
    input_name = compressed.graph.input[0].name
    reference_check = run_with_outputs(original, check_feeds, [])[0]
    classifier = is_classifier(reference_check[None] if reference_check.ndim == 2 else reference_check)

    def check_damage(model: onnx.ModelProto) -> float:
        return damage(compare(reference_check, run_with_outputs(model, check_feeds, [])[0]))

    # Features are block-end tensors present in both graphs (a removed residual branch leaves none).
    existing = {o.name for o in compressed.graph.output}
    produced = {name for node in compressed.graph.node for name in node.output}
    features = [name for name in dict.fromkeys(features) if name in produced and name not in existing]
    first_feature = len(compressed.graph.output)
    student_model = _with_outputs(free_batch(compressed), features)
    module = translate(student_model)
    trainable = _trainable(compressed)
    params = []
    for name in trainable:
        slot = module._slot[name]
        value = getattr(module, slot).clone().float()
        delattr(module, slot)
        param = torch.nn.Parameter(value)
        module.register_parameter(slot, param)
        params.append(param)
    optimizer = torch.optim.Adam(params, lr=lr)
    teacher = run_with_outputs(original, train_feeds, features)
    x_all = torch.from_numpy(_stack(train_feeds)[input_name])
    targets = [torch.from_numpy(t.astype(np.float32)) for t in teacher]
    scales = [float((t ** 2).mean()) + 1e-12 for t in targets]

    def loss_of(outputs, index):
        logits, feats = outputs[0], outputs[first_feature:]
        goal = targets[0][index]
        if classifier:
            out_loss = torch.nn.functional.kl_div(torch.log_softmax(logits.flatten(1), -1),
                                                  torch.log_softmax(goal.flatten(1), -1),
                                                  log_target=True, reduction="batchmean")
        else:
            out_loss = ((logits - goal) ** 2).mean() / scales[0]
        feat_loss = sum(((f - t[index]) ** 2).mean() / s for f, t, s in zip(feats, targets[1:], scales[1:]))
        return out_loss + FEATURE_WEIGHT * feat_loss / max(len(features), 1)

    def current_weights() -> dict[str, np.ndarray]:
        return {name: p.detach().numpy().copy() for name, p in zip(trainable, params)}

    best_damage = before = check_damage(compressed)
    best_weights, epochs = None, 0
    deadline = started + 60 * minutes
    bar = tqdm(total=round(60 * minutes), desc="distilling", unit="s", disable=not progress, leave=False)
    generator = torch.Generator().manual_seed(0)
    while time.perf_counter() < deadline:
        module.train()
        for index in torch.randperm(len(x_all), generator=generator).split(batch_size):
            optimizer.zero_grad()
            loss_of(module(x_all[index]), index).backward()
            optimizer.step()
            if time.perf_counter() >= deadline:
                break
        epochs += 1
        weights = current_weights()
        trial = check_damage(_write_back(compressed, weights))
        log.info("distill epoch %d: check damage %.4g (best %.4g)", epochs, trial, best_damage)
        if trial < best_damage:
            best_damage, best_weights = trial, weights
        bar.n = min(bar.total, round(time.perf_counter() - started))
        bar.refresh()
    bar.close()
    result = compressed if best_weights is None else _write_back(compressed, best_weights)
    return result, DistillReport((time.perf_counter() - started) / 60, epochs, before, best_damage)
