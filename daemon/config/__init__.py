"""The configuration: a TOML file loaded into the frozen dataclasses of daemon.model, every check naming its
TOML path.

    config/
      load.py      load_config, build_config: the file's tables checked and turned into the model
      tables.py    a TOML table read by type, its problems named by path
      values.py    durations, sizes, gaps, hours
      secrets.py   passwords and tokens from files, the environment, systemd credentials
      presets.py   provider = "google" | "microsoft" | "generic"
      database.py  [daemon] database, node and lease; a URL shown with its passwords masked
      printing.py  check --print

The model's names are here too, for the commands and tests that load a configuration and read it.
"""

from __future__ import annotations

from daemon.config.database import POSTGRES_SCHEMES
from daemon.config.load import (
    DEFAULT_PATH,
    LOOPBACK_HOSTS,
    MIN_TOKEN,
    accepted_state,
    address_problem,
    build_config,
    config_digest,
    config_path_from,
    database_of,
    holiday_calendar_problem,
    is_loopback,
    load_accepted,
    load_config,
    plainly_valid,
    valid_address,
)
from daemon.config.presets import PROVIDERS, SENT_COPIES, Preset
from daemon.config.printing import effective_dict
from daemon.config.secrets import MAX_SECRET
from daemon.config.values import format_duration, parse_duration, parse_gap, parse_hours, parse_size
from daemon.model import (
    DAYS,
    DEFAULT_PAUSE,
    MASK,
    UNSUBSCRIBE_LINK,
    ApiSettings,
    Auth,
    Automation,
    Cadence,
    Config,
    DaemonSettings,
    Mailbox,
    OAuth2,
    PauseRule,
    Playbook,
    Schedule,
    Secret,
    Server,
    Step,
    User,
    Warmup,
)
from daemon.store.urls import shown_database

__all__ = [
    "DAYS",
    "DEFAULT_PATH",
    "DEFAULT_PAUSE",
    "LOOPBACK_HOSTS",
    "MASK",
    "MAX_SECRET",
    "MIN_TOKEN",
    "POSTGRES_SCHEMES",
    "PROVIDERS",
    "SENT_COPIES",
    "UNSUBSCRIBE_LINK",
    "ApiSettings",
    "Auth",
    "Automation",
    "Cadence",
    "Config",
    "DaemonSettings",
    "Mailbox",
    "OAuth2",
    "PauseRule",
    "Playbook",
    "Preset",
    "Schedule",
    "Secret",
    "Server",
    "Step",
    "User",
    "Warmup",
    "accepted_state",
    "address_problem",
    "build_config",
    "config_digest",
    "config_path_from",
    "database_of",
    "effective_dict",
    "format_duration",
    "holiday_calendar_problem",
    "is_loopback",
    "load_accepted",
    "load_config",
    "parse_duration",
    "parse_gap",
    "parse_hours",
    "parse_size",
    "plainly_valid",
    "shown_database",
    "valid_address",
]
