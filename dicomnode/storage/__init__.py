"""Durable storage of received instances: the store and its index, series assembly, disk
back-pressure, retention."""
