"""Local backend: each execution in a bubblewrap sandbox on this machine (the default).

Isolation, when bubblewrap works: every namespace unshared (no network at all, not even
the host's loopback; own pids, IPC, UTS, user), a read-only minimal root (``/usr`` and the
Python installation only), a private size-limited ``/tmp``, no host home directories or
secrets, ``--new-session``, ``--die-with-parent``, all capabilities dropped, no nested user
namespaces, a seccomp filter (x86_64) against rarely needed kernel interfaces and socket
families; started as a host uid of the sandbox's own when crucible runs as root (never as
host root; see ``uids.py``). Memory (socket buffers included), process-count and CPU limits come
from a per-execution cgroup when the machine allows it, from rlimits otherwise; file size and
open files from rlimits. As root, the cgroup also caps the sandbox's IP sockets (``sockcap.py``):
past any TCP limit each socket still gets a buffer, so only that cap bounds host TCP memory.

Where bubblewrap is missing or broken, executions run as a plain subprocess with limits,
a loud warning is logged once, and ``isolation`` is recorded as ``"none"`` on each one.

Modules, one job each (as in ``backends/kubernetes/``): ``backend.py`` the backend and its
settings; ``bwrap.py`` bubblewrap's command line; ``seccomp.py`` the seccomp filter;
``launch.py`` starting a sandbox's process; ``sandbox.py`` one running sandbox; ``warm.py``
warm sandboxes; ``cgroups.py`` and ``sockcap.py`` resource limits; ``uids.py`` host uids;
``doctor.py`` health.
"""

from .backend import CrucibleLocalBackend

__all__ = ["CrucibleLocalBackend"]
