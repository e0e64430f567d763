"""The llama decoder graph builder on small models, run with onnxruntime and compared with an
independent numpy forward pass: the last position's logits, the KV cache (past in, present out,
cached = recomputed), left-padded batches, grouped-query attention, and the byte-for-byte
reproducibility of the prepared tiny-llama graph (its manifest version is a content hash).
No prepared files needed: every graph is built here, in memory."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from millrace_models.llama import (
    ONNX_IR_VERSION,
    ONNX_OPSET,
    LayerWeights,
    LlamaConfig,
    LlamaWeights,
    TokenizerInfo,
    build_llama_decoder,
    llama_io_names,
    random_llama_weights,
    unpermute_rope,
)
from millrace_models.targets import TINY_SEED, TINY_VOCAB, tiny_config, truncated_vocabulary

# What the SmolLM2 GGUF says (models/README.md); tiny-llama takes these from it.
SMOLLM2 = LlamaConfig(num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64,
                      intermediate_size=1536, vocab_size=49152, rope_theta=100000.0,
                      rms_norm_eps=1e-5, context_length=8192)
TINY = tiny_config(SMOLLM2)

# sha256 of models/prepared/tiny-llama/model.onnx, the content its manifest version hashes.
# It changes exactly when the graph builder's output does: update it in the same change, which
# also changes the prepared model's version.
TINY_LLAMA_MODEL_SHA256 = "14dbfba3ca853d7f87dcc030bd389da5b660192cd6fcf80f3075cbe400bd2f71"

# Two layers, 4 query heads over 2 KV heads (so a wrong head grouping shows), an untied output
# projection and weights large enough that attention is far from uniform.
SHARP = LlamaConfig(num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8,
                    intermediate_size=48, vocab_size=96, rope_theta=10000.0, rms_norm_eps=1e-5,
                    context_length=256)


def sharp_weights(cfg: LlamaConfig, seed: int = 7) -> LlamaWeights:
    rng = np.random.default_rng(seed)
    H, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim

    def w(*shape, std=0.3):
        return rng.normal(0.0, std, size=shape).astype(np.float32)

    def norm():
        return (1.0 + rng.normal(0.0, 0.2, size=H)).astype(np.float32)

    layers = [LayerWeights(norm(), w(q_out, H), w(kv_out, H), w(kv_out, H), w(H, q_out), norm(),
                           w(I, H), w(I, H), w(H, I))
              for _ in range(cfg.num_layers)]
    return LlamaWeights(embed=w(V, H, std=1.0), layers=layers, norm=norm(), lm_head=w(V, H))


# --------------------------------------------------------------------------------------------
# The reference: a plain numpy llama forward pass (float64, HuggingFace conventions)
# --------------------------------------------------------------------------------------------


def rms_norm(x, weight, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def reference_logits(cfg: LlamaConfig, w: LlamaWeights, ids, mask):
    """Logits of every row's last position for a left-padded batch: ids, mask [batch, seq]."""
    b, t = ids.shape
    nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, hd, 2) / hd)
    angles = positions[..., None] * inv_freq
    angles = np.concatenate([angles, angles], axis=-1)[:, None]  # [b, 1, t, hd]
    cos, sin = np.cos(angles), np.sin(angles)

    def rope(v):  # [b, heads, t, hd]: v * cos + rotate_half(v) * sin
        half = hd // 2
        return v * cos + np.concatenate([-v[..., half:], v[..., :half]], axis=-1) * sin

    allowed = np.tril(np.ones((t, t), dtype=bool))[None] & (mask[:, None, :] == 1)  # [b, q, k]
    x = w.embed[ids].astype(np.float64)
    for lw in w.layers:
        h = rms_norm(x, lw.attn_norm, cfg.rms_norm_eps)
        q = rope((h @ lw.q.T).reshape(b, t, nh, hd).transpose(0, 2, 1, 3))
        k = rope((h @ lw.k.T).reshape(b, t, nkv, hd).transpose(0, 2, 1, 3))
        v = (h @ lw.v.T).reshape(b, t, nkv, hd).transpose(0, 2, 1, 3)
        k = np.repeat(k, nh // nkv, axis=1)  # query head i reads KV head i // group
        v = np.repeat(v, nh // nkv, axis=1)
        scores = np.where(allowed[:, None], q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd), -np.inf)
        peak = scores.max(-1, keepdims=True)
        e = np.where(allowed[:, None], np.exp(scores - np.where(np.isfinite(peak), peak, 0)), 0.0)
        probs = e / np.maximum(e.sum(-1, keepdims=True), 1e-300)  # padding queries: all zero
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(b, t, nh * hd)
        x = x + ctx @ lw.o.T
        h = rms_norm(x, lw.ffn_norm, cfg.rms_norm_eps)
        gate = h @ lw.gate.T
        x = x + (gate / (1.0 + np.exp(-gate)) * (h @ lw.up.T)) @ lw.down.T
    head = w.embed if w.lm_head is None else w.lm_head
    return rms_norm(x[:, -1], w.norm, cfg.rms_norm_eps) @ head.T


# --------------------------------------------------------------------------------------------
# Running the graph
# --------------------------------------------------------------------------------------------


class Decoder:
    def __init__(self, cfg: LlamaConfig, weights: LlamaWeights, name: str = "test") -> None:
        self.cfg = cfg
        self.model = build_llama_decoder(cfg, weights, name)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(self.model.SerializeToString(), opts,
                                            providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, ids, mask, positions, past=None) -> dict:
        cfg = self.cfg
        empty = np.zeros((ids.shape[0], cfg.num_kv_heads, 0, cfg.head_dim), dtype=np.float32)
        feed = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64),
                "position_ids": positions.astype(np.int64)}
        for i in range(cfg.num_layers):
            for t in ("key", "value"):
                feed[f"past_key_values.{i}.{t}"] = empty if past is None else past[f"present.{i}.{t}"]
        return dict(zip(self.outputs, self.session.run(None, feed)))

    def prefill(self, ids, mask) -> dict:
        return self.run(ids, mask, np.maximum(np.cumsum(mask, axis=1) - 1, 0))


