"""Predictions, metrics (shipped offline) and the report, table and model card."""
