"""Helpers shared by the test suites: plain functions and classes, no fixtures.

Fixtures live in the ``conftest.py`` files; everything a test module or a conftest imports
comes from here (``from tests.helpers.engine import run_cell``), never from a conftest.
``tests`` is a package and pytest puts the repository root on ``sys.path`` (``pythonpath``
in pyproject.toml), so these imports work for ``dev/test`` and for one file alike.

Modules: ``net`` (free ports, polling), ``postgres`` (a throwaway server), ``engine`` (cells
through a dispatcher), ``runner`` (the runner as a subprocess), ``cluster`` (the dev
Kubernetes cluster), ``k8s`` (the Kubernetes backend on it), ``jupyter`` (a Jupyter server),
``hub`` (JupyterHub), ``lab`` (JupyterLab in Chromium), ``reports`` (failure evidence).
"""
