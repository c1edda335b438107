"""Importance without training: how far the network's output moves when one candidate alone is
applied, measured on calibration inputs. Only the part of the network downstream of the block is
re-run; its other inputs come from one cached run of the original model."""
from __future__ import annotations

import hashlib

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .blocks import suffix_model
from .graph import to_model
from .verify import compare, run_each


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
    once per new set of tensors, and kept: one array per tensor, stacked over the feeds (each feed's
    value is a view of it), so that hundreds of feeds of a large model fit in memory."""

    FETCH_GROUP = 8  # tensors fetched per run of the original: bounds the memory a fetch needs twice

    def __init__(self, model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], prefetch: list[str],
                 kind: str | None = None):
        """`prefetch`: tensors most suffixes will read (the chains' positions); `kind`: see verify.compare."""
        self.model, self.feeds, self.kind = model, feeds, kind
        self.graph = gs.import_onnx(model)
        self.stacked: dict[str, np.ndarray] = {name: np.stack([feed[name] for feed in feeds]) for name in feeds[0]}
        self.reference = None
        self._fetch(list(dict.fromkeys(prefetch)))

    def _fetch(self, names: list[str]) -> None:
        missing = [n for n in dict.fromkeys(names) if n not in self.stacked]
        if not missing and self.reference is not None:
            return
        for begin in range(0, max(len(missing), 1), self.FETCH_GROUP):
            group = missing[begin:begin + self.FETCH_GROUP]
            probe = self.graph.copy()
            tensors = probe.tensors()
            probe.outputs = list(probe.outputs[:1]) + [tensors[n] for n in group]
            runs = run_each(to_model(probe, like=self.model), self.feeds)
            self.reference = np.stack([values[0] for values in runs])
            for index, name in enumerate(group, start=1):
                self.stacked[name] = np.stack([values[index] for values in runs])
            del runs

    def values(self, names: list[str]) -> list[np.ndarray]:
        """The original model's values of `names` over all calibration feeds (batch-concatenated)."""
        self._fetch(names)
        return [self.stacked[name].reshape((-1,) + self.stacked[name].shape[2:]) for name in names]

    def score(self, transformed: gs.Graph, changed_prefix: str) -> dict:
        """Fidelity metrics of the transformed graph against the original; only the part of the
        network the rewrite (nodes named `changed_prefix...`) can change is run."""
        suffix = suffix_model(transformed, changed_prefix, like=self.model)
        if suffix is None:
            return compare(self.reference, self.reference, kind=self.kind)
        wanted = [i.name for i in suffix.graph.input]
        self._fetch(wanted)
        feeds = [{name: self.stacked[name][i] for name in wanted} for i in range(len(self.feeds))]
        return compare(self.reference, np.stack([outs[0] for outs in run_each(suffix, feeds)]), kind=self.kind)
