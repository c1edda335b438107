"""Fuzzing the merge on random linear-layer graphs (tests/fuzz_graphs.py), against onnxruntime.

Every run checks MERGE_GRAPHS graphs with `lmopt merge`'s core and CANDIDATE_GRAPHS graphs with
every candidate block rewritten, from a seed that changes each day (so CI covers thousands of
graphs over its runs); LMOPT_FUZZ_SEED and LMOPT_FUZZ_COUNT pin and scale it. A failure names
the seed of the graph that reproduces it.

What must hold: no exception (the graphs are valid, so not even an LmoptError); a merge reported
exact matches the original (the exporter's spelling, before canonicalisation) on every graph output
within TOL (max |diff| / max |output|, float32); a merge reported inexact keeps the output shapes
and stays finite.
"""
from __future__ import annotations

import datetime
import os

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from fuzz_graphs import random_graph

from lmopt.analysis import analyse
from lmopt.apply import apply_candidates
from lmopt.candidates import enumerate_candidates
from lmopt.errors import LmoptError
from lmopt.loader import canonicalise
from lmopt.passes.merge import BlockBuilder
from lmopt.passes.merge_runs import merge_linear_runs
from lmopt.runtime import session

TOL = 1e-4
COUNT = int(os.environ.get("LMOPT_FUZZ_COUNT", "800"))
MERGE_GRAPHS, CANDIDATE_GRAPHS = COUNT, COUNT // 4
BASE_SEED = int(os.environ.get("LMOPT_FUZZ_SEED", datetime.date.today().toordinal())) * 10_000


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - ref).max() / max(float(np.abs(ref).max()), 1e-12))


def check_outputs(gots: list[np.ndarray], refs: list[np.ndarray], exact: bool) -> str | None:
    """None when every graph output is fine, else what is wrong."""
    if len(gots) != len(refs):
        return f"{len(gots)} outputs instead of {len(refs)}"
    problems = [check_output(got, ref, exact) for got, ref in zip(gots, refs)]
    return next((f"output {k}: {p}" for k, p in enumerate(problems) if p), None)


def check_output(got: np.ndarray, ref: np.ndarray, exact: bool) -> str | None:
    """None when fine, else what is wrong."""
    if got.shape != ref.shape:
        return f"shape {got.shape} != {ref.shape}"
    if not np.isfinite(got).all():
        return "non-finite output"
    if exact and relative_error(got, ref) > TOL:
        return f"reported exact but differs by {relative_error(got, ref):.3g}"
    return None


def merge_failure(seed: int) -> str | None:
    model, shape = random_graph(seed)
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    refs = session(model).run(None, {"x": x})
    try:
        canon, _ = canonicalise(model)
        merged, chosen, _ = merge_linear_runs(canon, allow_inexact=True)
        gots = session(merged).run(None, {"x": x})
    except LmoptError as exc:  # every fuzz graph is valid and runs in onnxruntime: nothing to refuse
        return f"refused: {exc}"
    except Exception as exc:  # noqa: BLE001 - an internal error is the finding
        return f"internal error {type(exc).__name__}: {exc}"
    problem = check_outputs(gots, refs, all(run["exact"] for run in chosen))
    return problem and f"{problem} (merged {[run['block'] for run in chosen]})"


def candidate_failures(seed: int) -> list[str]:
    model, shape = random_graph(seed)
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    ref = session(model).run(None, {"x": x})[0]
    canon, _ = canonicalise(model)
    analysis = analyse(canon)
    problems = []
    for cand in enumerate_candidates(analysis, gs.import_onnx(canon), max_kernel=99):
        try:
            exact = BlockBuilder(gs.import_onnx(canon), analysis.chains[cand.chain], cand).is_exact()
            got = session(apply_candidates(canon, analysis, [cand])).run(None, {"x": x})[0]
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{cand.key}: internal error {type(exc).__name__}: {exc}")
            continue
        problem = check_output(got, ref, exact)
        if problem:
            problems.append(f"{cand.key}: {problem}")
    return problems


