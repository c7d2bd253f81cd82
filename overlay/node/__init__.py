"""The node agent behind `overlay run`: startup, registry events, what it shows, its lifecycle."""
