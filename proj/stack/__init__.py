"""The local stack of `proj up`: plan, process manager and the development SMTP server."""
