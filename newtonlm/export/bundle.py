"""The remote code of an exported ParaRNN model: the two modeling files plus the kernel package.

``save_pretrained`` (with the classes registered for the Auto classes) copies the modeling files,
:data:`MODEL_FILES`, which import nothing of newtonlm but ``from newtonlm.kernels import ...``.
:func:`make_self_contained` then

* points those imports at ``.newtonlm_kernels`` (one line each, ``newtonlm.kernels`` ->
  ``.newtonlm_kernels``), and
* writes ``newtonlm_kernels.py``: the code of :mod:`newtonlm.export.bundle_loader` followed by the
  files of :data:`KERNEL_FILES`, verbatim, as string literals. On import it writes them to a cache
  folder and imports that as a package (see the loader's docstring), so the kernel files run
  unchanged: nothing in them is rewritten, and an edit inside them needs no change here.

What goes into the bundle is this one explicit list. :func:`check_sources` (run by every export and
by ``tests/test_export.py``) fails, naming the file, line and import, when a bundled module imports a
kernel module that is not listed, reaches into another part of newtonlm, or imports a package that a
user of the exported model may not have (anything outside the standard library and
:data:`DEPENDENCIES`).
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

from . import bundle_loader

# newtonlm/kernels files that go into the bundle (bench.py and modules no listed module imports stay out)
KERNEL_FILES = ("__init__.py", "cells.py", "checks.py", "cpu_ext.py", "function.py", "modules.py",
                "newton.py", "reference.py", "scan.py", "seqpar.py", "triton_fused.py", "triton_scan.py",
                "csrc/cpu_kernels.c")
# newtonlm/models files that save_pretrained copies for the ParaRNN models' auto_map
MODEL_FILES = ("configuration_pararnn.py", "modeling_pararnn.py")
# third-party packages the bundled code may import (triton: only the Triton modules, imported on CUDA)
DEPENDENCIES = ("torch", "transformers", "triton")
BUNDLE = "newtonlm_kernels"


class BundleError(RuntimeError):
    """newtonlm's own source no longer fits the bundle: a developer fixes the list or the import."""


def _source_dirs() -> tuple[Path, Path]:
    import newtonlm.kernels
    import newtonlm.models

    return Path(newtonlm.kernels.__file__).parent, Path(newtonlm.models.__file__).parent


