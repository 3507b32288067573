"""``python -m crucible_jupyter.kernel -f CONNECTION_FILE``: start the crucible kernel."""

from __future__ import annotations

from ipykernel.kernelapp import IPKernelApp

from .kernel import CrucibleKernel


def main() -> None:
    """Launch the kernel (what ``kernelspec/crucible/kernel.json`` runs)."""
    IPKernelApp.launch_instance(kernel_class=CrucibleKernel)


if __name__ == "__main__":
    main()
