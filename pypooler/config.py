"""Pooler configuration: the schema, where its values come from, and how problems are reported.

`load_settings()` is the one way the pooler reads its configuration. The rules it keeps:

- Sources, highest priority first: keyword overrides given to `load_settings()`, then
  `PYPOOLER_*` environment variables, then the config file, then the defaults written below.
  The file is TOML, or PgBouncer's ini format when its name ends in `.ini` (pgbouncer_ini.py:
  its keys translated, problems reported at their file and line, warnings logged).
  Tables merge key by key across sources, so `PYPOOLER_DATABASES__APP__PORT=5433` changes only
  the port of a `[databases.app]` defined in the file and keeps its host, user and password.
- Environment variable names are case-insensitive and `__` steps into a table. So a database
  named from the environment is always lower-case, and database names differing only in case
  are refused: otherwise an override meant for `[databases.App]` would quietly create a second,
  half-configured database `app`.
- An unknown key anywhere in the file, among the overrides or inside a table reached from the
  environment is an error: a misspelt setting must never fall back to its default unnoticed.
  Only an unknown top-level `PYPOOLER_*` variable is ignored (pydantic-settings reads just the
  variables that name a setting, and the environment is shared with everything else).
- Every problem is reported at once, one readable line each, in a `ConfigError`; pydantic's
  `ValidationError` never escapes this module.
- The database names `pgbouncer` and `pypooler` belong to the admin console.
- A server password never appears in a repr, an error line or a chained traceback.
- Settings that name a file take "" for "not set" (TOML has no null); a file that is set must
  exist when the configuration is loaded. Checks that involve several settings (auth_type md5
  needs somewhere to read passwords from, TLS needs a certificate) run after the schema's own and
  are reported the same way, one line each.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from pypooler.pgbouncer_ini import IniSettings, read_ini

__all__ = [
    "ADMIN_DATABASE_NAMES",
    "CONFIG_PATH_ENV",
    "DEFAULT_AUTH_QUERY",
    "RESTART_ONLY_SETTINGS",
    "TLS_REQUIRED_MODES",
    "AuthType",
    "ClientTlsMode",
    "ConfigError",
    "DatabaseConfig",
    "LogLevel",
    "PoolMode",
    "ServerTlsMode",
    "SessionStatePolicy",
    "Settings",
    "UserConfig",
    "check_settings",
    "load_settings",
]

PoolMode = Literal["session", "transaction", "statement"]
SessionStatePolicy = Literal["log", "error", "pin"]
ListenMode = Literal["multiplex", "session_state"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
# How clients prove who they are. "plain" is PostgreSQL's "password" (cleartext); "hba" reads the
# method per connection from auth_hba_file; "cert" takes the user from the client certificate.
AuthType = Literal["trust", "plain", "md5", "scram-sha-256", "cert", "hba"]
# Methods that check a password, hence need auth_file or auth_query.
PASSWORD_AUTH_TYPES = frozenset({"plain", "md5", "scram-sha-256"})
ClientTlsMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
# The client_tls_sslmode values that refuse a client without TLS.
TLS_REQUIRED_MODES = frozenset({"require", "verify-ca", "verify-full"})
ServerTlsMode = Literal["disable", "prefer", "require", "verify-ca", "verify-full"]

# Reads the secret PostgreSQL itself would check; NULL once VALID UNTIL has passed, no row for a
# role that cannot log in. Schema-qualified so a search_path cannot substitute other objects.
DEFAULT_AUTH_QUERY = (
    "SELECT rolname, CASE WHEN rolvaliduntil IS NULL OR rolvaliduntil > pg_catalog.now()"
    " THEN rolpassword END FROM pg_catalog.pg_authid WHERE rolname = $1 AND rolcanlogin"
)

ENV_PREFIX = "PYPOOLER_"
ENV_NESTED_DELIMITER = "__"
# Names the config file when load_settings() is given no path.
CONFIG_PATH_ENV = "PYPOOLER_CONFIG"
# A client asking for one of these databases reaches the admin console, never a server.
ADMIN_DATABASE_NAMES = frozenset({"pgbouncer", "pypooler"})
# Settings a RELOAD cannot change (they take effect at the next start): the listening sockets.
RESTART_ONLY_SETTINGS = frozenset(
    {
        "listen_addr",
        "listen_port",
        "listen_backlog",
        "unix_socket_dir",
        "unix_socket_mode",
        "unix_socket_group",
    }
    | {"metrics_addr", "metrics_port"}
)

MAX_PORT = 65535

log = logging.getLogger(__name__)


class ConfigError(Exception):
    """The configuration cannot be used; `problems` holds one readable line per problem."""

    def __init__(self, problems: list[str]) -> None:
        # Passed on to Exception so that args round-trips through pickle.
        super().__init__(problems)
        self.problems: list[str] = list(problems)

    def __str__(self) -> str:
        return "\n".join(self.problems)


def _check_database_name(name: str) -> str:
    if not name:
        raise ValueError("database name must not be empty")
    if any(char.isspace() for char in name):
        raise ValueError(f"database name {name!r} must not contain whitespace")
    # casefold: the environment can only spell lower-case names, and "PgBouncer" next to the
    # admin console's "pgbouncer" would only confuse.
    if name.casefold() in ADMIN_DATABASE_NAMES:
        raise ValueError(f"database name {name!r} is reserved for the admin console")
    return name


DatabaseName = Annotated[str, AfterValidator(_check_database_name)]


def _port_of(text: str, item: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_PORT:
        raise ValueError(f"host {item!r}: the port must be a number from 1 to {MAX_PORT}")
    return int(text)


class DatabaseConfig(BaseModel):
    """One `[databases.NAME]` table: the server a client asking for database NAME is sent to."""

    model_config = ConfigDict(extra="forbid")

    # One host, or several separated by commas (hosts.py), each with its own ":port" if it
    # differs from `port` ("db1,db2:5433"; an IPv6 address with a port in brackets, "[::1]:5433").
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=5432, ge=1, le=MAX_PORT)
    # With several hosts: each new server starts at the next ("round-robin", PgBouncer's way) or
    # tries them in order ("disable": failover); and which kind of server to accept.
    load_balance_hosts: Literal["round-robin", "disable"] = "round-robin"
    target_session_attrs: Literal["any", "read-write", "read-only"] = "any"
    # Database name on the server; None means the entry's own NAME.
    dbname: str | None = Field(default=None, min_length=1)
    # Log in to the server as this user whoever the client is; None means the client's user.
    user: str | None = Field(default=None, min_length=1)
    password: str | None = Field(default=None, repr=False)
    # None means Settings.default_pool_size.
    pool_size: int | None = Field(default=None, ge=1)
    # None means Settings.min_pool_size, Settings.reserve_pool_size, Settings.max_db_connections.
    min_pool_size: int | None = Field(default=None, ge=0)
    reserve_pool: int | None = Field(default=None, ge=0)
    max_db_connections: int | None = Field(default=None, ge=0)
    # None means Settings.pool_mode.
    pool_mode: PoolMode | None = None
    # None means Settings.auth_type.
    auth_type: AuthType | None = None
    # Startup parameters every server of this database is opened with (PgBouncer's
    # client_encoding, datestyle, timezone, application_name); clients still get their own.
    client_encoding: str | None = None
    datestyle: str | None = None
    timezone: str | None = None
    application_name: str | None = None
    # Run on each new server before any client gets it; its errors are logged, not fatal.
    connect_query: str | None = None
    # The user auth_query runs as for this database; None means Settings.auth_user.
    auth_user: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _hosts_are_readable(self) -> DatabaseConfig:
        self.targets()  # ValueError names what is wrong
        return self

    def targets(self) -> tuple[tuple[str, int], ...]:
        """(host, port) of each server of the entry, in the order written."""
        targets = []
        for item in self.host.split(","):
            text = item.strip()
            host, port = text, self.port
            if text.startswith("["):  # [IPv6]:port
                host, _, rest = text[1:].partition("]")
                port = _port_of(rest[1:], text) if rest.startswith(":") else self.port
            elif text.count(":") == 1:
                host, _, port_text = text.partition(":")
                port = _port_of(port_text, text)
            if not host:
                raise ValueError(f"host {self.host!r}: an empty name in the list")
            targets.append((host, port))
        return tuple(targets)

    def startup_parameters(self) -> tuple[tuple[str, str], ...]:
        names = ("client_encoding", "datestyle", "timezone", "application_name")
        return tuple((name, value) for name in names if (value := getattr(self, name)) is not None)


class UserConfig(BaseModel):
    """One `[users.NAME]` table (PgBouncer's [users]): settings for the pools of server user NAME."""

    model_config = ConfigDict(extra="forbid")

    # None means the database's pool_mode, else Settings.pool_mode.
    pool_mode: PoolMode | None = None
    # None means Settings.max_user_connections.
    max_user_connections: int | None = Field(default=None, ge=0)
    # None means the database's pool_size, else default_pool_size.
    pool_size: int | None = Field(default=None, ge=1)


class Settings(BaseSettings):
    """The whole configuration: top-level TOML keys plus the `[databases.NAME]` tables.

    Build it with `load_settings()`. Constructing `Settings(...)` directly reads only its
    keyword arguments and `os.environ`, never a file, and raises pydantic's ValidationError.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        case_sensitive=False,
        extra="forbid",
    )

    # One host name or address; "*" listens on every address (IPv4 and IPv6), as in PgBouncer.
    listen_addr: str = Field(default="127.0.0.1", min_length=1)
    # 0 asks the OS for any free port (tests use it).
    listen_port: int = Field(default=6432, ge=0, le=MAX_PORT)
    # Also listen on the unix-domain socket DIR/.s.PGSQL.<listen_port> (PgBouncer's default
    # directory on Linux); "" listens on TCP only. Its mode, and its group ("" leaves it).
    unix_socket_dir: str = "/tmp"
    unix_socket_mode: int = Field(default=0o777, ge=0, le=0o7777)
    unix_socket_group: str = ""
    # Connections the kernel queues for accept() (PgBouncer: 128); bursts of serverless
    # functions connect all at once.
    listen_backlog: int = Field(default=4096, ge=1)
    pool_mode: PoolMode = "transaction"
    default_pool_size: int = Field(default=20, ge=1)
    max_client_conn: int = Field(default=1000, ge=1)
    # Servers each pool keeps open even when idle (opened by the maintenance pass); 0: none.
    min_pool_size: int = Field(default=0, ge=0)
    # Servers a pool may open beyond its pool_size once a client has waited
    # reserve_pool_timeout seconds; 0: no reserve.
    reserve_pool_size: int = Field(default=0, ge=0)
    reserve_pool_timeout: float = Field(default=5.0, ge=0, allow_inf_nan=False)
    # Servers (open or connecting) across all pools of one database / of one server user,
    # whatever the pools' sizes add up to; 0: no bound.
    max_db_connections: int = Field(default=0, ge=0)
    max_user_connections: int = Field(default=0, ge=0)
    # Seconds a client may wait for a server connection; 0 waits forever.
    query_wait_timeout: float = Field(default=120.0, ge=0, allow_inf_nan=False)
    server_connect_timeout: float = Field(default=15.0, gt=0, allow_inf_nan=False)
    # Seconds to wait before connecting again after a server connect failed.
    server_login_retry: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    # Run when a session-mode client leaves, before its server is reused; "" runs nothing.
    server_reset_query: str = "DISCARD ALL"
    # Remove a pool made for the "*" fallback or for a client's own user name (no forced user)
    # once it has had no client and no server for this many seconds; 0 keeps them.
    autodb_idle_timeout: float = Field(default=3600.0, ge=0, allow_inf_nan=False)
    # At most this many such pools at once; a login that would make one more is refused (53400)
    # unless an unused one can be removed to make room.
    max_auto_pools: int = Field(default=1000, ge=1)
    # Run on a server idle for server_check_delay seconds (at most once per that delay, and
    # once a second), by the maintenance pass: a server that fails it is closed; "" runs nothing.
    server_check_query: str = "select 1"
    server_check_delay: float = Field(default=30.0, ge=0, allow_inf_nan=False)
    # Seconds a host of a several-host entry is tried last after its connect failed (hosts.py).
    host_down_timeout: float = Field(default=10.0, ge=0, allow_inf_nan=False)
    # Close servers idle longer than this many seconds; 0 keeps them.
    server_idle_timeout: float = Field(default=600.0, ge=0, allow_inf_nan=False)
    # Close servers older than this many seconds when they are released; 0 keeps them.
    server_lifetime: float = Field(default=3600.0, ge=0, allow_inf_nan=False)
    # SIGTERM: seconds running transactions get to finish before every connection is closed
    # (SIGINT allows at most FAST_DRAIN_S of it); 0 closes at once.
    shutdown_drain_timeout: float = Field(default=20.0, ge=0, allow_inf_nan=False)
    tcp_keepalive: bool = True
    # TCP keepalive timing and TCP_USER_TIMEOUT on client and server sockets; 0: the OS default.
    tcp_keepidle: int = Field(default=0, ge=0)  # seconds idle before the first probe
    tcp_keepintvl: int = Field(default=0, ge=0)  # seconds between probes
    tcp_keepcnt: int = Field(default=0, ge=0)  # probes unanswered before the connection is dead
    tcp_user_timeout: int = Field(default=0, ge=0)  # ms sent data may stay unacknowledged
    # Protocol-level named prepared statements kept per server in transaction and statement
    # mode (least recently used ones are closed beyond it); 0 passes them through untracked.
    max_prepared_statements: int = Field(default=200, ge=0)
    # Append " - address:port" of the client to the application_name it logs in with (what the
    # server's pg_stat_activity shows), as PgBouncer does; a later SET is left alone.
    application_name_add_host: bool = False
    # Startup parameters accepted from clients and otherwise ignored (names, any case).
    ignore_startup_parameters: list[str] = ["extra_float_digits"]
    # What to do when a transaction-mode client leaves session state on its server
    # (SET, advisory locks, temp tables, LISTEN, WITH HOLD cursors, SQL PREPARE):
    # "log" warns once per application_name and kind, "error" refuses the statement,
    # "pin" keeps the server with that client until it disconnects.
    session_state_policy: SessionStatePolicy = "log"
    # LISTEN in transaction and statement mode: "multiplex" answers LISTEN/UNLISTEN in pypooler
    # and holds every client's channels on one listener connection per pool (listening.py);
    # "session_state" sends LISTEN to the borrowed server, handled by session_state_policy.
    listen_mode: ListenMode = "multiplex"
    log_connections: bool = True
    log_disconnections: bool = True
    log_level: LogLevel = "INFO"

    # Client authentication. A path of "" means not set.
    auth_type: AuthType = "trust"
    auth_file: str = ""  # PgBouncer's userlist.txt format: "user" "secret" per line
    auth_hba_file: str = ""  # pg_hba.conf-style rules, for auth_type = "hba"
    auth_user: str = ""  # runs auth_query for users missing from auth_file; "" disables it
    auth_query: str = DEFAULT_AUTH_QUERY
    # Seconds an auth_query answer (found or not) is reused; 0 asks every time.
    auth_cache_seconds: float = Field(default=5.0, ge=0, allow_inf_nan=False)
    # Seconds a client may take from connecting to being logged in; 0 waits forever.
    client_login_timeout: float = Field(default=60.0, ge=0, allow_inf_nan=False)

    # TLS between clients and pypooler.
    client_tls_sslmode: ClientTlsMode = "disable"
    client_tls_cert_file: str = ""
    client_tls_key_file: str = ""
    client_tls_ca_file: str = ""  # verifies client certificates (verify-ca, verify-full, cert)
    # TLS between pypooler and PostgreSQL.
    server_tls_sslmode: ServerTlsMode = "prefer"
    server_tls_ca_file: str = ""  # "" trusts the system's CA store for verify-ca / verify-full
    server_tls_cert_file: str = ""  # client certificate presented to servers, optional
    server_tls_key_file: str = ""

    # --- Observability: stats, Prometheus, admin console, advisor, hog detection.
    # Seconds between stats snapshots; averages, rates and SHOW ADVICE cover the last period.
    stats_period: float = Field(default=60.0, gt=0, allow_inf_nan=False)
    # application_name values tracked per pool; later names are counted as "other".
    stats_max_applications: int = Field(default=20, ge=1)
    # Statement fingerprints tracked per pool; later ones are counted as "other".
    stats_max_statements: int = Field(default=100, ge=1)
    # Prometheus /metrics, /healthz, /readyz; port 0 picks a free port, None turns HTTP off.
    metrics_addr: str = Field(default="127.0.0.1", min_length=1)
    metrics_port: int | None = Field(default=9127, ge=0, le=MAX_PORT)
    # /metrics splits its histograms by application_name (each name then costs a pool's 126
    # histogram series again, README); false keeps one set per pool, for large fleets.
    metrics_per_application: bool = True
    # Users allowed in the admin console (database "pgbouncer" or "pypooler").
    admin_users: list[str] = Field(default_factory=lambda: ["postgres"])
    # Users allowed to run SHOW commands only.
    stats_users: list[str] = Field(default_factory=list)
    # Log each error pypooler sends a client (rate-limited, log_limits.py), as PgBouncer's
    # log_pooler_errors; false leaves them to the metrics (pypooler_errors_total).
    log_pooler_errors: bool = True
    # Log a warning when a held server sits idle in a transaction longer than this; 0: never.
    hold_warn_ms: float = Field(default=1000.0, ge=0, allow_inf_nan=False)
    # Log the top holders when a client waited longer than this for a server; 0: never.
    wait_warn_ms: float = Field(default=1000.0, ge=0, allow_inf_nan=False)
    # Ask PostgreSQL (pg_stat_activity, pg_blocking_pids) what servers held longer than this are
    # doing, at most once a second, on a connection of the advisor's own (activity.py); 0: never.
    holder_diagnosis_ms: float = Field(default=1000.0, ge=0, allow_inf_nan=False)
    # Close a client idle inside a transaction longer than this many seconds; 0: never.
    idle_transaction_timeout: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    # End a client (and close its server) whose query has run longer than this many seconds,
    # as PgBouncer does: a bound for network trouble, below the server's statement_timeout;
    # 0: never.
    query_timeout: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    # Close a client that has sent nothing for this many seconds outside a transaction; 0: never.
    client_idle_timeout: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    # Instances of this pooler (or of the app's own pools) sharing the same servers, for the
    # max_connections check: pool bounds x expected_instances must fit the server.
    expected_instances: int = Field(default=1, ge=1)

    # --- HTTP and WebSocket (issue 18)
    # SQL over HTTP (http_listener.py): the address to listen on ("" = off, the default; "*" =
    # every address) and its port (0: one the OS chooses). HTTPS when client TLS is configured.
    http_listen_addr: str = ""
    http_listen_port: int = Field(default=8080, ge=0, le=65535)
    # Bytes of request body one HTTP request may carry (413 past it).
    http_max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    # SQL over HTTP (POST /sql): queries one batch may hold (run as one transaction).
    http_max_batch_queries: int = Field(default=100, ge=1)
    # SQL over HTTP: bytes of JSON one response may carry; a larger result is refused with
    # SQLSTATE 54000 (and its server closed) rather than buffered.
    http_max_response_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    # SQL over HTTP: seconds one request may take from its login to its last answer, waiting
    # for a server included (0 = no limit); past it the request gets SQLSTATE 57014 and its
    # query is cancelled. As long as query_wait_timeout by default, so a wait ends by that first.
    http_request_timeout: float = Field(default=120.0, ge=0)

    databases: dict[DatabaseName, DatabaseConfig] = Field(default_factory=dict)
    users: dict[str, UserConfig] = Field(default_factory=dict)

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level_any_case(cls, value: object) -> object:
        # PYPOOLER_LOG_LEVEL=debug is what people type.
        return value.upper() if isinstance(value, str) else value

    @field_validator("ignore_startup_parameters")
    @classmethod
    def _parameter_names_any_case(cls, names: list[str]) -> list[str]:
        # Startup parameter names are matched case-insensitively, like PostgreSQL's GUC names.
        return [name.lower() for name in names]

    @field_validator("databases")
    @classmethod
    def _database_names_differ_in_more_than_case(
        cls, databases: dict[str, DatabaseConfig]
    ) -> dict[str, DatabaseConfig]:
        first_spelling: dict[str, str] = {}
        clashes: list[str] = []
        for name in databases:
            seen = first_spelling.setdefault(name.casefold(), name)
            if seen != name:
                clashes.append(f"{seen!r} and {name!r}")
        if clashes:
            raise ValueError(
                f"database names {', '.join(clashes)} differ only in case, which environment"
                " variables cannot tell apart"
            )
        return databases

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # No .env files and no secrets directories: one file, the environment, overrides.
        plan = _load_plan.get()
        if plan is None:
            return (init_settings, env_settings)
        sources: list[PydanticBaseSettingsSource] = [
            init_settings,
            _MappingEnvSource(settings_cls, plan.environ),
        ]
        if plan.ini is not None:
            sources.append(InitSettingsSource(settings_cls, init_kwargs=plan.ini.values))
        elif plan.toml_file is not None:
            sources.append(_TomlFileSource(settings_cls, plan.toml_file))
        return tuple(sources)

    def auth_user_for(self, database: str) -> str:
        """The user auth_query runs as for `database` (its entry's, else the "*" entry's, else
        auth_user); "" means no auth_query."""
        db = self.databases.get(database) or self.databases.get("*")
        return db.auth_user if db is not None and db.auth_user else self.auth_user

    def pool_size_of(self, db: DatabaseConfig, user: str) -> int:
        """The size of the pool of entry `db` logged in as `user`: the user's ([users]), else the
        entry's, else default_pool_size."""
        by_user = self.users.get(user)
        if by_user is not None and by_user.pool_size is not None:
            return by_user.pool_size
        return db.pool_size or self.default_pool_size

    def pool_mode_of(self, db: DatabaseConfig, user: str) -> PoolMode:
        """The pool mode of the pool of entry `db` logged in as `user`: the user's ([users]),
        else the entry's, else pool_mode."""
        by_user = self.users.get(user)
        if by_user is not None and by_user.pool_mode is not None:
            return by_user.pool_mode
        return db.pool_mode or self.pool_mode

    def max_user_connections_of(self, user: str) -> int:
        by_user = self.users.get(user)
        if by_user is not None and by_user.max_user_connections is not None:
            return by_user.max_user_connections
        return self.max_user_connections

    def pool_limits(self, db: DatabaseConfig) -> tuple[int, int, int]:
        """(min_pool_size, reserve_pool, max_db_connections) of entry `db`: its own values, else
        the top-level defaults."""
        return (
            self.min_pool_size if db.min_pool_size is None else db.min_pool_size,
            self.reserve_pool_size if db.reserve_pool is None else db.reserve_pool,
            self.max_db_connections if db.max_db_connections is None else db.max_db_connections,
        )

    def pool_size_for(self, name: str) -> int:
        """Server connections kept for database `name`; KeyError if it is not configured."""
        pool_size = self._database(name).pool_size
        return self.default_pool_size if pool_size is None else pool_size

    def pool_mode_for(self, name: str) -> PoolMode:
        """Pool mode of database `name`; KeyError if it is not configured."""
        pool_mode = self._database(name).pool_mode
        return self.pool_mode if pool_mode is None else pool_mode

    def server_dbname_for(self, name: str) -> str:
        """Database name sent to the server for `name`; KeyError if it is not configured."""
        dbname = self._database(name).dbname
        return name if dbname is None else dbname

    def _database(self, name: str) -> DatabaseConfig:
        try:
            return self.databases[name]
        except KeyError:
            raise KeyError(f"database {name!r} is not configured") from None


@dataclass(frozen=True, slots=True)
class _LoadPlan:
    """What one load_settings() call reads; settings_customise_sources() has no other inputs."""

    environ: Mapping[str, str]
    toml_file: Path | None
    ini: IniSettings | None = None


# A context variable rather than a class attribute: concurrent loads (threads, tasks) must not
# see each other's file or environment.
_load_plan: ContextVar[_LoadPlan | None] = ContextVar("pypooler_config_load_plan", default=None)


class _MappingEnvSource(EnvSettingsSource):
    """The environment source, reading a given mapping instead of os.environ."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {name if self.case_sensitive else name.lower(): value for name, value in self._environ.items()}


class _TomlFileSource(TomlConfigSettingsSource):
    """The TOML source, turning an absent or unreadable file into a ConfigError.

    The library's own source treats a missing file as empty, which would start the pooler on
    defaults because of a typo in a path.
    """

    def __init__(self, settings_cls: type[BaseSettings], toml_file: Path) -> None:
        self._shown_path = str(toml_file)
        resolved = toml_file.expanduser()
        if not resolved.exists():
            raise ConfigError([f"config file {self._shown_path}: not found"])
        if not resolved.is_file():
            raise ConfigError([f"config file {self._shown_path}: not a regular file"])
        super().__init__(settings_cls, toml_file=resolved)

    def _read_file(self, file_path: Path | Traversable) -> dict[str, Any]:
        try:
            return super()._read_file(file_path)
        except tomllib.TOMLDecodeError as exc:
            problem = _describe_toml_error(exc)
        except UnicodeDecodeError as exc:
            problem = f"not UTF-8 (byte {exc.start})"
        except OSError as exc:
            problem = f"cannot read ({exc.strerror or exc})"
        raise ConfigError([f"config file {self._shown_path}: {problem}"]) from None


# tomllib ends every message with its position, e.g. "Invalid value (at line 3, column 7)".
_TOML_POSITION = re.compile(r"^(?P<reason>.*) \(at line (?P<line>\d+), column (?P<column>\d+)\)$")
_TOML_AT_END = re.compile(r"^(?P<reason>.*) \(at end of document\)$")


def _describe_toml_error(exc: tomllib.TOMLDecodeError) -> str:
    message = str(exc)
    if match := _TOML_POSITION.match(message):
        return f"TOML syntax error at line {match['line']}, column {match['column']}: {match['reason']}"
    if match := _TOML_AT_END.match(message):
        return f"TOML syntax error at end of file: {match['reason']}"
    return f"TOML syntax error: {message}"


def load_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    read_files: bool = True,
    **overrides: Any,
) -> Settings:
    """Read, merge and validate the configuration; raise ConfigError listing every problem.

    `path` is the TOML file; None means the file named by PYPOOLER_CONFIG, or no file when that
    is unset or empty. `env` replaces os.environ entirely when given. `overrides` are settings
    by field name and win over everything; an override of None counts as not given, so a
    command line can pass its unset options straight through (no top-level setting is
    nullable). `read_files=False` leaves out the check that the files the settings name
    (auth_file, certificates, ...) can be read: for a reader of the settings that never loads
    them (`pypooler advise`, run by an operator who may not read the pooler's secrets).
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    if path is None:
        path = _config_path_from(environ)
    given = {key: value for key, value in overrides.items() if value is not None}
    # BaseSettings reads underscore keywords (_env_prefix, _build_sources, ...) as options.
    private = sorted(key for key in given if key.startswith("_"))
    if private:
        raise ConfigError([f"unknown setting {key!r}" for key in private])

    ini = None
    if path is not None and str(path).endswith(".ini"):
        ini = read_ini(path)
        if ini.problems:
            raise ConfigError(ini.problems)
        for warning in ini.warnings:
            log.warning("%s", warning)
    plan = _LoadPlan(environ=environ, toml_file=None if path is None else Path(path), ini=ini)
    token = _load_plan.set(plan)
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        # from None: the ValidationError's own text would show rejected inputs, passwords too.
        raise ConfigError(
            [_at_origin(_describe_error(error), error, ini) for error in exc.errors()]
        ) from None
    except SettingsError as exc:
        # Raised for a table given as JSON in one variable (PYPOOLER_DATABASES='{...}').
        raise ConfigError([f"environment: {_describe_settings_error(exc)}"]) from None
    finally:
        _load_plan.reset(token)
    problems = check_settings(settings, read_files=read_files)
    if problems:
        raise ConfigError(problems)
    return settings


def _at_origin(problem: str, error: ErrorDetails, ini: IniSettings | None) -> str:
    """`problem` prefixed with the ini file line its value came from, when it came from one."""
    if ini is None:
        return problem
    loc = tuple(str(part) for part in error["loc"])
    for depth in range(len(loc), 0, -1):
        where = ini.origins.get(loc[:depth])
        if where is not None:
            return f"{where}: {problem}"
    return problem


def check_settings(settings: Settings, *, read_files: bool = True) -> list[str]:
    """Problems that involve several settings or (with `read_files`) the file system, one line
    each."""
    problems: list[str] = []
    auth_types = {("auth_type", settings.auth_type)} | {
        (f"databases.{_dotted((name,))}.auth_type", db.auth_type)
        for name, db in settings.databases.items()
        if db.auth_type is not None
    }
    for where, auth_type in sorted(auth_types):
        any_auth_user = settings.auth_user or any(db.auth_user for db in settings.databases.values())
        if auth_type in PASSWORD_AUTH_TYPES and not settings.auth_file and not any_auth_user:
            problems.append(
                f"{where}: {auth_type} needs auth_file or auth_user (auth_query) to find passwords"
            )
        if auth_type == "hba" and not settings.auth_hba_file:
            problems.append(f"{where}: hba needs auth_hba_file")
        if auth_type == "cert" and not settings.client_tls_ca_file:
            problems.append(f"{where}: cert needs client_tls_ca_file to verify client certificates")
        if auth_type == "cert" and settings.client_tls_sslmode == "disable":
            problems.append(f"{where}: cert needs TLS (client_tls_sslmode is disable)")
    if (settings.auth_user or any(db.auth_user for db in settings.databases.values())) and not (
        settings.auth_query.strip()
    ):
        problems.append("auth_query: must not be empty when auth_user is set")
    mode = settings.client_tls_sslmode
    if mode != "disable":
        for name in ("client_tls_cert_file", "client_tls_key_file"):
            if not getattr(settings, name):
                problems.append(f"{name}: is required when client_tls_sslmode is {mode}")
    if mode in ("verify-ca", "verify-full") and not settings.client_tls_ca_file:
        problems.append(f"client_tls_ca_file: is required when client_tls_sslmode is {mode}")
    if bool(settings.server_tls_cert_file) != bool(settings.server_tls_key_file):
        problems.append("server_tls_cert_file and server_tls_key_file: set both or neither")
    for name in _FILE_SETTINGS if read_files else ():
        path = getattr(settings, name)
        if path:
            problem = _file_problem(Path(path))
            if problem:
                problems.append(f"{name}: {path}: {problem}")
    return problems


_FILE_SETTINGS = (
    "auth_file",
    "auth_hba_file",
    "client_tls_cert_file",
    "client_tls_key_file",
    "client_tls_ca_file",
    "server_tls_ca_file",
    "server_tls_cert_file",
    "server_tls_key_file",
)


def _file_problem(path: Path) -> str | None:
    try:
        if not path.expanduser().is_file():
            return "not found" if not path.expanduser().exists() else "not a regular file"
        with path.expanduser().open("rb"):
            pass
    except OSError as exc:
        return f"cannot read ({exc.strerror or exc})"
    return None


# pydantic-settings says: error parsing value for field "databases" from source "...".
_SETTINGS_ERROR_FIELD = re.compile(r'field "(?P<field>[^"]+)"')


def _describe_settings_error(exc: SettingsError) -> str:
    match = _SETTINGS_ERROR_FIELD.search(str(exc))
    if match is None:
        return str(exc)
    variable = ENV_PREFIX + match["field"].upper()
    cause = f": {exc.__cause__}" if exc.__cause__ is not None else ""
    if str(exc).startswith("error parsing"):
        return f"{variable} is not valid JSON{cause}"
    return f"cannot read {variable}{cause}"


def _config_path_from(environ: Mapping[str, str]) -> str | None:
    # Same case-insensitivity as the PYPOOLER_* settings themselves.
    for name, value in environ.items():
        if name.upper() == CONFIG_PATH_ENV and value:
            return value
    return None


_REASONS: dict[str, str] = {
    "greater_than_equal": "must be >= {ge}",
    "greater_than": "must be > {gt}",
    "less_than_equal": "must be <= {le}",
    "less_than": "must be < {lt}",
    "literal_error": "must be one of {expected}",
    "int_parsing": "must be an integer",
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "string_too_short": "must not be empty",
    "list_type": "must be a list",
    "dict_type": "must be a table",
    "model_type": "must be a table",
    "model_attributes_type": "must be a table",
    "missing": "is required",
}
# Errors whose input is absent. Tables are never shown either: _shown_input() skips them.
_INPUT_NOT_SHOWN = frozenset({"missing"})
_SHOWN_INPUT_MAX = 40
# TOML's bare keys; anything else is shown quoted, as it would be written in the file.
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _describe_error(error: ErrorDetails) -> str:
    """One pydantic error as 'where: what (got value)'."""
    loc = error["loc"]
    kind = error["type"]
    if kind == "extra_forbidden":
        where = _dotted(loc[:-1])
        unknown = f"unknown setting {str(loc[-1])!r}"
        return f"{where}: {unknown}" if where else unknown

    ctx = error.get("ctx", {})
    if kind == "value_error" and "error" in ctx:
        # Our own validators: their message already names the value.
        reason = str(ctx["error"])
    else:
        reason = _reason(kind, ctx) or error["msg"]
        if kind not in _INPUT_NOT_SHOWN and "password" not in loc:
            shown = _shown_input(error["input"])
            if shown is not None:
                reason = f"{reason} (got {shown})"
    return f"{_dotted(loc) or 'config'}: {reason}"


def _reason(kind: str, ctx: dict[str, Any]) -> str | None:
    """Our wording for a pydantic error type, or None to keep pydantic's message."""
    template = _REASONS.get(kind)
    if template is None:
        return None
    # Float bounds arrive as 0.0; people write and read them as 0.
    bounds = {key: f"{value:g}" if isinstance(value, float) else value for key, value in ctx.items()}
    try:
        return template.format(**bounds)
    except KeyError:  # a pydantic version that names the bound differently
        return None


def _dotted(loc: tuple[int | str, ...]) -> str:
    # "[key]" marks an error in a dict key rather than its value; the key is already in loc.
    parts = [str(part) for part in loc if part != "[key]"]
    return ".".join(part if _BARE_KEY.fullmatch(part) else json.dumps(part) for part in parts)


def _shown_input(value: object) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        if len(value) > _SHOWN_INPUT_MAX:
            value = value[:_SHOWN_INPUT_MAX] + "..."
        return repr(value)
    return None
