"""Python onnxruntime baseline for the engine's static-batch generate bench.

Runs the same workload as shared/engine/benches/generate.rs, on the same ONNX model, with the
plain onnxruntime Python API: for each batch size b, prompts[i % len] for i < b are left-padded
to the longest with pad_token_id (attention mask 0 on padding, position ids = real tokens before
each position, 0 on padding), prefilled in one run, then decoded new_tokens - 1 more steps of one
token per row (greedy argmax, EOS ignored, so every row yields exactly new_tokens tokens). One
warm-up (batch 1, 4 tokens) precedes timing; each repetition is timed from the prefill's start to
the last decode's end, and tokens/s = b * new_tokens / seconds (median, min, max reported).

    .tools/venv/bin/python scripts/py/ort-generate-bench.py in.json out.json
    .tools/venv/bin/python scripts/py/ort-generate-bench.py --check in.json

in.json (written by the engine bench): model_file, num_layers, num_kv_heads, head_dim,
pad_token_id, threads, new_tokens, repetitions, batches, prompts (lists of token ids).
out.json: {"engine": "python-onnxruntime", "onnxruntime", "threads", "new_tokens", "rows": [...]};
a Markdown table is printed too. --check instead verifies that left padding changes no row's
greedy tokens: each of the first 4 prompts alone equals its row in one batch of all 4.
"""

import json
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort


def open_session(cfg):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = cfg["threads"]
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(cfg["model_file"], opts, providers=["CPUExecutionProvider"])


def generate(session, cfg, prompts, new_tokens):
    """Greedy static-batch generation; returns an int64 array [batch, new_tokens]."""
    batch, longest = len(prompts), max(len(p) for p in prompts)
    ids = np.full((batch, longest), cfg["pad_token_id"], dtype=np.int64)
    mask = np.zeros((batch, longest), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = prompt
        mask[row, longest - len(prompt):] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    real = mask.sum(axis=1, keepdims=True)  # real tokens so far per row
    empty = np.zeros((batch, cfg["num_kv_heads"], 0, cfg["head_dim"]), dtype=np.float32)
    past = {f"past_key_values.{layer}.{kind}": empty
            for layer in range(cfg["num_layers"]) for kind in ("key", "value")}
    present_names = [name.replace("past_key_values.", "present.") for name in past]
    out = np.empty((batch, new_tokens), dtype=np.int64)
    for step in range(new_tokens):
        logits, *present = session.run(
            ["logits", *present_names],
            {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **past})
        out[:, step] = logits[:, -1, :].argmax(axis=-1)
        ids, positions = out[:, step:step + 1].copy(), real.copy()
        real += 1
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        past = dict(zip(past, present))
    return out


def check(session, cfg):
    prompts = [cfg["prompts"][i % len(cfg["prompts"])] for i in range(4)]
    together = generate(session, cfg, prompts, cfg["new_tokens"])
    bad = [i for i, p in enumerate(prompts)
           if not np.array_equal(generate(session, cfg, [p], cfg["new_tokens"])[0], together[i])]
    lengths = [len(p) for p in prompts]
    print(f"check {'ok' if not bad else 'FAILED'}: batch of 4 (prompt lengths {lengths}) vs each "
          f"alone, {cfg['new_tokens']} greedy tokens" + (f"; rows differing: {bad}" if bad else ""))
    return not bad


def bench(session, cfg, out_path):
    generate(session, cfg, cfg["prompts"][:1], 4)  # warm-up
    n, rows = cfg["new_tokens"], []
    for b in cfg["batches"]:
        prompts = [cfg["prompts"][i % len(cfg["prompts"])] for i in range(b)]
        seconds = []
        for _ in range(cfg["repetitions"]):
            start = time.perf_counter()
            generate(session, cfg, prompts, n)
            seconds.append(time.perf_counter() - start)
        rates = [b * n / s for s in seconds]
        rows.append({"batch": b, "prompt_tokens": sum(len(p) for p in prompts),
                     "new_tokens": b * n, "seconds": seconds,
                     "new_tokens_per_s": statistics.median(rates),
                     "new_tokens_per_s_min": min(rates), "new_tokens_per_s_max": max(rates)})
    report = {"engine": "python-onnxruntime", "onnxruntime": ort.__version__,
              "threads": cfg["threads"], "new_tokens": n, "rows": rows}
    with open(out_path, "w") as f:
        json.dump(report, f, indent=2)
    print("| batch | prompt tokens | new tokens/s (median) | min | max |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['prompt_tokens']} | {r['new_tokens_per_s']:.1f} "
              f"| {r['new_tokens_per_s_min']:.1f} | {r['new_tokens_per_s_max']:.1f} |")


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--check"] and len(args) == 2:
        cfg = json.load(open(args[1]))
        sys.exit(0 if check(open_session(cfg), cfg) else 1)
    if len(args) != 2:
        sys.exit(__doc__)
    cfg = json.load(open(args[0]))
    bench(open_session(cfg), cfg, args[1])
