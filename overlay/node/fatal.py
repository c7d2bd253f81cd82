"""The node's one kind of fatal error."""


class Fatal(Exception):
    """A startup or runtime error that ends the daemon with one line and exit status 1."""
