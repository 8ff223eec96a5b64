"""Storage: the index (a unit of work, :mod:`node.storage.interface`) and the blob store."""
