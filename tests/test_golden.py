"""Golden values under nbval (DESIGN.md section 5), on small fake chapters: a recorded number that moved beyond its
tolerance fails the notebook with the table (metric, golden, now, tolerance), a metric that was added fails, a chapter
without golden values fails naming `make golden`, and a run within tolerance passes."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from test_nbval_rules import ROOT, notebook

GOLDEN = {"chapter": "fake", "tolerances": {"drift": 0.2},
          "values": {"headline": 0.856, "epochs": 8, "drift": 1.5, "per_class.a": 0.5, "seconds": 10.0}}


def chapter(chapter, headline=0.856, drift=1.5, extra=""):
    "A one-cell chapter that records like a real one (`record` is the chapter's last cell)."
    src = (f"from tltutor.core import record\n_ = record({chapter!r}, headline={headline}, epochs=8, drift={drift}, "
           f"per_class={{'a': 0.5}}, seconds=3.0{extra})")
    return notebook([(src, None)])


def test_golden_values_fail_a_moved_headline_and_an_added_key(tmp_path):
    for name in ("conftest.py", "settings.ini", "pytest.ini", "nbval_sanitize.cfg"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "nbs" / "golden").mkdir(parents=True)      # conftest points TLTUTOR_GOLDEN here
    for ch in ("within", "moved", "added"):
        (tmp_path / "nbs" / "golden" / f"{ch}.json").write_text(json.dumps(dict(GOLDEN, chapter=ch)))
    files = {"within.ipynb": chapter("within", headline=0.841, drift=1.65),   # -1.5 points, +0.15 under a 0.2 override
             "moved.ipynb": chapter("moved", headline=0.80),                  # the headline fell 5.6 points
             "added.ipynb": chapter("added", extra=", new_metric=1"),
             "nogolden.ipynb": chapter("nogolden")}
    for name, nb in files.items(): (tmp_path / name).write_text(json.dumps(nb))
    env = {k: v for k, v in os.environ.items() if k not in ("TLTUTOR_GOLDEN", "TLTUTOR_RESULTS")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])   # this checkout's tltutor
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n0", *files], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, env=env)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    failed = {line.split("::")[0].split()[-1] for line in out.splitlines() if line.startswith("FAILED")}
    assert failed == {"moved.ipynb", "added.ipynb", "nogolden.ipynb"}, out
    assert "3 failed, 1 passed" in out, out
    # the table: metric, golden, now, tolerance, for the moved headline and the added metric only
    assert "1 of 5 results of 'moved' differ from the golden values" in out, out
    assert "metric    golden  now  tolerance                status" in out, out
    assert "headline  0.856   0.8  +-0.0428 (max 0.03, 5%)  FAIL" in out, out
    assert "new_metric  -       1    added      FAIL" in out, out
    assert "no golden values for chapter 'nogolden'" in out and "make golden" in out, out
    assert (tmp_path / "_results" / "moved.json").exists()   # saved before the comparison, for `make golden`
