"""The notebook test rules of DESIGN.md section 5, checked on small throw-away notebooks:
nbval is strict (a changed deterministic output fails), cleaned cells are still compared, `#| eval: false` cells and
`_*` notebooks are skipped."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def notebook(cells):
    "A minimal nbformat-4 notebook; `cells` are (source, stored_stdout or None) pairs, cleaned like nbdev_clean does."
    out = []
    for i, (src, stdout) in enumerate(cells):
        outputs = [] if stdout is None else [{"name": "stdout", "output_type": "stream", "text": [stdout]}]
        out.append({"cell_type": "code", "execution_count": None, "id": f"c{i}", "metadata": {}, "outputs": outputs,
                    "source": src})
    return {"cells": out, "metadata": {"kernelspec": {"display_name": "python3", "language": "python", "name": "python3"}},
            "nbformat": 4, "nbformat_minor": 5}


def run_nbval(tmp_path, files):
    for name in ("conftest.py", "settings.ini", "pytest.ini", "nbval_sanitize.cfg"):
        shutil.copy(ROOT / name, tmp_path / name)
    for name, nb in files.items():
        (tmp_path / name).write_text(json.dumps(nb))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", *files], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    return r.returncode, r.stdout + r.stderr


def test_nbval_rules(tmp_path):
    good = notebook([("print(1 + 1)", "2\n"),
                     ("#| eval: false\nraise SystemExit('an eval: false cell must not run')", None),
                     ("#| notest\nraise SystemExit('a tst_flags cell must not run')", None)])
    changed = notebook([("print(1 + 1)", "3\n")])  # a stored deterministic output that no longer matches
    broken_draft = notebook([("raise SystemExit('_ notebooks are not collected')", None)])
    rc, out = run_nbval(tmp_path, {"good.ipynb": good, "_draft.ipynb": broken_draft})
    assert rc == 0, out
    assert "1 passed, 2 skipped" in out, out
    rc, out = run_nbval(tmp_path, {"changed.ipynb": changed})
    assert rc != 0 and "Cell outputs differ" in out, out
