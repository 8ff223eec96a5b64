"""The PostgreSQL backend of the storage interface: several nodes on one index.

With :mod:`node.storage.sqlite`, the only package of the node that holds SQL or
imports a database driver (``psycopg`` 3).
"""
