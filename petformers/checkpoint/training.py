"""Training checkpoints: one directory per step under `output_dir/checkpoint/`, written atomically.

A checkpoint is written into a hidden temp directory, every file fsynced, then renamed to
`step_00000042/`; `manifest.json` (size and sha256 of every other file) is the last file written
inside it. So a kill at any moment leaves either the previous checkpoints only, or a complete new one,
and resume checks the manifest before loading: a checkpoint truncated or altered afterwards (a bad
disk, a bit flip, a copy cut short) is skipped with one warning for the newest intact one, never loaded.

Contents: `trainable.safetensors` (adapter / trainable tensors, petformers names), `adapter/` (the
same in PEFT format, usable with `--adapter`), `optimizer.pt` (torch.load(weights_only=True)-safe),
`rng_state.pt`, `trainer_state.json` (step, epoch, data position, losses), `model_config.json` and
`pet_config.json` (what `petformers ckpt consolidate` rebuilds the adapter with). Under FSDP the
trainable tensors and optimizer state are a sharded `dcp/` directory instead, written by every rank
(petformers.checkpoint.dcp); either layout resumes at any world size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file

from petformers.atomic import fsync_dir, synced
from petformers.checkpoint.hf import save_safetensors_atomic
from petformers.errors import CheckpointError
from petformers.faults import kill_point
from petformers.safepath import inside, shown

STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"

log = logging.getLogger("petformers")


def _torch_save(obj, file: Path):
    with synced(file, "wb") as fh:
        torch.save(obj, fh)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": json.dumps(random.getstate()),
             "numpy": json.dumps(np.random.get_state(), default=lambda a: a.tolist())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, gauss = json.loads(state["numpy"])
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, step: int, trainable: dict[str, torch.Tensor], optimizer_state: dict,
                    trainer_state: dict, keep_max: int, write_adapter=None, extra_json: dict | None = None) -> Path:
    """Write `root/step_{step}` atomically and prune to the newest `keep_max` checkpoints."""
    tmp = begin_checkpoint(root, step)
    kill_point("checkpoint")
    with _no_partial(root, tmp, step):
        save_safetensors_atomic({k: v.detach().cpu() for k, v in trainable.items()}, tmp / "trainable.safetensors")
        kill_point("checkpoint")
        _torch_save(optimizer_state, tmp / "optimizer.pt")
    return commit_checkpoint(root, tmp, step, trainer_state, keep_max, write_adapter, extra_json)


@contextlib.contextmanager
def _no_partial(root: Path, tmp: Path, step: int):
    """A write that fails (disk full, quota, file size limit, I/O error) removes the temp directory and
    becomes one line naming the file; the previous checkpoints are untouched."""
    try:
        yield
    except Exception as e:
        if not isinstance(e, OSError) and type(e).__name__ != "SafetensorError":
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(root)
        where = getattr(e, "filename", None) or tmp
        why = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise CheckpointError(f"{where}: cannot write the step {step} checkpoint ({why}); nothing partial was "
                              f"left; the last checkpoint, {previous[-1] if previous else 'none'}, is intact: free "
                              "space and resume with --resume_training True") from None


def begin_checkpoint(root: Path, step: int) -> Path:
    """A fresh hidden temp directory to write step `step` into (sharded checkpoints: every rank writes there)."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp_step_{step:08d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def commit_checkpoint(root: Path, tmp: Path, step: int, trainer_state: dict, keep_max: int, write_adapter=None,
                      extra_json: dict | None = None) -> Path:
    """Add rng state, adapter, `extra_json` files ({name: object}), trainer_state.json and the manifest
    (last) to `tmp`, fsync, rename it to `root/step_{step}` and prune to the newest `keep_max` checkpoints."""
    final = root / f"step_{step:08d}"
    with _no_partial(root, tmp, step):
        _write_rest(tmp, step, trainer_state, write_adapter, extra_json)
        _put_in_place(tmp, final)
        fsync_dir(root)
    kill_point("checkpoint")
    for old in list_checkpoints(root)[:-keep_max] if keep_max > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
        kill_point("checkpoint")
    return final


def _write_rest(tmp: Path, step: int, trainer_state: dict, write_adapter, extra_json: dict | None):
    kill_point("checkpoint")
    _torch_save(rng_state(), tmp / "rng_state.pt")
    kill_point("checkpoint")
    if write_adapter is not None:
        write_adapter(tmp / "adapter")
    kill_point("checkpoint")
    for name, obj in (extra_json or {}).items():
        with synced(tmp / name) as fh:
            json.dump(obj, fh, indent=2)
    with synced(tmp / STATE_FILE) as fh:
        json.dump(trainer_state | {"step": step}, fh, indent=2)
    kill_point("checkpoint")
    write_manifest(tmp)
    kill_point("checkpoint")
    for directory in [p for p in tmp.rglob("*") if p.is_dir()] + [tmp]:
        fsync_dir(directory)


def remove_partial(root: Path) -> list[Path]:
    """Delete what interrupted saves left in `root` (temp and set-aside directories); returns them.
    Called once at the start of a run, before any save, by the one process that commits checkpoints."""
    left = [p for p in root.glob(".tmp_step_*") if p.is_dir()] + [p for p in root.glob(".old_step_*") if p.is_dir()] \
        if root.exists() else []
    for path in left:
        shutil.rmtree(path, ignore_errors=True)
    return left


