"""Scoring engine: slides in, predictions, attention heatmaps, GeoJSON and top-k tiles out."""
