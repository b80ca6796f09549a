"""manager_core."""
