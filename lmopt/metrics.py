"""How far outputs moved: the fidelity measures of every report, and the one-number damage the planner minimises."""
from __future__ import annotations

import numpy as np

from .errors import LmoptError


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
        # Changed answers weighted by how sure the original was of them: a flip of a confident
        # answer costs more than a flip of a near-tie. With tiny or uniform logits every weight is
        # about equal and this is the plain flip rate, so nothing looks free.
        sure = np.exp(ref_logp).max(axis=-1)
        result["weighted_flips"] = float((sure * ~agree).sum() / sure.sum())
        # Agreement where the original is sure of its answer (top-1 probability >= 0.5): the
        # answers a user relies on; ambiguous inputs flip on tiny changes.
        result["confident_count"] = int(confident.sum())
        result["confident_agreement"] = float(agree[confident].mean()) if confident.any() else None
        result["samples"] = int(agree.size)
    return result


def damage(metrics: dict) -> float:
    """One number for how much a change hurts (lower is better), independent of the output's scale:
    for classifiers KL plus the changed top-1 answers weighted by the original's confidence in them
    (KL alone calls everything free when logits are tiny; the plain flip rate counted near-ties as
    much as sure answers and chose worse plans on both Lite0 folds, bench/RESULTS.md), for
    embeddings 1 - mean cosine similarity, else NRMSE^2. NaN or inf is an error, never a score."""
    value = (metrics["kl"] + metrics["weighted_flips"] if "kl" in metrics else
             1.0 - metrics["cosine_mean"] if "cosine_mean" in metrics else metrics["nrmse"] ** 2)
    if not np.isfinite(value):
        raise LmoptError("a fidelity score is NaN or inf: the model (or a rewrite of it) gives non-finite outputs "
                         "on the calibration data")
    return float(value)


def compare_named(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> dict[str, dict]:
    """compare() for each output, by name (a missing or reshaped output is an error)."""
    result = {}
    for name, ref in reference.items():
        if name not in candidate or candidate[name].shape != ref.shape:
            got = list(candidate[name].shape) if name in candidate else "missing"
            raise LmoptError(f"output {name!r} changed shape: {list(ref.shape)} -> {got}")
        result[name] = compare(ref, candidate[name])
    return result
