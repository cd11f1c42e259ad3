"""Transform passes: each rewrites the graph and keeps the analysis annotations valid."""
