"""experiments/gpu.sh: one entry point over experiments/gpu_suites/*.sh; every script the docs name exists."""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "experiments" / "gpu.sh"
SUITES = sorted((ROOT / "experiments" / "gpu_suites").glob("*.sh"))


def gpu(*args):
    return subprocess.run(["bash", str(GPU), *args], capture_output=True, text=True, cwd=ROOT, timeout=30)


def test_list_names_every_suite_with_its_description():
    out = gpu("--list")
    assert out.returncode == 0
    listed = {line.split()[0]: line.split(None, 1)[1] for line in out.stdout.splitlines()}
    assert sorted(listed) == sorted(s.stem for s in SUITES) and len(SUITES) >= 8
    assert all(desc.strip() for desc in listed.values())


def test_an_unknown_suite_fails_with_a_clear_message():
    out = gpu("no-such-suite")
    assert out.returncode == 2
    assert "unknown suite 'no-such-suite'" in out.stderr and "engine" in out.stderr   # and the known ones


@pytest.mark.parametrize("suite", SUITES, ids=lambda p: p.stem)
def test_every_suite_parses(suite):
    assert subprocess.run(["bash", "-n", str(suite)], capture_output=True).returncode == 0
    assert suite.read_text().startswith("# ")                     # its one-line description


def test_every_experiments_script_the_docs_name_exists():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    named = {m for d in docs for m in re.findall(r"experiments/[\w./-]+\.(?:sh|py)", d.read_text())}
    assert named
    assert [n for n in sorted(named) if not (ROOT / n).exists()] == []
    for d in docs:   # `gpu.sh SUITE`: the suite exists
        for suite in re.findall(r"experiments/gpu\.sh ([\w-]+)", d.read_text()):
            assert (ROOT / "experiments" / "gpu_suites" / f"{suite}.sh").exists(), (d.name, suite)
