"""An execution id in a URL is taken only when the whole value is one (no trailing
newline, which a ``$``-anchored pattern lets through)."""

from __future__ import annotations

import pytest

from crucible_jupyter.errors import NotFound
from crucible_jupyter.server.common import CrucibleRequestMixin

ID = "01a24895-2f02-77fa-91fb-4e79d2acb878"


def test_a_whole_id_is_taken():
    assert CrucibleRequestMixin.execution_id(None, ID) == ID  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [ID + "\n", " " + ID, ID.upper(), ID[:-1], ID + "0"])
def test_anything_else_is_not_found(value):
    with pytest.raises(NotFound):
        CrucibleRequestMixin.execution_id(None, value)  # type: ignore[arg-type]
