"""Plain text files -> one JSONL of documents (``{"id", "text", "source"}``), written atomically; and the
docstrings of the installed Python standard library, a small real-English corpus every machine with Python
has (PSF License), for smoke runs and benchmarks."""

from __future__ import annotations

import ast
import glob
import json
import os
import sysconfig

from ...common.errors import UserError
from ...common.atomic import atomic_write_text


def files_to_jsonl(root: str, patterns: list[str], output: str, *, min_chars: int = 1) -> tuple[int, int]:
    """Each file matching one of ``root/pattern`` becomes one document; files that are not UTF-8 or shorter
    than ``min_chars`` are skipped and counted. Returns (documents written, files skipped)."""
    if not os.path.isdir(root):
        raise UserError(f"files-to-jsonl: no such folder {root!r}")
    paths = sorted({p for pattern in patterns for p in glob.glob(os.path.join(root, pattern), recursive=True)})
    if not paths:
        raise UserError(f"files-to-jsonl: no file under {root!r} matches --glob {' '.join(patterns)}")
    lines, skipped = [], 0
    for path in paths:
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except (UnicodeDecodeError, OSError):
            skipped += 1
            continue
        if len(text) < min_chars:
            skipped += 1
            continue
        rel = os.path.relpath(path, root)
        lines.append(json.dumps({"id": rel, "text": text, "source": os.path.abspath(path)}, ensure_ascii=False))
    if not lines:
        raise UserError(f"files-to-jsonl: all {len(paths)} matching files under {root!r} were skipped")
    atomic_write_text(output, "\n".join(lines) + "\n")
    return len(lines), skipped


def stdlib_docstrings(limit: int = 400) -> list[str]:
    """The first ``limit`` docstrings longer than 200 characters of the standard library's top-level
    modules (modules, classes and functions, in file order; a module's own docstring comes twice, as
    ``ast.walk`` starts at the module)."""
    root = sysconfig.get_paths()["stdlib"]
    docs: list[str] = []
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py"):
            continue
        try:
            with open(os.path.join(root, name), encoding="utf-8") as handle:
                tree = ast.parse(handle.read())
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    docs.append(doc)
        if len(docs) >= limit:
            break
    return docs[:limit]
