"""Resumable answers files of the eval scripts and the provenance each answer records.

An answers file is JSON lines, one `{"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}` per
answer (DESIGN.md, "Eval files"). `AnswerFile` appends to it, knows which questions it already answers, drops a
truncated last line (a killed run) and resumes only a file whose answers all record the same run (`metadata`: the
model, its fingerprint, the question file's sha256 and the settings); `checkpoint_fingerprint` and `file_sha256`
compute what is recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import string
import sys
from collections.abc import Callable, Hashable

_ID_ALPHABET = string.ascii_letters + string.digits


def log(message: str) -> None:
    """A progress note on stderr (stdout stays clean for scripts that print results)."""
    print(message, file=sys.stderr, flush=True)


def question_key(record: dict) -> Hashable:
    return record["question_id"]


def new_answer_id() -> str:
    """A random 22-character id, like the original's shortuuid."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(22))


def meta_differences(old: dict, new: dict) -> list[str]:
    """`field: old -> new` for every recorded run field that differs."""
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


class AnswerFile:
    """A JSON-lines answers file opened for appending; `done` holds the keys it already answers.

    A run that was killed mid-write leaves a truncated last line: it is dropped (and re-answered). Any other bad line
    is an error, since it means the file is not an answers file. With `meta` (what this run is: model, question file,
    settings, as each answer's `metadata` records it), a file is resumed only when all its answers record the same.
    """

    def __init__(
        self,
        path: str,
        key: Callable[[dict], Hashable] = question_key,
        overwrite: bool = False,
        meta: dict | None = None,
    ):
        self.path = os.path.expanduser(path)
        self.key = key
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.done: set = set()
        self.meta = meta
        self._mismatch: tuple[int, dict | None] | None = None  # the first line whose record differs from `meta`
        if overwrite or not os.path.exists(self.path):
            open(self.path, "w").close()
        else:
            self._scan()
            if self._mismatch is not None:
                self._refuse(*self._mismatch)
        self._file = open(self.path, "a", encoding="utf-8")

    def _check_record(self, number: int, record: dict) -> None:
        if self.meta is None or self._mismatch is not None:
            return
        recorded = record.get("metadata")
        if not isinstance(recorded, dict) or not set(self.meta) <= set(recorded):
            self._mismatch = (number, None)
        elif any(recorded[k] != v for k, v in self.meta.items()):
            self._mismatch = (number, {k: recorded[k] for k in self.meta})

    def _refuse(self, number: int, recorded: dict | None) -> None:
        advice = "pass --overwrite to answer every question again, or choose another --answers-file."
        if recorded is None:
            raise ValueError(
                f"`{self.path}` already holds {len(self.done)} answer(s), but line {number} does not record the model, "
                f"question file and settings that wrote it (written by the original scripts or an older version), so "
                f"the file cannot be resumed safely; {advice}"
            )
        raise ValueError(
            f"`{self.path}` line {number} was written by a different run, so the file's {len(self.done)} answer(s) "
            "are not resumed: " + "; ".join(meta_differences(recorded, self.meta)) + f". To replace them, {advice}"
        )

    def _scan(self) -> None:
        with open(self.path, encoding="utf-8") as f:
            text = f.read()
        numbered = [(n, line) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
        kept = []
        for i, (number, line) in enumerate(numbered):
            try:
                record = json.loads(line)
                self.done.add(self.key(record))
                self._check_record(number, record)
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                if i == len(numbered) - 1:
                    log(f"{self.path}: dropping a truncated last line (line {number}); that question is re-answered.")
                    continue
                raise ValueError(
                    f"`{self.path}` line {number} is not an answer record ({type(err).__name__}: {err}); pass "
                    "--overwrite to start this answers file afresh, or choose another --answers-file."
                ) from err
            kept.append(line)
        tidy = "".join(line + "\n" for line in kept)
        if tidy != text:  # a dropped line, blank lines or a missing final newline: rewrite before appending
            with open(self.path, "w", encoding="utf-8") as f:
                f.write(tidy)

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self.done.add(self.key(record))

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> AnswerFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(os.path.expanduser(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_fingerprint(path: str | None) -> str | None:
    """A cheap content fingerprint of a local checkpoint directory: each top-level file's name and size, its first
    and last MiB (weights retrained in the same folder change it); None for a hub id."""
    if not path or not os.path.isdir(os.path.expanduser(path)):
        return None
    folder = os.path.expanduser(path)
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        full = os.path.join(folder, name)
        if not os.path.isfile(full):
            continue
        size = os.path.getsize(full)
        digest.update(f"{name}\0{size}\0".encode())
        with open(full, "rb") as f:
            digest.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                digest.update(f.read())
    return digest.hexdigest()
