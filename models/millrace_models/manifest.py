"""manifest.json, what the Rust engine reads: its schema version, the ONNX Runtime library and
per model its recorded entry plus a content-hash version."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from .common import MANIFEST_FILE, write_json
from .sources import ORT_VERSION

if TYPE_CHECKING:
    from .state import State, Target

# The manifest's format. Bump it when the meaning of a field changes, and teach the Rust engine
# (shared/engine/src/manifest.rs, SUPPORTED_SCHEMA_VERSIONS) the new version in the same change.
# Every target's key includes it, so a bump rebuilds every recorded entry on the next run.
MANIFEST_SCHEMA_VERSION = 1


def model_version(state_entry: dict, files: list[str]) -> str:
    """sha256 over the model's files' content hashes (paths relative to the manifest)."""
    lines = [f"{state_entry['outputs'][f]}  {f}" for f in sorted(files)]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def schema_on_disk(path: Path = MANIFEST_FILE) -> tuple[bool, int | None]:
    """Whether a manifest exists at `path`, and its schema_version (None when it has none or
    cannot be read)."""
    if not path.exists():
        return False, None
    try:
        version = json.loads(path.read_text()).get("schema_version")
    except (OSError, ValueError, AttributeError):
        return True, None
    return True, version if isinstance(version, int) else None


def write_manifest(state: State, targets: list[Target], path: Path = MANIFEST_FILE) -> dict:
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
    write_json(path, manifest)
    return manifest
