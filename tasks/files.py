"""File tasks: thin adapters over proj.files."""
