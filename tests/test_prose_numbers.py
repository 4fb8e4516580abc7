"""The numbers a reader reads are the numbers the code produced.

For every chapter notebook (`nbs/index.ipynb` and `nbs/[0-9]*.ipynb`; `_*` drafts are skipped) this test reads the
markdown prose and fails, listing (notebook, number, sentence), for every *measured-looking* number that appears
nowhere in the same notebook's stored outputs.

What is checked (a "claim"):
- every decimal number (`0.787`, `7.5`);
- every integer followed by a unit that only a measurement gives: `%`, `points`/`point`/`pp`, a multiplier (`22x`,
  `22×`, `22 times`; not a size `1280 x 10`), a time (`552 s`, `3 ms`, `2 minutes`), a count in millions
  (`3.5M`, `2.24 million`).
  Plain integers (counts, sizes, seeds, epochs, chapter numbers, years, `3-fold` cross-validation) are settings, not
  claims, and are not checked; nor is a confidence level (`95 % interval`).
- Ranges (`0.67-0.69`, `0.5-1.5 points`, `1-5 minutes`) are checked at both ends, with the unit of the range.

How a claim matches a stored output number o (any number printed in a cell's stored text/stream/HTML output):
- p written with d decimals matches o when o rounds to p at d decimals (`0.787` <- `0.7866`; `0.79` <- `0.787`) and
  o was printed with at least d decimals, or when o equals p (`0.8` <- `0.80`);
- signs are ignored (`+7.5 points` <- `-0.075` or `+0.075`): the sentence says which way;
- a percentage or a number of points also matches a printed fraction times 100 (`82 %` <- `0.817`,
  `+7.5 points` <- `+0.075`, `10.4-point gap` <- `0.104`), and a printed percentage (`72%`);
- a time matches only a printed time (a number followed by `s` or `ms`): minutes a printed number of seconds divided
  by 60 (`10 minutes` <- `593 s`), ms a printed number of seconds times 1000; millions match a printed count (`3.5M` <- `3,504,872`); a multiplier matches any
  printed number (`59x` <- `58.9`).
So a difference or a ratio quoted in prose ("+7.5 points", "22x") must be printed by a cell, and a timing quoted in
prose must be re-read after every refresh of its notebook (this test then points at it).

What is not a claim (not checked):
- maths (`$...$`, `$$...$$`) and code (`` `...` ``, fenced blocks): formulas, hyperparameters and settings are written
  there (`lr=3e-3`, $\\beta = 0.999$, $T = 4$). A setting written as a bare decimal in prose is checked like a claim,
  so write settings as code or maths;
- headings, link targets, HTML tags, the front matter;
- numbers glued to a name (`MobileNetV2`, `CIFAR-10`, `resnet8x4`, `float16`, `v2.1`) and version strings (`2.4.14`);
- literature numbers: a sentence that carries a citation, "(Author et al., 2015)", "(Author and Author, 2015)",
  "(Author, NeurIPS 2019)", "Author et al. (2015)" or "Author, Venue Name 2015", is the literature's, and its numbers are
  not checked. Keep our own numbers out of such sentences.
"""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def chapter_notebooks(root=ROOT):
    nbs = root / "nbs"
    return [p for p in [nbs / "index.ipynb", *sorted(nbs.glob("[0-9]*.ipynb"))] if p.exists()]


# --- stored outputs -----------------------------------------------------------------------------------------------
_OUT_NUM = re.compile(r"(?<![\w.])[-+]?(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?(%|\s?ms\b|\s?s\b|\s?sec|\s?seconds\b)?")


def _output_text(nb) -> str:
    parts = []
    for c in nb["cells"]:
        if c["cell_type"] != "code": continue
        for o in c.get("outputs", []):
            if "text" in o: parts.append("".join(o["text"]))
            data = o.get("data", {})
            for mime in ("text/plain", "text/markdown", "text/latex"):
                if mime in data: parts.append("".join(data[mime]))
            if "text/html" in data: parts.append(re.sub(r"<[^>]+>", " ", "".join(data["text/html"])))
    return "\n".join(parts)


