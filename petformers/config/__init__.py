"""The run configuration: schema (schema.py), MindFormers mapping (mindformers.py), YAML tree (yamlio.py),
loading and the resolved dump (load.py), docs/config.md's key tables (docs.py)."""
