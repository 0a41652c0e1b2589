"""Model loading, attention for packed rows, and the supervised loss."""
