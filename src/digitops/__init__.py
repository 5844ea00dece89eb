"""digitops: a handwritten-digit CNN from data to a served, explained, improving model."""

__version__ = "0.1.0"
