"""Redis-backed stores of proj: plain redis-py, no Celery, no kombu."""
