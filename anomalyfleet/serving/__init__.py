"""Ray Serve scoring service: one HTTP API for every production line (see app.py)."""
