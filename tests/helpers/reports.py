"""What fixtures need to know about the test they serve: did it fail?

The root conftest's ``pytest_runtest_makereport`` hook keeps each phase's report in the
item's stash under :data:`PHASE_REPORTS`; a fixture's teardown asks :func:`failed` to
decide whether to save evidence (logs, screenshots, cluster events).
"""

from __future__ import annotations

import pytest

PHASE_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


def failed(item: pytest.Item, when: str = "call") -> bool:
    """Whether the test's ``when`` phase (``setup``, ``call``) has run and failed."""
    report = item.stash.get(PHASE_REPORTS, {}).get(when)
    return report is not None and report.failed
