"""Make nbval obey nbdev's conventions (DESIGN.md section 5).

- cells marked `#| eval: false`, or with one of settings.ini's `tst_flags` (`#| notest`, `#| slow`), are skipped;
- notebooks whose name starts with `_` are not collected;
- cells that `nbdev_clean` left with outputs but `execution_count: null` get a count, so their outputs are still
  compared (nbval otherwise treats them as never run and fails with "Unrun reference cell has outputs").
"""
import re
from configparser import ConfigParser
from pathlib import Path

import pytest

_cfg = ConfigParser(delimiters=["="])
_cfg.read(Path(__file__).parent / "settings.ini")
TST_FLAGS = [f for f in re.split(r"[|\s]+", _cfg.get("DEFAULT", "tst_flags", fallback="")) if f]


def _directives(source: str) -> dict:
    "nbdev `#| key: value` / `#| flag` directives of a cell."
    out = {}
    for line in source.splitlines():
        m = re.match(r"^\s*#\s*\|\s*([\w-]+)\s*:?\s*(.*?)\s*$", line)
        if m: out[m.group(1).lower()] = m.group(2).lower()
    return out


def skip_reason(source: str):
    "Why nbval should not run this cell, or None."
    d = _directives(source)
    if d.get("eval") == "false": return "#| eval: false"
    for flag in TST_FLAGS:
        if flag in d: return f"#| {flag} (a tst_flag in settings.ini)"
    return None


def pytest_ignore_collect(collection_path, config):
    if collection_path.suffix == ".ipynb" and collection_path.name.startswith("_"):
        return True
    return None


def pytest_collection_modifyitems(session, config, items):
    # notebooks named on the command line bypass pytest_ignore_collect: drop `_*` notebooks here too
    drafts = [it for it in items if it.path.suffix == ".ipynb" and it.path.name.startswith("_")]
    if drafts:
        config.hook.pytest_deselected(items=drafts)
        items[:] = [it for it in items if it not in drafts]
    for item in items:
        cell = getattr(item, "cell", None)
        if cell is None or not hasattr(item, "options"): continue  # not an nbval cell
        reason = skip_reason(cell.source)
        if reason:
            item.options["skip"] = True
            item.add_marker(pytest.mark.skip(reason=reason))
        elif cell.get("execution_count") is None and cell.get("outputs"):
            cell["execution_count"] = item.cell_num + 1
