"""Development and test settings; production lives in ``config.settings.production``."""

from .base import *  # noqa: F403
