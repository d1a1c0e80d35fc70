"""Vertex AI CustomJob specs (YAML) and ``python -m deploy.vertex.submit``."""
