"""`lmopt inspect`: the chains, layers, activations, residual spans and candidates lmopt finds; for a
quantized model, its weight bytes by type and its ops."""
from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from ..analysis import Unit, analyse
from ..candidates import enumerate_candidates
from ..loader import canonicalise, parse_input_shapes, quantized_ops
from ..onnxio import load_model
from ..report import op_table, weight_bytes
from ..segments import find_segments
from .common import add_model_arguments, print_json


def add_parser(subparsers):
    parser = subparsers.add_parser("inspect", help="show what lmopt can merge, prune and remove in a model")
    add_model_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the structure as JSON")
    parser.add_argument("--max-kernel", type=int, default=7, help="largest merged kernel counted (default 7)")
    return parser


def layer_text(unit: Unit, nodes: dict[str, gs.Node]) -> str:
    node = nodes[unit.layer]
    if unit.op == "Conv":
        weight = node.inputs[1].shape
        kernel = "x".join(map(str, weight[2:]))
        stride = node.attrs.get("strides", [1])[0]
        group = node.attrs.get("group", 1)
        kind = "dw" if group > 1 and group == weight[0] and weight[1] == 1 else (f"g{group}" if group > 1 else "")
        return f"conv{kernel}{kind} s{stride} {weight[1] * group}->{weight[0]}"
    return f"{unit.op.lower()} {_width(unit.in_shape)}->{_width(unit.out_shape)}"


def _width(shape: tuple) -> str:
    return str(shape[-1]) if shape and shape[-1] is not None else "?"


def _size_text(size: int) -> str:
    if size >= 2 ** 20 // 20:  # from 0.05 MB, which rounds to 0.1
        return f"{size / 2 ** 20:.1f} MB"
    return f"{size / 2 ** 10:.1f} KB" if size >= 2 ** 10 else f"{size} B"


def weights_text(by_dtype: dict[str, int]) -> str:
    """Weight bytes by element type as text: "44.6 MB float32", "11.2 MB int8 + 0.1 MB float32 (11.3 MB)"."""
    if not by_dtype:
        return "none"
    parts = " + ".join(f"{_size_text(size)} {dtype}" for dtype, size in by_dtype.items())
    return parts if len(by_dtype) == 1 else f"{parts} ({_size_text(sum(by_dtype.values()))})"


def summary(model: onnx.ModelProto, steps: dict, max_kernel: int, weights: dict[str, int] | None = None) -> dict:
    """What inspect reports. `weights`: weight bytes by element type (report.weight_bytes) of the model
    as the user gave it; default: of `model`, after canonicalisation."""
    weights = weight_bytes(model) if weights is None else weights
    analysis = analyse(model)
    graph = gs.import_onnx(model)
    nodes = {n.name: n for n in graph.nodes}
    candidates = enumerate_candidates(analysis, graph, max_kernel=max_kernel)
    chains = []
    for chain in analysis.chains:
        units = []
        for k, unit in enumerate(chain.units, start=1):
            entry = {"unit": k, "layer": unit.layer, "what": layer_text(unit, nodes),
                     "activation": unit.act.kind if unit.act else None, "prunable": unit.prunable}
            if unit.skip:
                entry["residual_from"] = unit.skip.position if unit.skip.position is not None else "outside"
                entry["shortcut"] = "projection" if unit.skip.projection else "identity"
            units.append(entry)
        mine = [c for c in candidates if c.chain == chain.index]
        chains.append({"chain": chain.index, "kind": chain.kind, "layers": len(chain), "units": units,
                       "blocks": len({(c.start, c.end) for c in mine}), "candidates": len(mine)})
    return {
        "model": str(model.graph.name),
        "canonicalisation": steps,
        "chains": chains,
        "activations": analysis.activations,
        "residual_spans": sum(1 for c in analysis.chains for u in c.units if u.skip),
        "blocks": sum(c["blocks"] for c in chains),
        "candidates": len(candidates),
        "segments": [{"chains": [s.chains[0], s.chains[-1]], "start": s.start, "end": s.end, "regions": s.regions}
                     for s in find_segments(model, analysis) if s.mode == "identity"],
        "stops": analysis.stops,
        "unsupported": analysis.unsupported,
        "weights": {"bytes": sum(weights.values()), "by_dtype": dict(weights)},
    }


