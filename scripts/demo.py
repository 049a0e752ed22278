"""`make demo`: a real LoRA fine-tune of SmolLM2-135M-Instruct on this CPU, with before/after evaluation.

Every step is the public CLI a user would type:
  1. demo/make_data.py                      the project's own data (train + held-out split)
  2. petformers download smollm2-135m-instruct
  3. petformers run --run_mode eval         the base model on the held-out split (exact match, ROUGE-L, loss)
  4. petformers run                         LoRA fine-tune with configs/smollm2/lora_smollm2_135m.yaml
  5. petformers run --run_mode eval --adapter   the tuned model on the same held-out split
  6. petformers report                      report.html with curves, metrics and generations
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/smollm2/lora_smollm2_135m.yaml"
RUN = ROOT / "output" / "smollm2_lora"
EVAL_DATA = "demo/data/eval.json"
TARGET_BEFORE, TARGET_AFTER = 0.10, 0.80


def sh(*args: str):
    cmd = [sys.executable, "-m", "petformers", *args] if args[0] != "python" else [sys.executable, *args[1:]]
    print(f"\n$ {' '.join(['petformers', *args] if args[0] != 'python' else ['python', *args[1:]])}", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def evaluate(tag: str, adapter: str | None) -> dict:
    out = RUN / f"eval_{tag}"
    args = ["run", "--config", CONFIG, "--run_mode", "eval", "--eval_dataset_dir", EVAL_DATA,
            "--output_dir", str(out), "eval_generation=True", "max_new_tokens=48"]
    if adapter:
        args += ["--adapter", adapter]
    sh(*args)
    results = json.loads((out / "eval_results.json").read_text(encoding="utf-8"))
    shutil.copy(out / "eval_results.json", RUN / f"eval_{tag}.json")
    return results


def main() -> int:
    started = time.time()
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 2))
    if RUN.exists():
        shutil.rmtree(RUN)
    RUN.mkdir(parents=True)
    sh("python", "demo/make_data.py")
    sh("download", "smollm2-135m-instruct")
    before = evaluate("before", None)
    sh("run", "--config", CONFIG, "--output_dir", str(RUN))
    after = evaluate("after", str(RUN / "adapter"))
    sh("report", "--output_dir", str(RUN))

    b, a = before["metrics"], after["metrics"]
    print("\n" + "=" * 78)
    print("SmolLM2-135M-Instruct + LoRA on Quillfeather order tickets (held-out split, "
          f"{len(after.get('samples', []))} notes)")
    print(f"{'metric':<22}{'before':>12}{'after':>12}")
    for key, label in (("exact_match", "exact match"), ("rouge_l", "ROUGE-L"), ("bleu4", "BLEU-4"),
                       ("eval_loss", "eval loss"), ("eval_ppl", "perplexity")):
        if key in b and key in a:
            fmt = "{:>12.1%}" if key in ("exact_match", "rouge_l", "bleu4") else "{:>12.3f}"
            print(f"{label:<22}{fmt.format(b[key])}{fmt.format(a[key])}")
    print("\nGenerations (held-out):")
    for sb, sa in list(zip(before.get("samples", []), after.get("samples", [])))[:3]:
        print(f"  note:      {sb['prompt'][-110:]}")
        print(f"  reference: {sb['reference']}")
        print(f"  before:    {sb['prediction'][:110]!r}")
        print(f"  after:     {sa['prediction'][:110]!r}\n")
    print("Artefacts:")
    for name, path in (("PEFT adapter", RUN / "adapter"), ("merged model", RUN / "merged"),
                       ("loss curve", RUN / "loss.png"), ("metrics", RUN / "metrics.jsonl"),
                       ("report", RUN / "report.html"), ("run summary", RUN / "run_summary.json")):
        print(f"  {name:<14}{path.relative_to(ROOT)}{'' if path.exists() else '  (missing!)'}")
    elapsed = time.time() - started
    ok = b.get("exact_match", 1) < TARGET_BEFORE and a.get("exact_match", 0) > TARGET_AFTER
    print(f"\nTotal time: {elapsed / 60:.1f} min. Targets (exact match before < {TARGET_BEFORE:.0%}, "
          f"after > {TARGET_AFTER:.0%}): {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
