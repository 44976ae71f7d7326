"""The cache warmer: its CloudEvents service (app.py), on the cache tier library (tier/) and beside the
cold-start optimizer (optimizer/)."""
