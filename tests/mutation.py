"""`make mutants`: apply each curated bug to a scratch copy and check that the tests catch it.

A mutant is one exact text replacement in one source file (tests/mutants.yaml) plus the fast
tests that are meant to catch it. Each mutant runs in its own copy of the working tree (so the
checkout is never modified); it is *killed* when those tests fail, *survives* when they pass.
A mutant whose text no longer occurs exactly once is *stale*: the list must follow the code.
First, every named test runs once on the unmutated tree (the *baseline*): a test that fails
anyway, or no longer exists, would "kill" mutants for nothing, so the run stops there.
Exit status 0 only when the baseline passes and every mutant is killed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
MUTANTS = Path(__file__).resolve().parent / "mutants.yaml"
COPIED = (
    "model",
    "data_pipeline",
    "trainer",
    "launch",
    "tests",
    "bench",
    "configs",
    "pyproject.toml",
)


@dataclass(frozen=True)
class Mutant:
    """One deliberate bug: replace `find` by `replace` in `file`; `tests` must then fail."""

    name: str
    file: str
    find: str
    replace: str
    tests: tuple[str, ...]


def load_mutants(path: Path = MUTANTS) -> list[Mutant]:
    """The curated list, in file order."""
    raw = yaml.safe_load(path.read_text())
    return [
        Mutant(
            name=item["name"],
            file=item["file"],
            find=item["find"],
            replace=item["replace"],
            tests=tuple(item["tests"]),
        )
        for item in raw
    ]


def scratch_copy(destination: Path) -> None:
    """Copy the sources and tests (not the venv, runs or caches) into `destination`."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "results")
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=ignore)
        elif source.is_file():
            shutil.copy2(source, destination / name)


def run_tests(copy: Path, tests: tuple[str, ...], timeout_s: float) -> tuple[int, str]:
    """(pytest exit status, its last output line) for `tests` run in `copy`; -1 on timeout."""
    env = {**os.environ, "PYTHONPATH": str(copy), "DS_ACCELERATOR": "cpu"}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
    command += ["-m", "not gpu", *tests]
    try:
        result = subprocess.run(
            command, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return -1, f"over {timeout_s:.0f} s"
    return result.returncode, (result.stdout.strip().splitlines() or ["(no output)"])[-1]


def run_baseline(mutants: list[Mutant], timeout_s: float) -> tuple[bool, str]:
    """Run every test the mutants name on the unmutated tree: a kill only means something
    when those tests pass without the bug (and exist: a renamed test is a collection error)."""
    tests = tuple(dict.fromkeys(test for mutant in mutants for test in mutant.tests))
    with tempfile.TemporaryDirectory(prefix="mutant-baseline-") as tmp:
        scratch_copy(Path(tmp))
        status, summary = run_tests(Path(tmp), tests, timeout_s)
    return status == 0, summary


def run_mutant(mutant: Mutant, timeout_s: float) -> tuple[str, float, str]:
    """(outcome, seconds, detail): outcome is killed, survived, stale, error or timeout."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
        copy = Path(tmp)
        scratch_copy(copy)
        target = copy / mutant.file
        if not target.is_file():
            return "stale", 0.0, f"{mutant.file}: no such file"
        text = target.read_text()
        occurrences = text.count(mutant.find)
        if occurrences != 1:
            return "stale", 0.0, f"{mutant.file}: the text occurs {occurrences} times"
        target.write_text(text.replace(mutant.find, mutant.replace))
        status, summary = run_tests(copy, mutant.tests, timeout_s)
        elapsed = time.perf_counter() - started
        if status == -1:
            return "timeout", elapsed, summary
        if status == 1:
            return "killed", elapsed, summary
        if status == 0:
            return "survived", elapsed, summary
        # 2-5: usage errors, collection errors, no tests: the mutant was not judged.
        return "error", elapsed, f"pytest exit {status}: {summary}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", default=None, help="mutant names to run")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant")
    parser.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the run of the named tests on the unmutated tree (done by default)",
    )
    args = parser.parse_args(argv)
    mutants = load_mutants()
    if args.only:
        unknown = set(args.only) - {m.name for m in mutants}
        if unknown:
            parser.error(f"unknown mutants: {sorted(unknown)}")
        mutants = [m for m in mutants if m.name in args.only]
    started = time.perf_counter()
    if not args.no_baseline:
        # All the named tests at once: allow them the time of several mutants.
        passed, summary = run_baseline(mutants, 3 * args.timeout)
        seconds = time.perf_counter() - started
        print(f"baseline  {seconds:6.1f}s  unmutated tree: {summary}", flush=True)
        if not passed:
            print("the tests fail (or are missing) without any mutant: fix them first")
            return 1
    outcomes: dict[str, int] = {}
    for mutant in mutants:
        outcome, seconds, detail = run_mutant(mutant, args.timeout)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        print(f"{outcome:9s} {seconds:6.1f}s  {mutant.name}: {detail}", flush=True)
    total = time.perf_counter() - started
    print(
        f"{len(mutants)} mutants in {total / 60:.1f} min: "
        + ", ".join(f"{count} {outcome}" for outcome, count in sorted(outcomes.items()))
    )
    return 0 if outcomes.get("killed", 0) == len(mutants) else 1


if __name__ == "__main__":
    sys.exit(main())
