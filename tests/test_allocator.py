"""`python -m petformers` runs on jemalloc where it is installed (petformers/allocator.py), says so in its
run summary, and PETFORMERS_ALLOCATOR chooses; a library caller's process is never replaced."""

import json
import os
import subprocess
import sys

import pytest

from petformers import allocator
from tests.test_train import alpaca_small, write_config  # noqa: F401  (alpaca_small: a fixture)

needs_jemalloc = pytest.mark.skipif(allocator.find_jemalloc() is None,
                                    reason="libjemalloc2 is not installed (make test installs it where it can)")


def _run(tmp_path, tiny_model_dir, alpaca_small, name, **env):
    out = tmp_path / name
    cfg = write_config(tmp_path / f"{name}.yaml", tiny_model_dir, alpaca_small, out,
                       **{"runner_config.epochs": 1, "callbacks": []})
    proc = subprocess.run([sys.executable, "-m", "petformers", "run", "--config", str(cfg), "max_steps=1"],
                          env=dict(os.environ, OMP_NUM_THREADS="1", **env), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((out / "run_summary.json").read_text()), proc.stderr


@needs_jemalloc
def test_a_run_runs_on_jemalloc_and_glibc_on_request(tmp_path, tiny_model_dir, alpaca_small):
    summary, log = _run(tmp_path, tiny_model_dir, alpaca_small, "auto")
    assert summary["allocator"] == "jemalloc"
    assert "(jemalloc malloc)" in log
    summary, _ = _run(tmp_path, tiny_model_dir, alpaca_small, "glibc", PETFORMERS_ALLOCATOR="glibc")
    assert summary["allocator"] == "glibc"


def test_the_test_process_is_not_replaced():
    """The library (and so this pytest process) runs on what it started with."""
    assert allocator.current() == ("jemalloc" if "libjemalloc" in os.environ.get("LD_PRELOAD", "") else "glibc")


def test_bad_or_missing_choice_is_one_line_exit_2(monkeypatch, capsys):
    monkeypatch.setenv("PETFORMERS_ALLOCATOR", "tcmalloc")
    with pytest.raises(SystemExit) as e:
        allocator.reexec_under_jemalloc(["--version"])
    assert e.value.code == 2
    assert "PETFORMERS_ALLOCATOR='tcmalloc'" in capsys.readouterr().err
    monkeypatch.setenv("PETFORMERS_ALLOCATOR", "jemalloc")
    monkeypatch.setattr(allocator, "_CANDIDATES", ("/nonexistent/libjemalloc.so.2",))
    with pytest.raises(SystemExit) as e:
        allocator.reexec_under_jemalloc(["--version"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "libjemalloc2" in err
    # auto without jemalloc: runs on as it is (no exit, no exec)
    monkeypatch.setenv("PETFORMERS_ALLOCATOR", "auto")
    assert allocator.reexec_under_jemalloc(["--version"]) is None
