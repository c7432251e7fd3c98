"""Where run-time adapter loads may read: only inside the server's `--adapter-dir`.

A path from a client is refused when it has a `..` part, is absolute and outside the root, or resolves
(symlinks followed, at any depth) to somewhere outside the root; it must then be an existing directory.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath

from lorakit.core.errors import LorakitError


def resolve_inside(root: Path, user_path: str) -> Path:
    """The directory `user_path` names inside `root`, fully resolved.

    Args:
        root: the adapter root (`--adapter-dir`).
        user_path: a client's path: relative to the root, or absolute inside it.

    Returns:
        The resolved directory, inside the resolved root.

    Raises:
        LorakitError: a `..` part, a path (or a symlink in it) leading outside the root, a NUL byte, or
            no such directory.
    """
    if "\x00" in user_path or not user_path.strip():
        raise LorakitError("lora_path is empty or holds a NUL byte; give a directory inside the adapter root.")
    parts = PurePosixPath(user_path.replace("\\", "/")).parts
    if ".." in parts:
        raise LorakitError(f"lora_path {user_path!r} has a '..' part; give a path inside the adapter root, without '..'.")
    real_root = root.resolve(strict=True)
    candidate = Path(user_path)
    if not candidate.is_absolute():
        candidate = real_root / candidate
    outside = LorakitError(f"lora_path {user_path!r} is outside the adapter root; only directories under the "
                           "server's --adapter-dir can be loaded.")
    if not _within(candidate.absolute(), real_root) and not _within(candidate.absolute(), root.absolute()):
        raise outside
    try:
        real = candidate.resolve(strict=True)
    except (FileNotFoundError, RuntimeError, OSError):
        raise LorakitError(f"lora_path {user_path!r}: no such directory under the adapter root.") from None
    if not _within(real, real_root):  # a symlink somewhere along the path leads out
        raise outside
    if not real.is_dir():
        raise LorakitError(f"lora_path {user_path!r} is not a directory; give the adapter's directory.")
    return real


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents
