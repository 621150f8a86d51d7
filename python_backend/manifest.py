"""The repository manifest: sha256 of every artifact, checked by each model when it loads."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "manifest.json"


class ManifestError(RuntimeError):
    pass


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(repo: Path, info: dict) -> Path:
    """Hash every file under `repo` except the manifest itself."""
    repo = Path(repo)
    files = {}
    for f in sorted(repo.rglob("*")):
        if f.is_file() and f.name != MANIFEST and "__pycache__" not in f.parts:
            files[f.relative_to(repo).as_posix()] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    path = repo / MANIFEST
    path.write_text(json.dumps({**info, "files": files}, indent=2))
    return path


def read_manifest(repo) -> dict:
    """`REPO/manifest.json` as a dict; {} when there is none (or `repo` is None) or it does not parse."""
    if repo is None:
        return {}
    try:
        return json.loads((Path(repo) / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def verify_model_dir(model_dir: Path, version: str | None = None) -> dict:
    """Check the artifacts of one model folder (`REPO/<model>`) against `REPO/manifest.json`; with
    `version`, only that version's folder and the files outside version folders (a version staged beside
    it by `tritonchat deploy` cannot stop the serving one from loading).

    Raises ManifestError naming the first file that is missing or does not match; returns the
    manifest's info (everything but the file table).
    """
    model_dir = Path(model_dir)
    repo = model_dir.parent
    path = repo / MANIFEST
    if not path.exists():
        raise ManifestError(f"{path} is missing: rebuild the repository with `tritonchat build`")
    manifest = json.loads(path.read_text())
    prefix = model_dir.name + "/"
    for rel, entry in manifest["files"].items():
        if not rel.startswith(prefix):
            continue
        sub = rel[len(prefix):].split("/", 1)[0]
        if version is not None and sub.isdigit() and sub != str(version):
            continue
        f = repo / rel
        if not f.exists():
            raise ManifestError(f"artifact {rel} listed in manifest.json is missing")
        if f.stat().st_size != entry["bytes"] or sha256_file(f) != entry["sha256"]:
            raise ManifestError(f"artifact {rel} does not match manifest.json (sha256 mismatch): "
                                "the file was modified or corrupted; rebuild the repository")
    return {k: v for k, v in manifest.items() if k != "files"}