def output_numbers(nb) -> list:
    "(value, decimals printed, unit: '%', 's', 'ms' or '') for every number in the notebook's stored outputs."
    out = []
    for m in _OUT_NUM.finditer(_output_text(nb)):
        whole, frac, unit = m.group(1).replace(",", ""), m.group(2) or "", (m.group(3) or "").strip()
        out.append((float(f"{whole}.{frac}" if frac else whole), len(frac), "s" if unit.startswith("s") else unit))
    return out


# --- prose ---------------------------------------------------------------------------------------------------------
_CITATION = re.compile(
    r"[A-Z][\w'’\-]+(?: et al\.?| and [A-Z][\w'’\-]+)?(?:'s)?,? (?:\(|(?:[A-Z][\w\-]*,? ){1,3})?(?:19|20)\d\d[a-z]?\b")
_UNIT = (r"(?P<unit>\s?%(?!\s?(?:interval|confidence|CI)\b)|\s?-?(?:percentage )?points?\b|\s?pp\b|\s?[x×](?![\w])(?!\s?\d)"
         r"|\s(?:times)\b|\s?ms\b|\s?s\b|\s?(?:minutes?|min)\b|\s?M\b|\smillion\b)")
_NUM = r"\d+(?:\.\d+)?"
_CLAIM = re.compile(rf"(?<![\w.\-/])(?<![A-Za-z]-)(?P<a>{_NUM})(?:\s?(?:-|–|to)\s?(?P<b>{_NUM}))?(?![\w.]*\.\d)(?:{_UNIT})?")


def _strip(md: str) -> str:
    "Markdown prose with maths, code, headings, link targets, HTML and front matter removed."
    md = re.sub(r"\A---\n.*?\n---\n?", " ", md, flags=re.S)
    md = re.sub(r"```.*?```", " ", md, flags=re.S)
    md = re.sub(r"\$\$.*?\$\$", " ", md, flags=re.S)
    md = re.sub(r"\$[^$]*\$", " ", md)
    md = re.sub(r"`[^`]*`", " ", md)
    md = re.sub(r"\]\([^)]*\)", "]", md)
    md = re.sub(r"<[^>]+>", " ", md)
    md = "\n".join(l for l in md.splitlines() if not l.lstrip().startswith("#"))
    return md


