"""Who may import whom inside the package: every import statement of every package module, those inside
functions too, against the table of allowed edges below.

The folders, lowest layer first: common <- model <- parallel <- training <- {evaluation, finetune, interop}
<- launcher; data_prep stands beside the training stack on common alone, and training and above may use
it. The model never imports torch.distributed, and inside the package every import of the package is
relative (``from ..model.gpt import GPT``), so a checkout reads the same without an install.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
ROOT = ""  # the package's own __init__.py (its docstring and version; it imports nothing)

_TRAINING_STACK = {"common", "model", "parallel", "training", "data_prep"}
ALLOWED: dict[str, set[str]] = {
    ROOT: set(),
    "common": set(),
    "model": {"common"},
    "parallel": {"common", "model"},
    "training": {"common", "model", "parallel", "data_prep"},
    "evaluation": _TRAINING_STACK,
    "finetune": _TRAINING_STACK,
    "interop": _TRAINING_STACK,
    "launcher": _TRAINING_STACK | {"evaluation", "finetune", "interop"},
    "data_prep": {"common"},
    "configs": set(),  # YAML files: read by path, never imported
}
"""Folder -> the other folders its modules may import (each may always import itself and ROOT)."""

NOT_PACKAGE = {"tests", "bench", "docs", "gptforge.egg-info"}  # and hidden folders (.venv, .git)


def package_modules() -> list[Path]:
    paths = [REPO / "__init__.py"]
    for folder in sorted(p for p in REPO.iterdir() if p.is_dir() and p.name not in NOT_PACKAGE
                         and not p.name.startswith(".")):
        paths += sorted(folder.rglob("*.py"))
    return paths


def layer_of(path: Path) -> str:
    parts = path.relative_to(REPO).parts
    return ROOT if len(parts) == 1 else parts[0]


def imports_of(path: Path) -> list[tuple[int, str, tuple[str, ...] | None]]:
    """(line, the module as written, its folder path inside the package or None if outside it)."""
    rel = path.relative_to(REPO)
    package = rel.parts[:-1]  # a module's package; an __init__.py is its own package
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = tuple(alias.name.split("."))
                found.append((node.lineno, alias.name, parts[1:] if parts[0] == "gptforge" else None))
        elif isinstance(node, ast.ImportFrom):
            written = "." * node.level + (node.module or "")
            module = tuple(node.module.split(".")) if node.module else ()
            if node.level == 0:
                if module[0] == "gptforge":
                    found += [(node.lineno, written, module[1:] + ((a.name,) if len(module) == 1 else ()))
                              for a in node.names]
                else:
                    found += [(node.lineno, f"{written}.{a.name}", None) for a in node.names]
                continue
            if node.level - 1 > len(package):
                found.append((node.lineno, written, ("<beyond the package>",)))
                continue
            base = package[:len(package) - (node.level - 1)]
            # ``from . import x`` names modules (or names) of the package itself: x is what is imported
            found += [(node.lineno, written, base + module + (() if module else (a.name,))) for a in node.names]
    return found


def violations() -> list[str]:
    problems = []
    for path in package_modules():
        rel, layer = path.relative_to(REPO), layer_of(path)
        if layer not in ALLOWED:
            problems.append(f"{rel}: folder {layer!r} is not in ALLOWED (tests/test_layering.py)")
            continue
        for line, written, target in imports_of(path):
            where = f"{rel}:{line}: {written}"
            if target is None:
                if layer == "model" and written.startswith("torch.distributed"):
                    problems.append(f"{where}: model never imports torch.distributed")
                continue
            if not written.startswith("."):
                problems.append(f"{where}: absolute import of the package (use a relative one)")
            if target and target[0] == "<beyond the package>":
                problems.append(f"{where}: relative import beyond the package")
                continue
            # a target without a folder is the root package itself (``from .. import __version__``)
            to = target[0] if len(target) > 1 or (target and (REPO / target[0]).is_dir()) else ROOT
            if to not in (layer, ROOT) and to not in ALLOWED[layer]:
                problems.append(f"{where}: {layer} may not import {to}")
        if layer == "model":  # torch.distributed reached as an attribute, without importing it
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if (isinstance(node, ast.Attribute) and node.attr == "distributed"
                        and isinstance(node.value, ast.Name) and node.value.id == "torch"):
                    problems.append(f"{rel}:{node.lineno}: torch.distributed: model never uses torch.distributed")
    return problems


def test_every_package_import_follows_the_layers():
    problems = violations()
    assert not problems, "imports across the layers:\n" + "\n".join(problems)


def test_the_checker_sees_every_kind_of_import(tmp_path, monkeypatch):
    """The checker itself, on a small fake package: each rule fires where it should and only there."""
    files = {
        "__init__.py": "",
        "common/__init__.py": "from ..model import gpt\n",
        "model/__init__.py": "",
        "model/gpt.py": ("import torch\nfrom torch import distributed\ndef f():\n"
                         "    import torch.distributed as dist\n    return torch.distributed.is_initialized()\n"),
        "training/__init__.py": "from ..model.gpt import f\nfrom . import steps\nfrom .. import __version__\n",
        "training/steps.py": "def g():\n    from ..evaluation.tasks import load\n",
        "evaluation/__init__.py": "",
        "evaluation/tasks.py": "from gptforge.model.gpt import f\nfrom ...outside import x\n",
        "launcher/cli.py": "from ..evaluation import tasks\nfrom ..finetune.cli import run\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert sorted(violations()) == sorted([
        "common/__init__.py:1: ..model: common may not import model",
        "model/gpt.py:2: torch.distributed: model never imports torch.distributed",
        "model/gpt.py:4: torch.distributed: model never imports torch.distributed",
        "model/gpt.py:5: torch.distributed: model never uses torch.distributed",
        "training/steps.py:2: ..evaluation.tasks: training may not import evaluation",
        "evaluation/tasks.py:1: gptforge.model.gpt: absolute import of the package (use a relative one)",
        "evaluation/tasks.py:2: ...outside: relative import beyond the package",
    ])
