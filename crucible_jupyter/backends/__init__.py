"""Execution backends: the contract (``base.py``), the registry of backends by name
(``registry.py``), and the two this package ships: ``local/`` (bubblewrap) and
``kubernetes/`` (a Job per execution)."""