def test_fuzz_merge_is_exact_or_reported_inexact():
    failures = {}
    for seed in range(BASE_SEED, BASE_SEED + MERGE_GRAPHS):
        problem = merge_failure(seed)
        if problem:
            failures[seed] = problem
    assert not failures, f"{len(failures)} of {MERGE_GRAPHS} graphs fail (seed: problem): {failures}"


def test_fuzz_every_candidate_rewrite_runs_and_exact_ones_match():
    failures = {}
    for seed in range(BASE_SEED + MERGE_GRAPHS, BASE_SEED + MERGE_GRAPHS + CANDIDATE_GRAPHS):
        problems = candidate_failures(seed)
        if problems:
            failures[seed] = problems
    assert not failures, f"{len(failures)} of {CANDIDATE_GRAPHS} graphs fail (seed: problems): {failures}"


def test_generator_covers_what_it_claims():
    """The fuzz graphs really hold the mixes the module docstring promises."""
    seen = set()
    for seed in range(200):
        model, _ = random_graph(seed)
        for node in model.graph.node:
            attrs = {a.name: onnx_attr(a) for a in node.attribute}
            if node.op_type == "Conv" and "auto_pad" in attrs:
                seen.add(("auto_pad", attrs["auto_pad"].decode()))
            elif node.op_type == "Conv" and "kernel_shape" in attrs:  # (not the 1x1 projections)
                seen.add(("kernel", attrs["kernel_shape"][0]))
                seen.add(("stride", attrs["strides"][0]))
                seen.add(("dilation", attrs["dilations"][0]))
                seen.add(("padded", any(attrs["pads"])))
                seen.add(("asymmetric", attrs["pads"][:2] != attrs["pads"][2:]))
                seen.add(("grouped", attrs["group"] > 1))
            seen.add(("op", node.op_type))
            if node.op_type == "Gemm":
                seen.add(("transA", attrs["transA"]))
                seen.add(("transB", attrs["transB"]))
                seen.add(("alpha", attrs["alpha"] != 1.0))
    for want in [("kernel", 1), ("kernel", 2), ("kernel", 5), ("stride", 2), ("dilation", 2), ("padded", True),
                 ("asymmetric", True), ("grouped", True), ("op", "Add"), ("op", "Relu"), ("op", "Gemm"),
                 ("op", "MatMul"), ("op", "Flatten"), ("transB", 1), ("alpha", True), ("transA", 1), ("op", "Pad"),
                 ("op", "Mul"), ("op", "Reshape"), ("auto_pad", "SAME_UPPER"), ("auto_pad", "SAME_LOWER"),
                 ("auto_pad", "VALID")]:
        assert want in seen, want


def onnx_attr(attribute):
    import onnx

    return onnx.helper.get_attribute_value(attribute)


@pytest.mark.parametrize("strides,dilations", [((1, 1, 1), (1, 1)), ((2, 1, 1), (1, 1)), ((1, 1, 1), (2, 2))])
def test_issue_case_dense_then_grouped_convs(strides, dilations):
    """Issue 8's report: 1x3x12x12, Conv 5x5 pads 1 (3->8), then two 3x3 convs with group 2 and no
    padding: merged exactly, equal to onnxruntime's run of the original."""
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from chains import conv_chain_model, random_conv

    rng = np.random.default_rng(8)
    specs = [random_conv(rng, 3, 8, (5, 5), pads_begin=(1, 1), pads_end=(1, 1), strides=(strides[0],) * 2),
             random_conv(rng, 8, 8, (3, 3), group=2, strides=(strides[1],) * 2, dilations=(dilations[0],) * 2),
             random_conv(rng, 8, 8, (3, 3), group=2, strides=(strides[2],) * 2, dilations=(dilations[1],) * 2)]
    model = conv_chain_model(specs, (1, 3, 12, 12))
    x = np.random.default_rng(9).standard_normal((1, 3, 12, 12)).astype(np.float32)
    merged, chosen, skipped = merge_linear_runs(canonicalise(model)[0], allow_inexact=False)
    assert [run["exact"] for run in chosen] == [True] and not skipped
    assert [n.op_type for n in merged.graph.node].count("Conv") == 1
    assert relative_error(session(merged).run(None, {"x": x})[0], session(model).run(None, {"x": x})[0]) <= TOL