def _put_in_place(tmp: Path, final: Path):
    """Rename the finished `tmp` to `final`. When `final` exists (the same step saved twice, e.g. SIGTERM
    right after a periodic save) the two directories are exchanged in one renameat2(RENAME_EXCHANGE)
    call and the old one is deleted afterwards: at no moment is there no complete `final`."""
    if not final.exists():
        os.rename(tmp, final)
        return
    if _exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the old checkpoint
        return
    # No renameat2 (not Linux): the old one is moved aside first; a kill between the two renames
    # leaves the earlier checkpoints, never a partial one.
    aside = final.with_name(f".old_{final.name}_{os.getpid()}")
    os.rename(final, aside)
    os.rename(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 with RENAME_EXCHANGE); False where unsupported."""
    import ctypes  # only this Linux-only system call needs it

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    return False


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp directories and ones without trainer_state.json are skipped)."""
    if not root.exists():
        return []
    done = [p for p in root.glob("step_*") if p.is_dir() and (p / STATE_FILE).exists()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path):
    """`manifest.json`: {relative path: {bytes, sha256}} of every file in `directory`, written last."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    with synced(directory / MANIFEST) as fh:
        json.dump({"files": entries}, fh, indent=1)


def damage(path: Path) -> str | None:
    """Why checkpoint `path` must not be loaded (missing manifest, a file missing, truncated or
    altered), or None when every file matches its manifest entry."""
    try:
        files = json.loads((path / MANIFEST).read_text(encoding="utf-8"))["files"]
        items = list(files.items())
    except FileNotFoundError:
        return f"no {MANIFEST} (the save did not finish)"
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        return f"{MANIFEST} unreadable ({type(e).__name__})"
    for name, entry in items:
        file = path / name
        try:
            size, expected = int(entry["bytes"]), str(entry["sha256"])
        except (KeyError, TypeError, ValueError):
            return f"{MANIFEST}: entry {name!r} malformed"
        try:  # a '..', an absolute path or a symlink out of the checkpoint is never read
            inside(path, name, path / MANIFEST, "entry", CheckpointError)
        except CheckpointError:
            return f"{MANIFEST}: entry {name!r:.80} leaves the checkpoint"
        if not file.is_file():
            return f"{shown(name)} is missing"
        if file.stat().st_size != size:
            return f"{shown(name)} has {file.stat().st_size} bytes, the manifest says {size} (truncated?)"
        if _sha256(file) != expected:
            return f"{shown(name)} does not match its sha256 in {MANIFEST} (corrupted)"
    return None


def latest_good_checkpoint(root: Path, warn: bool = True) -> Path | None:
    """The newest checkpoint whose files all match their manifest; newer damaged ones are named in one
    warning line. A checkpoint with no manifest at all was saved by petformers before it wrote manifests
    (a save is renamed into place only after its manifest): it is used, with a note in that line, when
    its files load. None when there is no checkpoint; CheckpointError when every one is damaged."""
    skipped = []
    for path in reversed(list_checkpoints(root)):
        problem = damage(path)
        legacy = problem is not None and problem.startswith(f"no {MANIFEST}")
        if legacy:
            why = _loads_without_manifest(path)
            problem = None if why is None else f"{problem}; {why}"
        if problem is None:
            notes = [f"{p.name} is damaged ({why})" for p, why in skipped]
            if legacy:
                notes.append(f"{path.name} has no {MANIFEST} (saved by a petformers without manifests); its files "
                             "load, so it is used without checksums")
            if notes and warn:
                log.warning("petformers: warning: %s; resuming from %s", "; ".join(notes), path)
            return path
        skipped.append((path, problem))
    if skipped:
        raise CheckpointError(f"{root}: no intact checkpoint to resume from ("
                              + "; ".join(f"{p.name}: {why}" for p, why in skipped)
                              + "); move them away to start from step 0")
    return None


def _loads_without_manifest(path: Path) -> str | None:
    """None when the files of a checkpoint without a manifest load (trainer state, rng state, and the
    trainable tensors and optimizer state, or DCP's metadata for a sharded one); else why not."""
    try:
        int(json.loads((path / STATE_FILE).read_text(encoding="utf-8"))["step"])
        torch.load(path / "rng_state.pt", map_location="cpu", weights_only=True)
        if (path / "dcp").is_dir():
            if not (path / "dcp" / ".metadata").is_file():
                return "dcp/.metadata is missing"
        else:
            load_file(str(path / "trainable.safetensors"))
            torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file makes it unusable, named in the warning
        return f"its files do not load ({type(e).__name__}: {shown(str(e).splitlines()[0] if str(e) else '')})"
    return None


class TrainingCheckpoint(NamedTuple):
    """What one checkpoint directory holds (a named tuple: it unpacks in this order)."""
    trainable: dict  # trainable tensors, petformers names
    optimizer: dict  # optimizer.state_dict()
    rng: dict  # rng_state()
    state: dict  # trainer_state.json


def load_checkpoint(path: Path) -> TrainingCheckpoint:
    """The trainable tensors, optimizer state, rng state and trainer state of one checkpoint directory."""
    try:
        trainable = load_file(str(path / "trainable.safetensors"))
        optimizer = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        rng = torch.load(path / "rng_state.pt", map_location="cpu", weights_only=True)
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except Exception as e:
        raise CheckpointError(f"{path}: cannot resume from this checkpoint ({type(e).__name__}: {e})") from None
    return TrainingCheckpoint(trainable, optimizer, rng, state)
