"""Scoring without labels: how far the network's output moves when one candidate alone is applied,
measured on calibration inputs, with each merged layer first refit by least squares on the other
half of them. Only the part of the network downstream of the block is re-run; its other inputs
come from one cached run of the original model.
"""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .algebra import LayerSpec
from .algebra.linear import ConvSpec
from .algebra.lowrank import reduced_rank
from .algebra.refit import refit_conv, refit_dense
from .apply import apply_candidates
from .blocks import suffix_model
from .calib import Data
from .candidates import Candidate
from .graph import to_model
from .inputs import real_tokens
from .latency.cache import LatencyCache
from .latency.signature import model_fingerprint
from .metrics import compare, damage
from .passes.merge import ZERO, BlockBuilder, rewrite_prefix
from .prepare import Prepared, candidate_graph
from .progress import stage
from .runtime import run_each, run_outputs
from .segments import Segment, fit_linear

# What one Scorer may keep of the original's values: a study holds two (fit and score data), and
# candidates' own runs need room beside them.
MEMORY_SHARE = 0.15

# Bump when the damage measure changes, so cached scores of the old measure are not reused.
SCORE_VERSION = "damage-v6"


def feeds_fingerprint(feeds: list[dict[str, np.ndarray]]) -> str:
    digest = hashlib.sha256()
    for feed in feeds:
        for name in sorted(feed):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(feed[name]).tobytes())
    return digest.hexdigest()[:32]


class Scorer:
    """Scores rewrites against the original model on calibration feeds. Tensors of the original
    that a rewrite's suffix reads are computed by running the original with them as extra outputs
    and kept: one array per tensor, stacked over the feeds (each feed's value is a view of it).
    What is kept is bounded by `budget_bytes`: the least recently used tensors are dropped and
    computed again when asked for (the chains' positions of EfficientNet-Lite1 over 256 feeds are
    10.6 GB, and a study holds two scorers). Candidates come in chain order, so a miss also reads
    ahead the next positions of `prefetch`."""

    FETCH_GROUP = 8  # tensors fetched per run of the original

    def __init__(self, model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], prefetch: list[str],
                 kind: str | None = None, budget_bytes: int | None = None):
        """`prefetch`: tensors most suffixes will read, in the order they are read (the chains'
        positions); `kind`: see metrics.compare; `budget_bytes`: default MEMORY_SHARE of this
        machine's memory."""
        self.model, self.feeds, self.kind = model, feeds, kind
        self.graph = gs.import_onnx(model)
        self.budget = budget_bytes or int(MEMORY_SHARE * physical_memory())
        self.order = list(dict.fromkeys(prefetch))
        self.inputs = set(feeds[0])  # the feeds themselves are never dropped
        self.stacked: OrderedDict[str, np.ndarray] = OrderedDict(
            (name, np.stack([feed[name] for feed in feeds])) for name in feeds[0])
        self.reference = None
        self.fetches = 0  # runs of the original so far
        tensors = self.graph.tensors()
        self.sample_bytes = {name: _sample_bytes(tensors[name]) for name in self.order if name in tensors}
        self._fetch(self.order[:1])

    def _read_ahead(self, missing: list[str]) -> list[str]:
        """`missing`, then the next uncached tensors of the prefetch order, within one fetch's share
        of the budget (a group's values are held twice while they are stacked)."""
        group, size = list(missing), sum(self.sample_bytes.get(n, 0) for n in missing) * len(self.feeds)
        after = max((self.order.index(n) + 1 for n in missing if n in self.order), default=len(self.order))
        for name in self.order[after:]:
            if len(group) >= self.FETCH_GROUP:
                break
            if name in self.stacked:
                continue
            size += self.sample_bytes.get(name, 0) * len(self.feeds)
            if size > self.budget // 4:
                break
            group.append(name)
        return group

    def _fetch(self, names: list[str]) -> None:
        names = list(dict.fromkeys(names))
        for name in names:
            if name in self.stacked:
                self.stacked.move_to_end(name)
        missing = [n for n in names if n not in self.stacked]
        if not missing and self.reference is not None:
            return
        while missing or self.reference is None:
            group = self._read_ahead(missing[:self.FETCH_GROUP])
            missing = missing[self.FETCH_GROUP:]
            probe = self.graph.copy()
            tensors = probe.tensors()
            probe.outputs = list(probe.outputs[:1]) + [tensors[n] for n in group]
            runs = run_each(to_model(probe, like=self.model), self.feeds)
            self.fetches += 1
            self.reference = np.stack([values[0] for values in runs])
            for index, name in enumerate(group, start=1):
                self.stacked[name] = np.stack([values[index] for values in runs])
            del runs
            self._drop_beyond_budget(keep=set(names))

    def _drop_beyond_budget(self, keep: set[str]) -> None:
        total = sum(value.nbytes for value in self.stacked.values())
        for name in list(self.stacked):
            if total <= self.budget:
                break
            if name not in keep and name not in self.inputs:
                total -= self.stacked.pop(name).nbytes

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


def _sample_bytes(tensor) -> int:
    """Bytes of one feed's value of `tensor` (0 when its shape or type is unknown)."""
    shape, dtype = getattr(tensor, "shape", None), getattr(tensor, "dtype", None)
    if not shape or dtype is None or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape):
        return 0
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


