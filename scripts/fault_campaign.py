"""Kill anywhere, lose nothing: a seeded kill -9 campaign against `petformers run` on a tiny model.

One uninterrupted run gives the reference adapter. Then the same run is started again and again, each
process SIGKILLed at a moment drawn from the seed (PETFORMERS_KILL_AT, petformers/faults.py): after
an optimizer step, between the files of a checkpoint write or around its rename, or before an
evaluation batch. Each restart uses --resume_training and must say it resumed from the newest
checkpoint on disk that holds a manifest (read here from the directory, not from petformers); after
the last kill a run without faults must finish with an adapter bitwise equal to the reference.

The same for 2-rank torchrun jobs (DDP and FSDP2, `rank_campaign`): one rank, drawn from the seed, is
killed at each moment; every resume on 2 ranks is checked the same way; before the last resume the newest
checkpoint gets a flipped bit (the resume falls back to the previous one with one warning line); the run
resumed on 2 ranks ends bitwise equal to an uninterrupted 2-rank run, a copy resumed on 1 rank equal to a
one-process run within 1e-5 (another reduction order).

`make faults` runs more seeds; tests/test_kill_anywhere.py runs one seed of 20 kills and
tests/test_rank_kill_anywhere.py one FSDP2 seed in `make test`.
    python scripts/fault_campaign.py --seeds 5 --kills 20 --rank_seeds 1 --rank_kills 4 --json faults.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WINDOW = 4  # a kill lands within this many steps of a resumed process
SAVE_EVERY, EVAL_EVERY, EVAL_ROWS, BATCH = 2, 4, 4, 2
CHECKPOINT_POINTS = 8  # kill_point("checkpoint") calls in one save, before any pruning
KINDS = ("step", "checkpoint", "eval")


def write_config(workdir: Path, model_dir: Path, train: Path, evaluation: Path, steps: int,
                 dropout: float = 0.1) -> Path:
    cfg = {"seed": 11, "load_checkpoint": str(model_dir), "run_mode": "finetune", "max_steps": steps,
           "runner_config": {"epochs": 1000, "batch_size": BATCH, "gradient_accumulation_steps": 1},
           "optimizer": {"type": "AdamW", "learning_rate": 3e-3, "weight_decay": 0.01},
           "lr_schedule": {"type": "CosineWithWarmUpLR", "learning_rate": 3e-3, "warmup_steps": 2},
           "train_dataset": {"data_loader": {"dataset_dir": str(train), "shuffle": True}},
           "eval_dataset": {"data_loader": {"dataset_dir": str(evaluation)}},
           "do_eval": True, "eval_step_interval": EVAL_EVERY,
           "callbacks": [{"type": "CheckpointMonitor", "save_checkpoint_steps": SAVE_EVERY,
                          "keep_checkpoint_max": 2}],
           "model": {"model_config": {"seq_length": 128, "compute_dtype": "float32", "pet_config": {
               "pet_type": "lora", "lora_rank": 2, "lora_alpha": 4, "lora_dropout": dropout,  # dropout: RNG restored
               "target_modules": ".*wq|.*wv"}}},
           "template": "chat"}
    path = workdir / "run.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def newest_complete_step(out: Path) -> int:
    """The step of the newest checkpoint directory that holds its manifest (written last), else 0."""
    steps = [int(p.name.split("_")[1]) for p in (out / "checkpoint").glob("step_*") if (p / "manifest.json").is_file()]
    return max(steps, default=0)


def draw_kill(rng: random.Random, kind: str) -> str:
    if kind == "step":
        return f"step:{rng.randint(1, WINDOW)}"
    if kind == "checkpoint":
        return f"checkpoint:{rng.randint(1, CHECKPOINT_POINTS * (WINDOW // SAVE_EVERY))}"
    return f"eval:{rng.randint(1, (EVAL_ROWS // BATCH) * (WINDOW // EVAL_EVERY))}"


def run_cli(config: Path, out: Path, kill: str | None, resume: bool, timeout: float,
            fork: bool = False) -> subprocess.CompletedProcess:
    """`petformers run` in a new process: a fresh interpreter (`python -m petformers`), or with `fork` a
    child of this process, which has torch and petformers imported already (the same code and the
    same SIGKILL, without paying the interpreter start-up 20 times)."""
    argv = ["run", "--config", str(config), "--output_dir", str(out)] + (["--resume_training", "True"] if resume
                                                                         else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("PETFORMERS_KILL_AT", None)
    if kill:
        env["PETFORMERS_KILL_AT"] = kill
    if fork:
        return _run_forked(argv, env, timeout)
    return subprocess.run([sys.executable, "-m", "petformers", *argv], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _run_forked(argv: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    from petformers.cli.main import main

    with tempfile.TemporaryFile("w+", encoding="utf-8") as log:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: run, then leave without running the parent's exit handlers
            code = 70
            try:
                os.environ.clear()
                os.environ.update(env)
                from petformers import faults

                faults._passed.clear()
                os.dup2(log.fileno(), 1)
                os.dup2(log.fileno(), 2)
                sys.stdout = sys.stderr = open(log.fileno(), "w", buffering=1, closefd=False)
                code = main(argv)
            except BaseException:  # noqa: BLE001 - reported through the log, like an uncaught error
                import traceback

                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code if isinstance(code, int) else 1)
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                raise AssertionError(f"petformers {' '.join(argv)} did not end within {timeout} s")
            time.sleep(0.02)
        log.seek(0)
        output = log.read()
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    return subprocess.CompletedProcess(argv, code, "", output)


def resumed_step(stderr: str) -> int:
    found = re.findall(r"resumed from \S+ \(step (\d+) of", stderr)
    return int(found[-1]) if found else 0


def campaign(seed: int, kills: int, workdir: Path, model_dir: Path, train: Path, evaluation: Path,
             timeout: float = 300, fork: bool = False) -> dict:
    """One seeded campaign; raises AssertionError on the first broken promise, returns its record."""
    steps = WINDOW * (kills + 2)  # room for every kill to land before the run ends
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_config(workdir, model_dir, train, evaluation, steps)
    rng = random.Random(seed)
    started = time.monotonic()
    reference = workdir / "reference"
    done = run_cli(config, reference, None, False, timeout, fork)
    assert done.returncode == 0, done.stderr[-3000:]
    out = workdir / "killed"
    kinds = list(KINDS) + [rng.choice(KINDS) for _ in range(kills - len(KINDS))]
    rng.shuffle(kinds)
    record = {"seed": seed, "steps": steps, "kills": [], "final_resume": None,
              "processes": "forked" if fork else "fresh interpreters"}
    for i, kind in enumerate(kinds[:kills]):
        kill = draw_kill(rng, kind)
        expected = newest_complete_step(out)
        done = run_cli(config, out, kill, resume=i > 0, timeout=timeout, fork=fork)
        assert done.returncode == -9, f"kill {i + 1} ({kill}) did not happen: exit {done.returncode}\n" \
                                      f"{done.stderr[-3000:]}"
        got = resumed_step(done.stderr) if i > 0 else 0
        assert got == expected, f"kill {i + 1} ({kill}): resumed from step {got}, newest complete is {expected}"
        record["kills"].append({"at": kill, "resumed_from": got, "checkpoint_after": newest_complete_step(out)})
    expected = newest_complete_step(out)
    done = run_cli(config, out, None, resume=True, timeout=timeout, fork=fork)
    assert done.returncode == 0, done.stderr[-3000:]
    got = resumed_step(done.stderr)
    assert got == expected, f"final run: resumed from step {got}, newest complete is {expected}"
    record["final_resume"] = got
    from safetensors.torch import load_file

    a = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() and a[k].dtype == b[k].dtype for k in a), \
        "final adapter differs from the uninterrupted run's"
    assert sorted(a) and (reference / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (out / "adapter" / "adapter_model.safetensors").read_bytes(), "adapter files differ byte for byte"
    leftovers = [p.name for p in (out / "checkpoint").iterdir() if p.name.startswith(".")]
    assert not leftovers, f"partial checkpoint directories left behind: {leftovers}"
    record["bitwise_equal"] = True
    record["seconds"] = round(time.monotonic() - started, 1)
    return record


# ---- 2 ranks (torchrun, CPU, gloo): one rank killed, resumed on 2 and on 1 ----------------------------------

STRATEGIES = ("ddp", "fsdp")
# kill_point("checkpoint") calls per save on each rank: DDP's rank 0 writes the whole checkpoint alone;
# under FSDP every rank writes its DCP shard (one point) and rank 0 then commits (the other points).
RANK_CHECKPOINT_POINTS = {("ddp", 0): CHECKPOINT_POINTS, ("ddp", 1): 0,
                          ("fsdp", 0): CHECKPOINT_POINTS - 1, ("fsdp", 1): 1}
RANK_BATCH = BATCH // 2  # per rank: the global batch stays BATCH, as in the one-process run


def draw_rank_kill(rng: random.Random, kind: str, strategy: str) -> tuple[str, int]:
    """A kill moment and the rank that dies there (only rank 0 writes a DDP checkpoint)."""
    rank = rng.randint(0, 1)
    if kind == "checkpoint" and not RANK_CHECKPOINT_POINTS[(strategy, rank)]:
        rank = 0
    if kind == "step":
        return f"step:{rng.randint(1, WINDOW)}", rank
    if kind == "checkpoint":
        return f"checkpoint:{rng.randint(1, RANK_CHECKPOINT_POINTS[(strategy, rank)] * (WINDOW // SAVE_EVERY))}", rank
    per_rank = EVAL_ROWS // 2 // RANK_BATCH
    return f"eval:{rng.randint(1, per_rank * (WINDOW // EVAL_EVERY))}", rank


def run_torchrun(config: Path, out: Path, strategy: str, kill: str | None, rank: int, resume: bool,
                 timeout: float) -> subprocess.CompletedProcess:
    """`petformers run` on 2 CPU ranks under torchrun; with `kill`, rank `rank` SIGKILLs itself there."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "petformers", "run", "--config", str(config), "--output_dir", str(out), "--use_parallel", "True",
           f"runner_config.batch_size={RANK_BATCH}", f"parallel_strategy={strategy}"]
    cmd += ["--resume_training", "True", "--auto_trans_ckpt", "True"] if resume else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for name in ("PETFORMERS_KILL_AT", "PETFORMERS_KILL_RANK"):
        env.pop(name, None)
    if kill:
        env |= {"PETFORMERS_KILL_AT": kill, "PETFORMERS_KILL_RANK": str(rank)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def damage_newest(out: Path) -> tuple[str, str] | None:
    """Flip one bit in the newest complete checkpoint's largest file when an older complete one exists
    to fall back to; (its directory name, the older one's) or None."""
    complete = sorted((p for p in (out / "checkpoint").glob("step_*") if (p / "manifest.json").is_file()),
                      key=lambda p: int(p.name.split("_")[1]))
    if len(complete) < 2:
        return None
    newest = complete[-1]
    victim = max((p for p in newest.rglob("*") if p.is_file() and p.name != "manifest.json"),
                 key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    return newest.name, complete[-2].name


def _one_warning(output: str, damaged: str, fallback: str):
    warnings = [line for line in output.splitlines() if "warning" in line and damaged in line]
    assert len(warnings) == 1 and fallback in warnings[0], f"expected one warning naming {damaged}: {warnings}"


def _same_adapter(a_dir: Path, b_dir: Path, tol: float) -> float:
    """The largest difference between two runs' adapters; AssertionError beyond `tol` (0: byte for byte)."""
    from safetensors.torch import load_file

    a = load_file(str(a_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(b_dir / "adapter" / "adapter_model.safetensors"))
    assert a and a.keys() == b.keys(), f"{a_dir} and {b_dir} hold different adapter tensors"
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    if tol == 0:
        assert (a_dir / "adapter" / "adapter_model.safetensors").read_bytes() == \
            (b_dir / "adapter" / "adapter_model.safetensors").read_bytes(), \
            f"final adapter differs from the uninterrupted run's (largest difference {worst})"
    assert worst <= tol, f"final adapter differs from the uninterrupted run's by {worst} (> {tol})"
    return worst


def rank_campaign(seed: int, kills: int, strategy: str, workdir: Path, model_dir: Path, train: Path,
                  evaluation: Path, timeout: float = 300, single_reference: Path | None = None,
                  tolerance: float = 1e-5) -> dict:
    """One seeded 2-rank campaign for `strategy` (ddp or fsdp): an uninterrupted 2-rank run, then `kills`
    runs each losing one rank (drawn from the seed) to SIGKILL at a seeded moment, each resumed on 2 ranks
    from the newest complete checkpoint (asserted from the log); before the last run the newest checkpoint
    gets a flipped bit (resume falls back to the previous one with one warning line). The 2-rank result must
    equal the uninterrupted 2-rank run's byte for byte; a copy resumed on 1 rank must equal the one-process
    run (`single_reference`, run here when None) within `tolerance` (another reduction order)."""
    steps = WINDOW * (kills + 2)
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_config(workdir, model_dir, train, evaluation, steps, dropout=0.0)  # one RNG stream per rank
    rng = random.Random(f"{strategy}:{seed}")
    started = time.monotonic()
    reference = workdir / "reference"
    done = run_torchrun(config, reference, strategy, None, 0, False, timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    if single_reference is None:
        single_reference = workdir / "single"
        done = run_cli(config, single_reference, None, False, timeout)
        assert done.returncode == 0, done.stderr[-3000:]
    out = workdir / "killed"
    kinds = list(KINDS)[:kills] + [rng.choice(KINDS) for _ in range(kills - len(KINDS))]
    rng.shuffle(kinds)
    record = {"seed": seed, "strategy": strategy, "ranks": 2, "steps": steps, "kills": []}
    for i, kind in enumerate(kinds):
        kill, rank = draw_rank_kill(rng, kind, strategy)
        expected = newest_complete_step(out)
        done = run_torchrun(config, out, strategy, kill, rank, resume=i > 0, timeout=timeout)
        assert done.returncode != 0 and "Signal 9 (SIGKILL)" in done.stderr, \
            f"kill {i + 1} ({kill} on rank {rank}) did not happen: exit {done.returncode}\n{done.stderr[-3000:]}"
        got = resumed_step(done.stderr) if i > 0 else 0
        assert got == expected, f"kill {i + 1} ({kill} on rank {rank}): resumed from step {got}, " \
                                f"newest complete is {expected}"
        record["kills"].append({"at": kill, "rank": rank, "resumed_from": got,
                                "checkpoint_after": newest_complete_step(out)})
    damaged = damage_newest(out)
    one = workdir / "one_rank"
    shutil.copytree(out, one)
    expected = newest_complete_step(out) if damaged is None else int(damaged[1].split("_")[1])
    for where, result in (("2 ranks", None), ("1 rank", None)):
        if where == "2 ranks":
            result = run_torchrun(config, out, strategy, None, 0, True, timeout)
        else:
            result = run_cli(config, one, None, True, timeout)
        assert result.returncode == 0, f"final run on {where}: {result.stderr[-3000:]}"
        got = resumed_step(result.stderr)
        assert got == expected, f"final run on {where}: resumed from step {got}, expected {expected}"
        if damaged is not None:
            _one_warning(result.stderr, *damaged)
    record["final_resume"] = expected
    record["fell_back_from_damaged"] = damaged[0] if damaged else None
    _same_adapter(reference, out, 0)
    record["bitwise_equal"] = True
    record["one_rank_max_difference"] = _same_adapter(single_reference, one, tolerance)
    leftovers = [p.name for d in (out, one) for p in (d / "checkpoint").iterdir() if p.name.startswith(".")]
    assert not leftovers, f"partial checkpoint directories left behind: {leftovers}"
    record["seconds"] = round(time.monotonic() - started, 1)
    return record


def _tiny_inputs(workdir: Path) -> tuple[Path, Path, Path]:
    """The tiny model and data the test suite uses (tests/conftest.py), built here for a standalone run."""
    sys.path.insert(0, str(ROOT / "tests"))
    import conftest

    tok = conftest.write_tiny_tokenizer(workdir / "tokenizer")
    model = conftest.write_tiny_llama(workdir / "model", tokenizer_dir=tok)
    records = [r for r in json.loads(conftest.ALPACA_DEMO.read_text(encoding="utf-8"))
               if len(r["instruction"]) + len(r["input"]) + len(r["output"]) < 200]
    train, evaluation = workdir / "train.json", workdir / "eval.json"
    train.write_text(json.dumps(records[:16]), encoding="utf-8")
    evaluation.write_text(json.dumps(records[16:16 + EVAL_ROWS]), encoding="utf-8")
    return model, train, evaluation


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3, help="campaigns, seeds 0..N-1")
    p.add_argument("--first_seed", type=int, default=0)
    p.add_argument("--kills", type=int, default=20, help="kill -9 moments per campaign")
    p.add_argument("--rank_seeds", type=int, default=0, help="2-rank campaigns per strategy (DDP, FSDP2)")
    p.add_argument("--rank_kills", type=int, default=4, help="kill -9 moments (one rank each) per 2-rank campaign")
    p.add_argument("--json", default=None, help="write the records here")
    p.add_argument("--fork", action="store_true", help="fork each run from this process (faster start-up)")
    opts = p.parse_args(argv)
    records, failures, rank_records = [], [], []
    with tempfile.TemporaryDirectory(prefix="petformers_faults_") as tmp:
        model, train, evaluation = _tiny_inputs(Path(tmp))
        for seed in range(opts.first_seed, opts.first_seed + opts.seeds):
            try:
                record = campaign(seed, opts.kills, Path(tmp) / f"seed{seed}", model, train, evaluation,
                                  fork=opts.fork)
            except AssertionError as e:
                failures.append({"seed": seed, "error": str(e)[:2000]})
                print(f"seed {seed}: FAILED: {str(e).splitlines()[0]}", flush=True)
                continue
            records.append(record)
            print(f"seed {seed}: {len(record['kills'])} kills {_kinds(record)}, every resume at the newest "
                  f"complete checkpoint, final adapter bitwise equal ({record['seconds']} s)", flush=True)
        single = None
        for seed in range(opts.first_seed, opts.first_seed + opts.rank_seeds):
            for strategy in STRATEGIES:
                try:
                    record = rank_campaign(seed, opts.rank_kills, strategy, Path(tmp) / f"{strategy}{seed}", model,
                                           train, evaluation, single_reference=single)
                except AssertionError as e:
                    failures.append({"seed": seed, "strategy": strategy, "error": str(e)[:2000]})
                    print(f"{strategy} seed {seed}: FAILED: {str(e).splitlines()[0]}", flush=True)
                    continue
                single = single or Path(tmp) / f"{strategy}{seed}" / "single"
                rank_records.append(record)
                print(f"{strategy} seed {seed}: {len(record['kills'])} kills of one rank {_kinds(record)}, every "
                      f"resume at the newest complete checkpoint, damaged newest -> one warning, final adapter "
                      f"bitwise equal on 2 ranks, within {record['one_rank_max_difference']:.1e} on 1 rank "
                      f"({record['seconds']} s)", flush=True)
    total = sum(len(r["kills"]) for r in records)
    rank_total = sum(len(r["kills"]) for r in rank_records)
    print(f"{len(records) + len(rank_records)}/{len(records) + len(rank_records) + len(failures)} campaigns held; "
          f"{total} kills of one process, {rank_total} kills of one rank of two")
    if opts.json:
        Path(opts.json).write_text(json.dumps({"campaigns": records, "rank_campaigns": rank_records,
                                               "failures": failures}, indent=1))
    return 0 if not failures else 1


def _kinds(record: dict) -> dict:
    kinds = {}
    for k in record["kills"]:
        kinds[k["at"].split(":")[0]] = kinds.get(k["at"].split(":")[0], 0) + 1
    return kinds


if __name__ == "__main__":
    raise SystemExit(main())
