"""Ray Serve applications. `openai_app` serves chat and RAG behind an OpenAI-compatible HTTP API."""

from trustray.serve_apps.config import ServeConfig

__all__ = ["ServeConfig"]
