"""A tiny BERT-like sentence encoder written with onnx.helper, as PyTorch / Hugging Face export it:
int64 inputs with symbolic dims (input_ids, attention_mask, token_type_ids), embeddings by Gather,
position embeddings sliced by the sequence length read from Shape, post-norm layers (attention with
MatMul/Softmax and a mask bias, GELU MLP in its Erf form), masked mean pooling, and an int64
pass-through output before the float ones (as sentence-transformers exports do).

Import from tests as ``from encoders import tiny_bert`` (pytest puts tests/ on sys.path).
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lmopt.onnxio import DEFAULT_OPSET, runtime_compatible

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class _Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def const(self, name: str, array) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], scope: str, **attrs) -> str:
        self.count += 1
        out = f"{scope}/{op}_{self.count}_output_0"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{scope}/{op}_{self.count}", **attrs))
        return out

    def linear(self, x: str, scope: str, fin: int, fout: int, gain: float = 1.0) -> str:
        w = (self.rng.standard_normal((fin, fout)) * gain / math.sqrt(fin)).astype(np.float32)
        b = self.rng.normal(0.0, 0.02, fout).astype(np.float32)
        y = self.node("MatMul", [x, self.const(f"{scope}.weight_t", w)], scope)
        return self.node("Add", [self.const(f"{scope}.bias", b), y], scope)

    def layernorm(self, x: str, scope: str, dim: int) -> str:
        g = self.rng.uniform(0.8, 1.2, dim).astype(np.float32)
        b = self.rng.normal(0.0, 0.05, dim).astype(np.float32)
        return self.node("LayerNormalization", [x, self.const(f"{scope}.weight", g), self.const(f"{scope}.bias", b)],
                         scope, axis=-1, epsilon=1e-12)

    def gelu(self, x: str, scope: str) -> str:
        t = self.node("Div", [x, self.const(f"{scope}.sqrt2", np.float32(math.sqrt(2.0)))], scope)
        t = self.node("Erf", [t], scope)
        t = self.node("Add", [t, self.const(f"{scope}.one", np.float32(1.0))], scope)
        t = self.node("Mul", [x, t], scope)
        return self.node("Mul", [t, self.const(f"{scope}.half", np.float32(0.5))], scope)


def tiny_bert(layers: int = 2, dim: int = 32, heads: int = 4, hidden: int = 128, vocab: int = 100,
              max_len: int = 64, seed: int = 0, pooled_only: bool = False, activation: bool = True,
              classes: int = 0) -> onnx.ModelProto:
    """Outputs: input_ids (int64 pass-through), token_embeddings [batch, seq, dim], sentence_embedding
    [batch, dim]; with `pooled_only`, sentence_embedding alone; with `classes`, logits [batch, classes]
    of a linear head on the pooled embedding instead. `activation=False` leaves the MLP's GELU out."""
    b = _Builder(seed)
    head_dim = dim // heads
    word = b.const("embeddings.word", (b.rng.standard_normal((vocab, dim)) * 0.5).astype(np.float32))
    pos = b.const("embeddings.position", (b.rng.standard_normal((max_len, dim)) * 0.1).astype(np.float32))
    kind = b.const("embeddings.type", (b.rng.standard_normal((2, dim)) * 0.1).astype(np.float32))

    def i64(name, values):
        return b.const(name, np.asarray(values, dtype=np.int64))

    scope = "/embeddings"
    shape = b.node("Shape", ["input_ids"], scope)
    seq = b.node("Gather", [shape, i64("seq_index", 1)], scope, axis=0)
    seq1 = b.node("Unsqueeze", [seq, i64("axis0", [0])], scope)
    positions = b.node("Slice", [pos, i64("zero1", [0]), seq1, i64("axis0b", [0])], scope)
    x = b.node("Gather", [word, "input_ids"], scope, axis=0)
    x = b.node("Add", [x, b.node("Gather", [kind, "token_type_ids"], scope, axis=0)], scope)
    x = b.node("Add", [x, positions], scope)
    x = b.layernorm(x, "/embeddings/LayerNorm", dim)

    # Mask bias (1 - mask) * -10000, as [batch, 1, 1, seq]
    scope = "/mask"
    mask_f = b.node("Cast", ["attention_mask"], scope, to=TensorProto.FLOAT)
    mask_f4 = b.node("Unsqueeze", [mask_f, i64("axes12", [1, 2])], scope)
    bias = b.node("Mul", [b.node("Sub", [b.const("mask.one", np.float32(1.0)), mask_f4], scope),
                          b.const("mask.neg", np.float32(-10000.0))], scope)

    batch_seq = b.node("Slice", [b.node("Shape", ["input_ids"], scope), i64("zero1b", [0]), i64("two", [2])], scope)
    split_shape = b.node("Concat", [batch_seq, i64("heads_hd", [heads, head_dim])], scope, axis=0)
    merge_shape = b.node("Concat", [batch_seq, i64("dim1", [dim])], scope, axis=0)

    for i in range(layers):
        scope = f"/encoder/layer.{i}"
        heads_of = []
        for name in ("query", "key", "value"):
            t = b.linear(x, f"{scope}/attention/self/{name}", dim, dim)
            t = b.node("Reshape", [t, split_shape], scope)
            heads_of.append(b.node("Transpose", [t], scope, perm=[0, 2, 1, 3]))
        q, k, v = heads_of
        kt = b.node("Transpose", [k], scope, perm=[0, 1, 3, 2])
        scores = b.node("MatMul", [q, kt], scope)
        scores = b.node("Div", [scores, b.const(f"{scope}.scale", np.float32(math.sqrt(head_dim)))], scope)
        scores = b.node("Add", [scores, bias], scope)
        probs = b.node("Softmax", [scores], scope, axis=-1)
        ctx = b.node("Transpose", [b.node("MatMul", [probs, v], scope)], scope, perm=[0, 2, 1, 3])
        ctx = b.node("Reshape", [ctx, merge_shape], scope)
        out = b.linear(ctx, f"{scope}/attention/output/dense", dim, dim)
        x = b.layernorm(b.node("Add", [out, x], scope), f"{scope}/attention/output/LayerNorm", dim)
        h = b.linear(x, f"{scope}/intermediate/dense", dim, hidden)
        if activation:
            h = b.gelu(h, f"{scope}/intermediate/act")
        h = b.linear(h, f"{scope}/output/dense", hidden, dim, gain=0.7)
        x = b.layernorm(b.node("Add", [h, x], scope), f"{scope}/output/LayerNorm", dim)

    scope = "/pooling"
    tokens = x
    weights = b.node("Unsqueeze", [mask_f, i64("axis_last", [-1])], scope)
    summed = b.node("ReduceSum", [b.node("Mul", [tokens, weights], scope), i64("axis1", [1])], scope, keepdims=0)
    count = b.node("ReduceSum", [mask_f, i64("axis1b", [1])], scope, keepdims=1)
    count = b.node("Max", [count, b.const("pool.eps", np.float32(1e-9))], scope)
    pooled = b.node("Div", [summed, count], scope)
    if classes:
        b.nodes.append(helper.make_node("Identity", [b.linear(pooled, "/classifier", dim, classes, 4.0)], ["logits"],
                                        name="/classifier/out"))
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])]
    else:
        b.nodes.append(helper.make_node("Identity", [pooled], ["sentence_embedding"], name="/pooling/out"))
        outputs = [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", dim])]
    if not pooled_only:
        b.nodes.append(helper.make_node("Identity", [tokens], ["token_embeddings"], name="/tokens/out"))
        b.nodes.append(helper.make_node("Identity", ["input_ids"], ["input_ids_out"], name="/ids/out"))
        outputs = [helper.make_tensor_value_info("input_ids_out", TensorProto.INT64, ["batch", "sequence"]),
                   helper.make_tensor_value_info("token_embeddings", TensorProto.FLOAT, ["batch", "sequence", dim]),
                   *outputs]
    inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"]) for name in INPUTS]
    graph = helper.make_graph(b.nodes, "tiny_bert", inputs, outputs, initializer=b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)])
    runtime_compatible(model)
    onnx.checker.check_model(model)
    return model


def token_feeds(count: int, batch: int = 1, seq: int = 16, vocab: int = 100, seed: int = 0) -> list[dict]:
    """Token-like feeds with some padding at the end of each row."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        ids = rng.integers(1, vocab, (batch, seq)).astype(np.int64)
        mask = np.ones((batch, seq), np.int64)
        for row in range(batch):
            mask[row, rng.integers(seq // 2, seq + 1):] = 0
        feeds.append({"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})
    return feeds
