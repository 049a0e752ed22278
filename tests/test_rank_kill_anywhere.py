"""Kill anywhere, lose nothing, across ranks: 2-rank torchrun jobs (CPU, gloo, a tiny real model) lose one
rank to kill -9 at seeded moments (after a step, inside a checkpoint write, during evaluation); every
resume starts from the newest complete checkpoint (asserted from its log line); with the newest
checkpoint damaged the resume falls back to the previous one with one warning; resumed on 2 ranks the
adapter equals an uninterrupted 2-rank run's byte for byte, resumed on 1 rank a one-process run's within
1e-5. `make test` runs one FSDP2 campaign of 2 kills; the `faults` marker a DDP one of 4, and `make faults`
(scripts/fault_campaign.py --rank_seeds) more seeds of both."""

from __future__ import annotations

import json

import pytest

from tests.test_kill_anywhere import load_campaign


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dir, alpaca_demo):
    faults = load_campaign()
    tmp = tmp_path_factory.mktemp("rank_campaign")
    records = [r for r in json.loads(alpaca_demo.read_text(encoding="utf-8"))
               if len(r["instruction"]) + len(r["input"]) + len(r["output"]) < 200]
    train, evaluation = tmp / "train.json", tmp / "eval.json"
    train.write_text(json.dumps(records[:16]))
    evaluation.write_text(json.dumps(records[16:16 + faults.EVAL_ROWS]))
    return faults, tiny_model_dir, train, evaluation


def check(record: dict, kills: int):
    assert len(record["kills"]) == kills and record["bitwise_equal"]
    assert record["one_rank_max_difference"] <= 1e-5
    assert record["fell_back_from_damaged"] is not None  # the damaged newest checkpoint was exercised
    assert [k["resumed_from"] for k in record["kills"][1:]] == [k["checkpoint_after"] for k in record["kills"][:-1]]


def test_fsdp_one_rank_killed_twice_then_the_same_adapter(inputs, tmp_path):
    faults, model, train, evaluation = inputs
    # Seed 2: rank 0 dies inside the step-2 checkpoint write, after its rename and before pruning; then after
    # step 5 (step 4 saved); step 4 is damaged, so both final resumes must fall back to step 2.
    record = faults.rank_campaign(2, 2, "fsdp", tmp_path, model, train, evaluation)
    assert [(k["at"], k["rank"]) for k in record["kills"]] == [("checkpoint:7", 0), ("step:3", 0)]
    assert [k["checkpoint_after"] for k in record["kills"]] == [2, 4]
    assert record["fell_back_from_damaged"] == "step_00000004" and record["final_resume"] == 2
    check(record, 2)


@pytest.mark.faults
def test_ddp_one_rank_killed_four_times_then_the_same_adapter(inputs, tmp_path):
    faults, model, train, evaluation = inputs
    record = faults.rank_campaign(1, 4, "ddp", tmp_path, model, train, evaluation)
    assert {k["at"].split(":")[0] for k in record["kills"]} == {"step", "checkpoint", "eval"}
    check(record, 4)
