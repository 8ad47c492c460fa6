"""Files: where caches live, and writing so that a crash, a kill or a full disk never leaves half of one behind."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock


def cache_root() -> Path:
    """Where tokenizers, token caches and compiled kernels are kept: ``$LM_LIGHTNING_CACHE`` or ``~/.cache/lm_lightning``."""
    return Path(os.path.expanduser(os.environ.get("LM_LIGHTNING_CACHE", "~/.cache/lm_lightning")))


_TEXTS: dict[tuple[str, int, int, str], str] = {}


def read_source_text(path: str | os.PathLike, errors: str = "strict") -> str:
    """The UTF-8 text of a model source's small file (``config.json``, ``tokenizer.json``, ...), read once per process
    while it is unchanged (same size and modification time): the readers of one source (config, tokenizer, special
    tokens, chat template, the data module's tokenizer) share one read of each file."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_mtime_ns, stat.st_size, errors)
    if key not in _TEXTS:
        _TEXTS[key] = Path(path).read_text(encoding="utf-8", errors=errors)
    return _TEXTS[key]


class WriteError(OSError):
    """A file could not be written (disk full, no permission); the previous version of it is intact."""


@contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created if need be): one process at a time, across processes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path):
        yield


def temporary_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place: the same folder, so the rename is atomic."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def remove_stale_temporaries(path: Path) -> None:
    """Delete temporary files of ``path`` (a name or a glob pattern) left by processes that died mid-write
    (``kill -9``, power loss)."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name.rsplit(".", 2)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], what: str = "file") -> None:
    """Write ``path`` through ``write(tmp)`` into a temporary file, fsync it, and rename it over ``path``.

    Readers see the old file or the new one, never a part. If writing fails (``ENOSPC``, ``EACCES``), the
    temporary file is removed and a ``WriteError`` says so; ``path`` keeps its previous content. Temporaries
    of ``path`` left by killed writers are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = temporary_path(path)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WriteError(f"cannot write {what} {path}: {e.strerror or e}; the previous {path.name} is intact") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, what: str = "file") -> None:
    """``atomic_write`` of UTF-8 text."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), what)