def left_pad(prompts: list[list[int]], pad: int = 0):
    longest = max(map(len, prompts))
    ids = np.full((len(prompts), longest), pad, dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = prompt
        mask[row, longest - len(prompt):] = 1
    return ids, mask


def assert_logits_close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.fixture(scope="module")
def sharp():
    weights = sharp_weights(SHARP)
    return Decoder(SHARP, weights), weights


@pytest.fixture(scope="module")
def tiny():
    weights = random_llama_weights(TINY, TINY_SEED)
    return Decoder(TINY, weights, "tiny-llama"), weights


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [TINY, SHARP], ids=["tiny", "sharp"])
def test_the_graph_is_valid_onnx_with_the_manifest_io_names(cfg):
    model = build_llama_decoder(cfg, random_llama_weights(cfg, 1), "io")
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == ONNX_IR_VERSION
    assert [(o.domain, o.version) for o in model.opset_import] == [("", ONNX_OPSET)]
    inputs, outputs = llama_io_names(cfg)
    assert [i.name for i in model.graph.input] == inputs
    assert [o.name for o in model.graph.output] == outputs
    assert len(inputs) == 3 + 2 * cfg.num_layers


def test_the_tiny_llama_graph_is_reproducible_byte_for_byte():
    first = build_llama_decoder(TINY, random_llama_weights(TINY, TINY_SEED), "tiny-llama")
    second = build_llama_decoder(TINY, random_llama_weights(TINY, TINY_SEED), "tiny-llama")
    data = first.SerializeToString()
    assert data == second.SerializeToString()
    assert TINY.vocab_size == TINY_VOCAB
    assert hashlib.sha256(data).hexdigest() == TINY_LLAMA_MODEL_SHA256, (
        "the graph builder no longer builds the prepared tiny-llama model.onnx (its manifest "
        "version changes): update TINY_LLAMA_MODEL_SHA256 if that is intended")


@pytest.mark.parametrize("which", ["tiny", "sharp"])
def test_prefill_logits_match_numpy(which, request):
    decoder, weights = request.getfixturevalue(which)
    rng = np.random.default_rng(3)
    ids = rng.integers(0, decoder.cfg.vocab_size, size=(2, 11))
    mask = np.ones_like(ids)
    out = decoder.prefill(ids, mask)
    assert out["logits"].shape == (2, 1, decoder.cfg.vocab_size)
    assert out["logits"].dtype == np.float32
    expected = reference_logits(decoder.cfg, weights, ids, mask)
    assert_logits_close(out["logits"][:, 0], expected)
    # the two rows differ (so the comparison says something)
    assert np.abs(expected[0] - expected[1]).max() > 10 * np.abs(out["logits"][:, 0] - expected).max()


def test_grouped_query_attention_pairs_each_query_head_with_its_kv_head(sharp):
    # Swapping the two KV heads' weights must change the logits: the graph really reads query
    # head i's keys from KV head i // 2 (the numpy reference above agrees with it on that).
    decoder, weights = sharp
    hd = SHARP.head_dim
    swapped_layers = []
    for lw in weights.layers:
        swap = np.concatenate([np.arange(hd, 2 * hd), np.arange(0, hd)])
        swapped_layers.append(LayerWeights(lw.attn_norm, lw.q, lw.k[swap], lw.v[swap], lw.o,
                                           lw.ffn_norm, lw.gate, lw.up, lw.down))
    swapped = LlamaWeights(weights.embed, swapped_layers, weights.norm, weights.lm_head)
    ids = np.array([[5, 17, 42, 8, 91, 3]])
    mask = np.ones_like(ids)
    original = decoder.prefill(ids, mask)["logits"][:, 0]
    changed = Decoder(SHARP, swapped).prefill(ids, mask)["logits"][:, 0]
    assert_logits_close(changed, reference_logits(SHARP, swapped, ids, mask))
    assert np.abs(changed - original).max() > 1e-2


