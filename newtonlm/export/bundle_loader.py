"""newtonlm's kernel package (``newtonlm.kernels``), carried inside an exported model folder.

transformers' remote-code loader copies into one flat module folder only the ``.py`` files reached
through ``from .<module> import`` lines, so a package with sub-modules, a C source and Triton kernels
cannot ship as files. This module carries the package's files verbatim as text (``FILES``, appended
by ``newtonlm.export``) and, when first imported, writes them once to a folder named by their hash,
``$NEWTONLM_CACHE/bundles/newtonlm_kernels_<hash>/`` (default ``~/.cache/newtonlm``; a private
temporary folder, removed at exit, when that is not writable), and imports that folder as the package
``newtonlm_kernels_<hash>``. The kernel files thus run unchanged: their relative imports, the C
source next to them (compiled at first use when a compiler is present, else PyTorch loops run), and
Triton's reading of kernel source all work as in newtonlm. The model files import the package's
public names from this module.

This file uses only the standard library (the loader checks every absolute import of the files it
copies). It is also a module of newtonlm (``newtonlm/export/bundle_loader.py``), tested there.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

PREFIX = "newtonlm_kernels_"


def package_name(files: dict[str, str]) -> str:
    """The import name of the package made of ``files`` ({relative path: text}): PREFIX + a hash of
    them, so that two copies of this module (transformers loads the configuration and the model file
    separately) share one package, and different versions never mix."""
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode("utf-8")).hexdigest()
    return PREFIX + digest[:16]


def _cache_root() -> Path:
    cache = os.environ.get("NEWTONLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "newtonlm")
    return Path(cache) / "bundles"


def _holds(folder: Path, files: dict[str, str]) -> bool:
    try:
        return all((folder / rel).read_text(encoding="utf-8") == text for rel, text in files.items())
    except (OSError, UnicodeDecodeError):
        return False


def _write(folder: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)


def extract(files: dict[str, str], name: str) -> Path:
    """A folder holding exactly ``files``: the cached one when its content is intact, else written
    now (into a fresh private folder, renamed into place, so concurrent processes never see a
    half-written package)."""
    folder = _cache_root() / name
    if _holds(folder, files):
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    except OSError:  # no writable cache: a folder for this process only
        tmp = Path(tempfile.mkdtemp(prefix=f"{name}-"))
        atexit.register(shutil.rmtree, tmp, True)
        _write(tmp, files)
        return tmp
    _write(tmp, files)
    if folder.exists() and not _holds(folder, files):  # a damaged or tampered copy
        shutil.rmtree(folder, ignore_errors=True)
    try:
        os.rename(tmp, folder)
    except OSError:  # another process renamed its copy first, or the old copy could not be removed
        if _holds(folder, files):
            shutil.rmtree(tmp, ignore_errors=True)
            return folder
        return tmp
    return folder


def load(files: dict[str, str]) -> ModuleType:
    """Import ``files`` (which hold the package's ``__init__.py``) as the package :func:`package_name`."""
    name = package_name(files)
    if name in sys.modules:
        return sys.modules[name]
    folder = extract(files, name)
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
        raise
    return module
