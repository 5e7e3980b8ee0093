"""Settings from the environment (django-environ).

With nothing set, an embedded default that needs no server: SQLite under ``var/`` and a Celery broker
on kombu's filesystem transport, so a laptop runs web + worker in minutes. ``DATABASE_URL`` and
``CELERY_BROKER_URL`` switch to PostgreSQL and Redis.
"""

from pathlib import Path

import environ

BASE_DIR = Path(__file__).resolve().parent.parent.parent
env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env", overwrite=False) if (BASE_DIR / ".env").is_file() else None

VAR_DIR = Path(env.str("VAR_DIR", default=str(BASE_DIR / "var")))
VAR_DIR.mkdir(parents=True, exist_ok=True)

# Development default only; production settings refuse it (and any key shorter than 50 characters).
DEVELOPMENT_SECRET_KEY = "dev-only-insecure-key-do-not-deploy"
SECRET_KEY = env.str("SECRET_KEY", default=DEVELOPMENT_SECRET_KEY)
DEBUG = env.bool("DEBUG", default=True)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # swagger-ui's files, served from here rather than a CDN
    "annotation",
    "rewards",
    "training",
    "frontend",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    # Before anything reads the body: a body over the upload limit, a NUL in the query (config.request_limits).
    "config.request_limits.RequestLimitsMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'db.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # One writer at a time: take the write lock at BEGIN so concurrent claims queue instead of failing.
    DATABASES["default"].setdefault("OPTIONS", {}).update({"transaction_mode": "IMMEDIATE", "timeout": 20})
    # A file, not memory, so that a worker process in the end-to-end tests sees the test database.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test-db.sqlite3")}
else:
    DATABASES["default"]["CONN_MAX_AGE"] = env.int("CONN_MAX_AGE", default=60)
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

CACHES = {"default": env.cache("CACHE_URL", default="locmemcache://")}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "staticfiles"
STATIC_ROOT.mkdir(exist_ok=True)
LOGIN_URL = "/login/"
LOGIN_REDIRECT_URL = "/"

# Where checkpoints and run artefacts live (a shared volume in production).
ARTIFACTS_DIR = Path(env.str("ARTIFACTS_DIR", default=str(VAR_DIR / "artifacts")))
# The public reference data (HH-RLHF, tokenizers, ...): ../shared/data beside the repository.
SHARED_DATA_DIR = Path(env.str("SHARED_DATA_DIR", default=str(BASE_DIR.parent / "shared" / "data")))

REST_FRAMEWORK = {
    # JSON bodies checked by annotation.validation (no NUL or lone surrogate anywhere); forms as usual.
    "DEFAULT_PARSER_CLASSES": [
        "annotation.api.fields.CheckedJSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.SessionAuthentication",
        "rest_framework.authentication.TokenAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.LimitOffsetPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "annotation.api.errors.exception_handler",
    # `?format=` selects the export format (native, trl, hh-rlhf), not a DRF renderer.
    "URL_FORMAT_OVERRIDE": None,
    # How many proxies in front of the web tier set X-Forwarded-For; 0: the client is REMOTE_ADDR (a header
    # sent by the client itself must not choose whose rate limit it counts against).
    "NUM_PROXIES": env.int("NUM_PROXIES", default=0),
    "DEFAULT_THROTTLE_RATES": {
        "claim": env.str("THROTTLE_CLAIM", default="120/min"),
        "submit": env.str("THROTTLE_SUBMIT", default="120/min"),
    },
}

SPECTACULAR_SETTINGS = {
    "TITLE": "RLHF platform API",
    "DESCRIPTION": "Prompts, comparison tasks, annotations, batches, imports and exports of the Llama 2 "
    "human-feedback loop.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {
        "ChoiceEnum": ["a", "b"],
        "DomainEnum": "annotation.models.tasks.Domain",
        "RiskCategoryEnum": "annotation.models.content.RiskCategory",
        "PolicyKindEnum": "annotation.models.registry.PolicyKind",
        "RunKindEnum": "annotation.models.registry.RunKind",
        "RunStatusEnum": "annotation.models.registry.RunStatus",
        "OpenClosedEnum": "annotation.models.tasks.BatchStatus",  # a batch's status, and a campaign's (the same choices)
        "CampaignKindEnum": "annotation.models.evaluation.CampaignKind",
        "TaskStatusEnum": "annotation.models.tasks.TaskStatus",
    },
}

# Log-in (token and session) failures allowed per user name and per client address in a window; past them
# every attempt is refused until the window ends (annotation.throttling).
LOGIN_FAILURES_PER_USER = env.int("LOGIN_FAILURES_PER_USER", default=10)
LOGIN_FAILURES_PER_ADDRESS = env.int("LOGIN_FAILURES_PER_ADDRESS", default=50)
LOGIN_FAILURE_WINDOW_SECONDS = env.int("LOGIN_FAILURE_WINDOW_SECONDS", default=900)

# Demo users with a known password (`load_demo`): never under the production settings.
ALLOW_DEMO_DATA = True

