"""The command line that scripts/prepare-models.sh runs (through models/prepare.py):
--tiny, --check-only, --force."""

from __future__ import annotations

import argparse
import sys

from . import __doc__ as PACKAGE_DOC
from .checks import check_ort_library, run_check
from .common import LOG, MANIFEST_FILE, PREPARED, Fatal, shown
from .manifest import MANIFEST_SCHEMA_VERSION, model_version, schema_on_disk, write_manifest
from .sources import Cache
from .state import State, ensure
from .targets import (
    minilm_target,
    ort_library_target,
    profanity_target,
    smollm2_target,
    tiny_target,
)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=PACKAGE_DOC.split("\n\n")[0],
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

    # A manifest of another (or no) schema version is rewritten at the end of every run; the
    # entries recorded for it rebuild because every target's key includes the schema version.
    exists, on_disk = schema_on_disk()
    if exists and on_disk != MANIFEST_SCHEMA_VERSION:
        found = "no schema_version" if on_disk is None else f"schema_version {on_disk}"
        if args.check_only:
            raise Fatal(f"{shown(MANIFEST_FILE)} has {found}, this preparation writes "
                        f"{MANIFEST_SCHEMA_VERSION}: run scripts/prepare-models.sh without "
                        f"--check-only to prepare again")
        LOG.note(f"{shown(MANIFEST_FILE)} has {found}; this run writes schema_version "
                 f"{MANIFEST_SCHEMA_VERSION}")

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
    print(f"[prepare] wrote {shown(MANIFEST_FILE)} in {LOG.total():.1f}s total")
    return 0


def run() -> None:
    """main() with the errors meant for a person printed without a traceback."""
    try:
        sys.exit(main(sys.argv[1:]))
    except Fatal as e:
        print(f"[prepare] ERROR: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
