"""Files only their owner may read: SQLite databases holding sealed keys and launch state, key files.

SQLite creates a database, and its `-wal`/`-shm`/`-journal` companions, with the process umask (0644
under the usual 022), and creates the companions with the database file's mode. So the database is
created here first, 0600 with O_EXCL (no race with another creator, no symlink followed), before SQLite
opens it; its companions then follow its mode. Files already there with a wider mode are narrowed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

PRIVATE_MODE = 0o600
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")


def create_private_sqlite(path: str | os.PathLike[str]) -> None:
    """Makes `path` a 0600 file (created empty if absent, which SQLite takes as a new database) and
    narrows the database and any existing `-wal`/`-shm`/`-journal` file to 0600.

    Call it before `sqlite3.connect(path)`. SQLite's special names (":memory:", "", "file:" URIs) are
    left alone. Raises OSError, e.g. when `path` is a symlink or a directory.
    """
    name = os.fspath(path)
    if name in ("", ":memory:") or name.startswith("file:"):
        return
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_MODE)
    except FileExistsError:
        pass
    else:
        os.close(fd)
    for candidate in (name, *(name + suffix for suffix in SQLITE_COMPANIONS)):
        _narrow(Path(candidate), must_exist=candidate == name)


def _narrow(path: Path, *, must_exist: bool) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if must_exist:
            raise
        return
    if stat.S_ISLNK(st.st_mode):
        raise OSError(f"{path} is a symbolic link; refusing to use it for a private database")
    if not stat.S_ISREG(st.st_mode):
        raise OSError(f"{path} is not a regular file")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, PRIVATE_MODE, follow_symlinks=False)


def write_private_file(path: str | os.PathLike[str], data: bytes) -> None:
    """Writes key or secret material to `path`, 0600 from its first byte.

    The bytes go to a new temporary file in the same folder (O_CREAT|O_EXCL|O_NOFOLLOW, 0600), are
    flushed to disk, and the file is renamed over `path`. So an existing file with a wider mode (or a
    symlink planted at `path`) never holds the new bytes, and a crash leaves the old file or the new one.
    """
    target = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        tmp = target.with_name(f".{target.name}.{os.urandom(6).hex()}.tmp")
        try:
            fd = os.open(tmp, flags, PRIVATE_MODE)
        except FileExistsError:
            continue
        break
    else:  # pragma: no cover - 100 collisions of 48 random bits
        raise FileExistsError(f"cannot create a temporary file beside {target}")
    try:
        try:
            os.fchmod(fd, PRIVATE_MODE)  # the umask can only have narrowed it; make it exact
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
