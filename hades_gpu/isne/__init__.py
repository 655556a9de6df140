"""isne layer."""
