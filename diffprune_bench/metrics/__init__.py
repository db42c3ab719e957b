"""Measurements shared by every method: MACs, FID/KID, latency, consistency."""
