"""Thin Celery adapters over the services in proj/."""
