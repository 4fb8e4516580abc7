"""The course site in a real browser: a three-page site built from stored outputs (no kernel), opened by headless
Chromium with the network blocked. Checks typeset maths, no nbdev directive text, the sidebar on every page, no
request for anything outside the site, and the front page's screenshot."""
import base64
import io
import re
import time
from pathlib import Path

import nbformat
import pytest
from nbformat import v4 as N

from tltutor.cli import build_course, main
from tltutor.website import chromium_path, dump_dom, flatten, mathjax_tarball, remote_refs, requested_urls

ROOT = Path(__file__).resolve().parents[1]


def _png() -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([1, 5, 20, 100], [0.4, 0.7, 0.8, 0.85], marker="o")
    ax.set(title="accuracy vs labels", xlabel="labels per class", ylabel="accuracy")
    buf = io.BytesIO(); fig.savefig(buf, format="png", dpi=60); plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _show_doc_md() -> str:
    from nbdev.showdoc import show_doc
    from tltutor.core import seed_everything
    return show_doc(seed_everything)._repr_markdown_()


def small_course(tmp: Path, sources: bool = True) -> Path:
    "A project folder with three small notebooks (index + two chapters) whose outputs are stored, never executed."
    (tmp / "settings.ini").write_text("[DEFAULT]\nlib_name = tltutor\n")
    if sources: (tmp / "tltutor").symlink_to(ROOT / "tltutor")  # the source pages show_doc links to
    nbs = tmp / "nbs"; nbs.mkdir()
    index = N.new_notebook(cells=[
        N.new_markdown_cell("# A tiny course\n\n> Two chapters, to test the site."),
        N.new_markdown_cell("## Chapters\n\n| # | chapter | the question it answers | status |\n|---|---|---|---|\n"
                            "| 00 | [probe](nbs/00_probe.ipynb) | do frozen features beat pixels? | ready |\n"
                            "| 01 | [loss](nbs/01_loss.ipynb) | what does the loss minimise? | ready |")])
    probe = N.new_notebook(cells=[
        N.new_markdown_cell('---\ntitle: "Probe: frozen features"\ndescription: A linear head on frozen features.\n---'),
        N.new_markdown_cell("# Probe\n\nA head on frozen features $\\phi(x) \\in \\mathbb{R}^D$ minimises\n\n"
                            "$$\\min_{W} -\\sum_i \\log \\operatorname{softmax}(W\\phi(x_i))_{y_i} + \\frac{1}{2C}\\lVert W\\rVert^2 .$$"),
        N.new_code_cell("#| default_exp probe"),
        N.new_code_cell("#| hide\nfrom nbdev.showdoc import show_doc"),
        N.new_code_cell("#| export\ndef head(d: int) -> int:\n    return d"),
        N.new_code_cell("show_doc(seed_everything)", execution_count=1, outputs=[
            N.new_output("execute_result", execution_count=1, data={"text/markdown": _show_doc_md(), "text/plain": "x"})]),
        N.new_code_cell("# NBVAL_IGNORE_OUTPUT\nplot()", execution_count=2, outputs=[
            N.new_output("display_data", data={"image/png": _png(), "text/plain": "<Figure>"})]),
        N.new_code_cell("record('probe', probe_k5=0.709, scratch_k5=0.618)", execution_count=3, outputs=[
            N.new_output("stream", name="stdout", text="results: probe\n  probe_k5    0.709\n  scratch_k5  0.618\n")]),
        N.new_code_cell("#| hide\n#| eval: false\nfrom nbdev.doclinks import nbdev_export\nnbdev_export()")])
    loss = N.new_notebook(cells=[
        N.new_markdown_cell("---\ntitle: Loss\ndescription: Cross-entropy.\n---"),
        N.new_markdown_cell("# Loss\n\nCross-entropy is $-\\log p_{y}$, with $p = \\operatorname{softmax}(z)$."),
        N.new_code_cell("#| export\nimport math"),
        N.new_code_cell("#| eval: false\nnbdev_export()")])
    for name, nb in (("index", index), ("00_probe", probe), ("01_loss", loss)): nbformat.write(nb, nbs / f"{name}.ipynb")
    return nbs


def visible_text(dom: str) -> str:
    body = re.sub(r"(?is)<(script|style|svg|mjx-assistive-mml)\b.*?</\1>", " ", dom)
    return re.sub(r"\s+", " ", re.sub(r"(?s)<[^>]+>", " ", body))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("course")
    nbs = small_course(tmp)
    t0 = time.perf_counter()
    mp = pytest.MonkeyPatch(); mp.setenv("TLTUTOR_RESULTS", str(tmp / "_results"))  # build_course sets it too
    runs = build_course(out=tmp / "_site", nbs=nbs, progress=False, execute=False, screenshot=chromium_path() is not None)
    mp.undo()
    return tmp / "_site", runs, time.perf_counter() - t0


