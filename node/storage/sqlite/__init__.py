"""The embedded SQLite storage backend: the only place (with postgresql/) that holds SQL."""
