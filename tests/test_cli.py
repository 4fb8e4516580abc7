"""The `tltutor` command, run as a subprocess the way users and `make` run it: exit codes and messages."""
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=ROOT, env=None, timeout=300):
    r = subprocess.run([sys.executable, "-m", "tltutor.cli", *args], cwd=cwd, capture_output=True, text=True,
                       timeout=timeout, env=env)
    return r.returncode, r.stdout, r.stderr


@pytest.mark.parametrize("sub", ["doctor", "data", "course"])
def test_help(sub):
    rc, out, _ = cli(sub, "--help")
    assert rc == 0 and f"usage: tltutor {sub}" in out


def test_no_command_prints_usage():
    rc, out, _ = cli()
    assert rc == 2 and "usage: tltutor" in out


def test_unknown_chapter_lists_valid_ones():
    rc, _, err = cli("course", "--chapters", "99_nope", "--out", "/tmp/tltutor-never-written")
    assert rc == 2 and "unknown chapter '99_nope'" in err and "00_core" in err


def test_out_is_a_file(tmp_path):
    f = tmp_path / "site"; f.write_text("not a folder")
    rc, _, err = cli("course", "--chapters", "00", "--out", str(f))
    assert rc == 2 and "is a file, not a folder" in err


def test_out_cannot_be_created():
    # /proc refuses new folders even to root, so this checks the message without relying on file permissions
    rc, _, err = cli("course", "--chapters", "00", "--out", "/proc/tltutor-site")
    assert rc == 2 and "cannot create --out" in err


def test_course_runs_chapters_and_reports_failures(tmp_path):
    nbs = tmp_path / "nbs"; nbs.mkdir()
    ok = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("---\ntitle: Tiny chapter\n---"),
        nbformat.v4.new_code_cell("from tltutor.core import record\nrecord('tiny', score=0.875, parts={'a': 2})")])
    bad = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("raise RuntimeError('chapter broke')")])
    nbformat.write(ok, nbs / "00_tiny.ipynb"); nbformat.write(bad, nbs / "01_bad.ipynb")
    env = {**__import__("os").environ, "TLTUTOR_RESULTS": str(tmp_path / "_results"),
           "TLTUTOR_GOLDEN": ""}  # throw-away chapters: no golden values to compare with
    rc, out, err = cli("course", "--nbs", str(nbs), "--out", str(tmp_path / "site"), env=env)
    assert rc == 1, (out, err)
    assert "1 of 2 chapters ran; failed: 01_bad" in out
    index = (tmp_path / "site" / "index.html").read_text()
    assert "Tiny chapter" in index and '<td>score</td><td class="num">0.875</td>' in index
    assert '<td>parts.a</td><td class="num">2</td>' in index
    assert "chapter broke" in index
    runs = json.loads((tmp_path / "site" / "runs.json").read_text())
    assert [r["ok"] for r in runs["runs"]] == [True, False]
    assert (tmp_path / "site" / "00_tiny.html").stat().st_size > 1000


def test_data_status_and_unknown_dataset():
    rc, out, _ = cli("data", "digits")
    assert rc == 0 and "digits" in out and "ok" in out
    rc, _, err = cli("data", "cifar10")
    assert rc == 2 and "unknown dataset 'cifar10'" in err and "fashion_mnist" in err


def test_doctor_reports_and_exits_nonzero_when_a_source_is_missing(tmp_path):
    env = {**__import__("os").environ, "TLTUTOR_HOME": str(tmp_path / "home"),
           "TLTUTOR_NOTO_DIR": str(tmp_path / "no-fonts")}  # fresh cache, and the Noto fonts "not installed"
    rc, out, err = cli("doctor", env=env)
    assert rc == 1, (out, err)
    assert "torch" in out and "device" in out and "datasets:" in out and "backbones:" in out
    assert "the course cannot run" in err and "glyphs is missing" in err and "fonts-noto-core" in err
