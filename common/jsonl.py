"""Strict JSON lines: small files (evaluation tasks, fine-tuning data) that must be valid throughout.

Corpora are read leniently instead (``data_prep.readers.documents``: bad records are skipped and counted).
"""

from __future__ import annotations

import gzip
import json

from .errors import UserError


def strict_json_lines(path: str, error: type[UserError] = UserError) -> list[tuple[int, dict]]:
    """(line number, object) of a small JSONL(.gz) file that must be valid throughout (task and
    fine-tuning files, not corpora): the first bad line raises ``error`` naming the file and line."""
    opener = gzip.open if path.endswith(".gz") else open
    rows = []
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except (OSError, UnicodeDecodeError, EOFError) as err:
        raise error(f"{path}: cannot read it as UTF-8 JSON lines ({err})") from None
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as err:
            raise error(f"{path} line {number}: not JSON ({err.msg})") from None
        if not isinstance(obj, dict):
            raise error(f"{path} line {number}: expected a JSON object, got {type(obj).__name__}")
        rows.append((number, obj))
    return rows
