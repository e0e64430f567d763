"""The llama decoder: its config, weights and tokenizer read from a GGUF file (or seeded random
weights), the ONNX graph builder with KV cache, int4 quantization, the tokenizer.json writer and
the decoder's manifest entry."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import Fatal, need, rel


# 4-bit weight quantization of the SmolLM2 decoder (MatMul -> MatMulNBits, embedding Gather ->
# GatherBlockQuantized). accuracy_level 0 = float32 activations: level 4 (int8 activations, ~2x
# faster at batch 1) made a request's tokens depend on its batch neighbours (models/README.md).
INT4_BLOCK_SIZE = 32
INT4_ACCURACY_LEVEL = 0
# int4 tensors (GatherBlockQuantized's data) need opset 21 / IR 10; build at that opset directly.
ONNX_OPSET = 21
ONNX_IR_VERSION = 10


@dataclass(frozen=True)
class LlamaConfig:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float
    context_length: int


@dataclass
class LayerWeights:
    """One decoder layer, weights in HuggingFace orientation ([out_features, in_features])."""

    attn_norm: Any
    q: Any
    k: Any
    v: Any
    o: Any
    ffn_norm: Any
    gate: Any
    up: Any
    down: Any


@dataclass
class LlamaWeights:
    embed: Any  # [vocab, hidden]
    layers: list[LayerWeights]
    norm: Any  # [hidden]
    lm_head: Any | None = None  # [vocab, hidden]; None = tied to embed


@dataclass
class TokenizerInfo:
    """What the GGUF says about its tokenizer."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int | None
    chat_template: str
    add_bos: bool = False
    pre: str = ""
    special: dict[str, int] = field(default_factory=dict)


GGUF_TOKEN_CONTROL = 3
GGUF_TOKEN_USER_DEFINED = 4


def gguf_field(reader, name: str, default: Any = ...) -> Any:
    f = reader.fields.get(name)
    if f is None:
        if default is ...:
            raise Fatal(f"GGUF metadata has no '{name}'")
        return default
    return f.contents()


