"""The embedded backend of the storage interface: one SQLite file in WAL mode.

The only package of the node that holds SQL for SQLite or imports ``sqlite3``.
"""
