"""Host uids for local sandboxes: each running sandbox gets one of its own.

The kernel keeps many limits per user: inotify instances and watches, fanotify groups,
POSIX message-queue bytes, pending signals, processes, user namespaces. Sandboxes that all
ran as one host uid (65534) shared them with each other and with the host's own processes of
that uid: one cell holding its 128 inotify instances made every other sandbox's fail.

So each sandbox, warm ones included, runs as a host uid leased from a reserved range for as
long as it runs. A lease is an ``flock`` on ``<folder>/<uid>``: two dispatchers on one host
never hold the same uid, and a dispatcher that dies releases its leases with it (its sandboxes
die with it too: bubblewrap runs with ``--die-with-parent``). The lowest free uid is taken,
so the folder holds as many files as sandboxes ever ran at once.

Only root can start a process as another uid; a dispatcher that is not root runs every
sandbox as its own user (see ``crucible doctor``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os

from ...errors import Unavailable

#: The default range: above the uids systemd hands to containers (524288-1879048191) and
#: below its "foreign" range (2147352576-) and 2^31 (signed 32-bit trouble), far from the
#: regular (1000-60000), dynamic (61184-65519) and subordinate (100000-, /etc/subuid) uids.
DEFAULT_RANGE = "2000000000-2000065535"
#: Where the leases are kept (root only; shared by every dispatcher on the host).
DEFAULT_FOLDER = "/run/crucible/uids"


def parse_range(text: str) -> tuple[int, int]:
    """``"FIRST-LAST"`` → (first, last); ValueError saying what is wrong."""
    try:
        first, last = (int(part) for part in text.split("-"))
    except ValueError:
        raise ValueError(f"uid_range {text!r} is not FIRST-LAST (two numbers)") from None
    if not 0 < first <= last < 2**32 - 1:
        raise ValueError(f"uid_range {text!r} must be 1 <= FIRST <= LAST < 4294967295")
    return first, last


class Lease:
    """One uid, held until :meth:`release` (or until this process ends)."""

    def __init__(self, uid: int, fd: int) -> None:
        self.uid = uid
        self._fd: int | None = fd

    def release(self) -> None:
        """Give the uid back (idempotent). Only once nothing of the sandbox runs any more."""
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()


class UidLeases:
    """Hands out the uids ``first``..``last``, each to one sandbox at a time, host-wide."""

    def __init__(self, first: int, last: int, folder: str = DEFAULT_FOLDER) -> None:
        self.first, self.last, self.folder = first, last, folder

    def take(self) -> Lease:
        """The lowest uid no sandbox on this host holds; Unavailable when all are taken."""
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        for uid in range(self.first, self.last + 1):
            fd = os.open(
                os.path.join(self.folder, str(uid)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            except BaseException:  # anything else: close the lock file, then re-raise
                os.close(fd)
                raise
            return Lease(uid, fd)
        raise Unavailable(
            f"all {self.last - self.first + 1} host uids for sandboxes ({self.first}-"
            f"{self.last}) are in use; widen c.CrucibleLocalBackend.uid_range"
        )
