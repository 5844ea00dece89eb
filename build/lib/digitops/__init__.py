"""digitops: a handwritten-digit CNN from data to a served, explained, continuously improving model."""

__version__ = "0.1.0"
