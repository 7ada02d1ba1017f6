"""security suite (issue 10)."""
