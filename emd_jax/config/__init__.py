"""Config defaults and validation."""
