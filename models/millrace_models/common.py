"""Paths, errors, progress output, hashing and file helpers shared by every module."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent
MODELS_DIR = PACKAGE_DIR.parent
REPO_ROOT = MODELS_DIR.parent
PREPARED = MODELS_DIR / "prepared"
CACHE = PREPARED / "cache"
STATE_FILE = PREPARED / "state.json"
MANIFEST_FILE = PREPARED / "manifest.json"


class Fatal(Exception):
    """An error with a message meant for the person running the tool (no traceback)."""


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


def rel(path: Path, root: Path = PREPARED) -> str:
    """A path relative to the manifest (models/prepared/)."""
    return path.relative_to(root).as_posix()


def shown(path: Path) -> str:
    """A path for messages: relative to the repository when it is inside it."""
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


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


def save_onnx(model, path: Path) -> None:
    onnx = need("onnx")
    data = model.SerializeToString()
    if len(data) >= 2**31:
        raise Fatal(f"{path.name} is over 2 GB; single-file ONNX cannot hold it")
    write_atomic(path, data)
    onnx.checker.check_model(str(path))
