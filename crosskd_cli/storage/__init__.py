"""Files on disk: run folders and their lock, crash-safe state folders, atomic writes.

Torch-free.
"""