def read_gguf_config(reader) -> LlamaConfig:
    arch = gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise Fatal(f"expected a llama GGUF, got architecture '{arch}'")
    hidden = int(gguf_field(reader, "llama.embedding_length"))
    heads = int(gguf_field(reader, "llama.attention.head_count"))
    head_dim = int(gguf_field(reader, "llama.rope.dimension_count", hidden // heads))
    vocab = int(gguf_field(reader, "llama.vocab_size", 0)) or len(
        gguf_field(reader, "tokenizer.ggml.tokens")
    )
    return LlamaConfig(
        num_layers=int(gguf_field(reader, "llama.block_count")),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=int(gguf_field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=head_dim,
        intermediate_size=int(gguf_field(reader, "llama.feed_forward_length")),
        vocab_size=vocab,
        rope_theta=float(gguf_field(reader, "llama.rope.freq_base", 10000.0)),
        # stored as float32 (9.99999975e-06): round to the intended value
        rms_norm_eps=float(f"{gguf_field(reader, 'llama.attention.layer_norm_rms_epsilon'):.6g}"),
        context_length=int(gguf_field(reader, "llama.context_length")),
    )


def read_gguf_tokenizer(reader) -> TokenizerInfo:
    model = gguf_field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise Fatal(f"expected a byte-level BPE ('gpt2') GGUF tokenizer, got '{model}'")
    tokens = list(gguf_field(reader, "tokenizer.ggml.tokens"))
    types = [int(t) for t in gguf_field(reader, "tokenizer.ggml.token_type")]
    special = {
        tok: i
        for i, (tok, t) in enumerate(zip(tokens, types))
        if t in (GGUF_TOKEN_CONTROL, GGUF_TOKEN_USER_DEFINED)
    }
    return TokenizerInfo(
        tokens=tokens,
        token_types=types,
        merges=list(gguf_field(reader, "tokenizer.ggml.merges")),
        bos_id=int(gguf_field(reader, "tokenizer.ggml.bos_token_id")),
        eos_id=int(gguf_field(reader, "tokenizer.ggml.eos_token_id")),
        pad_id=int(gguf_field(reader, "tokenizer.ggml.padding_token_id",
                              gguf_field(reader, "tokenizer.ggml.eos_token_id"))),
        unk_id=gguf_field(reader, "tokenizer.ggml.unknown_token_id", None),
        chat_template=gguf_field(reader, "tokenizer.chat_template"),
        add_bos=bool(gguf_field(reader, "tokenizer.ggml.add_bos_token", False)),
        pre=gguf_field(reader, "tokenizer.ggml.pre", ""),
        special=special,
    )


def unpermute_rope(w, n_heads: int):
    """Inverse of convert_hf_to_gguf.py's `permute`: llama.cpp's interleaved rope layout back to
    HuggingFace's rotate-half layout (rows of a [heads*head_dim, in] projection)."""
    # permute: reshape(heads, 2, rows/heads/2, in).swapaxes(1, 2); undo it the other way round.
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf_weights(reader, cfg: LlamaConfig) -> LlamaWeights:
    np = need("numpy")
    gguf = need("gguf")
    tensors = {t.name: t for t in reader.tensors}

    def get(name: str, shape: tuple[int, ...]):
        t = tensors.get(name)
        if t is None:
            raise Fatal(f"GGUF has no tensor '{name}'")
        a = gguf.quants.dequantize(t.data, t.tensor_type)
        a = np.ascontiguousarray(a, dtype=np.float32).reshape(shape)
        return a

    H, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layers = []
    for i in range(cfg.num_layers):
        p = f"blk.{i}."
        layers.append(
            LayerWeights(
                attn_norm=get(p + "attn_norm.weight", (H,)),
                q=unpermute_rope(get(p + "attn_q.weight", (q_out, H)), cfg.num_heads),
                k=unpermute_rope(get(p + "attn_k.weight", (kv_out, H)), cfg.num_kv_heads),
                v=get(p + "attn_v.weight", (kv_out, H)),
                o=get(p + "attn_output.weight", (H, q_out)),
                ffn_norm=get(p + "ffn_norm.weight", (H,)),
                gate=get(p + "ffn_gate.weight", (I, H)),
                up=get(p + "ffn_up.weight", (I, H)),
                down=get(p + "ffn_down.weight", (H, I)),
            )
        )
    return LlamaWeights(
        embed=get("token_embd.weight", (V, H)),
        layers=layers,
        norm=get("output_norm.weight", (H,)),
        lm_head=get("output.weight", (V, H)) if "output.weight" in tensors else None,
    )


def random_llama_weights(cfg: LlamaConfig, seed: int) -> LlamaWeights:
    """Seeded random weights (std 0.02, unit norms) for the tiny benchmark decoder."""
    np = need("numpy")
    rng = np.random.default_rng(seed)
    H, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim

    def w(*shape):
        return rng.normal(0.0, 0.02, size=shape).astype(np.float32)

    ones = np.ones(H, dtype=np.float32)
    layers = [
        LayerWeights(ones, w(q_out, H), w(kv_out, H), w(kv_out, H), w(H, q_out), ones,
                     w(I, H), w(I, H), w(H, I))
        for _ in range(cfg.num_layers)
    ]
    return LlamaWeights(embed=w(V, H), layers=layers, norm=ones)


class GraphBuilder:
    """Appends ONNX nodes and initializers with unique, readable names."""

    def __init__(self) -> None:
        self.onnx = need("onnx")
        self.np = need("numpy")
        self.nodes: list = []
        self.initializers: list = []
        self._names: set[str] = set()
        self._consts: dict[tuple, str] = {}

    def _unique(self, name: str) -> str:
        base, n = name, 1
        while name in self._names:
            n += 1
            name = f"{base}_{n}"
        self._names.add(name)
        return name

    def weight(self, name: str, array) -> str:
        if array.dtype == self.np.float64:
            raise TypeError(f"float64 initializer {name}: the graph is float32")
        name = self._unique(name)
        self.initializers.append(
            self.onnx.numpy_helper.from_array(self.np.ascontiguousarray(array), name)
        )
        return name

    def const(self, values, dtype="int64") -> str:
        """A small constant initializer, shared by value. Scalars stay 0-d."""
        arr = self.np.asarray(values, dtype=dtype)
        key = (str(arr.dtype), arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.weight(f"/const/{dtype}_{len(self._consts)}", arr)
        return self._consts[key]

    def op(self, op_type: str, inputs: list[str], name: str, output: str | None = None,
           domain: str | None = None, **attrs) -> str:
        node_name = self._unique(f"{name}/{op_type}")
        out = output or f"{node_name}_output_0"
        self.nodes.append(
            self.onnx.helper.make_node(op_type, inputs, [out], name=node_name, domain=domain,
                                       **attrs)
        )
        return out


def _rms_norm(g: GraphBuilder, x: str, weight, eps: float, name: str, wname: str) -> str:
    # Pow -> ReduceMean -> Add -> Sqrt -> Div -> Mul: the pattern ONNX Runtime fuses into
    # SimplifiedLayerNormalization.
    sq = g.op("Pow", [x, g.const(2.0, "float32")], name)
    var = g.op("ReduceMean", [sq, g.const([-1])], name, keepdims=1)
    std = g.op("Sqrt", [g.op("Add", [var, g.const(eps, "float32")], name)], name)
    normed = g.op("Div", [x, std], name)
    return g.op("Mul", [normed, g.weight(wname, weight)], name)


def _rotary(g: GraphBuilder, x: str, cos: str, sin: str, head_dim: int, name: str) -> str:
    """x * cos + rotate_half(x) * sin over the last axis (HuggingFace layout)."""
    half = head_dim // 2
    axes = g.const([-1])
    x1 = g.op("Slice", [x, g.const([0]), g.const([half]), axes], name)
    x2 = g.op("Slice", [x, g.const([half]), g.const([head_dim]), axes], name)
    rotated = g.op("Concat", [g.op("Neg", [x2], name), x1], name, axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos], name), g.op("Mul", [rotated, sin], name)], name)


def llama_io_names(cfg: LlamaConfig) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for i in range(cfg.num_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


def build_llama_decoder(cfg: LlamaConfig, w: LlamaWeights, graph_name: str):
    """A llama decoder with KV cache as an ONNX ModelProto (opset 21, float32).

    inputs:  input_ids [batch, sequence] int64, attention_mask [batch, total_sequence] int64
             (left padding allowed), position_ids [batch, sequence] int64,
             past_key_values.{i}.key/.value [batch, kv_heads, past_sequence, head_dim]
    outputs: logits [batch, 1, vocab] (the last position's), present.{i}.key/.value
             [batch, kv_heads, total_sequence, head_dim]   (total = past + sequence)
    Grouped-query attention broadcasts each KV head over its group of query heads (5-D
    MatMuls) instead of copying it.
    """
    onnx = need("onnx")
    np = need("numpy")
    TP, vi = onnx.TensorProto, onnx.helper.make_tensor_value_info
    g = GraphBuilder()
    nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if nh % nkv:
        raise Fatal(f"num_heads {nh} is not a multiple of num_kv_heads {nkv}")
    group = nh // nkv

    kv_shape = ["batch", nkv, "past_sequence", hd]
    graph_inputs = [
        vi("input_ids", TP.INT64, ["batch", "sequence"]),
        vi("attention_mask", TP.INT64, ["batch", "total_sequence"]),
        vi("position_ids", TP.INT64, ["batch", "sequence"]),
    ]
    graph_outputs = [vi("logits", TP.FLOAT, ["batch", 1, cfg.vocab_size])]
    for i in range(cfg.num_layers):
        graph_inputs += [vi(f"past_key_values.{i}.{t}", TP.FLOAT, kv_shape) for t in ("key", "value")]
        graph_outputs += [
            vi(f"present.{i}.{t}", TP.FLOAT, ["batch", nkv, "total_sequence", hd])
            for t in ("key", "value")
        ]

    # Token embeddings.
    x = g.op("Gather", [g.weight("model.embed_tokens.weight", w.embed), "input_ids"],
             "/model/embed_tokens")

    # Rotary tables from position_ids: cos/sin [batch, 1, seq, hd] (keys) and
    # [batch, 1, 1, seq, hd] (queries, grouped as [batch, kv_heads, group, seq, hd]).
    n = "/model/rotary"
    inv_freq = (1.0 / cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)).astype(np.float32)
    pos = g.op("Unsqueeze", [g.op("Cast", ["position_ids"], n, to=TP.FLOAT), g.const([-1])], n)
    freqs = g.op("Mul", [pos, g.weight("model.rotary.inv_freq", inv_freq)], n)
    angles = g.op("Concat", [freqs, freqs], n, axis=-1)
    cos4 = g.op("Unsqueeze", [g.op("Cos", [angles], n), g.const([1])], n)
    sin4 = g.op("Unsqueeze", [g.op("Sin", [angles], n), g.const([1])], n)
    cos5 = g.op("Unsqueeze", [cos4, g.const([1])], n)
    sin5 = g.op("Unsqueeze", [sin4, g.const([1])], n)

    # Attention bias [batch, 1, 1, seq, total]: query i (absolute position past+i) sees key j
    # iff j <= past+i and attention_mask[b, j] == 1; otherwise -1e9. Rows of padding queries
    # see nothing and get uniform weights (finite, never NaN).
    n = "/model/attn_mask"
    total = g.op("Shape", ["attention_mask"], n, start=1, end=2)
    seq = g.op("Shape", ["input_ids"], n, start=1, end=2)
    past = g.op("Sub", [total, seq], n)
    scalar = lambda t: g.op("Squeeze", [t, g.const([0])], n)  # noqa: E731
    zero, one = g.const(0), g.const(1)
    key_pos = g.op("Range", [zero, scalar(total), one], n)
    query_pos = g.op("Add", [g.op("Range", [zero, scalar(seq), one], n), past], n)
    causal = g.op("LessOrEqual", [key_pos, g.op("Unsqueeze", [query_pos, g.const([1])], n)], n)
    keep = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], n, to=TP.BOOL), g.const([1, 2])], n)
    allowed = g.op("And", [causal, keep], n)
    bias = g.op("Where", [allowed, g.const(0.0, "float32"), g.const(-1e9, "float32")], n)
    bias5 = g.op("Unsqueeze", [bias, g.const([1])], n)

    scale = np.float32(1.0 / np.sqrt(hd))  # folded into W_q (exact for head_dim 64)
    for i, lw in enumerate(w.layers):
        p, wp = f"/model/layers.{i}", f"model.layers.{i}"
        h = _rms_norm(g, x, lw.attn_norm, cfg.rms_norm_eps, p + "/input_layernorm",
                      wp + ".input_layernorm.weight")

        a = p + "/self_attn"
        q = g.op("MatMul", [h, g.weight(wp + ".self_attn.q_proj.weight_t", (lw.q * scale).T)],
                 a + "/q_proj")
        q = g.op("Reshape", [q, g.const([0, 0, nkv, group, hd])], a + "/q")
        q = g.op("Transpose", [q], a + "/q", perm=[0, 2, 3, 1, 4])  # [b, kvh, group, s, hd]
        q = _rotary(g, q, cos5, sin5, hd, a + "/q_rotary")

        k = g.op("MatMul", [h, g.weight(wp + ".self_attn.k_proj.weight_t", lw.k.T)], a + "/k_proj")
        k = g.op("Reshape", [k, g.const([0, 0, nkv, hd])], a + "/k")
        k = g.op("Transpose", [k], a + "/k", perm=[0, 2, 1, 3])  # [b, kvh, s, hd]
        k = _rotary(g, k, cos4, sin4, hd, a + "/k_rotary")

        v = g.op("MatMul", [h, g.weight(wp + ".self_attn.v_proj.weight_t", lw.v.T)], a + "/v_proj")
        v = g.op("Reshape", [v, g.const([0, 0, nkv, hd])], a + "/v")
        v = g.op("Transpose", [v], a + "/v", perm=[0, 2, 1, 3])

        k_all = g.op("Concat", [f"past_key_values.{i}.key", k], a + "/present_key",
                     output=f"present.{i}.key", axis=2)
        v_all = g.op("Concat", [f"past_key_values.{i}.value", v], a + "/present_value",
                     output=f"present.{i}.value", axis=2)

        k_t = g.op("Unsqueeze", [g.op("Transpose", [k_all], a, perm=[0, 1, 3, 2]), g.const([2])], a)
        scores = g.op("Add", [g.op("MatMul", [q, k_t], a + "/qk"), bias5], a)  # [b,kvh,grp,s,t]
        probs = g.op("Softmax", [scores], a, axis=-1)
        ctx = g.op("MatMul", [probs, g.op("Unsqueeze", [v_all, g.const([2])], a)], a + "/pv")
        ctx = g.op("Transpose", [ctx], a + "/ctx", perm=[0, 3, 1, 2, 4])  # [b, s, kvh, grp, hd]
        ctx = g.op("Reshape", [ctx, g.const([0, 0, nh * hd])], a + "/ctx")
        o = g.op("MatMul", [ctx, g.weight(wp + ".self_attn.o_proj.weight_t", lw.o.T)], a + "/o_proj")
        x = g.op("Add", [x, o], p + "/attn_residual")

        h = _rms_norm(g, x, lw.ffn_norm, cfg.rms_norm_eps, p + "/post_attention_layernorm",
                      wp + ".post_attention_layernorm.weight")
        m = p + "/mlp"
        gate = g.op("MatMul", [h, g.weight(wp + ".mlp.gate_proj.weight_t", lw.gate.T)], m + "/gate_proj")
        up = g.op("MatMul", [h, g.weight(wp + ".mlp.up_proj.weight_t", lw.up.T)], m + "/up_proj")
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate], m + "/act")], m + "/act")  # SiLU
        act = g.op("Mul", [act, up], m)
        down = g.op("MatMul", [act, g.weight(wp + ".mlp.down_proj.weight_t", lw.down.T)], m + "/down_proj")
        x = g.op("Add", [x, down], p + "/mlp_residual")

    # Only the last position's next token is ever needed (left padding puts every row's last
    # token there): scoring the vocabulary for the other prompt positions was most of a short
    # model's prefill, and copying those logits out most of the rest.
    x = g.op("Slice", [x, g.const([-1]), g.const([2**62]), g.const([1])], "/model/last_position")
    x = _rms_norm(g, x, w.norm, cfg.rms_norm_eps, "/model/norm", "model.norm.weight")
    head = w.lm_head if w.lm_head is not None else w.embed  # tied embeddings
    g.op("MatMul", [x, g.weight("lm_head.weight_t", head.T)], "/lm_head", output="logits")

    graph = onnx.helper.make_graph(g.nodes, graph_name, graph_inputs, graph_outputs,
                                   initializer=g.initializers)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", ONNX_OPSET)],
                                   producer_name="millrace-prepare")
    model.ir_version = ONNX_IR_VERSION
    return model


