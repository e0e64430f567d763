"""The checks each prepared model must pass before the manifest names it: generation through the
KV cache (alone and in a left-padded batch), classification against scikit-learn, embeddings,
and the ONNX Runtime library itself."""

from __future__ import annotations

import os
import time
from pathlib import Path

from .common import LOG, PREPARED, Fatal, need, shown
from .sources import ORT_VERSION, Cache
from .targets import load_profanity_pipeline

CHECK_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHECK_QUESTION = "What is the capital of France?"
CHECK_PROMPT = (
    f"<|im_start|>system\n{CHECK_SYSTEM_PROMPT}<|im_end|>\n"
    f"<|im_start|>user\n{CHECK_QUESTION}<|im_end|>\n<|im_start|>assistant\n"
)


def ort_session(path: Path):
    ort = need("onnxruntime")
    if ort.__version__ != ORT_VERSION:
        raise Fatal(f"Python onnxruntime is {ort.__version__}, expected {ORT_VERSION}: "
                    f"run scripts/prepare-models.sh")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = os.cpu_count() or 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class GreedyDecoder:
    """Greedy generation with the KV cache through the prepared decoder graph."""

    def __init__(self, entry: dict) -> None:
        self.np = need("numpy")
        self.entry = entry
        self.session = ort_session(PREPARED / entry["model"])
        self.output_names = [o.name for o in self.session.get_outputs()]

    def generate(self, prompts: list[list[int]], max_new: int) -> tuple[list[list[int]], dict]:
        np, e = self.np, self.entry
        batch, longest = len(prompts), max(len(p) for p in prompts)
        pad = e["special_tokens"]["pad"]
        ids = np.full((batch, longest), pad, dtype=np.int64)
        mask = np.zeros((batch, longest), dtype=np.int64)
        for b, p in enumerate(prompts):  # left padding
            ids[b, longest - len(p):] = p
            mask[b, longest - len(p):] = 1
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        empty = np.zeros((batch, e["num_kv_heads"], 0, e["head_dim"]), dtype=np.float32)
        past = {f"past_key_values.{i}.{t}": empty for i in range(e["num_layers"]) for t in ("key", "value")}
        generated: list[list[int]] = [[] for _ in prompts]
        done = np.zeros(batch, dtype=bool)
        stops = set(e["stop_token_ids"])
        t_prefill = decode_time = 0.0
        for step in range(max_new):
            t0 = time.perf_counter()
            outputs = self.session.run(
                None, {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **past})
            elapsed = time.perf_counter() - t0
            if step == 0:
                t_prefill = elapsed
            else:
                decode_time += elapsed
            result = dict(zip(self.output_names, outputs))
            logits = result["logits"]
            if not np.isfinite(logits[:, -1]).all():
                raise Fatal(f"{e['name']}: non-finite logits at step {step}")
            next_ids = logits[:, -1, :].argmax(axis=-1)
            for b in range(batch):
                if not done[b]:
                    generated[b].append(int(next_ids[b]))
                    done[b] = int(next_ids[b]) in stops
            if done.all():
                break
            past = {n.replace("present.", "past_key_values.", 1): v
                    for n, v in result.items() if n.startswith("present.")}
            ids = next_ids[:, None].astype(np.int64)
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            positions = positions[:, -1:] + 1
        steps = sum(len(g) for g in generated)
        stats = {"prompt_tokens": sum(len(p) for p in prompts), "prefill_s": t_prefill,
                 "decode_steps": step, "decode_s": decode_time,
                 "new_tokens": steps}
        return generated, stats


def check_generate(entry: dict, real_model: bool) -> None:
    tokenizers = need("tokenizers")
    minijinja = need("minijinja")
    tokenizer = tokenizers.Tokenizer.from_file(str(PREPARED / entry["tokenizer"]))
    special = entry["special_tokens"]
    for text, want in (("<|im_start|>", special["im_start"]), ("<|im_end|>", special["im_end"])):
        got = tokenizer.token_to_id(text)
        if got != want:
            raise Fatal(f"{entry['name']}: tokenizer maps {text} to {got}, manifest says {want}")

    env = minijinja.Environment(templates={"chat": entry["chat_template"]})
    prompt = env.render_template(
        "chat", messages=[{"role": "user", "content": CHECK_QUESTION}], add_generation_prompt=True)
    if prompt != CHECK_PROMPT:
        raise Fatal(f"{entry['name']}: chat template renders {prompt!r}, expected {CHECK_PROMPT!r}")
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    if ids[0] != special["im_start"] or tokenizer.decode(ids, skip_special_tokens=False) != prompt:
        raise Fatal(f"{entry['name']}: tokenizer does not round-trip the chat prompt")
    sample = "Millrace 2025: naïve café — ünïcödé, emoji 🚀, code `x += 1`\n\tdone."
    if tokenizer.decode(tokenizer.encode(sample).ids) != sample:
        raise Fatal(f"{entry['name']}: tokenizer does not round-trip {sample!r}")

    decoder = GreedyDecoder(entry)
    max_new = 32 if real_model else 8
    (answer_ids,), stats = decoder.generate([ids], max_new)
    answer = tokenizer.decode(answer_ids, skip_special_tokens=True)
    tps = stats["decode_steps"] / stats["decode_s"] if stats["decode_s"] else float("nan")
    LOG.note(f"prompt {len(ids)} tokens, prefill {stats['prefill_s'] * 1000:.0f} ms; "
             f"{stats['new_tokens']} new tokens, decode {tps:.1f} tokens/s (batch 1)")
    if real_model:
        LOG.note(f"answer: {answer!r}")
        if "Paris" not in answer:
            raise Fatal(f"{entry['name']}: the greedy answer to {CHECK_QUESTION!r} does not name "
                        f"Paris: {answer!r}")

    # Batched, left-padded prompts of different lengths must give each the tokens it gets alone.
    second = env.render_template(
        "chat", messages=[{"role": "user", "content": "Give me two short tips for staying focused while studying at home."}],
        add_generation_prompt=True)
    prompts = [ids, tokenizer.encode(second, add_special_tokens=False).ids]
    if len(prompts[0]) == len(prompts[1]):
        raise Fatal("internal error: batch check prompts must differ in length")
    n = 16 if real_model else 8
    alone = [decoder.generate([p], n)[0][0] for p in prompts]
    together, stats = decoder.generate(prompts, n)
    for b, (a, t) in enumerate(zip(alone, together)):
        if a != t:
            raise Fatal(f"{entry['name']}: prompt {b} ({len(prompts[b])} tokens) gives different "
                        f"greedy tokens in a left-padded batch:\n  alone:   {a}\n  batched: {t}")
    tps = stats["new_tokens"] / (stats["prefill_s"] + stats["decode_s"])
    LOG.note(f"batch of 2 left-padded prompts ({len(prompts[0])} and {len(prompts[1])} tokens) "
             f"matches unbatched greedy output ({n} tokens each, {tps:.1f} tokens/s incl. prefill)")


