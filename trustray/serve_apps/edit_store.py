"""The served edit sets on disk: what `/v1/edits` creates, lists, reports and deletes.

A finished edit set is an `EditSet` folder `<store_dir>/<id>/`; one still being made, that failed, or that the
locality check rejected is a job file `<store_dir>/.jobs/<id>.json` holding its status (a rejected edit set's weights
are never written, so it is never served). Ids are 12 hex digits; an edit set is served as the model
`<model_prefix><id>`. While it works, the editor touches `<store_dir>/.jobs/<id>.alive` every `HEARTBEAT_S`; a running
job whose heartbeat is older than `job_timeout_s` (its replica died, its node went away) is marked failed, which is
all there is to clean up: the edit set's folder appears in one rename at the end or not at all, and the served
model's weights are never changed outside a request.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from trustray.artifacts import METADATA_FILE, atomic_write_text, read_metadata
from trustray.core.editing.editset import EditSet
from trustray.serve_apps.config import EditServeConfig
from trustray.serve_apps.schemas import APIError

EDIT_ID = re.compile(r"^[0-9a-f]{12}$")
HEARTBEAT_S = 2.0


class EditStore:
    """Edit sets and their jobs in `config.store_dir` (shared storage on a multi-node cluster)."""

    def __init__(self, config: EditServeConfig):
        self.config = config
        self.root = Path(config.store_dir)

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex[:12]

    def folder(self, edit_id: str) -> Path:
        return self.root / edit_id

    def is_finished(self, edit_id: str) -> bool:
        return bool(EDIT_ID.match(edit_id)) and (self.folder(edit_id) / METADATA_FILE).is_file()

    def finished_ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(path.name for path in self.root.iterdir() if self.is_finished(path.name))

    def model_name(self, edit_id: str) -> str:
        return f"{self.config.model_prefix}{edit_id}"

    def edit_id_of(self, model: str) -> str | None:
        """The finished edit set a public model name names, or None."""
        prefix = self.config.model_prefix
        if model.startswith(prefix) and self.is_finished(model[len(prefix):]):
            return model[len(prefix):]
        return None

    # -- jobs --------------------------------------------------------------------------------------------
    def _job_path(self, edit_id: str) -> Path:
        return self.root / ".jobs" / f"{edit_id}.json"

    def _alive_path(self, edit_id: str) -> Path:
        return self.root / ".jobs" / f"{edit_id}.alive"

    def write_job(self, edit_id: str, job: dict[str, Any]) -> None:
        atomic_write_text(self._job_path(edit_id), json.dumps(job))

    def beat(self, edit_id: str) -> None:
        """Say the job's editor is still working on it."""
        self._alive_path(edit_id).touch()

    def drop_job(self, edit_id: str) -> None:
        self._job_path(edit_id).unlink(missing_ok=True)
        self._alive_path(edit_id).unlink(missing_ok=True)

    def _job(self, edit_id: str) -> dict[str, Any] | None:
        """The job's status; a running one whose editor stopped signalling is marked failed first."""
        path = self._job_path(edit_id)
        if not (EDIT_ID.match(edit_id) and path.is_file()):
            return None
        job = json.loads(path.read_text())
        if job["status"] == "running":
            alive = self._alive_path(edit_id)
            last = alive.stat().st_mtime if alive.exists() else job["created"]
            silent = time.time() - last
            if silent > self.config.job_timeout_s:
                job = {**job, "status": "failed", "error": f"interrupted: the editor stopped working on it ({silent:.0f} s "
                       "without a heartbeat; its replica or node is gone). Nothing was applied: send the edits again."}
                self.write_job(edit_id, job)
                self._alive_path(edit_id).unlink(missing_ok=True)
        return job

    def finish(self, edit_id: str, edit_set: EditSet) -> dict[str, Any]:
        """Save a finished edit set in place of its job; returns its summary."""
        edit_set.save(self.folder(edit_id))
        self.drop_job(edit_id)
        return self.summary(edit_id, edit_set.metadata)

    # -- what /v1/edits answers --------------------------------------------------------------------------
    def summary(self, edit_id: str, metadata: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": edit_id, "object": "edit_set", "model": self.model_name(edit_id),
            "status": metadata.get("status", "succeeded"), "created": metadata.get("created"),
            "name": metadata.get("name"), "editor": metadata.get("editor"), "n_edits": metadata.get("n_edits"),
            "metrics": metadata.get("metrics", {}), **({"error": metadata["error"]} if "error" in metadata else {}),
        }

    def _finished_folder(self, edit_id: str) -> Path:
        if not self.is_finished(edit_id):
            raise APIError(404, f"no edit set {edit_id!r}", param="edit_id", code="not_found")
        return self.folder(edit_id)

    def status(self, edit_id: str) -> dict[str, Any]:
        """The summary of a job, or of a finished edit set; 404 for neither."""
        job = self._job(edit_id)
        if job is not None:
            return self.summary(edit_id, job)
        return self.summary(edit_id, read_metadata(self._finished_folder(edit_id)))

    def delete(self, edit_id: str) -> dict[str, Any]:
        """Delete a failed job or a finished edit set; 409 while it is still being made, 404 for neither."""
        job = self._job(edit_id)
        if job is not None:
            if job["status"] == "running":
                raise APIError(409, f"edit set {edit_id!r} is still being made", param="edit_id", code="conflict")
            self.drop_job(edit_id)
        else:
            shutil.rmtree(self._finished_folder(edit_id))
        return {"id": edit_id, "object": "edit_set", "deleted": True}
