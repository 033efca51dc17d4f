"""SAM-Match training core: data, models, methods, evaluation. Never imports flwr."""

__version__ = "0.1.0"
