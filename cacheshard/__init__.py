"""cacheshard package."""
