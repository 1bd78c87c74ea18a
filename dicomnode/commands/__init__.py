"""Sub-commands of ``dicomnode``, one module per topic, each exposing ``register(app)``."""
