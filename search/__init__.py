"""Precision search (Optuna); see the search issue."""
