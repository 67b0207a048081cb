"""Reading JSON and jsonl files and writing any file atomically: the one place files are read and written.

Every writer in the package (SVD and knob safetensors, bases, pools, run files)
goes through `write_atomically`, so a crash leaves the old file or the new one.
Every jsonl reader goes through `iter_jsonl`, which reads plain or gzip files and
names file and line in its errors.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path


def _open_text(path: Path):
    # Package data ships compressed; a user's file is usually plain.
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def iter_jsonl(path: str | Path, error: type[ValueError]):
    """(where, record) for each non-blank line; a line that is not JSON raises `error` naming
    file and line (and saying so when a crash cut the last line short)."""
    path = Path(path)
    lineno = 0
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    # Writers end every line with a newline, so a last line without one was cut short.
                    truncated = " (truncated: the file ends mid-line)" if not line.endswith("\n") else ""
                    raise error(f"{where}: not valid JSON ({e.msg}){truncated}") from None
                yield where, record
    except (OSError, EOFError, UnicodeDecodeError) as e:  # unreadable, not gzip, cut-off gzip, not UTF-8
        raise error(f"{path}:{lineno + 1}: cannot read ({e})") from None


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep rows up to last_step: a resumed run rewrites what came after its checkpoint.
    A crash may have cut the last line short; lines that do not parse are dropped."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    write_atomically(path, "".join(kept))


def append_jsonl(path: Path, rows: list[dict]) -> None:
    """Rows appended and synced to disk: a crash loses at most the line being written."""
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_json(path: str | Path, error: type[ValueError], fix: str = "") -> dict:
    """A JSON object from a file; a missing, unreadable or malformed file, or one holding anything but an
    object, raises `error` naming it, and `fix` (what to do about it) when given."""
    path, fix = Path(path), f"; {fix}" if fix else ""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: no such file{fix}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: cannot read it ({e}){fix}") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e}){fix}") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, found {type(value).__name__}{fix}")
    return value


def write_directory_atomically(path: str | Path, write) -> None:
    """Call write(temp_dir) for a fresh directory beside `path`, then rename it into place: a
    half-built directory is never found. Two processes building the same cache at once both
    finish; the second rename fails on the first's (identical) result and is dropped."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        write(tmp)
        try:
            os.replace(tmp, path)
        except OSError:
            if not path.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_atomically(path: str | Path, write) -> None:
    """Call write(temp_path) for a temp file beside `path`, then rename it into place: a
    crash leaves the old file or the new one, never half of either. A str is written as text."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if isinstance(write, str):
            Path(tmp).write_text(write, encoding="utf-8")
        else:
            write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