# Celery: the embedded default is kombu's filesystem transport (no server) with results in SQLite.
_celery_fs = VAR_DIR / "celery" / "broker"
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="filesystem://")
if CELERY_BROKER_URL.startswith("filesystem://"):
    for sub in ("queue", "processed", "control"):
        (_celery_fs / sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_celery_fs / "queue"),
        "data_folder_out": str(_celery_fs / "queue"),
        "processed_folder": str(_celery_fs / "processed"),
        "control_folder": str(_celery_fs / "control"),
        "store_processed": False,
        "polling_interval": 0.2,  # seconds; a written prompt reaches the model worker within a second
    }
CELERY_RESULT_BACKEND = env.str(
    "CELERY_RESULT_BACKEND", default=f"db+sqlite:///{VAR_DIR / 'celery-results.sqlite3'}"
)
CELERY_TASK_DEFAULT_QUEUE = "default"
# Heavy work (reward models, policies, sampling) goes to GPU workers.
# By task name (tasks are named "<app>.<verb>", not by module): GPU work on the `gpu` queue, the rest on `default`.
# The model worker's fill (training.fill_responses) may have a queue of its own (MODEL_WORKER_QUEUE, e.g.
# "generation", served by a worker that holds the current policy): on `gpu`, written prompts wait while a long run
# trains on the single-concurrency GPU worker.
MODEL_WORKER_QUEUE = env.str("MODEL_WORKER_QUEUE", default="gpu")
CELERY_TASK_ROUTES = {"training.fill_responses": {"queue": MODEL_WORKER_QUEUE},  # an exact name wins over patterns
                      "training.*": {"queue": "gpu"}, "rewards.*": {"queue": "gpu"}}  # fmt: skip
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TIMEZONE = TIME_ZONE
# Redis re-delivers an unacknowledged message only after this long; the reconciler below is what notices a dead
# worker within a minute, so the visibility timeout only has to exceed the longest single task start.
if not CELERY_BROKER_URL.startswith("filesystem://"):
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": env.int("CELERY_VISIBILITY_TIMEOUT", default=43200)}

# Durable runs (annotation.services.runs, training.runs): a worker beats a running run's heartbeat every
# RUN_HEARTBEAT_SECONDS; beat's reconciler re-queues a run whose heartbeat is older than RUN_STALE_SECONDS and
# resends a queued run's message after RUN_RESEND_SECONDS. A re-queued run resumes from its stage's last
# checkpoint: PPO's every 10 minutes, SFT's every 50 steps, a reward model's every 10 (the runs' params change them).
RUN_HEARTBEAT_SECONDS = env.float("RUN_HEARTBEAT_SECONDS", default=10.0)
RUN_STALE_SECONDS = env.float("RUN_STALE_SECONDS", default=90.0)
RUN_RESEND_SECONDS = env.float("RUN_RESEND_SECONDS", default=600.0)
RUN_RECONCILE_SECONDS = env.float("RUN_RECONCILE_SECONDS", default=30.0)
RUN_MIN_PAIRS = env.int("RUN_MIN_PAIRS", default=8)
# Server paths a researcher may hand to runs and registrations (prompts files, checkpoints, tokenizers): with roots
# set, only files under them (and under ARTIFACTS_DIR); empty (the embedded default), any path the processes read.
RUN_INPUT_ROOTS = env.list("RUN_INPUT_ROOTS", default=[])
# The model worker: comparisons awaiting responses are filled on demand (a message after each new prompt or
# continuation, expiring when a busy worker cannot get to it) and by beat every MODEL_WORKER_POLL_SECONDS.
MODEL_WORKER_ON_DEMAND = env.bool("MODEL_WORKER_ON_DEMAND", default=True)
MODEL_WORKER_ASK_EXPIRES = env.float("MODEL_WORKER_ASK_EXPIRES", default=120.0)
MODEL_WORKER_POLL_SECONDS = env.float("MODEL_WORKER_POLL_SECONDS", default=30.0)
MODEL_WORKER_TEMPERATURES = [float(t) for t in env.list("MODEL_WORKER_TEMPERATURES", default=["0.6", "1.0"])]
MODEL_WORKER_MAX_NEW_TOKENS = env.int("MODEL_WORKER_MAX_NEW_TOKENS", default=128)
CELERY_BEAT_SCHEDULE = {
    "reconcile-runs": {"task": "annotation.reconcile_runs", "schedule": RUN_RECONCILE_SECONDS,
                       "options": {"expires": RUN_RECONCILE_SECONDS}},
    "fill-responses": {"task": "training.fill_responses", "schedule": MODEL_WORKER_POLL_SECONDS,
                       "options": {"expires": MODEL_WORKER_POLL_SECONDS}},
}
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")

# Annotation workflow defaults (a batch can override overlap, gold rate, lease and the too-fast floor).
ANNOTATION_LEASE_SECONDS = env.int("ANNOTATION_LEASE_SECONDS", default=900)
ANNOTATION_TOO_FAST_SECONDS = env.float("ANNOTATION_TOO_FAST_SECONDS", default=4.0)
# Salt for the pseudonymous annotator ids in exports.
ANNOTATOR_PSEUDONYM_SALT = env.str("ANNOTATOR_PSEUDONYM_SALT", default=SECRET_KEY)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
}
