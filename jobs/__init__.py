"""Runnable beamops pipelines: ``python -m jobs.<name> --help``."""
