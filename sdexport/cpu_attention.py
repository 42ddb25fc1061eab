"""Self-attention for onnxruntime's CPU provider: fused `Attention` nodes rewritten as MatMul + MultiHeadAttention.

onnxruntime's UNet fusion emits self-attention as `Attention` (one packed QKV weight), whose CPU kernel
materialises the (B, heads, S, S) probabilities: 1 GiB per call at 512x512 (S = 4096, batch 2). Its CPU
`MultiHeadAttention` kernel runs FlashAttention-style tiles sized to the L2 cache instead (no S x S buffer),
but it takes separate Q, K and V (packed QKV is not implemented on CPU). This pass keeps the packed weight,
projects once with a MatMul, splits the result in three and feeds MultiHeadAttention. Only node wiring
changes, so external weight files stay as they are.
Reference: onnxruntime contrib_ops/cpu/bert/multihead_attention.cc (MlasFlashAttention), attention.cc.
"""
from __future__ import annotations

from pathlib import Path

MS_DOMAIN = "com.microsoft"
KEPT_ATTRIBUTES = ("num_heads", "scale", "mask_filter_value")


def _rewritable(node) -> bool:
    """An Attention node with just input, packed weight and bias (no mask, past or unidirectional flag)."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    plain = set(attrs) <= {*KEPT_ATTRIBUTES, "unidirectional"} and not attrs.get("unidirectional", 0)
    return node.op_type == "Attention" and node.domain == MS_DOMAIN and len(node.input) == 3 and plain


def _replacement(node, hidden: int, split_name: str) -> list:
    """MatMul (B, S, C) x (C, 3D) -> (B, S, 3D), Split -> 3 x (B, S, D), MultiHeadAttention(q, k, v, bias)."""
    from onnx import helper

    x, weight, bias = node.input
    base = node.name or node.output[0]
    qkv = f"{base}/qkv"
    q, k, v = (f"{base}/{part}" for part in "qkv")
    attrs = [a for a in node.attribute if a.name in KEPT_ATTRIBUTES]
    mha = helper.make_node("MultiHeadAttention", [q, k, v, bias], list(node.output[:1]), name=f"{base}/mha",
                           domain=MS_DOMAIN)
    mha.attribute.extend(attrs)
    return [helper.make_node("MatMul", [x, weight], [qkv], name=f"{base}/qkv_matmul"),
            helper.make_node("Split", [qkv, split_name], [q, k, v], name=f"{base}/split", axis=-1), mha]


def multihead_self_attention(model) -> int:
    """Rewrite every plain Attention node of `model` (a ModelProto) in place; the number rewritten."""
    import numpy as np
    from onnx import numpy_helper

    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    nodes, count = [], 0
    for node in model.graph.node:
        weight_shape = shapes.get(node.input[1]) if len(node.input) > 1 else None
        if not _rewritable(node) or weight_shape is None or weight_shape[1] % 3:
            nodes.append(node)
            continue
        hidden = weight_shape[1] // 3                                   # D per projection
        split_name = f"{node.name or node.output[0]}/split_sizes"
        model.graph.initializer.append(numpy_helper.from_array(np.array([hidden] * 3, np.int64), split_name))
        nodes.extend(_replacement(node, hidden, split_name))
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return count


def rewrite_file(path: Path) -> int:
    """Apply multihead_self_attention to model.onnx, rewriting only the graph file (weights stay external)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    count = multihead_self_attention(model)
    if count:
        tmp = path.with_name("model.mha.onnx")
        onnx.save_model(model, str(tmp))
        tmp.replace(path)
    return count
