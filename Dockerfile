# One image for every process of proj: docker-compose.yml runs it as the email worker, the files
# worker, beat and Flower, which differ only in their command.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed non-root user: Celery refuses to be comfortable as root, and a task that went wrong
# owns nothing but /data. The folders exist here so named volumes inherit their owner.
RUN useradd --create-home --uid 10001 --user-group app \
 && install -d -o app -g app /data /data/files /data/beat

WORKDIR /app
COPY pyproject.toml README.md celeryconfig.py ./
COPY proj ./proj
COPY tasks ./tasks
# Installed as root into site-packages: the app user can run the code but not change it. No extras:
# the local stack's libraries (proj[stack]) and the tests' (proj[dev]) stay out of the image.
RUN pip install . && rm -rf build ./*.egg-info

USER app
ENV FILES_ROOT=/data/files \
    PROJ_LOCAL_DIR=/data

# The email worker unless compose says otherwise; exec form so SIGTERM reaches Celery itself.
# 16 threads: one process uses one core at most, so run one container per core (compose: replicas).
CMD ["celery", "-A", "proj", "worker", "-Q", "email,email_bulk,default", "-P", "threads", "-c", "16", \
     "-n", "email@%h", "--without-mingle", "--without-gossip", "-l", "INFO"]
