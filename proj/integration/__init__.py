"""proj's layer over Celery, kombu, redis-py and Flower: what it replaces or extends, and nothing else."""
