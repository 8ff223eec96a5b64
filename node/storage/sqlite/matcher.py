"""Placeholder until the matcher split lands: the SQLite query engine."""

from node.storage.query import QueryEngine as SqliteMatcher

__all__ = ["SqliteMatcher"]
