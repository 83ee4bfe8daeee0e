"""PTTH: a reverse HTTP tunnel. Importing this package has no side effects."""

__version__ = "0.1.0"
