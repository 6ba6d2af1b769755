"""setrain."""
