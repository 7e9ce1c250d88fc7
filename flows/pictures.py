"""Attach a run's pictures to its Prefect flow run, after the fact (``fat-distill inspect --pictures``).

``prefect.artifacts.create_*`` take the flow run from the run context and warn
(deprecated) outside one, so this talks to the API directly: ``ArtifactCreate``
with an explicit ``flow_run_id``. Images are file URIs of the PNGs, as the
pipeline's own plot artifacts are (flows/pipeline.py). Call
:func:`flows.environment.configure_prefect` first, as the pipeline commands do,
so the embedded server's database is the one the run reported to.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactCreate
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL

MARKDOWN_KEY = "run-pictures"


def attach_pictures(flow_run_id: str, images: Sequence[str | Path], run_id: str, *,
                    listed: Sequence[str | Path] = ()) -> int:
    """Create an image artifact per PNG in ``images`` and one markdown artifact listing them, on a flow run.

    Args:
        flow_run_id: the run's Prefect flow run (``run.json`` ``flow_run_id``).
        images: PNGs to attach as images.
        run_id: the fat-distill run, named in the descriptions.
        listed: more files to name in the markdown artifact only (e.g. per-query rows).

    Returns:
        The number of image artifacts created.

    Raises:
        LookupError: the flow run is not on the Prefect API in use.
    """
    try:
        flow_run_uuid = UUID(str(flow_run_id))
    except ValueError as exc:
        raise LookupError(f"run {run_id}: run.json's flow_run_id {flow_run_id!r} is not a flow run id") from exc
    images = [Path(p).resolve() for p in images]
    with get_client(sync_client=True) as client:
        try:
            client.read_flow_run(flow_run_uuid)
        except ObjectNotFound as exc:
            where = PREFECT_API_URL.value() or "the embedded server (PREFECT_HOME)"
            raise LookupError(f"run {run_id}: its flow run {flow_run_id} is not on {where}; point PREFECT_API_URL "
                              "(or PREFECT_HOME) at the Prefect the run reported to") from exc
        for png in images:
            client.create_artifact(ArtifactCreate(type="image", data=png.as_uri(), flow_run_id=flow_run_uuid,
                                                  description=f"{png.stem} ({run_id})"))
        lines = [f"# Pictures of fat-distill run `{run_id}`", "",
                 *(f"- `{png}`" for png in images)]
        if listed:
            lines += ["", "Also written:", "", *(f"- `{Path(p).resolve()}`" for p in listed)]
        client.create_artifact(ArtifactCreate(type="markdown", key=MARKDOWN_KEY, data="\n".join(lines),
                                              flow_run_id=flow_run_uuid,
                                              description=f"Ranked lists and t-SNE maps of run {run_id}"))
    return len(images)


__all__ = ["MARKDOWN_KEY", "attach_pictures"]
