"""Holds the ``sitecustomize.py`` that ``rope-patch run`` puts on PYTHONPATH.

This folder itself is what goes on PYTHONPATH; nothing imports this package.
"""
