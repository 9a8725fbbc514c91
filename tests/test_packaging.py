"""sdv2_lab as users get it: a built wheel (the configs inside) installed into a fresh venv outside the repo and run
from another folder; an import that leaves the caller's environment alone; dependencies that are used; CI pinned
by a constraints file; the README's commands and ignored folders."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "sdv2_lab", "conf")


def clean_env(**extra) -> dict:
    """The environment of a user's shell: no PYTHONPATH into this checkout, no config folder override."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SDV2_CONF_DIR")}
    return {**env, **extra}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of this source tree, built from a copy (an in-tree build would leave build/ and egg-info here),
    without build isolation or an index: this venv's setuptools, no download."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if not (ROOT / name).exists():
            continue
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    # a user's machine settings (git-ignored) must never ship in a wheel built from their checkout
    (src / "conf" / "local" / "default.yaml").write_text("# @package _global_\nseed: 7\n")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "-q", "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    (whl,) = (tmp / "dist").glob("sdv2_lab-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv under /tmp with the wheel pip-installed (--no-deps); torch and the other dependencies come
    from this venv's site-packages through a .pth line (nothing downloaded, nothing upgraded)."""
    root = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    purelib = Path(subprocess.run([str(root / "bin" / "python"), "-c", "import sysconfig; "
                                   "print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True,
                                  check=True).stdout.strip())
    # A bare path line: this venv's packages, without running its .pth files (its editable install of sdv2_lab).
    (purelib / "_borrowed_packages.pth").write_text(str(Path(sysconfig.get_paths()["purelib"]).resolve()) + "\n")
    res = subprocess.run([str(root / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index",
                          "--ignore-installed", "-q", "--disable-pip-version-check", str(wheel)],
                         capture_output=True, text=True, timeout=300, env=clean_env())
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return root


def test_wheel_ships_the_configs_inside_the_package(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    ours = {p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*.yaml")} - {"local/default.yaml"}
    assert {f"sdv2_lab/conf/{name}" for name in ours} <= names
    assert "sdv2_lab/conf/local/default.yaml" not in names
    assert {"sdv2_lab/conf/config.yaml", "sdv2_lab/conf/eval.yaml", "sdv2_lab/conf/trainer/default.yaml",
            "sdv2_lab/serve/static/index.html"} <= names
    assert not any(n.startswith(("conf/", "tests/")) for n in names)   # nothing at the top level but the package


def test_installed_wheel_runs_every_front_end_from_outside_the_repo(venv, tmp_path):
    """sdv2 run, sdv2 eval, sdv2 serve --help and the seed's API, from a folder outside the checkout, with the
    package (and its configs) from the venv."""
    user = tmp_path / "elsewhere"
    user.mkdir()
    py, sdv2 = str(venv / "bin" / "python"), str(venv / "bin" / "sdv2")

    def run(*cmd, timeout=600):
        res = subprocess.run(cmd, cwd=user, env=clean_env(), capture_output=True, text=True, timeout=timeout)
        assert res.returncode == 0, f"{cmd}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
        return res

    where = run(py, "-c", "import sdv2_lab, sdv2_lab.configs as c; print(sdv2_lab.__file__); print(c.CONF_DIR)")
    package, conf = where.stdout.split()
    assert package.startswith(str(venv)) and Path(conf) == Path(package).parent / "conf"
    out = run(sdv2, "run", "input.frames=9", "height=32", "width=48", "hydra.run.dir=run")
    assert "wrote" in out.stdout and (user / "run" / "output.mp4").is_file()
    run(sdv2, "eval", "debug=default", "height=32", "width=48", "hydra.run.dir=eval")
    assert (user / "eval" / "summary.json").is_file() and (user / "eval" / "results.csv").is_file()
    helped = run(sdv2, "serve", "--help", timeout=300)
    assert "serve.port" in helped.stdout or "port:" in helped.stdout
    api = run(py, "-c", "from sdv2_lab import StreamDiffusionV2Pipeline, run_video_to_video\n"
                        "from sdv2_lab.io.synthetic import write_synthetic_clip\n"
                        "write_synthetic_clip('in.mp4', frames=9, height=32, width=48)\n"
                        "print(run_video_to_video(video_path='in.mp4', prompt='a watercolor', output_path='out.mp4', "
                        "height=32, width=48, device='cpu'))")
    assert (user / "out.mp4").is_file(), api.stdout


def test_importing_the_package_leaves_the_environment_alone(tmp_path):
    """A notebook that imports sdv2_lab keeps its hub access and its W&B mode. (Lightning's own import sets two
    torch variables: the dependencies are imported first, so that only what sdv2_lab does is compared.)"""
    code = ("import os, json, torch, hydra, lightning.pytorch, transformers, pandas; before = dict(os.environ)\n"
            "import sdv2_lab, sdv2_lab.api, sdv2_lab.cli, sdv2_lab.v2v, sdv2_lab.eval.cli, sdv2_lab.eval.module\n"
            "from sdv2_lab import StreamDiffusionV2Pipeline\n"
            "after = dict(os.environ)\n"
            "print(json.dumps({k: [before.get(k), after.get(k)] for k in set(before) | set(after) "
            "if before.get(k) != after.get(k)}))")
    env = {k: v for k, v in clean_env(PYTHONPATH=str(ROOT)).items()
           if not k.startswith(("HF_", "TRANSFORMERS_", "WANDB_"))}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "{}"


def test_entry_points_set_offline_defaults_and_keep_the_users(monkeypatch):
    from sdv2_lab.entry import offline_defaults
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")     # the user's own choice
    offline_defaults()
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "0"
    assert "WANDB_MODE" not in __import__("sdv2_lab.entry", fromlist=["OFFLINE"]).OFFLINE


# ---------------------------------------------------------------------------------------------- dependencies
IMPORT_NAMES = {"hydra-core": "hydra", "pyyaml": "yaml", "opencv-python-headless": "cv2", "pillow": "PIL"}


def requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~\[ ;]", spec, maxsplit=1)[0].strip().lower()


def test_every_declared_dependency_is_imported():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    code = "\n".join(p.read_text() for p in (ROOT / "sdv2_lab").rglob("*.py"))
    for dep in map(requirement_name, deps):
        module = IMPORT_NAMES.get(dep, dep.replace("-", "_"))
        assert re.search(rf"^\s*(import|from) {re.escape(module)}\b", code, re.M), f"{dep} is declared, never imported"


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / ".ci" / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version and not re.search(r"[<>~!,; ]", version), f"not an exact pin: {line!r}"
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_ci_installs_with_exact_constraints_matching_the_venv():
    install = (ROOT / ".ci" / "install").read_text()
    assert re.search(r'^export PIP_CONSTRAINT="\$PWD/\.ci/constraints\.txt"$', install, re.M)
    pins = constraints()
    pin = dict(p.split("==") for p in re.search(r'^PIN="([^"]+)"', install, re.M).group(1).split())
    assert pins["torch"] == pin["torch"] and pins["torchvision"] == pin["torchvision"]
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert {requirement_name(d) for d in deps} <= set(pins), "every dependency is pinned"
    from importlib.metadata import PackageNotFoundError, version
    drift = {}
    for name, pinned in pins.items():
        try:
            have = version(name)
        except PackageNotFoundError:
            continue
        if have.split("+")[0] != pinned.split("+")[0]:
            drift[name] = (pinned, have)
    assert not drift, f"the venv differs from .ci/constraints.txt (pinned, installed): {drift}"


# ---------------------------------------------------------------------------------------------- the README
def test_readme_commands_work_in_a_fresh_shell():
    """`sdv2 ...` is "command not found" until .venv is activated: the block says to, before its first sdv2."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Using it", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [ln.strip() for ln in block.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    first_sdv2 = next(i for i, ln in enumerate(lines) if re.match(r"(\.venv/bin/)?sdv2\b", ln))
    assert lines[first_sdv2].startswith(".venv/bin/sdv2") or any(
        ln.startswith("source .venv/bin/activate") for ln in lines[:first_sdv2])


def test_the_readme_tiny_folder_and_local_settings_are_git_ignored():
    assert "tiny/ckpts" in (ROOT / "README.md").read_text()     # the README writes tiny/ in the checkout
    for path in ("tiny/ckpts/taew2_1.pth", "conf/local/default.yaml"):
        res = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, capture_output=True, timeout=60)
        assert res.returncode == 0, f"{path} is not git-ignored"
