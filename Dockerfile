# One image for web, CPU worker and beat. GPU workers use Dockerfile.gpu (CUDA build of torch).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
RUN apt-get update && apt-get install -y --no-install-recommends curl && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md ./
COPY config config
COPY annotation annotation
COPY rewards rewards
COPY training training
COPY frontend frontend
COPY manage.py gunicorn.conf.py ./
# CPU torch for the CPU worker: the PyTorch CPU index keeps the image small.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install -e '.[ml]'
RUN DJANGO_SETTINGS_MODULE=config.settings python manage.py collectstatic --no-input
EXPOSE 8000
CMD ["gunicorn", "config.wsgi:application", "--bind", "0.0.0.0:8000", "--workers", "4", "--threads", "4"]