def quantize_int4(model):
    """MatMul weights -> MatMulNBits, embedding Gather -> GatherBlockQuantized (4-bit,
    asymmetric, blocks along the input dimension). Asymmetric: symmetric int4 made the greedy
    answers wander ("…culture, and culture") where asymmetric answers like float32, ~10% slower."""
    need("onnxruntime")
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=4,
        block_size=INT4_BLOCK_SIZE,
        is_symmetric=False,
        accuracy_level=INT4_ACCURACY_LEVEL,
        op_types_to_quantize=("MatMul", "Gather"),
        quant_axes=(("MatMul", 0), ("Gather", 1)),
    )
    quantizer.process()
    return quantizer.model.model


def byte_level_bpe_tokenizer_json(tok: TokenizerInfo) -> dict:
    """A HuggingFace tokenizer.json (tokenizers 0.23 schema) for a GGUF 'gpt2' vocabulary:
    byte-level BPE; GGUF control tokens become added special tokens. The pre-tokenizer matches
    llama.cpp's 'smollm' pre-tokenizer (individual digits, then the GPT-2 regex)."""
    if tok.pre not in ("smollm", "starcoder", "refact", ""):
        raise Fatal(f"GGUF pre-tokenizer '{tok.pre}' is not supported by this converter")
    vocab = {t: i for i, t in enumerate(tok.tokens)}
    if len(vocab) != len(tok.tokens):
        raise Fatal("GGUF vocabulary has duplicate tokens")
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": tok.token_types[i] == GGUF_TOKEN_CONTROL}
        for t, i in tok.special.items()
    ]
    merges = []
    for m in tok.merges:
        a, sep, b = m.partition(" ")
        if not sep or " " in b:
            raise Fatal(f"unexpected GGUF merge '{m}'")
        merges.append([a, b])
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level],
        },
        "post_processor": {**byte_level, "trim_offsets": False},
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def generate_manifest_entry(name: str, cfg: LlamaConfig, tok: TokenizerInfo, model: Path,
                            tokenizer: Path, weights: str, source: str) -> dict:
    inputs, outputs = llama_io_names(cfg)
    names = {t: i for t, i in tok.special.items()}
    return {
        "name": name,
        "kind": "generate",
        "files": [rel(model), rel(tokenizer)],
        "model": rel(model),
        "tokenizer": rel(tokenizer),
        "inputs": inputs,
        "outputs": outputs,
        "chat_template": tok.chat_template,
        "special_tokens": {
            "bos": tok.bos_id,
            "eos": tok.eos_id,
            "pad": tok.pad_id,
            "unk": tok.unk_id,
            "im_start": names["<|im_start|>"],
            "im_end": names["<|im_end|>"],
            "endoftext": names["<|endoftext|>"],
        },
        "add_bos_token": tok.add_bos,
        "stop_token_ids": sorted({tok.eos_id, names["<|endoftext|>"]}),
        "context_length": cfg.context_length,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "num_kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "kv_cache": {
            "past_key": "past_key_values.{layer}.key",
            "past_value": "past_key_values.{layer}.value",
            "present_key": "present.{layer}.key",
            "present_value": "present.{layer}.value",
            "past_shape": ["batch", cfg.num_kv_heads, "past_sequence", cfg.head_dim],
            "present_shape": ["batch", cfg.num_kv_heads, "past_sequence + sequence", cfg.head_dim],
            "dtype": "float32",
        },
        "padding_side": "left",
        "weights": weights,
        "source": source,
    }
