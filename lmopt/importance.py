"""Importance without training: how far the network's output moves when one candidate alone is
applied, measured on calibration inputs. Only the part of the network downstream of the block is
re-run; its other inputs come from one cached run of the original model."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .blocks import boundary_tensors, downstream_nodes, suffix_model
from .loader import to_model
from .verify import compare, run_outputs, session


class Scorer:
    def __init__(self, model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], starts: list[str]):
        """`starts`: every tensor a candidate block may start from (the chains' positions)."""
        self.model, self.feeds = model, feeds
        graph = gs.import_onnx(model)
        tensors = graph.tensors()
        needed: dict[str, gs.Tensor] = {}
        for name in set(starts):
            downstream = [n for n in graph.nodes if id(n) in downstream_nodes(tensors[name])]
            for t in boundary_tensors(downstream):
                needed[t.name] = t
        input_names = {t.name for t in graph.inputs}
        extra = [t for name, t in needed.items() if name not in input_names]
        probe = graph.copy()
        probe_tensors = probe.tensors()
        probe.outputs = list(probe.outputs) + [probe_tensors[t.name] for t in extra]
        sess = session(to_model(probe, like=model))
        names = [o.name for o in sess.get_outputs()]
        self.cached: list[dict[str, np.ndarray]] = []
        reference = []
        for feed in feeds:
            values = dict(zip(names, sess.run(None, feed)))
            reference.append(values[names[0]])
            self.cached.append({**feed, **{t.name: values[t.name] for t in extra}})
        self.reference = np.stack(reference)

    def score(self, transformed: gs.Graph, start: str) -> dict:
        """Fidelity metrics of the transformed graph against the original, re-running only the suffix."""
        suffix = suffix_model(transformed, start, like=self.model)
        if suffix is None:
            return compare(self.reference, self.reference)
        sess = session(suffix)
        wanted = [i.name for i in sess.get_inputs()]
        outputs = [sess.run(None, {name: cached[name] for name in wanted})[0] for cached in self.cached]
        return compare(self.reference, np.stack(outputs))


def full_metrics(reference_model: onnx.ModelProto, model: onnx.ModelProto, feeds) -> dict:
    """Fidelity of a whole model against the reference on `feeds`."""
    return compare(run_outputs(reference_model, feeds), run_outputs(model, feeds))