@pytest.mark.parametrize("which", ["tiny", "sharp"])
def test_decoding_with_the_kv_cache_equals_recomputing_the_whole_sequence(which, request):
    decoder, weights = request.getfixturevalue(which)
    cfg = decoder.cfg
    rng = np.random.default_rng(11)
    sequence = rng.integers(0, cfg.vocab_size, size=(2, 10))
    prompt = 7
    ids, mask = sequence[:, :prompt], np.ones((2, prompt), dtype=np.int64)
    out = decoder.prefill(ids, mask)
    for step in range(prompt, sequence.shape[1]):
        past = out
        mask = np.ones((2, step + 1), dtype=np.int64)
        out = decoder.run(sequence[:, step:step + 1], mask, np.full((2, 1), step), past)
        for i in range(cfg.num_layers):
            for t in ("key", "value"):
                present = out[f"present.{i}.{t}"]
                assert present.shape == (2, cfg.num_kv_heads, step + 1, cfg.head_dim)
                # the cache grows by appending: the past comes back unchanged in front
                np.testing.assert_array_equal(present[:, :, :step], past[f"present.{i}.{t}"])
        whole = sequence[:, :step + 1]
        assert_logits_close(out["logits"][:, 0], reference_logits(cfg, weights, whole, mask))
        uncached = decoder.prefill(whole, mask)
        np.testing.assert_allclose(out["logits"], uncached["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", ["tiny", "sharp"])
def test_a_left_padded_batch_gives_each_prompt_what_it_gets_alone(which, request):
    decoder, weights = request.getfixturevalue(which)
    cfg = decoder.cfg
    rng = np.random.default_rng(5)
    prompts = [list(rng.integers(1, cfg.vocab_size, size=n)) for n in (4, 9, 6)]
    ids, mask = left_pad(prompts)
    batched = decoder.prefill(ids, mask)
    assert np.isfinite(batched["logits"]).all()
    for row, prompt in enumerate(prompts):
        alone_ids, alone_mask = left_pad([prompt])
        alone = decoder.prefill(alone_ids, alone_mask)["logits"][0]
        np.testing.assert_allclose(batched["logits"][row], alone, rtol=1e-5, atol=1e-5)
        assert_logits_close(alone[0], reference_logits(cfg, weights, alone_ids, alone_mask)[0])
    # and a decode step after the padded prefill still matches each prompt's own sequence
    next_ids = np.array([[7], [8], [9]])
    step_mask = np.concatenate([mask, np.ones((3, 1), dtype=np.int64)], axis=1)
    positions = np.array([[len(p)] for p in prompts])
    out = decoder.run(next_ids, step_mask, positions, batched)
    expected = reference_logits(cfg, weights, np.concatenate([ids, next_ids], axis=1), step_mask)
    assert_logits_close(out["logits"][:, 0], expected)


def test_unpermute_rope_inverts_the_gguf_converters_permute():
    def permute(weights, n_head):  # convert_hf_to_gguf.py's LlamaModel.permute
        return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
                .swapaxes(1, 2).reshape(weights.shape))

    w = np.arange(3 * 8 * 5, dtype=np.float32).reshape(24, 5)  # 3 heads of 8 rows, 5 inputs
    permuted = permute(w, 3)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(unpermute_rope(permuted, 3), w)


def test_a_truncated_vocabulary_keeps_the_merges_inside_it():
    tok = TokenizerInfo(
        tokens=["<|endoftext|>", "<|im_start|>", "a", "b", "c", "ab", "bc", "abc"],
        token_types=[3, 3, 1, 1, 1, 1, 1, 1],
        merges=["a b", "b c", "ab c"],
        bos_id=1, eos_id=0, pad_id=0, unk_id=None, chat_template="",
        special={"<|endoftext|>": 0, "<|im_start|>": 1},
    )
    small = truncated_vocabulary(tok, 6)
    assert small.tokens == tok.tokens[:6]
    assert small.token_types == tok.token_types[:6]
    assert small.merges == ["a b"]  # "b c" makes "bc", "ab c" makes "abc": both cut off
    assert small.special == tok.special
    with pytest.raises(Exception, match="bos token 1 is outside the first 1 tokens"):
        truncated_vocabulary(tok, 1)
