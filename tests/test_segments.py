"""Whole-layer candidates (lmopt.segments): finding them, rewriting exactly, fitting, timing and planning."""
from __future__ import annotations

import itertools
import math

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from encoders import INPUTS, tiny_bert, token_feeds

from lmopt.blocks import block_model
from lmopt.candidates import Candidate
from lmopt.graph import to_model
from lmopt.prepare import candidate_graph, prepare
from lmopt.profile import LatencyTable, with_segments
from lmopt.repair import run_with_outputs
from lmopt.runtime import run_each
from lmopt.segments import Segment, find_segments, fit_linear
from lmopt.select import fastest, select

SEQ = 16


def shapes():
    return {name: [1, SEQ] for name in INPUTS}


@pytest.fixture(scope="module")
def prepared():
    return prepare(tiny_bert(layers=2, dim=32, hidden=128), shapes())


def test_segments_are_the_sublayers_and_layers_of_an_encoder(prepared):
    """Two post-norm layers: four regions (attention: query, key, value and output chains; MLP: one
    chain), so four one-region and three two-region segments, each as identity and as linear map."""
    segments = prepared.segments
    spans = sorted({(s.chains, s.regions) for s in segments})
    assert spans == [((0, 1, 2, 3), 1), ((0, 1, 2, 3, 4), 2), ((4,), 1), ((4, 5, 6, 7, 8), 2),
                     ((5, 6, 7, 8), 1), ((5, 6, 7, 8, 9), 2), ((9,), 1)]
    assert {s.mode for s in segments} == {"identity", "linear"} and len(segments) == 14
    tensors = gs.import_onnx(prepared.model).tensors()
    for seg in segments:
        assert tensors[seg.start].shape == tensors[seg.end].shape == [1, SEQ, 32]


def test_no_segments_without_a_residual_stream():
    from chains import dense_matmul_model

    rng = np.random.default_rng(0)
    layers = [(rng.standard_normal((8, 8)), rng.standard_normal(8)) for _ in range(3)]
    p = prepare(dense_matmul_model(layers, (1, 4, 8)))
    assert p.analysis.chains and find_segments(p.model, p.analysis) == [] and p.segments == []


@pytest.mark.parametrize("mode", ["identity", "linear"])
def test_rewrite_replaces_the_segment_and_nothing_else(prepared, mode):
    """Exact: the segment's end becomes its start (identity) or start @ W + b (linear), and the rest
    of the network computes from it what the original's rest computes from the same value."""
    seg = next(s for s in prepared.segments if s.mode == mode and s.regions == 2 and s.chains[0] == 0)
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((600, 32)), rng.standard_normal((600, 32))
    operator = fit_linear(x, y) if mode == "linear" else None
    rewritten = to_model(candidate_graph(prepared, seg, operator), like=prepared.model)
    feeds = token_feeds(3, seq=SEQ)
    output = prepared.model.graph.output[0].name
    values = run_with_outputs(rewritten, feeds, [seg.start, seg.end])  # [first output, start, end]
    start, end = values[1], values[2]
    if operator is not None:
        expected = start @ operator.weight.astype(np.float32) + operator.bias.astype(np.float32)
    else:
        expected = start
    np.testing.assert_allclose(end, expected, rtol=0, atol=0 if operator is None else 1e-5)
    # The original's network after the segment, fed the rewritten end value (and the mask it reads).
    rest = block_model(gs.import_onnx(prepared.model), seg.end, output, like=prepared.model)
    names = [i.name for i in rest.graph.input]
    side_names = [n for n in names if n != seg.end]
    side = dict(zip(side_names, run_with_outputs(prepared.model, feeds, side_names)[1:]))
    rest_feeds = [{n: (end[i:i + 1] if n == seg.end else side[n][i:i + 1]) for n in names} for i in range(len(feeds))]
    expected_out = np.concatenate([outs[0] for outs in run_each(rest, rest_feeds)])
    np.testing.assert_allclose(values[0], expected_out, rtol=0, atol=1e-6)


