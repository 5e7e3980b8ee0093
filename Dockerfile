# One image for web, migrate, the CPU worker and beat (docker-compose.yml). GPU workers: Dockerfile.gpu.
# Python 3.11, as pyproject.toml requires.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    DJANGO_SETTINGS_MODULE=config.settings.production \
    VAR_DIR=/var/lib/rlhf \
    ARTIFACTS_DIR=/artifacts
WORKDIR /app

# curl for the web healthcheck; a user of its own, with the same uid as in Dockerfile.gpu (both write the
# artifacts volume), owning the run-time directories only: the code stays root's.
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --user-group --create-home rlhf \
 && install -d -o rlhf -g rlhf /var/lib/rlhf /artifacts

# The CPU build of torch (PyTorch's CPU index: no CUDA libraries in this image), in a layer of its own.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && python -c "import torch; assert torch.version.cuda is None, torch.version.cuda"

COPY pyproject.toml manage.py gunicorn.conf.py ./
COPY config config
COPY annotation annotation
COPY rewards rewards
COPY training training
COPY frontend frontend
RUN pip install --no-cache-dir -e '.[ml]'

# Static files, under the production settings, into their STATIC_ROOT (/app/staticfiles), which whitenoise serves
# at run time. The settings refuse to load without a SECRET_KEY: this one is a placeholder for this command only.
RUN SECRET_KEY=collectstatic-at-build-time-only-not-a-secret-0123456789abcdef ALLOWED_HOSTS=localhost \
    python manage.py collectstatic --no-input -v0

USER rlhf
EXPOSE 8000
CMD ["gunicorn", "config.wsgi:application", "--bind", "0.0.0.0:8000", "--workers", "4", "--threads", "4", "--access-logfile", "-"]
