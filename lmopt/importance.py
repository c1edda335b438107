"""Importance without training: how far the network's output moves when one candidate alone is
applied, measured on calibration inputs. Only the part of the network downstream of the block is
re-run; its other inputs come from one cached run of the original model."""
from __future__ import annotations

import hashlib

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .blocks import suffix_model
from .loader import to_model
from .verify import compare, session


# Bump when the damage measure changes, so cached scores of the old measure are not reused.
SCORE_VERSION = "damage-v5"


def feeds_fingerprint(feeds: list[dict[str, np.ndarray]]) -> str:
    digest = hashlib.sha256()
    for feed in feeds:
        for name in sorted(feed):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(feed[name]).tobytes())
    return digest.hexdigest()[:32]


class Scorer:
    """Scores rewrites against the original model on calibration feeds. Tensors of the original
    that a rewrite's suffix reads are computed by running the original with them as extra outputs,
    once per new set of tensors, and kept."""

    def __init__(self, model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], prefetch: list[str],
                 kind: str | None = None):
        """`prefetch`: tensors most suffixes will read (the chains' positions); `kind`: see verify.compare."""
        self.model, self.feeds, self.kind = model, feeds, kind
        self.graph = gs.import_onnx(model)
        self.cached: list[dict[str, np.ndarray]] = [dict(feed) for feed in feeds]
        self.reference = None
        self._fetch(list(dict.fromkeys(prefetch)))

    def _fetch(self, names: list[str]) -> None:
        missing = [n for n in names if n not in self.cached[0]]
        if not missing and self.reference is not None:
            return
        probe = self.graph.copy()
        tensors = probe.tensors()
        probe.outputs = list(probe.outputs[:1]) + [tensors[n] for n in missing]
        sess = session(to_model(probe, like=self.model))
        reference = []
        for cached, feed in zip(self.cached, self.feeds):
            values = sess.run(None, feed)
            reference.append(values[0])
            cached.update(zip(missing, values[1:]))
        self.reference = np.stack(reference)

    def values(self, names: list[str]) -> list[np.ndarray]:
        """The original model's values of `names` over all calibration feeds (batch-concatenated)."""
        self._fetch(names)
        return [np.concatenate([cached[name] for cached in self.cached]) for name in names]

    def score(self, transformed: gs.Graph, changed_prefix: str) -> dict:
        """Fidelity metrics of the transformed graph against the original; only the part of the
        network the rewrite (nodes named `changed_prefix...`) can change is run."""
        suffix = suffix_model(transformed, changed_prefix, like=self.model)
        if suffix is None:
            return compare(self.reference, self.reference, kind=self.kind)
        sess = session(suffix)
        wanted = [i.name for i in sess.get_inputs()]
        self._fetch(wanted)
        outputs = [sess.run(None, {name: cached[name] for name in wanted})[0] for cached in self.cached]
        return compare(self.reference, np.stack(outputs), kind=self.kind)

