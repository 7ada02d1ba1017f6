"""chaos suite (issue 10)."""
