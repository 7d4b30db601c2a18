"""modelserve: serve the Pima diabetes classifier (Flask/gunicorn web, Celery/RabbitMQ workers)."""

__version__ = "1.0.0"
