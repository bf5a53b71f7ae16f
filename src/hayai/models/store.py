"""The local model store: converted models under $HAYAI_HOME/models (default ~/.cache/hayai/models).

Each entry is a directory that is also a valid Hugging Face checkpoint:

    config.json  model.safetensors  tokenizer.json  tokenizer_config.json  hayai.json

`hayai.json` records where the model came from and the sha256 and size of every stored file; loading verifies
them, so a truncated or corrupted file is reported by name instead of producing garbage. Entries are written to a
temporary directory and renamed into place, so an interrupted conversion never leaves a half-written model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hayai.errors import CorruptFileError, HayaiError, ModelNotFoundError

MANIFEST = "hayai.json"
FORMAT_VERSION = 1
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def hayai_home() -> Path:
    return Path(os.environ.get("HAYAI_HOME") or Path.home() / ".cache" / "hayai")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_name(name: str) -> str:
    if not _NAME_PATTERN.match(name):
        raise HayaiError(
            f"invalid model name {name!r}: use letters, digits, '.', '_' or '-' (at most 100 characters)"
        )
    return name


@dataclass
class StoreEntry:
    name: str
    path: Path
    manifest: dict[str, Any]

    @property
    def size_bytes(self) -> int:
        return sum(f["bytes"] for f in self.manifest.get("files", {}).values())

    @property
    def source(self) -> str:
        return self.manifest.get("source", {}).get("description", "?")

    def verify(self, files: list[str] | None = None) -> None:
        """Check every recorded file's size and sha256; raise CorruptFileError naming the first bad file."""
        recorded = self.manifest.get("files", {})
        for filename in files or list(recorded):
            info = recorded.get(filename)
            path = self.path / filename
            if info is None:
                raise CorruptFileError(f"{path}: not recorded in {self.path / MANIFEST}")
            if not path.is_file():
                raise CorruptFileError(f"{path}: file is missing (re-run `hayai pull {self.name}`)")
            if path.stat().st_size != info["bytes"]:
                raise CorruptFileError(
                    f"{path}: size {path.stat().st_size} bytes, expected {info['bytes']} "
                    f"(truncated or modified; re-run `hayai pull {self.name}`)"
                )
            if sha256_file(path) != info["sha256"]:
                raise CorruptFileError(
                    f"{path}: sha256 mismatch, the file is corrupt (re-run `hayai pull {self.name}`)"
                )


class ModelStore:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else hayai_home() / "models"

    def path_for(self, name: str) -> Path:
        return self.root / check_name(name)

    def get(self, name: str) -> StoreEntry | None:
        path = self.root / name
        manifest_path = path / MANIFEST
        if not _NAME_PATTERN.match(name) or not manifest_path.is_file():
            return None
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise CorruptFileError(f"{manifest_path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        return StoreEntry(name, path, manifest)

    def entries(self) -> list[StoreEntry]:
        if not self.root.is_dir():
            return []
        found = (self.get(p.name) for p in sorted(self.root.iterdir()) if p.is_dir())
        return [e for e in found if e is not None]

    def names(self) -> list[str]:
        return [e.name for e in self.entries()]

    def remove(self, name: str) -> None:
        entry = self.get(name)
        if entry is None:
            raise ModelNotFoundError(f"no model named {name!r} in the store ({self.root})")
        shutil.rmtree(entry.path)

    def write(self, name: str, populate: Callable[[Path], None], source: dict[str, Any],
              overwrite: bool = False) -> StoreEntry:
        """Create entry `name`: `populate(tmpdir)` writes the files, then checksums, manifest, atomic rename."""
        final = self.path_for(name)
        if final.exists() and not overwrite:
            raise HayaiError(f"{final} already exists (remove it with `hayai rm {name}` or pass --force)")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=self.root))
        try:
            populate(tmp)
            files = {
                p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                for p in sorted(tmp.iterdir()) if p.is_file()
            }
            manifest = {"name": name, "format": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                        "source": source, "files": files}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            if final.exists():
                backup = final.with_name(f".old-{name}-{os.getpid()}")
                final.rename(backup)
                tmp.rename(final)
                shutil.rmtree(backup, ignore_errors=True)
            else:
                tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return StoreEntry(name, final, manifest)