def physical_memory() -> int:
    """This machine's memory in bytes (8 GiB where it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def chain_positions(prepared: Prepared) -> list[str]:
    return [p for chain in prepared.analysis.chains for p in chain.positions]


class Refits:
    """Least-squares refits of merged layers on the `fit` data, made when a candidate is first scored
    or applied and kept: scoring and the final model use the same weights."""

    def __init__(self, prepared: Prepared, fit_feeds: list[dict], enabled: bool = True):
        self.prepared, self.fit_feeds = prepared, fit_feeds
        self.enabled = enabled and bool(fit_feeds)
        self._made: dict[str, object] = {}
        self._scorer: Scorer | None = None

    def operator(self, cand: Candidate | Segment) -> LayerSpec | None:
        """The refit of a candidate's merged layer, or None to keep the composed weights (refit off,
        an exact merge, an identity, or too large to solve); a linear segment's fitted map (None: refit
        off)."""
        if not self.enabled or cand.is_original:
            return None
        if cand.key not in self._made:
            self._made[cand.key] = self._refit(cand)
        return self._made[cand.key]

    def of(self, changes: list[Candidate]) -> dict:
        return {c.key: self.operator(c) for c in changes}

    def activations(self, names: list[str]) -> list[np.ndarray]:
        """The original's values of `names` on the fit data; for token values, real tokens only."""
        if self._scorer is None:  # the original's activations on the fit data, once
            self._scorer = Scorer(self.prepared.model, self.fit_feeds, chain_positions(self.prepared))
        values = self._scorer.values(names)
        keep = real_tokens(self.fit_feeds, values[0].shape)
        if keep is not None and all(v.shape[:2] == keep.shape for v in values):
            values = [v[keep] for v in values]
        return values

    def _refit(self, cand: Candidate | Segment):
        if isinstance(cand, Segment):
            return fit_linear(*self.activations([cand.start, cand.end])) if cand.mode == "linear" else None
        chain = self.prepared.analysis.chains[cand.chain]
        builder = BlockBuilder(gs.import_onnx(self.prepared.model), chain, cand)
        merged, explicit = builder.build()
        if merged is None or merged is ZERO or builder.is_exact():
            return None
        names = [chain.positions[cand.start], chain.units[cand.end - 1].pre_act]
        if explicit is not None:
            names.append(explicit.tensor)
        values = self.activations(names)
        target = values[1] - values[2] if explicit is not None else values[1]
        if isinstance(merged, ConvSpec):
            return refit_conv(merged, values[0], target)
        fitted = refit_dense(merged, values[0], target)
        return reduced_rank(fitted, cand.rank, values[0]) if cand.rank and fitted is not None else fitted


@dataclass
class Scores:
    """Damage (see metrics.damage) of each candidate applied alone, by candidate key; 0 for originals."""
    damage: dict[str, float]


def score(prepared: Prepared, data: Data, refits: Refits, cache: LatencyCache | None = None,
          progress: bool = True) -> Scores:
    """Every candidate's damage on the `score` data, with its merged layer refit. Cached by model,
    calibration data and what the scores depend on: a warm run rewrites nothing."""
    depends = ("refit-tokens" if refits.enabled else "plain") + f"-{prepared.kind}"
    prefix = (f"{SCORE_VERSION}:{depends}:{model_fingerprint(prepared.model)}:"
              f"{feeds_fingerprint(data.fit)}:{feeds_fingerprint(data.score)}:")
    # A linear segment needs its fitted map: without fit data it is not offered.
    segments = [s for s in prepared.segments if s.mode == "identity" or refits.enabled]
    scorer, damages = None, {}
    for cand in stage([*prepared.candidates, *segments], desc="scoring", unit="cand", enabled=progress):
        value = 0.0 if cand.is_original else (cache.get_score(prefix + cand.key) if cache is not None else None)
        if value is None:
            if scorer is None:  # the original's activations on the score data: only when something is scored
                scorer = Scorer(prepared.model, data.score, chain_positions(prepared), kind=prepared.kind)
            graph = candidate_graph(prepared, cand, refits.operator(cand))
            value = max(0.0, damage(scorer.score(graph, rewrite_prefix(cand))))
            if cache is not None:
                cache.put_score(prefix + cand.key, value)
        damages[cand.key] = value
    return Scores(damages)


class PlanChecker:
    """Damage of whole plans on the `score` data (never the evaluation data)."""

    def __init__(self, prepared: Prepared, data: Data, refits: Refits):
        self.prepared, self.feeds, self.refits = prepared, data.score, refits
        self._reference: np.ndarray | None = None

    def damage(self, model: onnx.ModelProto) -> float:
        if self._reference is None:
            self._reference = run_outputs(self.prepared.model, self.feeds)
        return damage(compare(self._reference, run_outputs(model, self.feeds), kind=self.prepared.kind))

    def applied(self, changes: list[Candidate]) -> onnx.ModelProto:
        """The plan's changes applied with their refits, unrepaired."""
        return apply_candidates(self.prepared.model, self.prepared.analysis, changes, self.refits.of(changes))

    def rescored(self, changes: list[Candidate], damages: dict[str, float]) -> dict[str, float]:
        """Damages with each chosen change's in-context cost: how much worse the plan is with it than
        without it. A change only gets dearer: damages do not add up, and what is harmless alone can
        hurt beside its neighbours."""
        whole = self.damage(self.applied(changes))
        updated = dict(damages)
        for cand in changes:
            without = self.damage(self.applied([c for c in changes if c is not cand]))
            updated[cand.key] = max(damages[cand.key], whole - without)
        return updated
