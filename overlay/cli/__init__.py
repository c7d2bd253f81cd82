"""The front end of each `overlay <command>`: flags in, typed options out."""
