"""Ray Serve applications. `openai_app` builds and runs the OpenAI-compatible chat, RAG and edit-set service from
its `ingress` (HTTP), `deployments` (the models) and `edit_store` (served edit sets on disk)."""

from trustray.serve_apps.config import ServeConfig

__all__ = ["ServeConfig"]
