"""Build state: which outputs were produced from which inputs (models/prepared/state.json), and
the keys that decide whether a target is up to date."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .common import (
    LOG,
    PACKAGE_DIR,
    PREPARED,
    Fatal,
    mib,
    rel,
    sha256_file,
    sha256_json,
    shown,
    write_json,
)
from .manifest import MANIFEST_SCHEMA_VERSION

# RECIPE_VERSION versions the state file's format (a state file of another version is ignored:
# everything rebuilds).
RECIPE_VERSION = 1

# Every output's key includes the hash of the code that writes outputs, so editing it rebuilds
# (about a minute). The modules named here only check, report or parse flags: editing them
# rebuilds nothing. A new module counts as build code until it is listed here.
NOT_BUILD_CODE = frozenset({"__init__.py", "__main__.py", "checks.py", "cli.py", "manifest.py"})

# Keys written by the single-file models/prepare.py of before the split into this package had
# the form {"recipe", "script": sha256 of that file, **inputs}. Its last version (this hash)
# builds byte-identical outputs to this package (checked by a --force run on both), so a state
# recorded by it is taken over once, without rebuilding; older versions of that file rebuild, as
# they always did. It wrote manifest schema 1: once the schema moves on, this no longer applies.
LEGACY_SCRIPT_SHA256 = "c9ddaa706ee6b9300c2dbbf248e958d558e8ba337d67086c200b78bee457135d"
LEGACY_MANIFEST_SCHEMA = 1


def code_sha256(package_dir: Path = PACKAGE_DIR) -> str:
    """sha256 over the package's build code: every module not in NOT_BUILD_CODE, by name."""
    return sha256_json({
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(package_dir.glob("*.py"))
        if p.name not in NOT_BUILD_CODE
    })


BUILD_CODE_SHA256 = code_sha256()


def target_key(inputs: dict, code: str | None = None, manifest_schema: int | None = None) -> str:
    """The key of a target's outputs: its inputs, the build code (default: this package's) and
    the manifest schema its recorded manifest entry follows (default: the current one, so that a
    new schema rebuilds every entry)."""
    return sha256_json({
        "recipe": RECIPE_VERSION,
        "code": BUILD_CODE_SHA256 if code is None else code,
        "manifest_schema": MANIFEST_SCHEMA_VERSION if manifest_schema is None else manifest_schema,
        **inputs,
    })


def legacy_key(inputs: dict) -> str:
    """The key the single-file prepare.py (LEGACY_SCRIPT_SHA256) recorded for `inputs`."""
    return sha256_json({"recipe": RECIPE_VERSION, "script": LEGACY_SCRIPT_SHA256, **inputs})


class State:
    """models/prepared/state.json: per target the input key, output hashes, manifest entry;
    per model the version whose checks passed. Output paths are relative to `root`."""

    def __init__(self, root: Path = PREPARED) -> None:
        self.root = root
        self.file = root / "state.json"
        self.data: dict[str, Any] = {"targets": {}, "checks": {}}
        if self.file.exists():
            try:
                loaded = json.loads(self.file.read_text())
                if loaded.get("recipe") == RECIPE_VERSION:
                    self.data = loaded
            except (OSError, ValueError):
                pass  # unreadable state: rebuild everything
        self.data["recipe"] = RECIPE_VERSION

    def save(self) -> None:
        write_json(self.file, self.data)

    def target(self, name: str) -> dict | None:
        return self.data["targets"].get(name)

    def outputs_intact(self, name: str) -> tuple[bool, str]:
        entry = self.target(name)
        if entry is None:
            return False, "not built yet"
        for path, digest in entry["outputs"].items():
            p = self.root / path
            if not p.exists():
                return False, f"missing {shown(p)}"
            if sha256_file(p) != digest:
                return False, f"{shown(p)} changed"
        return True, ""

    def record(self, name: str, key: str, outputs: list[Path], manifest: dict | None) -> None:
        self.data["targets"][name] = {
            "key": key,
            "outputs": {rel(p, self.root): sha256_file(p) for p in outputs},
            "manifest": manifest,
        }
        self.data["checks"].pop(name, None)
        self.save()

    def rekey(self, name: str, key: str) -> None:
        """Record a new key for unchanged outputs (their checks stay passed)."""
        self.data["targets"][name]["key"] = key
        self.save()

    def checked(self, name: str, version: str) -> bool:
        return self.data["checks"].get(name) == version

    def mark_checked(self, name: str, version: str) -> None:
        self.data["checks"][name] = version
        self.save()


@dataclass
class Target:
    """Something the preparation builds: outputs that depend only on `key`."""

    name: str
    inputs: dict  # everything the outputs depend on (hashed into the key)
    outputs: list[Path]
    build: Callable[[], dict | None]  # writes the outputs, returns the manifest entry (or None)
    model: bool = True  # appears in the manifest's model list

    @property
    def key(self) -> str:
        return target_key(self.inputs)

    def legacy_key(self) -> str | None:
        """The single-file prepare.py's key for the same inputs, while it still applies."""
        if MANIFEST_SCHEMA_VERSION != LEGACY_MANIFEST_SCHEMA:
            return None
        return legacy_key(self.inputs)


def ensure(target: Target, state: State, force: bool) -> bool:
    """Build `target` unless its recorded outputs are intact and built from the same inputs.
    Returns whether it was built."""
    entry = state.target(target.name)
    legacy = target.legacy_key()
    if not force and entry is not None and entry["key"] in (target.key, legacy):
        ok, why = state.outputs_intact(target.name)
        if ok:
            if entry["key"] == target.key:
                LOG.skip(f"build {target.name}")
            else:
                state.rekey(target.name, target.key)
                LOG.skip(f"build {target.name}", "up to date (built by the single-file prepare.py)")
            return False
        LOG.note(f"{target.name}: rebuilding ({why})")
    with LOG.step(f"build {target.name}"):
        manifest = target.build()
        for p in target.outputs:
            if not p.exists():
                raise Fatal(f"internal error: {target.name} did not write {p}")
            LOG.note(f"wrote {shown(p)} ({mib(p)})")
        state.record(target.name, target.key, target.outputs, manifest)
    return True
