"""Deployment pull steps (``prefect.yaml``): where a worker runs a fat-distill flow.

A process worker runs each flow run in a subprocess that first executes the
deployment's pull steps. The project's flows read and write relative paths
(``runs/``, ``data_manifests/``, ``flows/pipeline.py``), so that subprocess must
start in the project folder: the one ``prefect deploy`` was run in (``prefect.yaml``
passes ``{{ $PWD }}``, filled in when deploying), unless the worker's environment
names another with ``FAT_DISTILL_PROJECT_DIR`` (a worker whose checkout, or
shared filesystem mount, lives at another path, such as the compose worker's ``/app``).
"""

from __future__ import annotations

import os
from pathlib import Path

#: Set in a worker's environment to run flows in this folder instead of the deployed one.
PROJECT_DIR_ENV = "FAT_DISTILL_PROJECT_DIR"


def project_directory(directory: str | os.PathLike | None) -> Path:
    """The folder a flow run should work in: ``$FAT_DISTILL_PROJECT_DIR`` if set, else ``directory``.

    Raises:
        FileNotFoundError: the folder does not exist on this worker's machine, with what to do.
    """
    chosen = os.environ.get(PROJECT_DIR_ENV) or (str(directory) if directory else "")
    if not chosen or "{{" in chosen:  # no PWD where `prefect deploy` ran, nor in the worker's environment
        raise FileNotFoundError(
            f"the deployment names no project folder ({chosen or 'empty'}): run `prefect deploy` from a shell in "
            f"the project folder (it fills in $PWD), or set {PROJECT_DIR_ENV} in the worker's environment")
    path = Path(chosen).expanduser()
    if not (path / "flows" / "pipeline.py").is_file():
        source = (f"{PROJECT_DIR_ENV} in the worker's environment" if os.environ.get(PROJECT_DIR_ENV)
                  else "the folder `prefect deploy` ran in")
        raise FileNotFoundError(
            f"fat-distill project folder {path} ({source}) has no flows/pipeline.py on this worker's machine: "
            f"check the project out (or mount the shared filesystem) at that path, or set {PROJECT_DIR_ENV} "
            "in the worker's environment to where it is")
    return path


def enter_project_directory(directory: str | None = None) -> dict[str, str]:
    """Pull step: change into the project folder (see :func:`project_directory`); returns ``{"directory": …}``."""
    path = project_directory(directory)
    os.chdir(path)
    return {"directory": str(path.resolve())}


__all__ = ["PROJECT_DIR_ENV", "enter_project_directory", "project_directory"]
