"""`petformers board` and report.html in headless Chromium (Debian's chromium + chromium-driver, via Selenium):
a live run is listed running, its loss curve gains points without a reload, it ends finished; a second
run overlays its curves with a config diff; the chat panel streams tokens from the run's adapter; a run with
a malformed metrics line shows a note; long unbroken answers wrap at 1280 px, in the board and in
report.html. Set PETFORMERS_SCREENSHOTS=DIR to keep the screenshots (docs/board_*.png come from here)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from board_helpers import write_run_config

pytest.importorskip("uvicorn", reason="the board extra (starlette, uvicorn) is not installed")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (dev extra) is not installed")

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="headless Chromium missing: `make browser` installs chromium and chromium-driver")
TICKET = "ORDER=2612|QTY=7|ITEM=satchel|" * 10  # one long unbroken answer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
                "--window-size=1280,1400"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(driver, script: str, timeout: float = 60, what: str = ""):
    """Poll a JavaScript expression until it is truthy; return its value."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = driver.execute_script("return " + script)
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what or script}")


def screenshot(driver, name: str, tmp_path: Path):
    folder = Path(os.environ.get("PETFORMERS_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(folder / name))


def no_sideways_scroll(driver) -> tuple:
    """(page overflows, cells whose content overflows them) in the current page."""
    return driver.execute_script(
        "return [document.documentElement.scrollWidth > document.documentElement.clientWidth,"
        " [...document.querySelectorAll('td,th')].filter(c => c.scrollWidth > c.clientWidth + 1)"
        "   .map(c => c.textContent.slice(0, 40))]")


def run_cli(cfg: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "petformers", "run", "--config", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_board_watches_compares_and_chats(tmp_path, tiny_model_dir, browser):
    root = tmp_path / "output"
    # A finished run to compare with (other learning rate, eval every 5 steps) and its before/after evals.
    from petformers.cli.main import main

    assert main(["run", "--config", str(write_run_config(tmp_path / "a.yaml", tiny_model_dir, tmp_path,
                                                         root / "lr_1e-2", max_steps=20, lr=1e-2, eval_every=5))]) == 0
    sample = {"prompt": "Customer 7 ordered a satchel and wrote a long note", "reference": TICKET}
    for name, prediction in (("eval_before.json", "I cannot help with that."), ("eval_after.json", TICKET)):
        (root / "lr_1e-2" / name).write_text(json.dumps({"metrics": {"exact_match": float(prediction == TICKET)},
                                                         "samples": [dict(sample, prediction=prediction)]}))
    broken = root / "broken"
    broken.mkdir()
    (broken / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss"\n{"step": 3, "loss": 2.0}\n')
    (broken / "run_state.json").write_text(json.dumps({"state": "finished"}))

    port = free_port()
    board = subprocess.Popen([sys.executable, "-m", "petformers", "board", "--output_root", str(root),
                              "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    live = run_cli(write_run_config(tmp_path / "b.yaml", tiny_model_dir, tmp_path, root / "lr_5e-3",
                                    max_steps=200, lr=5e-3, eval_every=50))
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert board.poll() is None, board.stderr.read()
                assert time.time() < deadline, "the board did not start listening"
                time.sleep(0.1)
        browser.get(f"http://127.0.0.1:{port}/")
        browser.execute_script("window.__not_reloaded = true")
        li = 'document.querySelector(\'#runs li[data-run="lr_5e-3"]\')'
        wait_for(browser, f"{li} && {li}.dataset.state === 'running'", 60, "the live run listed as running")
        browser.execute_script(f"{li}.click()")
        points = lambda: int(browser.execute_script(  # noqa: E731
            "return document.getElementById('loss-chart').dataset.points"))
        wait_for(browser, "Number(document.getElementById('loss-chart').dataset.points) >= 1", 60, "first loss point")
        seen = points()
        assert live.poll() is None, "the run ended before the curve could be watched"
        wait_for(browser, f"Number(document.getElementById('loss-chart').dataset.points) > {seen}", 60,
                 "the loss curve gaining points")
        assert points() > seen
        assert browser.execute_script("return document.getElementById('run-state').textContent") in ("running",
                                                                                                       "finished")
        wait_for(browser, f"{li}.dataset.state === 'finished'", 120, "the run listed as finished")
        assert live.wait(30) == 0, live.stderr.read()[-2000:]
        wait_for(browser, "document.getElementById('run-state').textContent === 'finished'", 10)
        wait_for(browser, "Number(document.getElementById('loss-chart').dataset.points) === 200", 10, "all 200 steps")
        wait_for(browser, "document.querySelector('#artefact-table') && "
                          "document.querySelector('#artefact-table').textContent.includes('adapter/')", 10)
        assert browser.execute_script("return window.__not_reloaded") is True
        screenshot(browser, "board_run.png", tmp_path)

        # Overlay a second run: both runs' train and eval curves, and the config keys that differ.
        browser.execute_script('document.querySelector(\'input.compare[data-run="lr_1e-2"]\').click()')
        wait_for(browser, "Number(document.getElementById('loss-chart').dataset.series) === 4", 20,
                 "train and eval curves of both runs")
        wait_for(browser, "document.getElementById('diff-table')", 20, "the config diff")
        diff = browser.execute_script("return document.getElementById('diff-table').innerText")
        assert "lr_schedule.learning_rate" in diff and "max_steps" in diff and "output_dir" not in diff
        browser.execute_script("window.scrollTo(0, 0)")
        screenshot(browser, "board_compare.png", tmp_path)

        # The run with before/after evals: metrics, samples; a long ticket wraps inside its cell.
        browser.execute_script('document.querySelector(\'#runs li[data-run="lr_1e-2"]\').click()')
        wait_for(browser, "document.getElementById('eval-table')", 20, "the before/after table")
        assert "exact_match" in browser.execute_script("return document.getElementById('eval-table').innerText")
        assert no_sideways_scroll(browser) == [False, []]

        # Chat with the run's adapter: pieces arrive one by one.
        browser.find_element("id", "chat-input").send_keys("Customer 3 ordered 2 quartzs.")
        browser.execute_script("document.getElementById('chat-max').value = 24")
        browser.find_element("id", "chat-send").click()
        wait_for(browser, "document.querySelector('.msg.assistant.done')", 60, "the streamed answer")
        pieces = browser.execute_script("return Number(document.querySelector('.msg.assistant .text').dataset.pieces)")
        answer = browser.execute_script("return document.querySelector('.msg.assistant .text').textContent")
        assert pieces >= 2 and answer, (pieces, answer)
        assert "adapter" in browser.find_element("id", "chat-info").text

        # A malformed metrics line: the run is listed and shows a note; the board keeps serving.
        browser.execute_script('document.querySelector(\'input.compare[data-run="lr_1e-2"]\').click()')  # untick
        browser.execute_script('document.querySelector(\'#runs li[data-run="broken"]\').click()')
        wait_for(browser, "document.getElementById('notes').innerText.includes('metrics.jsonl:2')", 20,
                 "the malformed-line note")
        wait_for(browser, "Number(document.getElementById('loss-chart').dataset.points) === 2", 10)
        assert board.poll() is None
    finally:
        for proc in (live, board):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)


def test_report_html_wraps_long_answers_at_1280px(tmp_path, browser):
    from petformers.report import write_report

    run = tmp_path / "run"
    run.mkdir()
    samples = [{"prompt": "Write the ticket for: " + "a customer wrote a long note " * 4, "reference": TICKET,
                "prediction": TICKET + "X"}]
    for name in ("eval_before.json", "eval_after.json"):
        (run / name).write_text(json.dumps({"metrics": {"exact_match": 0.0}, "samples": samples}))
    (run / "run_summary.json").write_text(json.dumps({"adapter_path": "/very/long/" + "directory_" * 40}))
    browser.get(write_report(run).as_uri())
    wait_for(browser, "document.readyState === 'complete'", 10)
    assert browser.execute_script("return window.innerWidth") == 1280
    assert no_sideways_scroll(browser) == [False, []]
