"""orchestrator_core."""