def check_profanity(entry: dict, cache: Cache) -> None:
    np = need("numpy")
    session = ort_session(PREPARED / entry["model"])
    texts = [
        "Thank you so much for your help, have a wonderful day!",
        "You are a fucking idiot, shut the fuck up.",
        "The meeting moved to Thursday afternoon.",
        "what a stupid piece of shit",
    ]
    probs = session.run(["probabilities"], {"text": np.array([[t] for t in texts], dtype=object)})[0]
    if probs.shape != (len(texts), 2):
        raise Fatal(f"profanity: probabilities shape {probs.shape}, expected ({len(texts)}, 2)")
    profane = probs[:, entry["positive_label"]]
    LOG.note("p(profane): " + ", ".join(f"{p:.3f}" for p in profane))
    if not (min(profane[1], profane[3]) > max(profane[0], profane[2])):
        raise Fatal(f"profanity: abusive sentences do not score above benign ones: {profane}")
    if cache.has("alt-profanity-check"):  # compare with scikit-learn itself
        joblib = need("joblib")
        from sklearn.pipeline import Pipeline

        expected = load_profanity_pipeline(cache, joblib, Pipeline).predict_proba(texts)
        diff = float(np.abs(expected - probs).max())
        LOG.note(f"max |onnx - scikit-learn| = {diff:.2e}")
        if diff > 1e-3:
            raise Fatal(f"profanity: ONNX probabilities differ from scikit-learn's by {diff}")


def check_embed(entry: dict) -> None:
    np = need("numpy")
    tokenizers = need("tokenizers")
    tokenizer = tokenizers.Tokenizer.from_file(str(PREPARED / entry["tokenizer"]))
    session = ort_session(PREPARED / entry["model"])

    def embed(texts: list[str]):
        encs = tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encs], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encs], dtype=np.int64)
        types = np.array([e.type_ids for e in encs], dtype=np.int64)
        hidden = session.run(["last_hidden_state"],
                             {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})[0]
        m = mask[:, :, None].astype(np.float32)
        pooled = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
        return pooled / np.linalg.norm(pooled, axis=1, keepdims=True), ids.shape

    texts = ["A man is playing a guitar.", "Someone is strumming an acoustic guitar on stage.",
             "The central bank raised interest rates again."]
    vecs, shape = embed(texts)
    if shape[1] >= 128:
        raise Fatal(f"minilm-l6: batch padded to {shape[1]} tokens; expected the longest input")
    related, unrelated = float(vecs[0] @ vecs[1]), float(vecs[0] @ vecs[2])
    LOG.note(f"batch padded to {shape[1]} tokens; cosine related {related:.3f} > "
             f"unrelated {unrelated:.3f}")
    if not related > unrelated:
        raise Fatal(f"minilm-l6: related pair cosine {related:.3f} <= unrelated {unrelated:.3f}")
    alone, _ = embed([texts[0]])
    if float(alone[0] @ vecs[0]) < 0.999:
        raise Fatal("minilm-l6: an embedding changes when its input is padded in a batch")


def check_ort_library(path: Path) -> None:
    import ctypes

    try:
        lib = ctypes.CDLL(str(path))
        api_base = lib.OrtGetApiBase
    except (OSError, AttributeError) as e:
        raise Fatal(f"cannot load {path}: {e}") from e
    api_base.restype = ctypes.POINTER(ctypes.c_void_p * 2)
    get_version = ctypes.CFUNCTYPE(ctypes.c_char_p)(api_base().contents[1])
    version = get_version().decode()
    if version != ORT_VERSION:
        raise Fatal(f"{path} reports version {version}, expected {ORT_VERSION}")
    LOG.note(f"{shown(path)} loads, reports version {version}")


def run_check(name: str, entry: dict, cache: Cache) -> None:
    if entry["kind"] == "generate":
        check_generate(entry, real_model=(name != "tiny-llama"))
    elif entry["kind"] == "classify":
        check_profanity(entry, cache)
    elif entry["kind"] == "embed":
        check_embed(entry)
