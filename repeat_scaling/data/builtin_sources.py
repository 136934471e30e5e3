"""Corpora every Python carries, so they need no download: ``builtin`` (pydoc topics and the
standard library's docstrings, English prose) and ``pystdlib`` (the standard library's own
``.py`` files, a code corpus). Both read the stdlib with ``ast`` or as bytes; nothing is imported.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import sysconfig
from typing import Any

from repeat_scaling.data.sources import Source, SourceError

# Standard-library directories with no English prose worth having, or GUI/test code.
_BUILTIN_SKIP_DIRS = frozenset(
    [
        "test",
        "tests",
        "idlelib",
        "tkinter",
        "turtledemo",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "lib2to3",
        "ensurepip",
        "lib-dynload",
        "venv",
        "__phello__",
    ]
)
_BUILTIN_MIN_CHARS = 200


def _stdlib_module_files() -> list[tuple[str, str]]:
    """(dotted module name, path) for every pure-Python stdlib module, sorted by name."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(
            x for x in dirs if x not in _BUILTIN_SKIP_DIRS and not x.startswith("config-")
        )
        rel = os.path.relpath(d, root)
        prefix = "" if rel == "." else rel.replace(os.sep, ".") + "."
        for f in files:
            if f.endswith(".py") and not f.startswith("test_"):
                mod = prefix + f[:-3]
                if mod.endswith(".__init__"):
                    mod = mod[: -len(".__init__")]
                out.append((mod, os.path.join(d, f)))
    return sorted(out)


def _module_docstrings(path: str, module: str) -> str:
    """A module's docstrings, outermost first, each headed by the object's qualified name."""
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, ValueError, OSError):
        return ""
    parts = []

    def visit(node, qual):
        doc = ast.get_docstring(node)
        if doc:
            parts.append(f"{qual}\n\n{doc}")
        for child in node.body:
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                if not child.name.startswith("_") or child.name == "__init__":
                    visit(child, f"{qual}.{child.name}")

    visit(tree, module)
    return "\n\n".join(parts)


class BuiltinSource(Source):
    """Real English prose every Python carries: pydoc topics + stdlib docstrings.

    Documents: one per ``pydoc_data.topics`` topic (id ``topic:NAME``) and one per stdlib
    module with at least 200 characters of docstrings (id ``module:NAME``), deduplicated by
    the sha256 of their text (the first id in sorted order wins). Nothing is imported: the
    stdlib sources are parsed with ``ast``, so the corpus is deterministic for a given
    Python version.
    """

    kind = "builtin"

    def native_splits(self):
        return ("train",)

    def fingerprint(self):
        import sys

        return {"kind": self.kind, "python": sys.version, "stdlib": sysconfig.get_paths()["stdlib"]}

    def _iter_native(self, split):
        # The corpus is small (~2 MB): parse the stdlib once per process.
        docs, duplicates = _builtin_documents()
        self.stats["duplicates_skipped"] = duplicates
        yield from docs


@functools.lru_cache(maxsize=1)
def _builtin_documents() -> tuple[tuple[tuple[str, str], ...], int]:
    """((doc_id, text), ...) of the builtin corpus and the number of duplicates dropped."""
    from pydoc_data.topics import topics

    seen: set[bytes] = set()
    docs = []
    duplicates = 0

    def items():
        for name in sorted(topics):
            yield f"topic:{name}", topics[name]
        for mod, path in _stdlib_module_files():
            yield f"module:{mod}", _module_docstrings(path, mod)

    for doc_id, text in items():
        if len(text) < _BUILTIN_MIN_CHARS:
            continue
        h = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
        if h in seen:
            duplicates += 1
            continue
        seen.add(h)
        docs.append((doc_id, text))
    return tuple(docs), duplicates


# --------------------------------------------------------------------------------------
# pystdlib: the standard library's own source code
# --------------------------------------------------------------------------------------

# Never part of the code corpus: installed third-party packages and bytecode caches.
_PYSTDLIB_SKIP_DIRS = frozenset(["site-packages", "dist-packages", "__pycache__"])
# The regression-test suites (Lib/test, */tests, idlelib/idle_test): excluded unless
# ``tests=1``; they are larger than the library itself and full of deliberately odd files.
_PYSTDLIB_TEST_DIRS = frozenset(["test", "tests", "idle_test"])


def pystdlib_files(include_tests: bool = False) -> list[tuple[str, str]]:
    """``(relative path, absolute path)`` of every stdlib ``.py`` file, sorted by relative path.

    The root is ``sysconfig.get_paths()["stdlib"]``; ``site-packages``, ``dist-packages`` and
    ``__pycache__`` are never walked; test-suite directories only with ``include_tests``.
    Relative paths use ``/`` on every platform.
    """
    root = sysconfig.get_paths()["stdlib"]
    skip = _PYSTDLIB_SKIP_DIRS | (frozenset() if include_tests else _PYSTDLIB_TEST_DIRS)
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in skip]
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                out.append((os.path.relpath(path, root).replace(os.sep, "/"), path))
    return sorted(out)


class PyStdlibSource(Source):
    """The Python standard library's ``.py`` files as a code corpus (Hernandez et al.'s
    "fine-tune on Python" data, offline).

    One document per file, in sorted order of the path relative to the stdlib root; the
    document id is that relative path (``json/decoder.py``) and the text is the whole file.
    Test suites (``test/``, ``tests/``, ``idle_test/`` directories) are excluded unless
    ``tests=1``. Files that are not valid UTF-8 are skipped and counted in
    ``stats["undecodable_files_skipped"]``. The validation split is the usual carve-out.
    The fingerprint names the Python version and the file list's size, so a store made on
    another interpreter is recognised as different. Python 3.11.7 without tests: 734 files,
    12.1 MB. Spec parameters: ``pystdlib:max_docs=500,tests=0``.
    """

    kind = "pystdlib"
    PARAMS = {"max_docs": 0, "tests": 0}

    def __init__(self, spec: str, params: dict[str, Any] | None = None, **kw):
        p = dict(self.PARAMS, **(params or {}))
        if p["max_docs"] < 0 or p["tests"] not in (0, 1):
            raise SourceError(f"source {spec!r}: max_docs must be >= 0 and tests 0 or 1")
        if p["max_docs"] and kw.get("max_docs") is None:
            kw["max_docs"] = p["max_docs"]
        super().__init__(spec, **kw)
        self.params = p
        self.files = pystdlib_files(include_tests=bool(p["tests"]))
        if not self.files:
            raise SourceError(
                f"source {spec!r}: no .py files under {sysconfig.get_paths()['stdlib']!r}"
            )
        self.stats["undecodable_files_skipped"] = 0

    def native_splits(self):
        return ("train",)

    def fingerprint(self):
        import sys

        return {
            "kind": self.kind,
            "python": sys.version,
            "stdlib": sysconfig.get_paths()["stdlib"],
            "files": len(self.files),
            "bytes": sum(os.path.getsize(p) for _, p in self.files),
            **self.params,
        }

    def size(self) -> dict[str, int]:
        """``{"files", "bytes"}`` of the whole corpus on disk (before any cap or carve-out)."""
        return {"files": len(self.files), "bytes": sum(os.path.getsize(p) for _, p in self.files)}

    def _iter_native(self, split):
        self.stats["undecodable_files_skipped"] = 0
        for rel, path in self.files:
            with open(path, "rb") as f:
                data = f.read()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                self.stats["undecodable_files_skipped"] += 1
                continue
            yield rel, text
