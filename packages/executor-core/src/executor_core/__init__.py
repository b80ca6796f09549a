"""executor_core."""
