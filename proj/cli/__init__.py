"""The `proj` command: one module per subcommand."""