def test_fit_linear_recovers_a_linear_map():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 12))
    weight, bias = rng.standard_normal((12, 12)), rng.standard_normal(12)
    fitted = fit_linear(x, x @ weight + bias)
    # exact up to the ridge term (1e-6 of the Gram matrix's mean diagonal: a 1e-6 relative pull)
    np.testing.assert_allclose(fitted.weight, weight, atol=1e-5)
    np.testing.assert_allclose(fitted.bias, bias, atol=1e-5)
    # too few rows per unknown for a full map: a per-channel scale and shift, recovered exactly
    scale, shift = rng.uniform(0.5, 2.0, 12), rng.standard_normal(12)
    few = fit_linear(x[:50], x[:50] * scale + shift)
    np.testing.assert_allclose(few.weight, np.diag(scale), atol=1e-9)
    np.testing.assert_allclose(few.bias, shift, atol=1e-9)


def test_fitted_map_beats_the_identity_on_held_out_tokens():
    """The measured part: the linear map, fitted on one set of sentences, moves the embeddings less
    than removing the layers does, on other sentences (summed over the segments)."""
    from lmopt.optimizer import Study

    model = tiny_bert(layers=2, dim=32, hidden=128, seed=1)
    study = Study(model, input_shapes=shapes(), calib_count=96, cache_path=False, progress=False,
                  backend_options={"runs": 3, "min_time_s": 0.0, "warmup_s": 0.0})
    damage = study.scores.damage
    pairs = [(damage[s.key], damage[s.key.replace("/identity", "/linear")]) for s in study.prepared.segments
             if s.mode == "identity" and s.key.replace("/identity", "/linear") in damage]
    assert len(pairs) == 7
    assert sum(linear for _, linear in pairs) < sum(identity for identity, _ in pairs)


# --------------------------------------------------------------------------- planning with segments


def synthetic(rng, chain_lengths):
    cands, latency, damage = [], {}, {}
    for chain, length in chain_lengths.items():
        for start in range(length):
            for end in range(start + 1, min(length, start + 2) + 1):
                cand = Candidate(chain, start, end)
                cands.append(cand)
                latency[cand.key] = float(max(1, cand.length * rng.integers(2, 5) - rng.integers(0, 3)))
                damage[cand.key] = 0.0 if cand.is_original else float(rng.uniform(0, 1))
    chains = sorted(chain_lengths)
    segments = []
    for first, count in itertools.product(range(len(chains)), (1, 2)):
        if first + count <= len(chains) and rng.random() < 0.7:
            seg = Segment(f"a{first}", f"b{first}", tuple(chains[first:first + count]), "identity", count)
            segments.append(seg)
            latency[seg.key] = float(rng.integers(0, 3))
            damage[seg.key] = float(rng.uniform(0, 2))
    return cands, segments, latency, damage


def brute_force(chain_lengths, cands, segments, latency, damage, budget):
    chains = sorted(chain_lengths)

    def covers(chain):
        def walk(pos):
            if pos == chain_lengths[chain]:
                yield []
                return
            for c in cands:
                if c.chain == chain and c.start == pos:
                    for rest in walk(c.end):
                        yield [c] + rest
        return list(walk(0))

    def plans(i):
        if i == len(chains):
            yield []
            return
        for cover in covers(chains[i]):
            for rest in plans(i + 1):
                yield cover + rest
        for seg in segments:
            if seg.chains[0] == chains[i]:
                for rest in plans(i + len(seg.chains)):
                    yield [seg] + rest

    best = math.inf
    fastest_ms = math.inf
    for plan in plans(0):
        ms = sum(latency[c.key] for c in plan)
        fastest_ms = min(fastest_ms, ms)
        if ms <= budget + 1e-9:
            best = min(best, sum(damage[c.key] for c in plan))
    return best, fastest_ms


@pytest.mark.parametrize("seed", range(6))
def test_dp_with_segments_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    chain_lengths = {0: 2, 1: 1, 2: 3, 3: 2}
    cands, segments, latency, damage = synthetic(rng, chain_lengths)
    assert segments
    _, floor = brute_force(chain_lengths, cands, segments, latency, damage, 0)
    assert fastest(chain_lengths, cands, latency, segments) == pytest.approx(floor)
    checked = 0
    for budget in np.arange(1.0, 30.0, 1.0):
        best, _ = brute_force(chain_lengths, cands, segments, latency, damage, budget)
        result = select(chain_lengths, cands, latency, damage, float(budget), steps=int(budget * 10),
                        segments=segments)
        if best == math.inf:
            assert result is None
            continue
        plan, planned = result
        covered = sorted(c for block in plan for c in (block.chains if isinstance(block, Segment) else [block.chain]))
        assert sorted(set(covered)) == sorted(chain_lengths) and planned <= budget + 1e-9
        assert sum(damage[c.key] for c in plan) == pytest.approx(best, abs=1e-9)
        checked += 1
    assert checked >= 10


