"""Runs: the workspace, the run store (SQLite), the one owner of a run's files, training runs, and the tasks and
worker processes every long computation runs in."""
