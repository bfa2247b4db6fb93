"""What the host's `/dev/sev` and the guest's `/dev/sev-guest` wrappers share: one open descriptor,
closed once (by `close()` or the end of a `with` block), and a repr naming only the path."""

from __future__ import annotations

import os
from types import TracebackType
from typing import Self


class DeviceFile:
    path: str
    _fd: int = -1

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={self.path!r})"

    def _open_fd(self) -> int:
        """The descriptor; RuntimeError (a programming error) once closed."""
        if self._fd < 0:
            raise RuntimeError(f"{type(self).__name__} is closed")
        return self._fd
