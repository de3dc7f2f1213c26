"""caiosfs: object storage as a filesystem for GPU clusters."""
__version__ = "0.1.0"
