"""mlbase package."""
