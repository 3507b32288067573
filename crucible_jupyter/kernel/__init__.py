"""The "Python (Crucible isolated)" wrapper kernel (kernelspec name ``crucible``)."""

from __future__ import annotations

from .kernel import CrucibleKernel

__all__ = ["CrucibleKernel"]
