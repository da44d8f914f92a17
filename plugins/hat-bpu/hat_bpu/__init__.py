"""hat-bpu: a HAT plugin."""

__version__ = "0.1.0"
