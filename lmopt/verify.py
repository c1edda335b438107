"""Run models in onnxruntime and compare outputs: the evidence behind every rewrite."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from .errors import LmoptError, one_line
from .onnxio import graph_inputs, input_dtype, runtime_compatible, static_shape

def input_specs(model: onnx.ModelProto) -> list[tuple[str, tuple[int, ...], type]]:
    """(name, static shape, numpy dtype) of each graph input."""
    return [(vi.name, static_shape(vi), input_dtype(vi)) for vi in graph_inputs(model)]


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
        raise LmoptError(f"onnxruntime cannot load the model: {one_line(exc)}") from None
    finally:
        model.ir_version = ir_version


BATCH = 32  # feeds run together when the model allows it


def free_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a batch-1 model whose leading dim is free: inputs and outputs get a symbolic batch,
    inner shapes are dropped, and constant Reshape targets copy the batch dim (0) instead of fixing it."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == 1:
            dims[0].dim_param = "batch"
    del model.graph.value_info[:]
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Reshape" and node.input[1] in inits:
            shape = numpy_helper.to_array(inits[node.input[1]]).copy()
            if shape.size and shape[0] == 1:
                shape[0] = 0
                inits[node.input[1]].CopyFrom(numpy_helper.from_array(shape, node.input[1]))
    return model


def run_each(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    """Every graph output for each feed. Feeds of batch 1 run BATCH at a time where the model
    allows it (checked against single runs on the first two feeds), else one by one."""
    sess = session(model)
    if len(feeds) < 3 or any(v.shape[:1] != (1,) for v in feeds[0].values()):
        return [sess.run(None, feed) for feed in feeds]
    single = [sess.run(None, feed) for feed in feeds[:2]]
    try:
        batched = session(free_batch(model))
        pair = batched.run(None, {name: np.concatenate([f[name] for f in feeds[:2]]) for name in feeds[0]})
        fits = all(out.shape[:1] == (2,) and np.allclose(out[i:i + 1], single[i][j], rtol=1e-4, atol=1e-5)
                   for j, out in enumerate(pair) for i in range(2))
    except Exception:  # the model is not batch-separable: run one by one
        fits = False
    if not fits:
        return single + [sess.run(None, feed) for feed in feeds[2:]]
    results = list(single)
    for begin in range(2, len(feeds), BATCH):
        chunk = feeds[begin:begin + BATCH]
        outs = batched.run(None, {name: np.concatenate([f[name] for f in chunk]) for name in feeds[0]})
        results += [[out[i:i + 1] for out in outs] for i in range(len(chunk))]
    return results


def run_outputs(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    """First graph output for each feed, stacked along a new leading axis."""
    return np.stack([outs[0] for outs in run_each(model, feeds)])


def run_all_outputs(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Every graph output by name, each stacked over the feeds."""
    runs = run_each(model, feeds)
    return {out.name: np.stack([r[i] for r in runs]) for i, out in enumerate(model.graph.output)}


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


def cosine(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Cosine similarity of each vector (last axis) of `candidate` to the same vector of `reference`."""
    a = reference.reshape(-1, reference.shape[-1]).astype(np.float64)
    b = candidate.reshape(-1, candidate.shape[-1]).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(norms > 0, (a * b).sum(1) / np.maximum(norms, 1e-30), 1.0)


def compare(reference: np.ndarray, candidate: np.ndarray, kind: str | None = None) -> dict:
    """How far `candidate` moved from `reference` (both stacked over samples). `kind` "embedding":
    cosine similarity per vector instead of the classifier measures (see lmopt.outputs)."""
    diff = np.abs(candidate.astype(np.float64) - reference)
    scale = float(np.abs(reference).max()) or 1.0
    result = {
        "max_abs": float(diff.max()),
        "max_rel": float(diff.max() / scale),
        "nrmse": float(np.sqrt((diff ** 2).mean() / max((reference.astype(np.float64) ** 2).mean(), 1e-30))),
    }
    if kind == "embedding":
        cos = cosine(reference, candidate)
        result["cosine_mean"], result["cosine_min"] = float(cos.mean()), float(cos.min())
    elif is_classifier(reference):
        ref_logp, new_logp = log_probabilities(reference), log_probabilities(candidate)
        kl = (np.exp(ref_logp) * (ref_logp - new_logp)).sum(axis=-1)
        agree = reference.argmax(-1) == candidate.argmax(-1)
        confident = np.exp(ref_logp).max(axis=-1) >= 0.5
        top5 = np.argsort(-candidate, axis=-1)[..., :5] == reference.argmax(-1)[..., None]
        result["kl"] = float(kl.mean())
        result["top1_agreement"] = float(agree.mean())
        result["top5_contains"] = float(top5.any(-1).mean())
        # Agreement where the original is sure of its answer (top-1 probability >= 0.5): the
        # answers a user relies on; ambiguous inputs flip on tiny changes.
        result["confident_count"] = int(confident.sum())
        result["confident_agreement"] = float(agree[confident].mean()) if confident.any() else None
        result["samples"] = int(agree.size)
    return result


def damage(metrics: dict) -> float:
    """One number for how much a change hurts (lower is better), independent of the output's scale:
    for classifiers KL plus the fraction of top-1 answers changed (KL alone calls everything free
    when logits are tiny), for embeddings 1 - mean cosine similarity, else NRMSE^2. NaN or inf is an
    error, never a score."""
    value = (metrics["kl"] + 1.0 - metrics["top1_agreement"] if "kl" in metrics else
             1.0 - metrics["cosine_mean"] if "cosine_mean" in metrics else metrics["nrmse"] ** 2)
    if not np.isfinite(value):
        raise LmoptError("a fidelity score is NaN or inf: the model (or a rewrite of it) gives non-finite outputs "
                         "on the calibration data")
    return float(value)


def check_finite(feeds: list[dict[str, np.ndarray]], what: str) -> None:
    """Refuse data with NaN or inf: every score computed from it would be meaningless."""
    for index, feed in enumerate(feeds):
        for name, value in feed.items():
            if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
                raise LmoptError(f"{what}: sample {index} ({name!r}) holds NaN or inf values")


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
