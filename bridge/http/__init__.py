"""The HTTP face: isendu intake and verification, health, readiness, metrics."""
