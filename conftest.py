"""Make nbval obey nbdev's conventions (DESIGN.md section 5), and keep test runs fast and machine-independent.

- cells marked `#| eval: false`, or with one of settings.ini's `tst_flags` (`#| notest`, `#| slow`), are skipped;
- notebooks whose name starts with `_` are not collected;
- cells that `nbdev_clean` left with outputs but `execution_count: null` get a count, so their outputs are still
  compared (nbval otherwise treats them as never run and fails with "Unrun reference cell has outputs");
- every process of a test run (pytest, its xdist workers and the notebook kernels they start) computes on ONE thread,
  so trained numbers do not depend on the machine's core count; parallelism comes from running notebooks side by side
  (pytest-xdist, `--dist loadfile`, one worker per core: see pytest.ini);
- `TLTUTOR_GOLDEN` (inherited by the kernels) points `tltutor.core.record` at `nbs/golden/`: every chapter's recorded
  numbers are compared with their reviewed golden values there, so a trained number that moved beyond its tolerance
  fails the notebook even where nbval ignores the cell that prints it (`make golden` rewrites them; an already set
  value wins, and `TLTUTOR_GOLDEN=` turns the check off);
- notebook kernels start one at a time across the xdist workers (two started at the same instant can race for ports
  and first-run files), each may take up to `--nbval-kernel-startup-timeout` seconds (pytest.ini), and a kernel that
  does not answer is replaced once, with a warning, before its notebook fails;
- notebooks start longest-budget first, and the run ends with a table of each notebook's seconds against its budget
  (`nbs/budgets.csv`); a notebook over 1.5x its budget fails the run (a regression guard, not a benchmark).
"""
import os

# Before anything imports torch or numpy: kernels inherit these, so nbval's kernels run on one thread too.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

# Kernels inherit this too: record() compares each chapter's results with its golden file (see tltutor.core).
os.environ.setdefault("TLTUTOR_GOLDEN", os.path.join(os.path.dirname(os.path.abspath(__file__)), "nbs", "golden"))

import csv
import re
import tempfile
import warnings
from collections import defaultdict
from configparser import ConfigParser
from contextlib import contextmanager
from pathlib import Path

try: import fcntl
except ImportError: fcntl = None  # Windows: kernels start without the cross-worker lock

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
    _sort_longest_first(items)
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


# --- parallel runs, budgets ---------------------------------------------------------------------------------------
ROOT = Path(__file__).parent
BUDGETS_FILE = ROOT / "nbs" / "budgets.csv"
OVER_BUDGET_FACTOR = 1.5


def read_budgets(path=BUDGETS_FILE, column="budget_s") -> dict:
    """`notebook file name -> seconds` from the one table of budgets: `budget_s`, what a notebook takes today (the
    regression guard fails a notebook over 1.5x it), or `target_s`, what it should take (the chapter's goal)."""
    if not Path(path).exists(): return {}
    with open(path, newline="") as f:
        return {r["notebook"]: float(r[column]) for r in csv.DictReader(f) if r.get("notebook") and r.get(column)}


def pytest_xdist_auto_num_workers(config):
    "`-n auto` = the cores this process may use (`taskset -c 0 make test` runs one worker)."
    try: return len(os.sched_getaffinity(0))
    except AttributeError: return os.cpu_count() or 1


def _sort_longest_first(items):
    "Notebooks with the largest budgets first (they set the run's length), then the rest in collection order."
    budgets = read_budgets()
    rank = {p: -budgets.get(Path(p).name, 0.0) for p in {str(it.path) for it in items} if p.endswith(".ipynb")}
    items.sort(key=lambda it: rank.get(str(it.path), 0.0))  # stable: cells keep their order


class _NotebookClock:
    "Adds up each notebook's seconds (kernel start + every cell) from the test reports, on the controlling process."
    def __init__(self): self.seconds, self.failed = defaultdict(float), set()

    def pytest_runtest_logreport(self, report):
        path = report.nodeid.split("::")[0]
        if not path.endswith(".ipynb"): return
        self.seconds[path] += report.duration
        if report.failed: self.failed.add(path)

    def rows(self):
        budgets, targets = read_budgets(), read_budgets(column="target_s")
        for path, secs in sorted(self.seconds.items()):
            budget, target = budgets.get(Path(path).name), targets.get(Path(path).name)
            status = ("no budget" if budget is None else
                      "OVER 1.5x" if secs > OVER_BUDGET_FACTOR * budget else "over" if secs > budget else
                      "ok, over target" if target is not None and secs > target else "ok")
            yield path, secs, budget, status, target

    def pytest_terminal_summary(self, terminalreporter):
        rows = list(self.rows())
        if not rows: return
        tr = terminalreporter
        tr.section("notebook seconds against budgets (nbs/budgets.csv)")
        tr.write_line(f"{'notebook':40s} {'seconds':>8s} {'budget':>7s} {'target':>7s}  status")
        for path, secs, budget, status, target in rows:
            fmt = lambda v: '-' if v is None else f'{v:.0f}'
            tr.write_line(f"{path:40s} {secs:8.1f} {fmt(budget):>7s} {fmt(target):>7s}  {status}")
        tr.write_line(f"{'total (cpu-seconds of notebooks)':40s} {sum(r[1] for r in rows):8.1f}")

    def pytest_sessionfinish(self, session, exitstatus):
        over = [r for r in self.rows() if r[3] == "OVER 1.5x"]
        if over and exitstatus == 0:
            print("\nerror: " + ", ".join(f"{p} took {s:.0f} s (budget {b:.0f} s)" for p, s, b, *_ in over) +
                  f": more than {OVER_BUDGET_FACTOR}x the budget in nbs/budgets.csv. Make the notebook cheaper "
                  "(cache, fewer epochs, smaller subsets) or, with a reason in review, raise its budget.")
            session.exitstatus = 1


# --- notebook kernels ---------------------------------------------------------------------------------------------
@contextmanager
def kernel_start_lock(run_id=None):
    "Held while one notebook kernel starts; shared by the xdist workers of one test run (a lock file, Unix only)."
    run_id = run_id or os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run_id is None or fcntl is None:  # one process, or no flock: nothing to serialise
        yield
        return
    with open(Path(tempfile.gettempdir()) / f"tltutor-kernel-start-{run_id}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try: yield
        finally: fcntl.flock(f, fcntl.LOCK_UN)


def start_kernels_safely(start, retries: int = 1):
    """Wrap nbval's kernel start (`nbval.plugin.RunningKernel`): kernels start one at a time across workers, and a
    kernel that does not answer (`RuntimeError`: "Kernel didn't respond", "Kernel died") is replaced `retries` times
    before the error reaches the notebook. nbval shuts the unanswering kernel down before it raises."""
    if getattr(start, "tltutor_safe", False): return start
    def start_kernel(*args, **kwargs):
        for attempt in range(retries + 1):
            try:
                with kernel_start_lock(): return start(*args, **kwargs)
            except RuntimeError as e:
                if attempt == retries: raise
                warnings.warn(f"a notebook kernel did not start ({e}); starting a new one")
    start_kernel.tltutor_safe = True
    return start_kernel


def pytest_configure(config):
    if config.pluginmanager.hasplugin("nbval"):
        import nbval.plugin
        nbval.plugin.RunningKernel = start_kernels_safely(nbval.plugin.RunningKernel)
    if not hasattr(config, "workerinput"):  # the controlling process (or a run without xdist)
        config.pluginmanager.register(_NotebookClock(), "tltutor-notebook-clock")