def test_segment_latency_takes_the_work_outside_blocks_from_the_fixed_time(prepared):
    """Timing accounting: with the whole model at 10 ms and a region's removal saving more than its
    blocks, a plan with the region replaced by the identity is predicted at 10 ms less the saving,
    and the original plan still at 10 ms."""
    cands = prepared.candidates
    block_ms = {c.key: 0.5 for c in cands}
    originals = [c for c in cands if c.is_original]
    fixed = 10.0 - 0.5 * len(originals)
    table = LatencyTable({}, "test", dict(block_ms), dict(block_ms), {}, 10.0, fixed, 10.0)
    seg = next(s for s in prepared.segments if s.mode == "identity" and s.chains == (4,))
    chain_blocks = 0.5 * sum(1 for c in originals if c.chain == 4)
    saving = chain_blocks + 0.4  # 0.4 ms of non-block work in the region
    result = with_segments(table, prepared, {seg.key: 10.0 - saving}, 10.0)
    assert result.fixed_ms + sum(result.block_ms[c.key] for c in originals) == pytest.approx(10.0)
    others = sum(result.block_ms[c.key] for c in originals if c.chain != 4)
    assert result.fixed_ms + others + result.block_ms[seg.key] == pytest.approx(10.0 - saving)


# --------------------------------------------------------------------------- timing as deployed


def test_a_transformer_is_timed_as_written_with_its_symbolic_dims(tmp_path):
    """The timing twin: the source canonicalised with its symbolic dims kept, fed at the planning
    shapes; its signature depends on them (no cached time of another sequence length is reused), and
    the written model is measured against it."""
    from lmopt.inputs import random_feeds, timing_shapes
    from lmopt.latency.signature import structural_signature
    from lmopt.onnxio import save_model
    from lmopt.optimizer import Study
    from lmopt.outputs import run_named

    path = tmp_path / "bert.onnx"
    save_model(tiny_bert(layers=2, dim=32, hidden=128), path)
    short = prepare(str(path), {name: [1, 8] for name in INPUTS})
    p = prepare(str(path), shapes())
    assert timing_shapes(p.twin) == shapes()
    dims = [d.dim_param for d in p.twin.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]
    assert random_feeds(p.twin, 1)[0]["input_ids"].shape == (1, SEQ)
    assert structural_signature(p.twin) != structural_signature(short.twin)
    # the twin computes what the canonical model computes
    feeds = token_feeds(2, seq=SEQ)
    twin_out, canonical_out = (run_named(m, feeds, ["sentence_embedding"]) for m in (p.twin, p.model))
    np.testing.assert_allclose(twin_out["sentence_embedding"], canonical_out["sentence_embedding"], rtol=1e-5,
                               atol=1e-6)
    study = Study(str(path), input_shapes=shapes(), calib_count=32, eval_count=8, cache_path=False, progress=False,
                  backend_options={"runs": 3, "min_time_s": 0.0, "warmup_s": 0.0})
    _, report = study.plan(1.3, rounds=0)
    assert report.symbolic_dims.startswith("symbolic dims kept")
    assert report.measured_models.startswith("the written model") and report.measured_speedup > 0


def test_convolutional_networks_are_timed_at_their_fixed_shapes():
    """Even with a symbolic batch dim: the twin is for all-dense models (see symbolic.timing_twin)."""
    from chains import conv_chain_model

    from lmopt.algebra.linear import ConvSpec

    rng = np.random.default_rng(0)
    spec = ConvSpec(rng.standard_normal((4, 4, 3, 3)), rng.standard_normal(4), (1, 1), (1, 1), (1, 1), (1, 1))
    model = conv_chain_model([spec, spec], (1, 4, 8, 8))
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    p = prepare(model, {model.graph.input[0].name: [1, 4, 8, 8]})
    assert p.analysis.chains and p.twin is None
