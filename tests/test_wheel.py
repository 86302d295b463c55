"""The wheel holds everything the installed CLI needs: every module, the presets, the `pretrain` entry point.

Built offline from a copy of the source (pip wheel --no-deps --no-build-isolation --no-index: setuptools
comes from the test environment), then imported from the unpacked wheel, not from the checkout."""

from __future__ import annotations

import configparser
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if importlib.util.find_spec("pip") is None or importlib.util.find_spec("setuptools") is None:
        pytest.skip("building the wheel needs pip and setuptools in the test environment")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy: the build writes build/ and *.egg-info next to the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "pretrain", src / "pretrain",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = {**os.environ, "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", "-w", str(tmp / "dist"), str(src)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (whl,) = (tmp / "dist").glob("pretrain-*.whl")
    return whl


def test_wheel_holds_every_module_and_preset(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = sorted((REPO / "pretrain" / "presets").glob("*.yaml"))
    assert presets
    for p in presets:
        assert f"pretrain/presets/{p.name}" in names
    for p in (REPO / "pretrain").rglob("*.py"):
        if "__pycache__" not in p.parts:
            assert p.relative_to(REPO).as_posix() in names
    assert not any(n.startswith(("tests/", "bench/", "configs/")) for n in names)
    (entry,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    points = configparser.ConfigParser()
    points.read_string(zipfile.ZipFile(wheel).read(entry).decode())
    assert points["console_scripts"]["pretrain"].strip() == "pretrain.cli:main"


def test_the_unpacked_wheel_runs_the_cli(wheel, tmp_path):
    """`pretrain presets` and `pretrain train NAME --print-config` from the wheel's files alone (in a folder
    with no checkout around: the presets come from the package, not from configs/)."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import pretrain; "
            "from pretrain.cli import main; print(json.dumps({'file': pretrain.__file__})); "
            "assert main(['presets', '--json']) == 0; "
            "assert main(['train', 'tiny', '--print-config', '--json']) == 0")
    proc = subprocess.run([sys.executable, "-c", code, str(site)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    where, listed, config = (json.loads(line) for line in proc.stdout.splitlines())
    assert Path(where["file"]).is_relative_to(site)
    shipped = {p.stem for p in (REPO / "pretrain" / "presets").glob("*.yaml")}
    assert {p["name"] for p in listed["presets"]} == shipped
    assert all(Path(p["path"]).is_relative_to(site) for p in listed["presets"])
    assert config["model"]["n_layer"] == 2 and config["data"]["seq_len"] == 64  # tiny.yaml's values


def test_the_readme_install_section_names_every_extra(wheel):
    """README's Install section and the package's extras agree: each extra it names exists, and each extra a
    user may want (all but dev) is named there."""
    names = zipfile.ZipFile(wheel).namelist()
    (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    metadata = zipfile.ZipFile(wheel).read(meta).decode()
    extras = set(re.findall(r"^Provides-Extra: (\S+)$", metadata, flags=re.M))
    assert {"hf", "lora"} <= extras
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Install\n", 1)[1].split("\n## ", 1)[0]
    named = {e for group in re.findall(r"(?:pretrain|\.)\[([\w,-]+)\]", section) for e in group.split(",")}
    assert named <= extras, f"the Install section names extras the package lacks: {sorted(named - extras)}"
    missing = extras - {"dev"} - named
    assert not missing, f"extras missing from README's Install section: {sorted(missing)}"
    assert "download.pytorch.org/whl/cpu" in section and "pip wheel" in section
