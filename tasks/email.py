"""Email tasks: thin adapters over proj.mail."""
