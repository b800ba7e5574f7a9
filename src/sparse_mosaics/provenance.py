"""Provenance: code fingerprints, config digests and the software/hardware a result came from.

Every result row carries these columns (DESIGN.md §6), so a table says which code, config and
machine produced each number. This module must stay importable without torch (the Snakefile uses
:func:`code_fingerprint`).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent

# What each pipeline step's output depends on, as paths relative to the package. A rule's
# ``params: code=`` fingerprint hashes only these, so editing figure code reruns only figures.
CODE_SCOPES = {
    "generate": ["data", "io.py", "commands/generate.py"],
    "pack": ["data", "io.py", "commands/pack.py"],
    "train": ["attention", "model", "data", "cell.py", "train.py", "io.py", "provenance.py", "commands/train.py"],
    "evaluate": ["attention", "model", "data", "cell.py", "evaluate.py", "io.py", "provenance.py",
                 "commands/evaluate.py"],
    "aggregate": ["tables.py", "io.py", "commands/aggregate.py"],
    "figures": ["figures", "io.py", "commands/plot.py"],
}


def code_fingerprint(*parts: str) -> str:
    """SHA-256 (16 hex digits) of the contents and relative names of the given package files.

    ``parts`` are paths relative to the package (files or folders; folders contribute every
    ``*.py`` below them). Independent of modification times and of where the checkout lives.
    """
    h = hashlib.sha256()
    for part in parts:
        p = PACKAGE_DIR / part
        if not p.exists():
            raise FileNotFoundError(f"code_fingerprint: {p} does not exist")
        files = sorted(p.rglob("*.py")) if p.is_dir() else [p]
        for f in files:
            h.update(f.relative_to(PACKAGE_DIR).as_posix().encode())
            h.update(b"\0")
            h.update(f.read_bytes())
            h.update(b"\0")
    return h.hexdigest()[:16]


def scope_fingerprint(scope: str) -> str:
    """The fingerprint of one pipeline step (a key of :data:`CODE_SCOPES`)."""
    return code_fingerprint(*CODE_SCOPES[scope])


def config_digest(obj) -> str:
    """SHA-256 (16 hex digits) of a JSON-serialisable object, key order independent."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def code_version() -> str:
    """The package version plus the git commit of the checkout (``+dirty`` when modified)."""
    from . import __version__

    try:
        root = PACKAGE_DIR.parents[1]
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=10", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        return f"{__version__}+g{commit}" + (".dirty" if dirty else "")
    except Exception:
        return __version__


def environment() -> dict:
    """torch / triton versions and the device name (imports torch)."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"torch_version": torch.__version__, "triton_version": triton_version, "device": device}
