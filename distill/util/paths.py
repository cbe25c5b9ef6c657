"""Where models and data live: local paths, files inside installed packages, or hub names.

`pkg://package/sub/path` points inside an installed Python package (found through importlib, never
a hard-coded site-packages path), so configs that use packaged offline assets stay portable.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

PACKAGE_SCHEME = "pkg://"
_LOCAL_PREFIXES = ("/", "./", "../", "~", PACKAGE_SCHEME)
_DATA_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet", ".txt", ".arrow")


def package_root(package: str) -> Path:
    """The folder of an installed package, without importing it (importing may need extras)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (needed by a pkg:// path)")
    return Path(list(spec.submodule_search_locations)[0])


def resolve_path(reference: str | os.PathLike) -> Path:
    text = str(reference)
    if text.startswith(PACKAGE_SCHEME):
        package, _, inner = text[len(PACKAGE_SCHEME):].partition("/")
        return package_root(package) / inner
    return Path(text).expanduser()


def is_local_reference(reference: str) -> bool:
    """True for things that must exist on disk; False for what may be a hub name ("org/name")."""
    text = str(reference)
    if text.startswith(_LOCAL_PREFIXES) or text.endswith(_DATA_SUFFIXES):
        return True
    if Path(text).exists():
        return True
    return text.count("/") > 1


def resolve_reference(reference: str) -> str:
    """A string for `from_pretrained` / `load_dataset`: the absolute local path, or the hub name."""
    return str(resolve_path(reference).resolve()) if is_local_reference(reference) else str(reference)


def links_leaving(folder: Path) -> list:
    """(link, target) for every symbolic link under `folder` that resolves outside it: a run
    directory handed over by someone else could otherwise make a resumed run write anywhere."""
    folder = Path(folder)
    if not folder.exists():
        return []
    root = folder.resolve()
    escapes = []
    for current, directories, files in os.walk(folder):
        for name in directories + files:
            path = Path(current) / name
            if path.is_symlink():
                target = path.resolve()
                if target != root and root not in target.parents:
                    escapes.append((path, target))
    return escapes