def test_built_without_a_kernel(site):
    out, runs, seconds = site
    assert [(r["chapter"], r["executed"], r["ok"]) for r in runs] == [("00_probe", False, True), ("01_loss", False, True)]
    assert seconds < 30, f"building a 3-page site took {seconds:.0f} s"
    assert {p.name for p in out.glob("*.html")} == {"index.html", "00_probe.html", "01_loss.html"}


def test_every_page_offline_with_sidebar(site):
    out, _, _ = site
    pages = sorted(out.rglob("*.html"))
    assert any(p.parent.name == "src" for p in pages)  # the module pages show_doc links to
    for page in pages:
        text = page.read_text()
        assert 'id="sidebar"' in text and "00_probe.html" in text and "01_loss.html" in text, page
        assert remote_refs(text) == [], page
    for css in out.rglob("*.css"): assert remote_refs(css.read_text()) == [], css


def test_front_page_cards(site):
    out, _, _ = site
    front = out / "index.html"
    text = front.read_text()
    assert "do frozen features beat pixels?" in text and "img/00_probe.png" in text and (out / "img" / "00_probe.png").exists()
    assert "stored outputs" in text and "<td>probe_k5</td>" in text
    assert "| 00 |" not in text  # the markdown chapter table became cards


def test_chapter_page_clean(site):
    out, _, _ = site
    text = (out / "00_probe.html").read_text()
    assert "<title>Probe: frozen features</title>" in text and "title: " not in text
    assert "#|" not in text and "NBVAL" not in text and "nbdev_export" not in text and "show_doc(" not in text
    assert 'href="src/tltutor.core.py.html#L-' in text and "{target" not in text  # show_doc as an API entry
    assert 'href="01_loss.html" rel="next"' in text and 'href="index.html"' in text


@pytest.mark.skipif(chromium_path() is None, reason="Chromium is not installed: apt-get install chromium (as root; "
                                                     "make course does it where it can)")
@pytest.mark.skipif(not mathjax_tarball().is_file(), reason="MathJax is not installed: make install (npm pack mathjax@3.2.2)")
def test_in_headless_chromium(site):
    out, _, _ = site
    t0 = time.perf_counter()
    dom = dump_dom(out / "00_probe.html", net_log=out.parent / "net.json")  # network blocked; every request logged
    assert requested_urls(out.parent / "net.json") == []  # nothing left the machine
    typeset = dom.count("<mjx-container")
    assert typeset >= 2, f"MathJax typeset {typeset} equations; the page shows raw TeX"
    assert 'display="true"' in dom  # the display equation too
    text = visible_text(dom)
    assert "#|" not in text and "\\frac" not in text and "\\phi" not in text, text[:500]
    assert 'id="sidebar"' in dom and "Probe" in text
    # the check can fail: a page with a CDN script shows its request in the log (and raw TeX)
    cdn = out.parent / "cdn.html"
    cdn.write_text('<script src="https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-svg.js"></script><p>$x^2$</p>')
    assert "<mjx-container" not in dump_dom(cdn, net_log=out.parent / "cdn.json")
    assert requested_urls(out.parent / "cdn.json") == ["https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-svg.js"]
    png = out / "screenshot.png"
    assert png.exists(), "build_course saves a screenshot of the front page when Chromium is installed"
    from PIL import Image
    with Image.open(png) as im:
        assert im.size == (1280, 1600) and len(set(im.convert("L").resize((64, 80)).getdata())) > 5  # not blank
    assert time.perf_counter() - t0 < 45


def test_cli_no_execute(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TLTUTOR_RESULTS", str(tmp_path / "_results"))
    monkeypatch.setattr("tltutor.website.chromium_path", lambda: None)  # no screenshot: the test above took one
    nbs = small_course(tmp_path, sources=False)
    assert main(["course", "--nbs", str(nbs), "--out", str(tmp_path / "s"), "--no-execute", "--chapters", "01"]) == 0
    assert "1 of 1 chapters rendered from stored outputs" in capsys.readouterr().out
    assert (tmp_path / "s" / "01_loss.html").exists() and (tmp_path / "s" / "index.html").exists()
    with pytest.raises(TypeError, match="must be a dict"): flatten("0.9")
