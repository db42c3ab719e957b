"""Turning run records into results: the leaderboard tables, plots and run summaries."""
