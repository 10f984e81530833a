"""Routing: conditions compiled once at load, and the router that turns items into deliveries."""
