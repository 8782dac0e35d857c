"""Pruning: unit discovery (DepGraph), percentile thresholds, physical removal."""
from .groups import PruneUnit, build_graph, discover_units, parts_without_units, skipped_groups, unit_gammas
from .physical import (COMPENSATE_MODES, apply_widths, fit_channel_groups, fold_removed_constants, layer_widths,
                       prune_channels, removed_gamma_share, widths_spec, zero_gamma_removed)
from .thresholds import check_keep_ratio, pruned_fraction, round_kept, rounded_count, select_channels

__all__ = ["PruneUnit", "build_graph", "discover_units", "skipped_groups", "parts_without_units", "unit_gammas",
           "apply_widths", "layer_widths", "prune_channels", "fit_channel_groups", "widths_spec",
           "fold_removed_constants", "removed_gamma_share", "zero_gamma_removed", "COMPENSATE_MODES",
           "check_keep_ratio", "pruned_fraction", "select_channels", "round_kept", "rounded_count"]
