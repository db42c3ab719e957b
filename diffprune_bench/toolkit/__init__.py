"""What methods may use: structural pruning glue, masks, N:M sparsity, slimmable networks, second-order scores.

The run core (harness, trainer, metrics, data, models) never imports from here; methods do.
"""