def run(args) -> int:
    shapes = parse_input_shapes(args.input_shape)
    model = load_model(args.model)
    weights = weight_bytes(model)  # of the file as given: canonicalisation folds BatchNormalization into the convs
    quantized = quantized_ops(model)
    if quantized:
        return _run_quantized(args, model, quantized, weights)
    model, steps = canonicalise(model, shapes)
    info = summary(model, steps, args.max_kernel, weights)
    if args.json:
        print_json(info)
        return 0
    print(f"{args.model}: {len(info['chains'])} chains, {info['residual_spans']} residual spans, "
          f"{info['blocks']} blocks, {info['candidates']} candidates (merged kernel <= {args.max_kernel})")
    print(f"canonicalised: {steps['batchnorm_folded']} BatchNormalization folded, "
          f"{steps['passthrough_removed']} Identity/Dropout removed, {steps['nodes_in']} -> {steps['nodes_out']} nodes"
          + (f", {steps['shapes_from_onnxruntime']} shapes from an onnxruntime run"
             if steps.get("shapes_from_onnxruntime") else ""))
    print(f"weights: {weights_text(weights)}")
    print("activations on chains: " + (", ".join(f"{k} x{v}" for k, v in info["activations"].items()) or "none"))
    print("ops that end chains: " + (", ".join(f"{k} x{v}" for k, v in info["stops"].items()) or "none"))
    for chain in info["chains"]:
        print(f"\nchain {chain['chain']} ({chain['kind']}, {chain['layers']} layers, "
              f"{chain['blocks']} blocks, {chain['candidates']} candidates)")
        for unit in chain["units"]:
            extra = (f"  + {unit['shortcut']} shortcut from position {unit['residual_from']}"
                     if "shortcut" in unit else "")
            act = unit["activation"] or "-"
            print(f"  {unit['unit']:>3}  {unit['what']:<24} {act:<10}{extra}")
    if info["segments"]:
        print(f"\nwhole-layer candidates ({len(info['segments'])} spans, each as identity or fitted linear map):")
        for seg in info["segments"]:
            print(f"  chains {seg['chains'][0]}-{seg['chains'][1]} ({seg['regions']} region"
                  f"{'s' if seg['regions'] > 1 else ''}): {seg['start']} -> {seg['end']}")
    if info["unsupported"]:
        print("\nnot handled:")
        for reason in info["unsupported"]:
            print(f"  {reason}")
    return 0


def _run_quantized(args, model: onnx.ModelProto, quantized: dict[str, int], weights: dict[str, int]) -> int:
    """A quantized model (lmopt's --precision int8 output, or any QDQ export): its size and ops, the
    Deep Compression view; chains are found in float models only, so there are none to list."""
    table = op_table(model)
    if args.json:
        print_json({"model": str(model.graph.name), "quantized": quantized, "ops": table["ops"],
                    "nodes": table["nodes"], "weights": {"bytes": sum(weights.values()), "by_dtype": dict(weights)}})
        return 0
    print(f"{args.model}: quantized model ({', '.join(f'{op} x{n}' for op, n in quantized.items())}), "
          f"{table['nodes']} nodes")
    print(f"weights: {weights_text(weights)}")
    compute = {op: n for op, n in table["ops"].items() if op not in quantized}
    print("other ops: " + (", ".join(f"{op} x{n}" for op, n in compute.items()) or "none"))
    print("chains and candidates are found in float models only: inspect the float model to see what lmopt "
          "can merge or prune")
    return 0
