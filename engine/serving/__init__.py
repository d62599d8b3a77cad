"""`lacuna engine`: one resident engine behind a FIM HTTP API (service.py), or Ray Serve replicas of it."""
