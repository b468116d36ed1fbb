"""The storage layer: the workspace (``$TL_HOME``), the run store (SQLite), the one owner of a run's files, and
process bookkeeping. Every layer above may use it; it imports nothing above it."""
