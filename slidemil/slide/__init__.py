"""Slides: reading, tissue detection, tiling grids, h5 stores and synthetic cohorts."""
