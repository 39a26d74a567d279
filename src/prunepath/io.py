"""Files and folders, in one place: atomic file writes and atomic directory replacement (with umask-following
modes), the cache folder and the data folders (the shared data root, the data shipped with the package, and
how a relative data path is resolved). Imports nothing of the package but :mod:`prunepath.errors`."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from prunepath.errors import PrunePathError

CHECKPOINT_MARKER = "prunepath_config.json"  # the file that makes a directory a PrunePath checkpoint (written last)
CONFIG_NAME = CHECKPOINT_MARKER


# ---- the cache folder ------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    root = os.environ.get("PRUNEPATH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "prunepath")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---- data folders ------------------------------------------------------------------------------------------
def shared_data_dir() -> Path:
    """The shared data folder: ``$PRUNEPATH_DATA`` or ``<repo>/../shared/data`` (as laid out in CI)."""
    env = os.environ.get("PRUNEPATH_DATA")
    if env:
        return Path(env)
    return repo_shared_data_dir()


def repo_shared_data_dir() -> Path:
    """``<repo>/../shared/data``: the data folder beside a checkout (absent in a plain clone or install)."""
    return (Path(__file__).resolve().parents[2] / ".." / "shared" / "data").resolve()


def builtin_data_dir() -> Path:
    """Data shipped inside the package (package data): ``wikitext-2/wiki.valid.raw``, with its attribution."""
    return Path(__file__).resolve().parent / "data" / "builtin"


def data_search_paths() -> list[Path]:
    """Folders searched, in order, for a relative data path that does not exist as given: ``$PRUNEPATH_DATA``
    (when set), the data shipped with the package, then ``<repo>/../shared/data``."""
    env = os.environ.get("PRUNEPATH_DATA")
    paths = ([Path(env).expanduser()] if env else []) + [builtin_data_dir(), repo_shared_data_dir()]
    return list(dict.fromkeys(paths))


def resolve_data_path(path: str | os.PathLike) -> Path:
    """A data file given as a path, or relative to a data folder (e.g. ``wikitext-2/wiki.valid.raw``, shipped
    with the package); see :func:`data_search_paths`."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    searched = data_search_paths()
    if not p.is_absolute():
        for root in searched:
            if (root / p).exists():
                return root / p
    where = "" if p.is_absolute() else " or under " + ", ".join(str(r) for r in searched)
    raise PrunePathError(
        f"data file not found: {p} (looked for it as given{where}). Pass an existing file, or a path relative to "
        "one of those folders: wikitext-2/wiki.valid.raw ships with PrunePath; for other data sets (GLUE TSVs, "
        "XSum / Alpaca samples) set PRUNEPATH_DATA to a folder laid out as <set>/<file>, e.g. sst2/glue/dev.tsv "
        "(where to get each: docs/evaluation.md, section Data)")


def check_text_file(path: str | os.PathLike, sample_bytes: int = 1 << 16) -> None:
    """Reject a file that is not text: it must decode as UTF-8 and not be mostly control bytes (checked on its
    first ``sample_bytes``). Every reader of raw-text data calls this before reading."""
    p = Path(path)
    with open(p, "rb") as fh:
        head = fh.read(sample_bytes)
    if not head:
        return
    why = None
    if b"\x00" in head:
        why = "it contains NUL bytes"
    else:
        try:
            head.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            # A multi-byte character cut by the sample's end is fine; anything earlier is not UTF-8.
            if exc.start < len(head) - 3:
                why = f"it is not UTF-8 (byte {exc.start} is 0x{head[exc.start]:02x})"
        if why is None:
            control = sum(1 for b in head if b < 32 and b not in (9, 10, 12, 13) or b == 127)
            if control > 0.1 * len(head):
                why = f"{control / len(head):.0%} of its first {len(head)} bytes are control characters"
    if why:
        raise PrunePathError(f"{p} looks binary, not like a text file ({why}); pass a UTF-8 text file (e.g. "
                             "wikitext-2/wiki.valid.raw), or a JSON / JSONL file where the task takes one")


# ---- atomic file writes ----------------------------------------------------------------------------------------
def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.chmod(tmp, default_mode())  # mkstemp creates 0600; results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def default_mode() -> int:
    """0666 minus the process umask (what a plain ``open(path, "w")`` would give)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf become None (strict JSON), tuples become lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(_clean(obj), indent=2) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """A result JSON file, or the ``results.json`` of an output directory (``sweep --out`` / ``run``)."""
    p = Path(path)
    if p.is_dir() and (p / "results.json").exists():
        p = p / "results.json"
    if not p.exists():
        raise PrunePathError(f"no such result file: {p}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise PrunePathError(f"{p} is not valid JSON ({exc}); pass a result file written by prunepath") from exc


# ---- file modes and durable, atomic directory replacement ----------------------------------------------------
def current_umask() -> int:
    """The process umask, read without changing it where the kernel reports it (no window in which another
    thread would create files with umask 0)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_default_modes(root: Path) -> None:
    """Give ``root`` and everything under it the modes a plain mkdir / open(…, "w") would have given (0777 / 0666
    minus the umask): tempfile.mkdtemp makes 0700 directories and safetensors writes 0600 files."""
    mask = current_umask()
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if not os.path.islink(p):
                os.chmod(p, 0o777 & ~mask)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)


def _fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` so that the rename that publishes it is durable."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for f in filenames:
            p = Path(dirpath, f)
            if not p.is_symlink():
                _fsync_path(p)
        _fsync_path(Path(dirpath))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directory entries (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def atomic_replace_dir(staging: Path, final: Path) -> None:
    """Move a completed ``staging`` directory to ``final``; an old PrunePath checkpoint there is replaced only
    after the new one is complete (one atomic swap where the kernel supports it). Any other existing non-empty
    directory is left untouched (error). Modes follow the umask; contents are flushed before the rename."""
    staging, final = Path(staging), Path(final)
    if final.exists() and not (final.is_dir() and (not any(final.iterdir()) or (final / CONFIG_NAME).exists())):
        raise PrunePathError(f"{final} exists and is not a PrunePath checkpoint; choose another output path "
                             "(PrunePath never overwrites other files)")
    apply_default_modes(staging)
    _fsync_tree(staging)
    if final.exists():
        if not any(final.iterdir()):
            final.rmdir()
        elif _exchange(staging, final):  # staging now holds the old checkpoint
            _fsync_path(final.parent)
            shutil.rmtree(staging, ignore_errors=True)
            return
        else:  # no atomic swap: a short window in which only .NAME.old-PID holds the old checkpoint (load says so)
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            staging.rename(final)
            _fsync_path(final.parent)
            shutil.rmtree(old, ignore_errors=True)
            return
    staging.rename(final)
    _fsync_path(final.parent)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temporaries(final: Path) -> None:
    """Delete what an interrupted save to ``final`` left behind (its process is gone): ``.NAME.tmp-PID-…``
    staging directories, and ``.NAME.old-PID`` copies once ``final`` is a complete checkpoint again."""
    if not final.parent.is_dir():
        return
    pat = re.compile(rf"^\.{re.escape(final.name)}\.(tmp|old)-(\d+)(-.*)?$")
    for p in final.parent.iterdir():
        m = pat.match(p.name)
        if not m or not p.is_dir() or _pid_alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not (final / CONFIG_NAME).exists():
            continue  # the only copy of the previous checkpoint (read_config points the user to it)
        shutil.rmtree(p, ignore_errors=True)
