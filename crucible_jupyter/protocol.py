"""The names crucible's parts agree on, each defined once.

Everything that two modules (or the Python package and the Lab extension) must spell the same
way lives here: the ``CRUCIBLE_*`` environment variables and how their values are read, the
kernel credential's header, the execution states and which of them are final, the tag
pattern, and how text is made valid UTF-8.

Copies that cannot import this module are held equal to it by tests
(``tests/unit/test_protocol.py``): the runner (``runner.py`` runs inside sandboxes on Python
3.8 without the package) and the Lab extension (``labextension/src/api.ts``).
"""

from __future__ import annotations

import getpass
import os
import re
from collections.abc import Mapping

# ----- environment ----------------------------------------------------------------------------

#: URL of the Jupyter server's crucible API, handed by the server extension to its kernels.
ENV_SERVER_URL = "CRUCIBLE_SERVER_URL"
#: Credential handed with :data:`ENV_SERVER_URL`; sent back as :data:`KERNEL_TOKEN_HEADER`.
ENV_TOKEN = "CRUCIBLE_TOKEN"
#: URL of the JupyterHub crucible service a user server forwards to (remote mode).
ENV_SERVICE_URL = "CRUCIBLE_SERVICE_URL"
#: MIME types the output policy passes unchanged (comma or space separated).
ENV_TRUSTED_OUTPUT_TYPES = "CRUCIBLE_TRUSTED_OUTPUT_TYPES"
#: ``0``/``false``/``no`` turns the crucible kernel's status line off.
ENV_KERNEL_STATUS_LINE = "CRUCIBLE_KERNEL_STATUS_LINE"
#: Database URL of the dispatcher's records.
ENV_DB_URL = "CRUCIBLE_DB_URL"
#: Backend that runs an execution whose request names none.
ENV_BACKEND = "CRUCIBLE_BACKEND"
#: Namespace of the Kubernetes backend's execution Jobs.
ENV_K8S_NAMESPACE = "CRUCIBLE_K8S_NAMESPACE"
#: Hex key signing the crucible service's login cookie.
ENV_COOKIE_SECRET = "CRUCIBLE_COOKIE_SECRET"
#: JupyterHub scope of the crucible service's administrators.
ENV_ADMIN_SCOPE = "CRUCIBLE_ADMIN_SCOPE"
#: Seconds the crucible service gives running cells on SIGTERM.
ENV_SHUTDOWN_GRACE_SECONDS = "CRUCIBLE_SHUTDOWN_GRACE_SECONDS"
#: Any value but ``0``/``false``/``no``/``off``: the ``crucible`` CLI prints its run time.
ENV_CLI_TIMING = "CRUCIBLE_CLI_TIMING"
#: The execution's id, in the environment of the cell itself.
ENV_EXECUTION_ID = "CRUCIBLE_EXECUTION_ID"
#: Name prefixes a request's ``env`` may not use: crucible's own, the loader's, Python's.
RESERVED_ENV_PREFIXES = ("CRUCIBLE_", "LD_", "PYTHON")

_FALSE = ("0", "false", "no", "off")


def local_user() -> str:
    """The user name this process records executions as when nobody else says who: the
    JupyterHub user (``JUPYTERHUB_USER``) in a hub's single-user server, else the
    operating-system user (:func:`getpass.getuser`: ``LOGNAME``, ``USER``, ``LNAME``,
    ``USERNAME``, then the password database), else ``uid-<uid>`` for a uid with no name.
    The CLI, the Jupyter server extension and the embedded client all use it, so one person
    gets one name (one history) whichever of them ran the cell."""
    if os.environ.get("JUPYTERHUB_USER"):
        return os.environ["JUPYTERHUB_USER"]
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login variable and no passwd entry for this uid
        return f"uid-{os.getuid()}"


def env_text(
    name: str,
    default: str,
    environ: Mapping[str, str] | None = None,
    *,
    empty_is_unset: bool = True,
) -> str:
    """The value of environment variable ``name``; ``default`` when it is unset, or empty
    (unless ``empty_is_unset`` is false: for a setting where empty means "none")."""
    env = os.environ if environ is None else environ
    value = env.get(name)
    if value is None or (empty_is_unset and value == ""):
        return default
    return value


def env_float(name: str, default: float, environ: Mapping[str, str] | None = None) -> float:
    """Environment variable ``name`` as a number; ``default`` when unset or empty.

    A value that is not a finite number raises ``ValueError`` naming the variable."""
    text = env_text(name, "", environ).strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(
            f"environment variable {name}={text[:40]!r} is not a number;"
            f" set it to a number such as {default:g}, or unset it"
        )
    return value


def env_flag(name: str, default: bool, environ: Mapping[str, str] | None = None) -> bool:
    """Environment variable ``name`` as on/off: ``0``, ``false``, ``no``, ``off`` (any case)
    are off, any other value on; ``default`` when unset or empty."""
    text = env_text(name, "", environ).strip().lower()
    if not text:
        return default
    return text not in _FALSE


# ----- HTTP -----------------------------------------------------------------------------------

#: Header carrying :data:`ENV_TOKEN` from a kernel to its server's crucible API.
KERNEL_TOKEN_HEADER = "X-Crucible-Token"

# ----- executions -----------------------------------------------------------------------------

#: Every state of an execution, in the order they are reached.
STATUSES = ("queued", "starting", "running", "succeeded", "failed", "timed_out", "cancelled")
#: The states after which an execution never changes again (its stream ends there).
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "timed_out", "cancelled"})

#: What a tag may be: 1 to 64 of letters, digits and ``_ . : / @ + = -`` (an ECMAScript
#: pattern for the OpenAPI document; in Python use :func:`is_tag`, since Python's ``$`` also
#: matches before a final newline).
TAG_PATTERN = r"^[A-Za-z0-9_.:/@+=-]{1,64}$"
_TAG_RE = re.compile(TAG_PATTERN)


def is_tag(value: object) -> bool:
    """True if ``value`` is a string that is a valid tag (:data:`TAG_PATTERN`, the whole
    string: ``"a\\n"`` is not a tag)."""
    return isinstance(value, str) and _TAG_RE.fullmatch(value) is not None


def is_terminal_event(event: Mapping[str, object]) -> bool:
    """True for the status event (a dict as the API sends it) that ends an execution."""
    return event.get("type") == "status" and event.get("status") in TERMINAL_STATUSES


# ----- text -----------------------------------------------------------------------------------


def is_utf8(text: str) -> bool:
    """True if ``text`` can be written as UTF-8 (no lone surrogate such as JSON's
    ``"\\ud800"`` or what ``surrogateescape`` decoding leaves)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def clean_utf8(text: str) -> str:
    """``text`` made valid UTF-8: each lone surrogate becomes its visible escape (the six
    characters ``\\udc80``); valid text is returned unchanged, as the same object."""
    if is_utf8(text):
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
