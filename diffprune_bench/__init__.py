"""diffprune-bench: one harness to compare compression methods for diffusion models.

Methods plug in through :func:`diffprune_bench.registry.register_method`; the harness measures every
method the same way (fvcore MACs, clean-fid FID/KID, latency, consistency) and writes one run record.
"""

__version__ = "0.1.0"
