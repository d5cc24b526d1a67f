"""What every writer of the trainer shares: output folders that can be created, files with ordinary permissions,
and the one way files and folders are written atomically (a temp sibling, then os.replace).

safetensors' save_file (and with it every diffusers/transformers save_pretrained) creates its files mode 0600,
as tempfile.mkstemp does, so a web UI or a colleague running as another user could not open an exported model.
Each writer that finishes with a rename calls `match_umask` on what it wrote before the rename, so a file never
appears under its final name with other permissions than a plain open() would have given it (0644 under umask
022).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable

from utils.core.config_schema import ConfigError

# Every temp name ends so: checkpoint listings skip such folders (utils/run/checkpoint.py).
TMP_SUFFIX = ".tmp"


def current_umask() -> int:
    """The process umask. Read from /proc where it can be: os.umask can only be read by setting it, which for
    a moment would give files created by other threads (TensorBoard's writer) the wrong mode."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def match_umask(path: Path) -> None:
    """Give `path` (a file, or a folder and everything below it) the modes a new file / folder gets from the
    umask: 0o666 / 0o777 minus the umask. Symbolic links are left alone (their mode is their target's)."""
    mask = current_umask()
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    path = Path(path)
    if path.is_symlink():
        return
    if not path.is_dir():
        os.chmod(path, file_mode)
        return
    for root, dirs, files in os.walk(path):
        os.chmod(root, dir_mode)
        for name in files:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                os.chmod(p, file_mode)


def create_folder(path: Path, what: str) -> Path:
    """mkdir -p, or ConfigError saying which folder cannot be created and what to do about it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # a regular file where a folder should be
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        raise ConfigError(f"{what}: cannot create the folder {path}: {blocker} is a file, not a folder; choose "
                          f"another {what}") from None
    except OSError as e:
        raise ConfigError(f"{what}: cannot create the folder {path} ({e.strerror or e}); choose a folder "
                          f"you can write to, or fix its permissions") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{what}: the folder {path} is not writable; choose a folder you can write to, "
                          f"or fix its permissions")
    return path


def temp_sibling(path: Path) -> Path:
    """A hidden name beside `path` for writing it: the pid and a random part keep concurrent writers (ranks, two
    runs sharing a cache) apart.

    Not tempfile.mkstemp/mkdtemp: those create 0600/0700 entries, and the renamed result must stay readable by a
    web UI running as another user, as any normally created file would be (match_umask fixes what safetensors'
    save_file creates 0600 before the rename)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove temp siblings in `folder` left by writers that no longer run (a save killed halfway): their pid,
    part of the temp name, is not a live process on this machine. Returns what was removed."""
    removed = []
    for path in Path(folder).glob(f".*.*{TMP_SUFFIX}"):
        pid = path.name[:-len(TMP_SUFFIX)].rsplit(".", 2)[-2]
        if not pid.isdigit() or int(pid) == os.getpid() or _process_alive(int(pid)):
            continue
        _remove(path)
        removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """write(temp) beside `path`, then os.replace: a reader never sees half a file, and a failure leaves the old
    file (if any) and no temp behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        write(tmp)
        match_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    return path


def write_json_atomic(path: Path, data: dict) -> None:
    """Indented JSON with a final newline, written atomically."""
    text = json.dumps(data, indent=2) + "\n"
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def replace_folder_atomic(folder: Path, write_contents: Callable[[Path], None]) -> Path:
    """write_contents(temp folder) beside `folder`, then swap it in. A failure leaves no temp and the old folder
    as it was; an existing folder is moved aside (not deleted) until the new one is in place, because a folder
    cannot be os.replace'd over a non-empty one."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(folder)
    tmp.mkdir()
    try:
        write_contents(tmp)
        match_umask(tmp)  # save_pretrained's safetensors files are created 0600
        if folder.exists():
            old = temp_sibling(folder)
            os.replace(folder, old)
            try:
                os.replace(tmp, folder)
            except BaseException:
                os.replace(old, folder)
                raise
            _remove(old)
        else:
            os.replace(tmp, folder)
    except BaseException:
        _remove(tmp)
        raise
    return folder
