"""badinput suite (issue 10)."""
