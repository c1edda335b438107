"""Run models in onnxruntime and compare outputs: the evidence behind every rewrite."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort

from .errors import LmoptError
from .onnxio import graph_inputs, input_dtype, random_feed, runtime_compatible, static_shape

def input_specs(model: onnx.ModelProto) -> list[tuple[str, tuple[int, ...], type]]:
    """(name, static shape, numpy dtype) of each graph input."""
    return [(vi.name, static_shape(vi), input_dtype(vi)) for vi in graph_inputs(model)]


def random_inputs(model: onnx.ModelProto, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """`count` random feeds (floats ~ N(0,1)) for a model with static shapes."""
    rng = np.random.default_rng(seed)
    return [random_feed(model, rng) for _ in range(count)]


def session(model: onnx.ModelProto, threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    ir_version = model.ir_version
    runtime_compatible(model)  # only lowers the IR version field; restored below
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise LmoptError(f"onnxruntime cannot load the model: {str(exc).splitlines()[0]}") from None
    finally:
        model.ir_version = ir_version


def run_outputs(model_or_session, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """First graph output for each feed, stacked along a new leading axis."""
    sess = model_or_session if isinstance(model_or_session, ort.InferenceSession) else session(model_or_session)
    return np.stack([sess.run(None, feed)[0] for feed in feeds])


def run_all_outputs(model_or_session, feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Every graph output by name, each stacked over the feeds."""
    sess = model_or_session if isinstance(model_or_session, ort.InferenceSession) else session(model_or_session)
    names = [o.name for o in sess.get_outputs()]
    runs = [sess.run(names, feed) for feed in feeds]
    return {name: np.stack([r[i] for r in runs]) for i, name in enumerate(names)}


def compare_outputs(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> dict[str, dict]:
    """compare() for each graph output, by name (a missing or reshaped output is an error)."""
    result = {}
    for name, ref in reference.items():
        if name not in candidate or candidate[name].shape != ref.shape:
            got = list(candidate[name].shape) if name in candidate else "missing"
            raise LmoptError(f"output {name!r} changed shape: {list(ref.shape)} -> {got}")
        result[name] = compare(ref, candidate[name])
    return result


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def is_probability(values: np.ndarray) -> bool:
    """Outputs that are already softmax probabilities (as many exporters append a Softmax)."""
    return bool(values.min() >= 0 and np.allclose(values.sum(axis=-1), 1.0, atol=1e-3))


def log_probabilities(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    if is_probability(values):
        return np.log(np.clip(values, 1e-12, None))
    return log_softmax(values)


def is_classifier(reference: np.ndarray) -> bool:
    """Logits of shape (..., batch, classes) with more than one class."""
    return reference.ndim >= 2 and reference.shape[-1] > 1 and reference[0].ndim <= 2


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """How far `candidate` moved from `reference` (both stacked over samples)."""
    diff = np.abs(candidate.astype(np.float64) - reference)
    scale = float(np.abs(reference).max()) or 1.0
    result = {
        "max_abs": float(diff.max()),
        "max_rel": float(diff.max() / scale),
        "nrmse": float(np.sqrt((diff ** 2).mean() / max((reference.astype(np.float64) ** 2).mean(), 1e-30))),
    }
    if is_classifier(reference):
        ref_logp, new_logp = log_probabilities(reference), log_probabilities(candidate)
        kl = (np.exp(ref_logp) * (ref_logp - new_logp)).sum(axis=-1)
        result["kl"] = float(kl.mean())
        result["top1_agreement"] = float((reference.argmax(-1) == candidate.argmax(-1)).mean())
    return result


def damage(metrics: dict) -> float:
    """One number for how much a change hurts (lower is better): KL for classifiers, else NRMSE^2."""
    return metrics["kl"] if "kl" in metrics else metrics["nrmse"] ** 2


def op_table(model: onnx.ModelProto) -> dict:
    counts = Counter(node.op_type for node in model.graph.node)
    params = sum(int(np.prod(init.dims)) for init in model.graph.initializer)
    return {"nodes": len(model.graph.node), "ops": dict(sorted(counts.items())), "params": params,
            "size_mb": round(model.ByteSize() / 2 ** 20, 2)}


def format_op_table(before: dict, after: dict) -> str:
    ops = sorted(set(before["ops"]) | set(after["ops"]))
    rows = [("", "before", "after")]
    rows += [(op, str(before["ops"].get(op, 0)), str(after["ops"].get(op, 0))) for op in ops]
    rows += [("nodes", str(before["nodes"]), str(after["nodes"])),
             ("params", f"{before['params']:,}", f"{after['params']:,}"),
             ("size MB", str(before["size_mb"]), str(after["size_mb"]))]
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"  {r[0]:<{width[0]}}  {r[1]:>{width[1]}}  {r[2]:>{width[2]}}" for r in rows)
