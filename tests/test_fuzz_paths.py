"""Hostile paths read from files never leave their directory (hypothesis, 200+ generated names each):
'..' chains, absolute paths, symlinks out of the directory and symlink loops, NUL bytes, names longer
than the file system allows, the directory itself. petformers/safepath.py refuses each in one line
naming the file and key; the readers that take names from files (a safetensors index's weight_map,
MindRecord shard_addresses, a checkpoint's manifest) go through it. Paths the user types (--output_dir,
export --output) are the user's choice, relative to the working directory, and are not confined."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from petformers.errors import PetformersError
from petformers.safepath import inside

CASES = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SEGMENTS = ["..", ".", "", "a", "b.safetensors", "out", "loop", "deep", "~", "\x00", "x" * 300, "é", "\\..",
            "a\\..\\..", " ", "..."]
hostile = st.one_of(
    st.builds(lambda parts, absolute: ("/" if absolute else "") + "/".join(parts),
              st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=6), st.booleans()),
    st.text(max_size=30), st.just("x/" * 2100), st.sampled_from(["/etc/passwd", "../../etc/passwd", "out/passwd"]))


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """base/ holding a file, a subdirectory, a symlink out (to the parent) and a symlink loop."""
    top = tmp_path_factory.mktemp("paths")
    base = top / "base"
    (base / "deep").mkdir(parents=True)
    (base / "a").write_text("inside")
    (top / "secret").write_text("outside")
    os.symlink(top, base / "out")
    os.symlink(base / "loop", base / "loop")
    return base


def refused_in_one_line(e: PetformersError, source, key: str):
    assert "\n" not in str(e) and str(source) in str(e) and key in str(e), str(e)
    assert len(str(e)) < 600, len(str(e))


@CASES
@given(name=hostile)
def test_safepath_keeps_every_name_inside(tree, name):
    try:
        path = inside(tree, name, "src.json", "key")
    except PetformersError as e:
        refused_in_one_line(e, "src.json", "key")
        return
    resolved = path.resolve()
    assert tree.resolve() in resolved.parents, (name, resolved)


@CASES
@given(name=hostile)
def test_index_weight_map_names(tmp_path_factory, tiny_model_dir, tree, name):
    from petformers.checkpoint import hf

    model = tmp_path_factory.mktemp("ix") / "model"
    shutil.copytree(tree, model, symlinks=True)
    shutil.copy(tiny_model_dir / "model.safetensors", model / "model.safetensors")
    index = model / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": name}}))
    try:
        files = hf.weight_files(model)
    except PetformersError as e:
        refused_in_one_line(e, index, "weight_map")
        return
    assert all(model.resolve() in f.resolve().parents for f in files), files


@CASES
@given(name=hostile)
def test_checkpoint_manifest_entries(tmp_path_factory, tree, name):
    from petformers.checkpoint.training import damage

    step = tmp_path_factory.mktemp("ck") / "step_00000002"
    shutil.copytree(tree, step, symlinks=True)
    (step / "manifest.json").write_text(json.dumps({"files": {name: {"bytes": 7, "sha256": "0" * 64}}}))
    problem = damage(step)  # a checkpoint naming files outside itself is damaged, never read through
    assert problem is not None and "\n" not in problem and len(problem) < 600, problem
    try:
        inside(step, name, "manifest.json", "entry")
    except PetformersError:
        assert "leaves the checkpoint" in problem, problem


def test_the_directory_itself_and_symlink_loops_are_refused(tree):
    for name, why in ((".", "the directory itself"), ("deep/..", "the directory itself"), ("loop", "loop"),
                      ("out/secret", "leaves"), ("x" * 300, "longer than a file name")):
        with pytest.raises(PetformersError) as e:
            inside(tree, name, "src.json", "key")
        assert why in str(e.value) or "cannot be resolved" in str(e.value), (name, str(e.value))
