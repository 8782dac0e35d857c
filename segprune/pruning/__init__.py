"""Pruning: unit discovery (DepGraph), percentile thresholds, physical removal."""
from .groups import PruneUnit, build_graph, discover_units, parts_without_units, skipped_groups, unit_gammas
from .physical import apply_widths, layer_widths, prune_channels, widths_spec
from .thresholds import check_keep_ratio, pruned_fraction, round_kept, rounded_count, select_channels

__all__ = ["PruneUnit", "build_graph", "discover_units", "skipped_groups", "parts_without_units", "unit_gammas",
           "apply_widths", "layer_widths", "prune_channels", "widths_spec", "check_keep_ratio", "pruned_fraction",
           "select_channels", "round_kept", "rounded_count"]
