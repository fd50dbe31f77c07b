"""Safe checkpoint writes for a training run: staging, completeness checks before resuming, full-disk errors.

A checkpoint is written into `<output_dir>/.saving-checkpoint-N/checkpoint-N` and moved to `<output_dir>/checkpoint-N`
(`publish_checkpoint`) only once every rank has finished writing, so an interrupted save never looks like a checkpoint;
`resumable_checkpoint` checks the files of the newest ones before a run resumes from them, `named_checkpoint` the one
`--resume_from_checkpoint` names (a broken one is an error, never swapped for another). A save (checkpoint or final
model) that runs out of disk space stops with a `CheckpointWriteError` naming the file, the directory, the free space
and the intact previous checkpoint. Which weight files each kind needs comes from `llava.model.checkpoint_format`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import struct
import zipfile

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from llava.model.checkpoint_format import REQUIRED_FILES, TRAINER_STATE_FILE, missing_weight_files

logger = logging.getLogger(__name__)

STAGING_PREFIX = ".saving-"  # checkpoint-N is written under <output_dir>/.saving-checkpoint-N/ and then moved up
STALE_PREFIX = ".stale-"  # an older checkpoint-N being replaced by a new save of the same step
# What PyTorch's zip writer says when a write comes up short (it does not report errno).
TORCH_SHORT_WRITE = re.compile(r"unexpected pos|iostream error|PytorchStreamWriter failed|file write failed")
# What libraries that do not raise OSError (the Rust `tokenizers`) say for ENOSPC / EDQUOT.
NO_SPACE_TEXT = re.compile(r"No space left on device|Disk quota exceeded|os error (28|122)\b")
# A failed write with less free space than this left on the filesystem is taken for a full disk.
NEARLY_FULL_BYTES = 1 << 20


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (the disk is full); the message says where and what is left intact."""


def _torch_file_problem(path: str) -> str | None:
    """What is wrong with a `torch.save` file (zip format), or None; a cut-off zip lacks its central directory."""
    size = os.path.getsize(path)
    if size == 0:
        return "is empty"
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return None  # the legacy (pickle) format: no cheap completeness check
    try:
        with zipfile.ZipFile(path) as archive:
            if any(info.header_offset + info.compress_size > size for info in archive.infolist()):
                return f"is cut short ({size} bytes)"
    except zipfile.BadZipFile as err:
        return f"is cut short ({size} bytes: {err})"
    return None


def _safetensors_problem(path: str) -> str | None:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"is cut short ({size} bytes, no header)"
        n = struct.unpack("<Q", head)[0]
        if 8 + n > size:
            return f"is cut short ({size} bytes, header of {n})"
        try:
            header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            return f"has an unreadable header ({type(err).__name__})"
    if 8 + n + end > size:
        return f"is cut short ({size} of {8 + n + end} bytes)"
    return None


def _json_problem(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        return "is empty" if os.path.getsize(path) == 0 else f"is not valid JSON ({err})"
    return None


FILE_CHECKS = {".bin": _torch_file_problem, ".pt": _torch_file_problem, ".pth": _torch_file_problem}
FILE_CHECKS.update({".safetensors": _safetensors_problem, ".json": _json_problem})


def checkpoint_problems(path: str, checkpoint_format: str | None = None, optimizer: bool = True) -> list[str]:
    """Why `checkpoint-N` at `path` cannot be resumed from (empty when it can): trainer_state.json unreadable, the
    weight files of `checkpoint_format` (any format when None) or the optimizer / DeepSpeed state missing or cut
    short. Every `.json`, `.bin`, `.pt`, `.pth` and `.safetensors` file in it (and in DeepSpeed's `global_stepN`) is
    checked for completeness."""
    problems = []
    state_file = os.path.join(path, TRAINER_STATE_FILE)
    if not os.path.isfile(state_file):
        problems.append("`trainer_state.json` is missing")
    else:
        bad = _json_problem(state_file)
        if bad is None:
            with open(state_file, encoding="utf-8") as f:
                state = json.load(f)
            if not isinstance(state, dict) or "global_step" not in state:
                bad = "has no `global_step`"
        if bad:
            problems.append(f"`trainer_state.json` {bad}")
    formats = [checkpoint_format] if checkpoint_format else list(REQUIRED_FILES)
    missing_by_format = {fmt: missing_weight_files(path, fmt) for fmt in formats}
    if all(missing_by_format.values()):
        problems.append(f"weights missing: {', '.join(missing_by_format[formats[0]])}")
    files = [os.path.join(path, n) for n in sorted(os.listdir(path))]
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):  # DeepSpeed: latest names the global_stepN folder holding model and optimizer state
        with open(latest, encoding="utf-8") as f:
            tag = f.read().strip()
        tag_dir = os.path.join(path, tag)
        names = sorted(os.listdir(tag_dir)) if tag and os.path.isdir(tag_dir) else []
        for kind in ("model_states.pt", "optim_states.pt"):
            if optimizer and not any(n.endswith(kind) for n in names):
                problems.append(f"DeepSpeed state `{tag or '(latest is empty)'}/*{kind}` is missing")
        files += [os.path.join(tag_dir, n) for n in names]
    elif optimizer:
        for name in ("optimizer.pt", "scheduler.pt"):
            if not os.path.isfile(os.path.join(path, name)):
                problems.append(f"`{name}` is missing")
    for file in files:
        check = FILE_CHECKS.get(os.path.splitext(file)[1])
        if check is not None and os.path.isfile(file) and os.path.basename(file) != "trainer_state.json":
            bad = check(file)
            if bad:
                problems.append(f"`{os.path.relpath(file, path)}` {bad}")
    return problems


