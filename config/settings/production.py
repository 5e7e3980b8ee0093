"""Production settings: refuse to start with a weak SECRET_KEY or with DEBUG on; schema and UI for signed-in
users only; no demo data; static files collected into the image (Dockerfile) and served by whitenoise."""

from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from .base import *  # noqa: F403
from .base import BASE_DIR, DEVELOPMENT_SECRET_KEY, MIDDLEWARE, SPECTACULAR_SETTINGS, env

if not env.str("SECRET_KEY", default=""):
    raise ImproperlyConfigured("SECRET_KEY must be set in the environment for production.")
SECRET_KEY = env.str("SECRET_KEY")
if SECRET_KEY == DEVELOPMENT_SECRET_KEY:
    raise ImproperlyConfigured("SECRET_KEY is the development key; set a random one for production.")
# Django's own deploy check (security.W009) asks for 50 characters and 5 distinct ones; here it is a refusal.
if len(SECRET_KEY) < 50 or len(set(SECRET_KEY)) < 5:
    raise ImproperlyConfigured("SECRET_KEY must be at least 50 characters with 5 distinct ones (a random string).")
if env.bool("DEBUG", default=False):
    raise ImproperlyConfigured("DEBUG must not be enabled in production.")
DEBUG = False
ANNOTATOR_PSEUDONYM_SALT = env.str("ANNOTATOR_PSEUDONYM_SALT", default=SECRET_KEY)

ALLOWED_HOSTS = env.list("ALLOWED_HOSTS")
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=True)
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=31536000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = True
SECURE_HSTS_PRELOAD = True
SESSION_COOKIE_SECURE = True
CSRF_COOKIE_SECURE = True
# `GET /healthz` for the container healthcheck, before host validation and the HTTPS redirect (config.health).
MIDDLEWARE = ["config.health.HealthCheckMiddleware", *MIDDLEWARE]
# A path of the code's tree, not of VAR_DIR (a run-time directory): `collectstatic` writes it when the image is
# built, and whitenoise serves it at run time, whatever VAR_DIR the container is given. STATIC_ROOT overrides it.
STATIC_ROOT = Path(env.str("STATIC_ROOT", default=str(BASE_DIR / "staticfiles")))
try:  # collectstatic fills it; an empty one (a checkout that has not collected yet) keeps whitenoise quiet
    STATIC_ROOT.mkdir(parents=True, exist_ok=True)
except OSError:  # a read-only image: it was collected at build time
    pass
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}

# The schema and its UI describe every endpoint: for signed-in users only.
SPECTACULAR_SETTINGS = {**SPECTACULAR_SETTINGS, "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAuthenticated"]}
ALLOW_DEMO_DATA = False
