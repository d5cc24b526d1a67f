"""What every writer of the trainer shares: output folders that can be created, files with ordinary permissions.

safetensors' save_file (and with it every diffusers/transformers save_pretrained) creates its files mode 0600,
as tempfile.mkstemp does, so a web UI or a colleague running as another user could not open an exported model.
Each writer that finishes with a rename calls `match_umask` on what it wrote before the rename, so a file never
appears under its final name with other permissions than a plain open() would have given it (0644 under umask
022).
"""
from __future__ import annotations

import os
from pathlib import Path

try:
    from utils.core.config_schema import ConfigError
except ImportError:  # utils/sd/convert_ldm.py run as a file from inside utils/
    from config_schema import ConfigError  # type: ignore[no-redef]


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
