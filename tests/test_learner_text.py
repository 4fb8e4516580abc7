"""Learner-facing text speaks to learners, not to the people who build the course.

The notebooks' markdown and code comments (`nbs/index.ipynb`, `nbs/[0-9]*.ipynb`; `_*` drafts are skipped), README.md
and the package's source (`tltutor/*.py`: docstrings, comments, messages) must not use the project's working
vocabulary: what an issue asked for, the course's source questions ("seed question", "(000 Q6)"), what has or has not
"landed", the integrator. Say what the text means to a reader instead ("the tests below check...", "the domain
adaptation chapter is not written yet").
"""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

VOCABULARY = re.compile("|".join([
    r"\bthe issue (?:asks|asked|says|said|wants|requires|requests|lists)\b",
    r"\bissue\s*#?\d+\b",                        # "issue 21", "issue #4"
    r"\bseed (?:questions?|files?)\b",
    r"\b(?:has|have|had) not (?:yet )?landed\b", r"\bnot landed\b", r"\bonce (?:it|this|that|\w+) lands\b",
    r"\blanded (?:on|in) main\b",
    r"\(?\b00[0-4]:? ?Q\d+\b\)?",                 # "(000 Q6)", "001: Q11"
    r"\bthe integrator\b",
]), re.I)


def _notebook_texts(path):
    nb = json.loads(path.read_text())
    for i, c in enumerate(nb["cells"]):
        src = "".join(c["source"])
        if c["cell_type"] == "markdown":
            yield f"{path.name} cell {i}", src
        elif c["cell_type"] == "code":
            comments = "\n".join(l for l in src.splitlines() if l.lstrip().startswith("#") and not l.lstrip().startswith("#|"))
            yield f"{path.name} cell {i} (comments)", comments


def learner_texts(root=ROOT):
    for p in [root / "nbs" / "index.ipynb", *sorted((root / "nbs").glob("[0-9]*.ipynb"))]:
        if p.exists(): yield from _notebook_texts(p)
    if (root / "README.md").exists(): yield "README.md", (root / "README.md").read_text()
    for p in sorted((root / "tltutor").glob("*.py")):
        yield f"tltutor/{p.name}", p.read_text()


def vocabulary_hits(texts) -> list:
    "(place, the line) for each use of the project's vocabulary."
    return [(place, line.strip()) for place, text in texts for line in text.splitlines() if VOCABULARY.search(line)]


def test_no_project_vocabulary():
    hits = vocabulary_hits(learner_texts())
    assert not hits, "project vocabulary in learner-facing text (say what it means to a reader):\n" + "\n".join(
        f"{place}: {line[:160]}" for place, line in hits)


@pytest.mark.parametrize("text", ["The tests the issue asks for: zero at start.", "as the seed question suggests",
                                  "The DANN chapter has not landed yet.", "see (000 Q6)", "001: Q11 asks this",
                                  "fixed in issue 21", "the integrator re-measures it"])
def test_vocabulary_is_caught(text):
    assert vocabulary_hits([("x", text)]), text


@pytest.mark.parametrize("text", ["On frozen features they landed close together.", "A known issue with BatchNorm.",
                                  "question 17 below", "Q = K V"])
def test_plain_english_passes(text):
    assert not vocabulary_hits([("x", text)]), text
