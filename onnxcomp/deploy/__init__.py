"""Deployment writers: artifacts for phones and edge runtimes (issue 10)."""
