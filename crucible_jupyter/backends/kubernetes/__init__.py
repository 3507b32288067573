"""Kubernetes backend: each execution as a hardened Job, followed through one shared watch."""

from .backend import CrucibleKubernetesBackend

__all__ = ["CrucibleKubernetesBackend"]
