"""The preparation's bookkeeping: hashing, build keys and when a target rebuilds, the take-over
of a state written by the single-file prepare.py, the sha256-checked download cache and the
manifest's schema version. Pure and fast: temporary folders only, no network, no models."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest

from millrace_models import state as state_module
from millrace_models.common import PACKAGE_DIR, Fatal, sha256_file, sha256_json
from millrace_models.manifest import (
    MANIFEST_SCHEMA_VERSION,
    model_version,
    schema_on_disk,
    write_manifest,
)
from millrace_models.sources import PACKAGES, Cache, Package
from millrace_models.state import (
    LEGACY_SCRIPT_SHA256,
    State,
    Target,
    code_sha256,
    ensure,
    legacy_key,
    target_key,
)
from millrace_models.targets import (
    minilm_target,
    ort_library_target,
    profanity_target,
    smollm2_target,
    tiny_target,
)

# --------------------------------------------------------------------------------------------
# Hashing
# --------------------------------------------------------------------------------------------


def test_sha256_json_ignores_key_order_but_not_values():
    assert sha256_json({"a": 1, "b": [1, 2]}) == sha256_json({"b": [1, 2], "a": 1})
    assert sha256_json({"a": 1}) != sha256_json({"a": 2})
    assert sha256_json({"a": [1, 2]}) != sha256_json({"a": [2, 1]})


def test_sha256_file_reads_a_file_of_several_chunks(tmp_path):
    data = bytes(range(256)) * 10_000  # 2.4 MiB: three 1 MiB reads
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_model_version_is_the_documented_content_hash():
    entry = {"outputs": {"m/model.onnx": "aa", "m/tokenizer.json": "bb", "other": "cc"}}
    version = model_version(entry, ["m/tokenizer.json", "m/model.onnx"])
    # models/README.md: sha256 over the sorted lines "<sha256 of file>  <path>" of `files`
    assert version == hashlib.sha256(b"aa  m/model.onnx\nbb  m/tokenizer.json").hexdigest()
    assert version == model_version(entry, ["m/model.onnx", "m/tokenizer.json"])
    changed = {"outputs": {**entry["outputs"], "m/model.onnx": "ab"}}
    assert model_version(changed, ["m/model.onnx", "m/tokenizer.json"]) != version
    # a file that is not one of the model's does not count
    unrelated = {"outputs": {**entry["outputs"], "other": "cd"}}
    assert model_version(unrelated, ["m/model.onnx", "m/tokenizer.json"]) == version


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------


def test_target_key_covers_inputs_code_and_manifest_schema():
    key = target_key({"wheel": "x"}, code="c1", manifest_schema=1)
    assert key == target_key({"wheel": "x"}, code="c1", manifest_schema=1)
    assert key != target_key({"wheel": "y"}, code="c1", manifest_schema=1)
    assert key != target_key({"wheel": "x", "seed": 1}, code="c1", manifest_schema=1)
    assert key != target_key({"wheel": "x"}, code="c2", manifest_schema=1)
    assert key != target_key({"wheel": "x"}, code="c1", manifest_schema=2)
    assert target_key({"wheel": "x"}) == target_key(
        {"wheel": "x"}, code=state_module.BUILD_CODE_SHA256, manifest_schema=MANIFEST_SCHEMA_VERSION)


def copy_package(tmp_path: Path) -> Path:
    copy = tmp_path / "millrace_models"
    shutil.copytree(PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def test_code_hash_follows_the_build_modules_only(tmp_path):
    package = copy_package(tmp_path)
    before = code_sha256(package)
    assert before == code_sha256(PACKAGE_DIR) == state_module.BUILD_CODE_SHA256
    for module in ("checks.py", "cli.py", "manifest.py", "__main__.py"):
        append(package / module, "\n# an edit that changes no output\n")
        assert code_sha256(package) == before, f"editing {module} must not rebuild"
    append(package / "llama.py", "\n# an edit of the graph builder\n")
    after_llama = code_sha256(package)
    assert after_llama != before
    (package / "helpers.py").write_text("# a new module counts as build code\n")
    assert code_sha256(package) != after_llama


def test_legacy_key_is_what_the_single_file_prepare_py_recorded(tmp_path):
    # Keys from a models/prepared/state.json written by prepare.py with sha256
    # LEGACY_SCRIPT_SHA256 (the last single-file version). When a target's inputs change (a new
    # pin), its old state rebuilds anyway: drop it from this table (and the take-over, in
    # state.py, once no target matches).
    recorded = {
        "onnxruntime": "e5d64692c3bd048fb28d7c32a0dd32ad7bd96d2b4c06f2ce288745e2f9768c67",
        "smollm2-135m": "e8f8fe307cdae5cf68e8883cede52b6f63ef792ce147c3f07df2bd374c95b2b2",
        "tiny-llama": "7b4c14426f642c1b255a723b041c9d465466101f1fe119b9159b456acb700eca",
        "profanity": "fe0444f16deb88828f120512960dc33a5f53fcca38a27fde812cce362e5be6a8",
        "minilm-l6": "56fd13b1aaf6f9c7c88f4bda14063abf06db07004f06ae3ebadc90ee6ba00b06",
    }
    assert LEGACY_SCRIPT_SHA256.startswith("c9ddaa70")
    cache = Cache(tmp_path)
    for make in (ort_library_target, smollm2_target, tiny_target, profanity_target, minilm_target):
        target = make(cache)
        assert legacy_key(target.inputs) == recorded[target.name], target.name
        assert target.legacy_key() == recorded[target.name]
        assert target.key != recorded[target.name]


# --------------------------------------------------------------------------------------------
# State and ensure(): when a target rebuilds
# --------------------------------------------------------------------------------------------


class FakeTarget:
    """A target writing one file under `root`, counting its builds."""

    def __init__(self, root: Path, name: str = "thing", inputs: dict | None = None,
                 content: bytes = b"output") -> None:
        self.builds = 0
        self.content = content
        self.out = root / name / "out.bin"
        self.target = Target(name, inputs or {"wheel": "abc"}, [self.out], self.build)

    def build(self) -> dict:
        self.builds += 1
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_bytes(self.content)
        return {"name": self.target.name, "files": [f"{self.target.name}/out.bin"]}


def test_a_target_builds_once_then_is_up_to_date(tmp_path):
    fake = FakeTarget(tmp_path)
    assert ensure(fake.target, State(tmp_path), force=False)
    assert fake.builds == 1
    recorded = json.loads((tmp_path / "state.json").read_text())["targets"]["thing"]
    assert recorded["key"] == fake.target.key
    assert recorded["outputs"] == {"thing/out.bin": hashlib.sha256(b"output").hexdigest()}
    assert not ensure(fake.target, State(tmp_path), force=False)  # state reloaded from disk
    assert fake.builds == 1
    assert ensure(fake.target, State(tmp_path), force=True)
    assert fake.builds == 2


def test_a_changed_or_missing_output_rebuilds(tmp_path):
    fake = FakeTarget(tmp_path)
    state = State(tmp_path)
    ensure(fake.target, state, force=False)
    fake.out.write_bytes(b"edited by hand")
    assert state.outputs_intact("thing") == (False, f"{fake.out} changed")
    assert ensure(fake.target, state, force=False)
    assert fake.out.read_bytes() == b"output"
    fake.out.unlink()
    assert ensure(fake.target, state, force=False)
    assert fake.builds == 3


def test_changed_inputs_rebuild(tmp_path):
    ensure(FakeTarget(tmp_path).target, State(tmp_path), force=False)
    other = FakeTarget(tmp_path, inputs={"wheel": "def"})
    assert ensure(other.target, State(tmp_path), force=False)
    assert other.builds == 1


def test_a_new_manifest_schema_rebuilds_recorded_entries(tmp_path, monkeypatch):
    fake = FakeTarget(tmp_path)
    ensure(fake.target, State(tmp_path), force=False)
    monkeypatch.setattr(state_module, "MANIFEST_SCHEMA_VERSION", MANIFEST_SCHEMA_VERSION + 1)
    assert ensure(fake.target, State(tmp_path), force=False)
    assert fake.builds == 2


@pytest.mark.parametrize("text", ['{"recipe": 0, "targets": {"thing": {}}, "checks": {}}',
                                  "not json", '{"recipe": 1'])
def test_a_state_file_of_another_recipe_or_unreadable_is_ignored(tmp_path, text):
    (tmp_path / "state.json").write_text(text)
    state = State(tmp_path)
    assert state.target("thing") is None
    fake = FakeTarget(tmp_path)
    assert ensure(fake.target, state, force=False)


def test_passed_checks_are_forgotten_when_a_target_rebuilds(tmp_path):
    fake = FakeTarget(tmp_path)
    state = State(tmp_path)
    ensure(fake.target, state, force=False)
    state.mark_checked("thing", "v1")
    assert State(tmp_path).checked("thing", "v1")
    assert not State(tmp_path).checked("thing", "v2")
    ensure(fake.target, state, force=True)
    assert not State(tmp_path).checked("thing", "v1")


def record_as_single_file_prepare_py(tmp_path: Path, fake: FakeTarget) -> None:
    state = State(tmp_path)
    ensure(fake.target, state, force=False)
    state.data["targets"][fake.target.name]["key"] = legacy_key(fake.target.inputs)
    state.mark_checked(fake.target.name, "v1")


def test_a_state_of_the_single_file_prepare_py_is_taken_over_without_rebuilding(tmp_path):
    fake = FakeTarget(tmp_path)
    record_as_single_file_prepare_py(tmp_path, fake)
    state = State(tmp_path)
    assert not ensure(fake.target, state, force=False)
    assert fake.builds == 1
    reloaded = State(tmp_path)
    assert reloaded.target("thing")["key"] == fake.target.key  # taken over: the new key
    assert reloaded.checked("thing", "v1")  # and its checks stay passed
    assert not ensure(fake.target, reloaded, force=False)


def test_a_single_file_state_of_other_inputs_or_changed_outputs_rebuilds(tmp_path):
    fake = FakeTarget(tmp_path)
    record_as_single_file_prepare_py(tmp_path, fake)
    other = FakeTarget(tmp_path, inputs={"wheel": "def"})
    assert ensure(other.target, State(tmp_path), force=False)

    fake = FakeTarget(tmp_path / "second")
    record_as_single_file_prepare_py(tmp_path / "second", fake)
    fake.out.write_bytes(b"edited")
    assert ensure(fake.target, State(tmp_path / "second"), force=False)


def test_a_single_file_state_is_not_taken_over_once_the_schema_moved_on(tmp_path, monkeypatch):
    fake = FakeTarget(tmp_path)
    record_as_single_file_prepare_py(tmp_path, fake)
    monkeypatch.setattr(state_module, "MANIFEST_SCHEMA_VERSION", 2)
    assert fake.target.legacy_key() is None
    assert ensure(fake.target, State(tmp_path), force=False)
    assert fake.builds == 2


# --------------------------------------------------------------------------------------------
# Download cache
# --------------------------------------------------------------------------------------------


def make_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def demo_cache(tmp_path: Path, sha256: str | None = None) -> Cache:
    wheel = make_wheel(tmp_path / "demo-1.0-py3-none-any.whl", {"demo/data.txt": b"hello"})
    package = Package("demo", "1.0", wheel.name, sha256 or sha256_file(wheel))
    return Cache(tmp_path, {"demo": package})


def test_a_cached_wheel_with_the_pinned_hash_is_used_without_downloading(tmp_path, monkeypatch):
    cache = demo_cache(tmp_path)
    monkeypatch.setattr(Cache, "_download", lambda *a: pytest.fail("must not download"))
    assert cache.has("demo")
    assert cache.read("demo", "demo/data.txt") == b"hello"
    out = cache.extract("demo", "demo/data.txt", tmp_path / "out" / "data.txt")
    assert out.read_bytes() == b"hello"
    assert not list((tmp_path / "out").glob("*.tmp"))
    with pytest.raises(Fatal, match="demo==1.0 has no file demo/missing"):
        cache.read("demo", "demo/missing")


def test_a_wheel_whose_hash_differs_from_the_pin_is_refused(tmp_path):
    cache = demo_cache(tmp_path, sha256="0" * 64)
    with pytest.raises(Fatal, match="sha256 mismatch for package demo==1.0") as error:
        cache.read("demo", "demo/data.txt")
    assert "millrace_models/sources.py" in str(error.value)


def test_a_missing_wheel_is_downloaded_into_the_cache(tmp_path, monkeypatch):
    source = make_wheel(tmp_path / "source.whl", {"demo/data.txt": b"hello"})
    root = tmp_path / "cache"
    package = Package("demo", "1.0", "demo-1.0-py3-none-any.whl", sha256_file(source))
    cache = Cache(root, {"demo": package})
    assert not cache.has("demo")
    downloads = []

    def download(self, pkg, dest):
        downloads.append(pkg.spec)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)

    monkeypatch.setattr(Cache, "_download", download)
    assert cache.read("demo", "demo/data.txt") == b"hello"
    assert cache.read("demo", "demo/data.txt") == b"hello"  # verified once, then remembered
    assert downloads == ["demo==1.0"]
    assert cache.has("demo")


def test_the_pinned_packages_name_their_exact_wheels():
    for name, package in PACKAGES.items():
        assert package.name == name
        assert len(package.sha256) == 64 and int(package.sha256, 16) >= 0
        wheel_prefix = f"{name.replace('-', '_')}-{package.version}-"
        assert package.filename.startswith(wheel_prefix) and package.filename.endswith(".whl")


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------


def test_the_manifest_records_its_schema_version_and_model_versions(tmp_path):
    state = State(tmp_path)
    library = FakeTarget(tmp_path, name="onnxruntime")
    library.target.model = False
    model = FakeTarget(tmp_path, name="model", content=b"weights")
    for fake in (library, model):
        ensure(fake.target, state, force=False)
    manifest = write_manifest(state, [library.target, model.target], tmp_path / "manifest.json")
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk == manifest
    assert MANIFEST_SCHEMA_VERSION == 1
    assert on_disk["schema_version"] == MANIFEST_SCHEMA_VERSION
    assert on_disk["onnxruntime"]["library"] == "onnxruntime/out.bin"
    (entry,) = on_disk["models"]
    assert entry["name"] == "model"
    assert entry["version"] == hashlib.sha256(
        f"{hashlib.sha256(b'weights').hexdigest()}  model/out.bin".encode()).hexdigest()
    assert schema_on_disk(tmp_path / "manifest.json") == (True, MANIFEST_SCHEMA_VERSION)


@pytest.mark.parametrize("text,expected", [
    (None, (False, None)),
    ('{"schema_version": 1, "models": []}', (True, 1)),
    ('{"schema_version": 7}', (True, 7)),
    ('{"models": []}', (True, None)),
    ('{"schema_version": "1"}', (True, None)),
    ("[1, 2]", (True, None)),
    ("{not json", (True, None)),
])
def test_schema_on_disk(tmp_path, text, expected):
    path = tmp_path / "manifest.json"
    if text is not None:
        path.write_text(text)
    assert schema_on_disk(path) == expected