def _imports(path: Path):
    """(line, relative level, module, imported names) of every import statement in ``path``
    (``import a.b``: level 0, module ``a.b``, no names)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, 0, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            yield node.lineno, node.level, node.module or "", [a.name for a in node.names]


def _third_party(module: str) -> str | None:
    top = module.split(".")[0]
    return None if top in sys.stdlib_module_names or top in DEPENDENCIES or top == "newtonlm" else top


def _kernel_problems(kernels: Path) -> list[str]:
    listed = {f[:-3] for f in KERNEL_FILES if f.endswith(".py")}
    problems = [f"newtonlm/kernels/{f} is listed in newtonlm.export.bundle.KERNEL_FILES but does not exist"
                for f in KERNEL_FILES if not (kernels / f).is_file()]
    for file in sorted(f for f in KERNEL_FILES if f.endswith(".py") and (kernels / f).is_file()):
        where = f"newtonlm/kernels/{file}"
        for line, level, module, names in _imports(kernels / file):
            if level == 1:
                targets = [module.split(".")[0]] if module else names
                for target in (t for t in targets if t not in listed):
                    problems.append(f"{where} line {line} imports newtonlm.kernels.{target}, which is not in "
                                    f"the bundle: add '{target}.py' to newtonlm.export.bundle.KERNEL_FILES")
            elif level > 1:
                problems.append(f"{where} line {line} imports '{'.' * level}{module}' outside "
                                "newtonlm.kernels; an exported model carries only newtonlm.kernels")
            elif module.split(".")[0] == "newtonlm":
                problems.append(f"{where} line {line} imports {module} by its absolute name; inside "
                                "newtonlm.kernels use relative imports (the bundle runs under another name)")
            elif top := _third_party(module):
                problems.append(f"{where} line {line} imports {top}, which a user of an exported model may "
                                f"not have (allowed: the standard library and {', '.join(DEPENDENCIES)})")
    return problems


def _model_problems(models: Path, public: set[str]) -> list[str]:
    stems = {f[:-3] for f in MODEL_FILES}
    problems = []
    for file in MODEL_FILES:
        where = f"newtonlm/models/{file}"
        for line, level, module, names in _imports(models / file):
            if level >= 1:
                if level > 1 or module.split(".")[0] not in stems:
                    problems.append(f"{where} line {line} imports '{'.' * level}{module}', which an exported "
                                    f"model does not ship (it ships {', '.join(MODEL_FILES)} and "
                                    "newtonlm.kernels)")
            elif module == "newtonlm.kernels" and names:
                missing = sorted(set(names) - public)
                if missing:
                    problems.append(f"{where} line {line} imports {missing} from newtonlm.kernels, which "
                                    "are not in its __all__ (the names the bundle exports)")
            elif module.split(".")[0] == "newtonlm":
                problems.append(f"{where} line {line} imports {module}; the modeling files may import "
                                "from newtonlm only 'from newtonlm.kernels import ...'")
            elif top := _third_party(module):
                problems.append(f"{where} line {line} imports {top}, which a user of an exported model may "
                                f"not have (allowed: the standard library and {', '.join(DEPENDENCIES)})")
    return problems


def check_sources(kernels: Path | None = None, models: Path | None = None) -> None:
    """Raise :class:`BundleError` listing every import of the bundled files that the bundle cannot
    serve (see the module docstring); ``kernels`` / ``models``: the package folders (default: newtonlm's)."""
    import newtonlm.kernels

    default_kernels, default_models = _source_dirs()
    kernels, models = Path(kernels or default_kernels), Path(models or default_models)
    problems = _kernel_problems(kernels) + _model_problems(models, set(newtonlm.kernels.__all__))
    if problems:
        raise BundleError("the exported model's code cannot be bundled:\n  " + "\n  ".join(problems))


_LEADING_IMPORT = re.compile(r"^(\s*)(f)(rom\s+\.)|^(\s*)(i)(mport\s+\.)", re.MULTILINE)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def text_literal(text: str) -> str:
    """A triple-quoted Python literal of ``text`` that reads like the text. transformers finds a
    folder's modules by matching lines ``from .x import`` in the raw file, string literals included,
    so such lines are written ``\\x66rom .x import`` (``\\x66`` is "f")."""
    body = text.replace("\\", "\\\\").replace("'''", "\\'\\'\\'")
    body = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", body.replace("\r", "\\r"))
    body = _LEADING_IMPORT.sub(lambda m: (m[1] + "\\x66" + m[3]) if m[2] else (m[4] + "\\x69" + m[6]), body)
    if body.endswith("'"):
        body = body[:-1] + "\\'"
    literal = f"'''{body}'''"
    assert ast.literal_eval(literal) == text, "text_literal does not round-trip"
    return literal


def kernel_module_source(kernels: Path) -> str:
    """The text of ``newtonlm_kernels.py``: the loader, the kernel files, and the public names."""
    files = {f: (kernels / f).read_text(encoding="utf-8") for f in KERNEL_FILES}
    loader = Path(bundle_loader.__file__).read_text(encoding="utf-8")
    entries = "".join(f"    {name!r}: {text_literal(text)},\n" for name, text in files.items())
    return (f"# Generated by newtonlm.export: {BUNDLE}.py = newtonlm/export/bundle_loader.py + the files of "
            "newtonlm/kernels (verbatim); do not edit.\n"
            f"{loader}\n\n"
            "# newtonlm/kernels, file by file (lines 'from .x import' are written '\\x66rom .x import': see\n"
            "# newtonlm.export.bundle.text_literal)\n"
            f"FILES = {{\n{entries}}}\n\n"
            "_package = load(FILES)\n"
            "__all__ = list(_package.__all__)\n"
            "globals().update({name: getattr(_package, name) for name in __all__})\n")


_KERNELS_IMPORT = re.compile(r"^(\s*from\s+)newtonlm\.kernels(\s+import\b)", re.MULTILINE)


def make_self_contained(folder: Path) -> list[str]:
    """Turn the modeling files that ``save_pretrained`` copied into ``folder`` into a self-contained
    set (see the module docstring); returns the names of the ``.py`` files in the folder."""
    from transformers.dynamic_module_utils import get_relative_import_files

    check_sources()
    kernels, _ = _source_dirs()
    folder = Path(folder)
    copied = sorted(f.name for f in folder.glob("*.py"))
    if copied != sorted(MODEL_FILES):
        raise BundleError(f"save_pretrained copied {copied}; expected newtonlm.export.bundle.MODEL_FILES "
                          f"{sorted(MODEL_FILES)}")
    for name in MODEL_FILES:
        path = folder / name
        path.write_text(_KERNELS_IMPORT.sub(rf"\1.{BUNDLE}\2", path.read_text(encoding="utf-8")),
                        encoding="utf-8")
    (folder / f"{BUNDLE}.py").write_text(kernel_module_source(kernels), encoding="utf-8")
    names = sorted(f.name for f in folder.glob("*.py"))
    for name in names:  # the folder never reaches back into newtonlm, and the loader finds every file
        for line, level, module, _ in _imports(folder / name):
            if level == 0 and module.split(".")[0] == "newtonlm":
                raise BundleError(f"{name} line {line} still imports {module} after the rewrite")
    reached = {Path(f).name for f in get_relative_import_files(str(folder / "modeling_pararnn.py"))}
    if reached | {"modeling_pararnn.py"} != set(names):
        raise BundleError(f"transformers' loader reaches {sorted(reached)} from modeling_pararnn.py; "
                          f"expected every file of {names}")
    return names