def numbered_checkpoints(output_dir: str) -> list[str]:
    """The `checkpoint-N` directories in `output_dir`, newest (highest N) first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return [path for _, path in sorted(found, reverse=True)]


def complete_checkpoint(
    output_dir: str, checkpoint_format: str | None = None, optimizer: bool = True, exclude: str | None = None
) -> str | None:
    """The newest `checkpoint-N` in `output_dir` (other than `exclude`) whose files are complete; no warnings."""
    for path in numbered_checkpoints(output_dir):
        if exclude is not None and os.path.realpath(path) == os.path.realpath(exclude):
            continue
        if not checkpoint_problems(path, checkpoint_format, optimizer):
            return path
    return None


def _listed(problems: list[str]) -> str:
    return "; ".join(problems[:5]) + (f"; ... {len(problems) - 5} more" if len(problems) > 5 else "")


class BrokenCheckpointError(ValueError):
    """The checkpoint named with `--resume_from_checkpoint` cannot be resumed from; the message says why and what to
    do instead."""


def named_checkpoint(path: str, checkpoint_format: str | None = None, optimizer: bool = True) -> str:
    """`path`, given with `--resume_from_checkpoint`, when it can be resumed from. Otherwise a `BrokenCheckpointError`
    naming it, what is wrong and the newest complete checkpoint in it or beside it: the user chose this one, so there
    is no silent fall-back to another."""
    if not os.path.isdir(path):
        problems = ["it does not exist" if not os.path.exists(path) else "it is not a directory"]
    else:
        problems = checkpoint_problems(path, checkpoint_format, optimizer)
    if not problems:
        return path
    # `path` may be a run's output_dir (holding checkpoint-N) or one checkpoint-N in it
    runs = [path, os.path.dirname(os.path.normpath(path)) or "."]
    found = [(run, complete_checkpoint(run, checkpoint_format, optimizer, exclude=path)) for run in runs]
    run, other = next(((r, c) for r, c in found if c), (runs[-1], None))
    choice = (
        f"pass `--resume_from_checkpoint {other}` (the newest complete checkpoint in `{run}`)"
        if other
        else f"name another checkpoint (none in `{run}` is complete)"
    )
    raise BrokenCheckpointError(
        f"Cannot resume from `{path}` (--resume_from_checkpoint): {_listed(problems)}. Either {choice}, or drop "
        "--resume_from_checkpoint: the run then resumes from the newest complete checkpoint in --output_dir, or "
        "starts afresh when there is none."
    )


def resumable_checkpoint(output_dir: str, checkpoint_format: str | None = None, optimizer: bool = True) -> str | None:
    """The newest `checkpoint-N` in `output_dir` whose files are complete; each newer broken one is named in a
    warning with what is wrong with it (it is left in place for the user to look at or delete)."""
    for path in numbered_checkpoints(output_dir):
        problems = checkpoint_problems(path, checkpoint_format, optimizer)
        if not problems:
            return path
        logger.warning(
            "Not resuming from `%s`: it is incomplete (a save interrupted or a full disk?): %s. Trying an older one.",
            path,
            _listed(problems),
        )
    return None


def remove_unfinished_saves(output_dir: str) -> None:
    """Delete the staging folders an interrupted save left in `output_dir` (never a `checkpoint-N`)."""
    if not os.path.isdir(output_dir):
        return
    for name in sorted(os.listdir(output_dir)):
        if name.startswith((STAGING_PREFIX + PREFIX_CHECKPOINT_DIR, STALE_PREFIX + PREFIX_CHECKPOINT_DIR)):
            logger.warning("Removing `%s`, left by a save that did not finish.", os.path.join(output_dir, name))
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def file_problem(path: str) -> str | None:
    """What is wrong with one written file (empty, cut short, unreadable JSON), or None."""
    try:
        if os.path.getsize(path) == 0:
            return "is empty"
        check = FILE_CHECKS.get(os.path.splitext(path)[1])
        return check(path) if check is not None else None
    except OSError:  # gone meanwhile (another rank's cleanup): not the one to name
        return None


def _failed_file(directory: str) -> str | None:
    """The file a failed save under `directory` was most likely writing: of the files written in the last second
    before the newest one, the newest that is empty or cut short, else the newest. (Modification times tick coarsely,
    e.g. every 4 ms: files written together can share one, so the newest alone may name a finished file.)"""
    stamped = []
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with contextlib.suppress(FileNotFoundError):  # removed while we look
                stamped.append((os.stat(path).st_mtime_ns, path))
    if not stamped:
        return None
    stamped.sort(reverse=True)
    recent = [path for stamp, path in stamped if stamp >= stamped[0][0] - 1_000_000_000]
    return next((path for path in recent if file_problem(path)), stamped[0][1])


def _existing_parent(path: str) -> str:
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def disk_full_reason(err: BaseException, directory: str) -> str | None:
    """A description of `err` when it means the disk under `directory` is full, else None. PyTorch's zip writer
    reports a short write as `unexpected pos ...` / `iostream error` without errno, so free space decides too."""
    free = shutil.disk_usage(_existing_parent(directory)).free
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return os.strerror(err.errno)
    text = str(err).strip().splitlines()[-1][:160] if str(err).strip() else type(err).__name__
    if NO_SPACE_TEXT.search(str(err)):
        return text
    if isinstance(err, (OSError, RuntimeError)) and (TORCH_SHORT_WRITE.search(str(err)) or free < NEARLY_FULL_BYTES):
        return f"a short write: {text}"
    return None


@contextlib.contextmanager
def disk_full_errors(directory: str, what: str, previous: str | None, cleanup: str | None = None):
    """Turn a write failure under `directory` caused by a full disk into a `CheckpointWriteError` that names the
    file, the directory, the free space and `previous` (the checkpoint still intact); `cleanup` (a staging folder)
    is removed first, which gives the space of the unfinished save back."""
    try:
        yield
    except Exception as err:  # writers raise OSError, RuntimeError (torch) or plain Exception (tokenizers)
        reason = disk_full_reason(err, directory)
        if reason is None or isinstance(err, CheckpointWriteError):
            raise
        file = getattr(err, "filename", None) or _failed_file(directory) or "(unknown)"
        if cleanup:
            shutil.rmtree(cleanup, ignore_errors=True)
        usage = shutil.disk_usage(_existing_parent(directory))
        head = (
            "No space left on device"
            if usage.free < NEARLY_FULL_BYTES or "short write" not in reason
            else ("A write failed (a full disk or quota?)")
        )
        intact = (
            f"The previous checkpoint `{previous}` is intact; free some space (or point --output_dir at a larger "
            "disk) and run the same command again to resume from it."
            if previous
            else "There is no earlier checkpoint to resume from; free some space and start again."
        )
        raise CheckpointWriteError(
            f"{head} while saving {what}: writing `{file}` in `{directory}` failed ({reason}); "
            f"{_human_bytes(usage.free)} free of {_human_bytes(usage.total)} on that filesystem"
            + (" (the unfinished save was removed)" if cleanup else "")
            + f". {intact}"
        ) from err


def final_save_errors(output_dir: str, checkpoint_format: str | None = None, optimizer: bool = True, run_dir=None):
    """`disk_full_errors` for the final model written into `output_dir`, naming the newest complete checkpoint of
    `run_dir` (default `output_dir`) as the one to resume from. The final save is not staged: a rerun resumes from
    that checkpoint and writes the final model again."""
    previous = complete_checkpoint(run_dir or output_dir, checkpoint_format, optimizer)
    return disk_full_errors(output_dir, f"the final model into `{output_dir}`", previous)


def staging_dir(run_dir: str, name: str) -> str:
    """Where `checkpoint-N` (`name`) is written before `publish_checkpoint` moves it into `run_dir`."""
    return os.path.join(run_dir, STAGING_PREFIX + name)


def publish_checkpoint(run_dir: str, name: str) -> str:
    """Move the finished `name` out of its staging folder into `run_dir`, replacing an older save of the same step
    (a resumed run saving a step again, e.g. over a broken checkpoint-N); returns its final path."""
    staging, final = staging_dir(run_dir, name), os.path.join(run_dir, name)
    if os.path.exists(final):
        stale = os.path.join(run_dir, STALE_PREFIX + name)
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(os.path.join(staging, name), final)
    os.rmdir(staging)
    return final
