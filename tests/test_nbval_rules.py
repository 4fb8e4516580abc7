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


# --- notebook kernels: one starts at a time across workers, an unanswering one is replaced once --------------------
def test_kernel_start_is_wrapped():
    import nbval.plugin
    assert getattr(nbval.plugin.RunningKernel, "tltutor_safe", False), "conftest.py did not wrap nbval's kernel start"
    import conftest
    assert conftest.start_kernels_safely(nbval.plugin.RunningKernel) is nbval.plugin.RunningKernel  # never twice


def test_kernel_start_retried_once():
    import conftest
    calls = []
    def flaky(name, cwd=None, startup_timeout=60):
        calls.append(name)
        if len(calls) == 1: raise RuntimeError("Kernel didn't respond in 60 seconds")
        return f"kernel {name}"
    with pytest.warns(UserWarning, match="did not start .*Kernel didn't respond"):
        assert conftest.start_kernels_safely(flaky)("python3", cwd="nbs") == "kernel python3"
    assert calls == ["python3", "python3"]

    def dead(*args, **kwargs): raise RuntimeError("Kernel died before replying to kernel_info")
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="Kernel died"):
        conftest.start_kernels_safely(dead, retries=1)("python3")
    def wrong(*args, **kwargs): raise ValueError("not a start-up failure")
    with pytest.raises(ValueError):  # anything else is not retried
        conftest.start_kernels_safely(wrong)("python3")


@pytest.mark.skipif(sys.platform == "win32", reason="the lock uses fcntl.flock")
def test_kernel_start_lock_serialises(tmp_path):
    import threading, time
    import conftest
    events, run_id = [], f"test-{tmp_path.name}"
    def start(name):
        with conftest.kernel_start_lock(run_id):
            events.append(("in", name)); time.sleep(0.2); events.append(("out", name))
    threads = [threading.Thread(target=start, args=(n,)) for n in "ab"]
    for t in threads: t.start()
    for t in threads: t.join()
    assert [e[0] for e in events] == ["in", "out", "in", "out"], events  # never two inside at once