def sentences(md: str) -> list:
    text = _strip(md)
    out = []
    for block in re.split(r"\n\s*\n|\n\s*[-*] |\n\s*\d+\. |\n\s*\|", text):
        block = " ".join(block.split())
        protected = re.sub(r"\b(et al|e\.g|i\.e|vs|Fig|cf)\.", lambda m: m.group(0)[:-1] + "§", block)
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z*(\[\"])", protected):
            if s.strip(): out.append(s.replace("§", "."))
    return out


def claims(sentence: str) -> list:
    "(text, value, decimals, unit) for each checked number of a sentence (both ends of a range)."
    out = []
    for m in _CLAIM.finditer(sentence):
        unit = (m.group("unit") or "").strip().lstrip("-").lower()
        for g in ("a", "b"):
            t = m.group(g)
            if t is None: continue
            dec = len(t.split(".")[1]) if "." in t else 0
            if dec == 0 and not unit: continue          # a plain integer: a count or a setting
            out.append((m.group(0).strip(), float(t), dec, unit))
    return out


def _kind(unit: str) -> str:
    if unit in ("%",) or unit.startswith("point") or unit.startswith("percentage") or unit == "pp": return "pct"
    if unit in ("x", "×", "times"): return "ratio"
    if unit == "ms": return "ms"
    if unit == "s": return "s"
    if unit.startswith("min"): return "min"
    if unit in ("m", "million"): return "million"
    return ""


def _rounds_to(o: float, o_dec: int, p: float, dec: int) -> bool:
    "p (written with `dec` decimals) is o, or o rounded at p's precision (o printed at least that precisely)."
    return abs(o - p) < 1e-9 or (o_dec >= dec and abs(o - p) <= 0.5 * 10 ** -dec + 1e-9)


def matches(value: float, dec: int, unit: str, numbers) -> bool:
    "Does a stored output number back the claim `value` (written with `dec` decimals, followed by `unit`)?"
    kind = _kind(unit)
    for o, o_dec, o_unit in numbers:
        o = abs(o)
        if kind in ("s", "min", "ms"):                                   # times: only printed times back them
            scale = {("s", "s"): 1, ("min", "s"): 1 / 60, ("ms", "ms"): 1, ("ms", "s"): 1000, ("s", "ms"): 1e-3}
            if (kind, o_unit) not in scale: continue
            f = scale[(kind, o_unit)]
            cands = [(o * f, o_dec if f == 1 else 9)]
        else:
            cands = [(o, o_dec)]
            if kind == "pct" and o_unit != "%": cands.append((o * 100, max(o_dec - 2, 0)))   # a fraction, in points
            if kind == "million": cands = [(o / 1e6, 9)]                                       # 3,504,872 -> 3.5M
        if any(_rounds_to(c, c_dec, value, dec) for c, c_dec in cands): return True
    return False


def check_notebook(path) -> list:
    "(notebook, number, sentence) for each claim in the prose that the stored outputs do not back."
    nb = json.loads(Path(path).read_text())
    numbers = output_numbers(nb)
    problems = []
    for c in nb["cells"]:
        if c["cell_type"] != "markdown": continue
        for s in sentences("".join(c["source"])):
            if _CITATION.search(s): continue                 # the literature's numbers, with their source
            for text, value, dec, unit in claims(s):
                if not matches(value, dec, unit, numbers):
                    problems.append((Path(path).name, text, s))
    return problems


def _report(problems) -> str:
    return "\n".join(f"{nb}: {num!r} not in the stored outputs: {s}" for nb, num, s in problems)


@pytest.mark.parametrize("path", chapter_notebooks(), ids=lambda p: p.name)
def test_prose_numbers_are_stored_outputs(path):
    problems = check_notebook(path)
    assert not problems, ("numbers in the prose that no stored output prints (print them in a cell, fix them, or give "
                          "the literature's source in the same sentence):\n" + _report(problems))


def _tiny(tmp_path, prose, printed):
    nb = {"cells": [{"cell_type": "code", "execution_count": 1, "id": "c0", "metadata": {},
                     "outputs": [{"name": "stdout", "output_type": "stream", "text": [printed]}], "source": "print()"},
                    {"cell_type": "markdown", "id": "m0", "metadata": {}, "source": prose}],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    p = tmp_path / "01_tiny.ipynb"
    p.write_text(json.dumps(nb))
    return check_notebook(p)


def test_a_wrong_number_fails(tmp_path):
    printed = "accuracy: 0.7866 +- 0.0042\nKD - alone: +0.075; speed-up 58.9x; 552.3 s\n"
    ok = ("The student reaches 0.787 ± 0.004 (0.79 at two decimals), **+7.5 points** over the student alone, "
          "on a model 59 times smaller that runs 59x faster; the run took 552 s (about 9 minutes). "
          "Hinton et al.'s small net closed 90 % of its gap (Hinton et al., 2015). "
          "Settings live in code or maths: `lr=3e-3`, $T = 4$, $\\alpha = 0.5$ on MobileNetV2 and CIFAR-10.")
    assert _tiny(tmp_path, ok, printed) == []
    wrong = _tiny(tmp_path, "The student reaches 0.788 ± 0.005, +9 points, 100 times faster, in about 1 minute.", printed)
    assert [w[1] for w in wrong] == ["0.788", "0.005", "9 points", "100 times", "1 minute"], wrong
    assert wrong[0][:2] == ("01_tiny.ipynb", "0.788") and "The student reaches" in wrong[0][2]
    # an uncited literature-looking number is our claim until it carries its source
    assert [w[1] for w in _tiny(tmp_path, "Hinton's net closed 90 % of its gap.", printed)] == ["90 %"]
    # a bare decimal setting in prose is checked like a claim
    assert [w[1] for w in _tiny(tmp_path, "We use beta 0.999.", printed)] == ["0.999"]
