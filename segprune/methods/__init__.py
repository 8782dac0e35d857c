"""Pruning methods: importance criteria and sparsity training, one file per method."""
from .base import METHODS, PruningMethod, build_method, per_layer_select
from .fpgm import FPGM
from .mtp import MTP, MultiTaskPruning, run_mtp
from .slimming import Slimming
from .thinet import ThiNet
from .uniform import Uniform, reinitialize_

__all__ = ["MTP", "MultiTaskPruning", "run_mtp", "PruningMethod", "METHODS", "build_method", "per_layer_select",
           "Uniform", "reinitialize_", "Slimming", "ThiNet", "FPGM"]
