"""The board's run-directory reader and server: run states from files, malformed metrics lines become
notes, and no request reaches a path outside the output root."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from board_helpers import write_run_config
from petformers.board import runs
from petformers.monitor.state import STATE_FILE, RunState, write_state


def make_run(path: Path, records=(), state: dict | None = None, summary: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "resolved_config.yaml").write_text("seed: 1\noptimizer:\n  learning_rate: 0.001\n", encoding="utf-8")
    if records:
        (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    if state is not None:
        write_state(path, state)
    if summary is not None:
        (path / "run_summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return path


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---- states -------------------------------------------------------------------------------------

def test_states_come_from_the_run_files(tmp_path):
    host = socket.gethostname()
    alive = make_run(tmp_path / "alive", state={"state": "running", "pid": os.getpid(), "host": host})
    killed = make_run(tmp_path / "killed", state={"state": "running", "pid": dead_pid(), "host": host})
    elsewhere = make_run(tmp_path / "elsewhere", state={"state": "running", "pid": dead_pid(), "host": "other-node"})
    done = make_run(tmp_path / "done", state={"state": "finished"})
    stopped = make_run(tmp_path / "stopped", state={"state": "stopped", "reason": "stopped by SIGTERM"})
    crashed = make_run(tmp_path / "crashed", state={"state": "crashed", "reason": "TrainingError: loss is nan"})
    assert runs.run_state(alive) == ("running", "")
    state, reason = runs.run_state(killed)
    assert state == "crashed" and "ended without recording an end" in reason
    assert runs.run_state(elsewhere)[0] == "running"  # another host's pid cannot be checked from here
    assert runs.run_state(done) == ("finished", "")
    assert runs.run_state(stopped) == ("stopped", "stopped by SIGTERM")
    assert runs.run_state(crashed) == ("crashed", "TrainingError: loss is nan")


def test_runs_without_a_state_file_are_judged_by_summary_and_freshness(tmp_path):
    finished = make_run(tmp_path / "old_finished", [{"step": 1, "loss": 2.0}], summary={"stopped": False})
    stopped = make_run(tmp_path / "old_stopped", [{"step": 1, "loss": 2.0}], summary={"stopped": True})
    fresh = make_run(tmp_path / "fresh", [{"step": 1, "loss": 2.0}])
    stale = make_run(tmp_path / "stale", [{"step": 1, "loss": 2.0}])
    old = time.time() - runs.STALE_SECONDS - 5
    os.utime(stale / "metrics.jsonl", (old, old))
    assert runs.run_state(finished)[0] == "finished"
    assert runs.run_state(stopped)[0] == "stopped"
    assert runs.run_state(fresh)[0] == "running"
    assert runs.run_state(stale)[0] == "crashed"


def test_run_state_writer_records_how_the_run_ended(tmp_path):
    with RunState(tmp_path / "ok", "finetune") as st:
        assert json.loads((tmp_path / "ok" / STATE_FILE).read_text())["state"] == "running"
        st.ended({"stopped": False})
    with RunState(tmp_path / "stop", "finetune") as st:
        st.ended({"stopped": True, "signal": "SIGTERM"})
    with pytest.raises(RuntimeError):
        with RunState(tmp_path / "boom", "finetune"):
            raise RuntimeError("out of cheese\nsecond line")
    with RunState(tmp_path / "rank1", "finetune", enabled=False):
        pass
    assert runs.run_state(tmp_path / "ok") == ("finished", "")
    assert runs.run_state(tmp_path / "stop") == ("stopped", "stopped by SIGTERM")
    assert runs.run_state(tmp_path / "boom") == ("crashed", "second line")
    assert not (tmp_path / "rank1").exists()


def test_a_run_killed_mid_training_reads_as_crashed(tmp_path, tiny_model_dir):
    out = tmp_path / "root" / "killed"
    cfg = write_run_config(tmp_path / "c.yaml", tiny_model_dir, tmp_path, out, max_steps=400)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "petformers", "run", "--config", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size > 0):
            assert proc.poll() is None and time.time() < deadline, "the run ended before writing metrics"
            time.sleep(0.05)
        assert runs.run_state(out)[0] == "running"
    finally:
        proc.kill()
        proc.wait()
    state, reason = runs.run_state(out)
    assert state == "crashed" and str(proc.pid) in reason


# ---- metrics ------------------------------------------------------------------------------------

def test_malformed_metrics_lines_become_notes_and_the_rest_is_read(tmp_path):
    run = make_run(tmp_path / "r")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": \n[1, 2]\n'
                                       '\xff\n{"step": 3, "loss": NaN}\n{"step": 4, "loss": 2.5}\n{"step": 5, "lo',
                                       encoding="latin-1")
    chunk = runs.read_metrics_since(run)
    assert [r["step"] for r in chunk.records] == [1, 3, 4]
    assert chunk.records[1]["loss"] is None  # NaN is not JSON a browser can parse
    assert len(chunk.errors) == 3
    assert chunk.errors[0].startswith("metrics.jsonl:2: not valid JSON")
    assert chunk.errors[1].startswith("metrics.jsonl:3: expected a JSON object, got list")
    assert chunk.errors[2].startswith("metrics.jsonl:4: not valid JSON")
    # the cut-off last line is left for the next read while the run writes; reported once it has ended
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write('ss": 2.0}\n')
    more = runs.read_metrics_since(run, chunk.offset, chunk.line)
    assert [r["step"] for r in more.records] == [5] and more.line == 7 and not more.errors
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2', encoding="utf-8")
    final = runs.read_metrics_since(run, final=True)
    assert [r["step"] for r in final.records] == [1]
    assert final.errors == ["metrics.jsonl:2: cut off (the run ended while writing it)"]


def test_reading_in_pieces_gives_the_same_records_as_reading_at_once(tmp_path):
    run = make_run(tmp_path / "r")
    lines = [json.dumps({"step": i, "loss": 1.0 / i}) + "\n" for i in range(1, 40)]
    text = "".join(lines)
    path = run / "metrics.jsonl"
    path.write_text("", encoding="utf-8")
    got, offset, line = [], 0, 0
    for cut in range(0, len(text), 37):  # appends that end mid-line
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(text[cut:cut + 37])
        chunk = runs.read_metrics_since(run, offset, line)
        got += chunk.records
        offset, line = chunk.offset, chunk.line
    assert got == [json.loads(x) for x in lines]


def test_config_diff_names_changed_and_missing_keys(tmp_path):
    rows = runs.config_diff({"a": {"seed": 1, "output_dir": "x", "optimizer": {"learning_rate": 1e-3, "type": "AdamW"}},
                             "b": {"seed": 1, "output_dir": "y", "optimizer": {"learning_rate": 2e-3, "type": "AdamW"},
                                   "packing": True}})
    assert [r["key"] for r in rows] == ["optimizer.learning_rate", "packing"]
    assert rows[0]["values"] == {"a": 1e-3, "b": 2e-3}
    assert rows[1]["missing"] == ["a"]


# ---- confinement ----------------------------------------------------------------------------------

def test_paths_stay_inside_the_output_root(tmp_path):
    root = tmp_path / "root"
    make_run(root / "group" / "a", [{"step": 1, "loss": 1.0}])
    make_run(tmp_path / "outside", [{"step": 1, "loss": 1.0}])
    (root / "link_out").symlink_to(tmp_path / "outside")
    (root / "group" / "a" / "leak.txt").symlink_to(tmp_path / "outside" / "resolved_config.yaml")
    (root / "not_a_run").mkdir()
    assert runs.find_runs(root) == ["group/a"]  # the symlink out of the root is not followed
    assert runs.confined(root, "group/a/metrics.jsonl") == (root / "group/a/metrics.jsonl").resolve()
    for bad in ("../outside", "group/../../outside", "/etc/passwd", "link_out", "group/a/leak.txt", "", "a\x00b",
                "group/missing"):
        with pytest.raises(runs.OutsideRoot):
            runs.confined(root, bad)
    for bad in ("not_a_run", "../outside", "link_out", "group"):
        with pytest.raises(runs.OutsideRoot):
            runs.run_path(root, bad)


@pytest.fixture()
def board_url(tmp_path):
    uvicorn = pytest.importorskip("uvicorn", reason="the board extra (starlette, uvicorn) is not installed")
    from petformers.board.app import create_app

    root = tmp_path / "root"
    make_run(root / "good", [{"step": 1, "loss": 2.0}], state={"state": "finished"})
    make_run(root / "broken", state={"state": "finished"})
    (root / "broken" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 2, "loss": 1.5}\n')
    (root / "broken" / "run_summary.json").write_text("{truncated")
    make_run(tmp_path / "secret")
    (tmp_path / "secret" / "key.txt").write_text("do not serve")
    (root / "good" / "escape").symlink_to(tmp_path / "secret")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = uvicorn.Server(uvicorn.Config(create_app(root, ["127.0.0.1"]), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline, "board did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def _get(url: str, headers: dict | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_server_refuses_every_path_outside_the_root(board_url):
    q = urllib.parse.quote
    status, body = _get(f"{board_url}/api/file?run=good&path=metrics.jsonl")
    assert status == 200 and b'"loss": 2.0' in body
    for url in (f"/api/file?run=good&path={q('../../secret/key.txt')}", f"/api/file?run=good&path={q('/etc/passwd')}",
                "/api/file?run=good&path=escape/key.txt", f"/api/file?run={q('../secret')}&path=key.txt",
                f"/api/run?name={q('../secret')}", f"/api/run?name={q(str(Path('/etc')))}",
                f"/api/diff?run=good&run={q('../secret')}", f"/static/{q('../app.py')}", "/static/runs.py",
                f"/static/..%2F..%2Fcli%2Fboard.py"):
        status, body = _get(board_url + url)
        assert status == 404, (url, status)
        assert b"do not serve" not in body and b"import" not in body, url
    status, _ = _get(f"{board_url}/api/runs", {"Host": "attacker.example"})
    assert status == 400  # a loopback board answers only to its own host name (DNS rebinding)


def test_server_shows_a_broken_run_with_notes(board_url):
    status, body = _get(f"{board_url}/api/runs")
    assert status == 200
    assert [r["name"] for r in json.loads(body)["runs"]] == ["broken", "good"]
    status, body = _get(f"{board_url}/api/run?name=broken")
    detail = json.loads(body)
    assert status == 200 and detail["state"] == "finished"
    assert any(n.startswith("run_summary.json: invalid JSON") for n in detail["notes"])
    with urllib.request.urlopen(f"{board_url}/api/events?run=broken", timeout=10) as r:
        events, buffer = {}, b""
        while "metrics" not in events:
            buffer += r.read1(65536)
            for block in buffer.split(b"\n\n")[:-1]:
                lines = dict(line.split(": ", 1) for line in block.decode().splitlines() if ": " in line)
                if "event" in lines:
                    events[lines["event"]] = json.loads(lines["data"])
    metrics = events["metrics"]
    assert [r["step"] for r in metrics["records"]] == [1, 2]
    assert metrics["errors"] == ["metrics.jsonl:2: not valid JSON (Expecting value); line skipped"]


# ---- command line -------------------------------------------------------------------------------

def test_board_cli_refuses_a_missing_root(tmp_path, capsys):
    from petformers.cli.main import main

    assert main(["board", "--output_root", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"petformers: error: --output_root {tmp_path / 'nope'}: no such directory"]


def test_board_cli_warns_when_exposed(tmp_path):
    pytest.importorskip("uvicorn", reason="the board extra (starlette, uvicorn) is not installed")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "petformers", "board", "--output_root", str(tmp_path), "--port",
                             str(port), "--host"], stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stderr.readline(), proc.stderr.readline()]
    finally:
        proc.terminate()
        proc.wait(10)
    assert lines[0].startswith("petformers: WARNING: the board listens on 0.0.0.0"), lines
    assert "there is no login" in lines[0]
    assert lines[1].startswith(f"petformers board: http://0.0.0.0:{port}/"), lines
