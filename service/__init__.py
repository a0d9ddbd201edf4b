"""FastAPI classification service over a bundle."""
