"""Pruning methods: importance criteria and sparsity training, one file per method."""
from .mtp import MTP, run_mtp

__all__ = ["MTP", "run_mtp"]
