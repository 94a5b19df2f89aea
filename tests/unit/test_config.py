"""Tests for pypooler.config: sources and their priority, validation, problem reporting.

Every test passes `env=` (or patches os.environ) so the developer's own PYPOOLER_* variables
cannot leak in.
"""

from __future__ import annotations

import pickle
import tomllib
from pathlib import Path
from typing import Any

import pytest

from pypooler.config import (
    ConfigError,
    DatabaseConfig,
    Settings,
    UserConfig,
    load_settings,
)

EXAMPLE_CONFIG = Path(__file__).resolve().parents[2] / "config" / "pypooler.toml"


def write_toml(tmp_path: Path, text: str, name: str = "pypooler.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(excinfo: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return excinfo.value.problems


# --- defaults and the file ---------------------------------------------------------------


def test_defaults() -> None:
    settings = load_settings(env={})

    assert settings.listen_addr == "127.0.0.1"
    assert settings.listen_port == 6432
    assert settings.pool_mode == "transaction"
    assert settings.default_pool_size == 20
    assert settings.max_client_conn == 1000
    assert settings.query_wait_timeout == 120.0
    assert settings.server_connect_timeout == 15.0
    assert settings.server_login_retry == 0.0
    assert settings.server_reset_query == "DISCARD ALL"
    assert settings.server_idle_timeout == 600.0
    assert settings.server_lifetime == 3600.0
    assert settings.shutdown_drain_timeout == 20.0
    assert settings.tcp_keepalive is True
    assert settings.max_prepared_statements == 200
    assert settings.ignore_startup_parameters == ["extra_float_digits"]
    assert settings.session_state_policy == "log"
    assert settings.log_connections is True
    assert settings.log_disconnections is True
    assert settings.log_level == "INFO"
    assert settings.databases == {}


def test_database_defaults() -> None:
    database = DatabaseConfig()

    assert database.host == "127.0.0.1"
    assert database.port == 5432
    assert database.dbname is None
    assert database.user is None
    assert database.password is None
    assert database.pool_size is None
    assert database.pool_mode is None


def test_toml_file_is_loaded(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        """
        listen_port = 7432
        pool_mode = "session"
        query_wait_timeout = 0
        tcp_keepalive = false

        [databases.app]
        host = "db.internal"
        port = 5433
        dbname = "app_production"
        user = "pooler"
        password = "s3cret"
        pool_size = 5
        pool_mode = "statement"

        [databases.reports]
        """,
    )

    settings = load_settings(path, env={})

    assert settings.listen_port == 7432
    assert settings.pool_mode == "session"
    assert settings.query_wait_timeout == 0.0
    assert settings.tcp_keepalive is False
    assert settings.databases["app"] == DatabaseConfig(
        host="db.internal",
        port=5433,
        dbname="app_production",
        user="pooler",
        password="s3cret",
        pool_size=5,
        pool_mode="statement",
    )
    assert settings.databases["reports"] == DatabaseConfig()


def test_path_may_be_a_str(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "listen_port = 7432\n")

    assert load_settings(str(path), env={}).listen_port == 7432


def test_config_path_comes_from_pypooler_config_when_no_path_given(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "listen_port = 7432\n")

    assert load_settings(env={"PYPOOLER_CONFIG": str(path)}).listen_port == 7432
    assert load_settings(env={"pypooler_config": str(path)}).listen_port == 7432
    # Set but empty means no file, as if unset.
    assert load_settings(env={"PYPOOLER_CONFIG": ""}).listen_port == 6432


def test_explicit_path_wins_over_pypooler_config(tmp_path: Path) -> None:
    named = write_toml(tmp_path, "listen_port = 7001\n", name="named.toml")
    explicit = write_toml(tmp_path, "listen_port = 7002\n", name="explicit.toml")

    settings = load_settings(explicit, env={"PYPOOLER_CONFIG": str(named)})

    assert settings.listen_port == 7002


def test_example_config_loads() -> None:
    settings = load_settings(EXAMPLE_CONFIG, env={})

    defaults = load_settings(env={})
    assert settings.model_dump(exclude={"databases"}) == defaults.model_dump(exclude={"databases"})
    assert settings.databases == {"app": DatabaseConfig()}


def test_example_config_shows_every_setting_with_its_default() -> None:
    # The example is the documentation: it must not drift from the schema.
    with EXAMPLE_CONFIG.open("rb") as file:
        example = tomllib.load(file)
    text = EXAMPLE_CONFIG.read_text(encoding="utf-8")

    tables = {"databases", "users"}
    top_level = {key: value for key, value in example.items() if key not in tables}
    assert set(top_level) == set(Settings.model_fields) - tables
    for key, value in top_level.items():
        assert value == Settings.model_fields[key].get_default(call_default_factory=True), key
    for field in [*DatabaseConfig.model_fields, *UserConfig.model_fields]:
        # Optional database and user settings appear commented out.
        assert f"\n{field} = " in text or f"\n# {field} = " in text, field


# --- priority: overrides > environment > file > defaults ---------------------------------


def test_environment_wins_over_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'listen_port = 7001\nlisten_addr = "10.0.0.1"\n')

    settings = load_settings(path, env={"PYPOOLER_LISTEN_PORT": "7002"})

    assert settings.listen_port == 7002
    assert settings.listen_addr == "10.0.0.1"


def test_overrides_win_over_environment_and_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "listen_port = 7001\n")

    settings = load_settings(path, env={"PYPOOLER_LISTEN_PORT": "7002"}, listen_port=7003)

    assert settings.listen_port == 7003


def test_override_of_none_counts_as_not_given() -> None:
    settings = load_settings(env={"PYPOOLER_LISTEN_PORT": "7002"}, listen_port=None)

    assert settings.listen_port == 7002


def test_environment_names_are_case_insensitive() -> None:
    settings = load_settings(env={"pypooler_Listen_Port": "7002", "PYPOOLER_LOG_LEVEL": "debug"})

    assert settings.listen_port == 7002
    assert settings.log_level == "DEBUG"


def test_environment_values_are_parsed() -> None:
    settings = load_settings(
        env={
            "PYPOOLER_TCP_KEEPALIVE": "false",
            "PYPOOLER_QUERY_WAIT_TIMEOUT": "2.5",
            "PYPOOLER_POOL_MODE": "session",
        }
    )

    assert settings.tcp_keepalive is False
    assert settings.query_wait_timeout == 2.5
    assert settings.pool_mode == "session"


def test_nested_environment_merges_into_a_database_from_the_file(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        """
        [databases.app]
        host = "db.internal"
        user = "pooler"
        password = "s3cret"
        """,
    )

    settings = load_settings(
        path,
        env={"PYPOOLER_DATABASES__APP__PORT": "5433", "PYPOOLER_DATABASES__APP__POOL_SIZE": "3"},
    )

    assert settings.databases["app"] == DatabaseConfig(
        host="db.internal", port=5433, user="pooler", password="s3cret", pool_size=3
    )


def test_nested_environment_may_add_a_database(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[databases.app]\nhost = 'db.internal'\n")

    settings = load_settings(path, env={"PYPOOLER_DATABASES__OTHER__HOST": "db2.internal"})

    assert settings.databases == {
        "app": DatabaseConfig(host="db.internal"),
        "other": DatabaseConfig(host="db2.internal"),
    }


def test_nested_overrides_merge_into_a_database_from_the_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[databases.app]\nhost = 'db.internal'\nport = 5433\n")

    settings = load_settings(
        path,
        env={"PYPOOLER_DATABASES__APP__USER": "pooler"},
        databases={"app": {"port": 5434}},
    )

    assert settings.databases["app"] == DatabaseConfig(host="db.internal", port=5434, user="pooler")


def test_no_env_argument_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYPOOLER_LISTEN_PORT", "7002")

    assert load_settings().listen_port == 7002


def test_env_argument_replaces_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYPOOLER_LISTEN_PORT", "7002")

    assert load_settings(env={}).listen_port == 6432


def test_unknown_environment_variables_are_ignored() -> None:
    # The environment is shared with everything else; only the file and overrides are strict.
    assert load_settings(env={"PYPOOLER_LISEN_PORT": "1"}).listen_port == 6432


# --- problems ----------------------------------------------------------------------------


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        """
        listen_port = 70000
        pool_mode = "sesion"
        default_pool_size = 0
        server_connect_timeout = 0
        tcp_keepalive = "maybe"

        [databases.app]
        port = "x"
        pool_size = 0
        """,
    )

    with pytest.raises(ConfigError) as excinfo:
        load_settings(path, env={"PYPOOLER_QUERY_WAIT_TIMEOUT": "-1"})

    assert problems_of(excinfo) == [
        "listen_port: must be <= 65535 (got 70000)",
        "pool_mode: must be one of 'session', 'transaction' or 'statement' (got 'sesion')",
        "default_pool_size: must be >= 1 (got 0)",
        "query_wait_timeout: must be >= 0 (got '-1')",
        "server_connect_timeout: must be > 0 (got 0)",
        "tcp_keepalive: must be true or false (got 'maybe')",
        "databases.app.port: must be an integer (got 'x')",
        "databases.app.pool_size: must be >= 1 (got 0)",
    ]
    assert str(excinfo.value) == "\n".join(problems_of(excinfo))


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "lisen_port = 7000\n")

    with pytest.raises(ConfigError) as excinfo:
        load_settings(path, env={})

    assert problems_of(excinfo) == ["unknown setting 'lisen_port'"]


def test_unknown_database_key(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[databases.app]\nhots = 'db'\n")

    with pytest.raises(ConfigError) as excinfo:
        load_settings(path, env={})

    assert problems_of(excinfo) == ["databases.app: unknown setting 'hots'"]


def test_unknown_override() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_settings(env={}, lisen_port=7000)

    assert problems_of(excinfo) == ["unknown setting 'lisen_port'"]


def test_underscore_override_is_not_taken_as_a_settings_option() -> None:
    # BaseSettings itself would read _env_prefix as an option, not as a setting.
    with pytest.raises(ConfigError) as excinfo:
        load_settings(env={}, _env_prefix="OTHER_")

    assert problems_of(excinfo) == ["unknown setting '_env_prefix'"]


def test_bad_toml_syntax(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'listen_addr = "127.0.0.1"\n\nlisten_port = = 6432\n')

    with pytest.raises(ConfigError) as excinfo:
        load_settings(path, env={})

    [problem] = problems_of(excinfo)
    assert problem.startswith(f"config file {path}: TOML syntax error at line 3")


def test_toml_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('listen_addr = "café"\n'.encode("latin-1"))

    with pytest.raises(ConfigError) as excinfo:
        load_settings(path, env={})

    assert problems_of(excinfo) == [f"config file {path}: not UTF-8 (byte 18)"]


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"

    with pytest.raises(ConfigError) as excinfo:
        load_settings(path, env={})

    assert problems_of(excinfo) == [f"config file {path}: not found"]


def test_missing_file_named_by_pypooler_config(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"

    with pytest.raises(ConfigError) as excinfo:
        load_settings(env={"PYPOOLER_CONFIG": str(path)})

    assert problems_of(excinfo) == [f"config file {path}: not found"]


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_settings(tmp_path, env={})

    assert problems_of(excinfo) == [f"config file {tmp_path}: not a regular file"]


def test_settings_of_the_wrong_kind(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'databases = "app"\n')

    with pytest.raises(ConfigError) as excinfo:
        load_settings(path, env={})

    assert problems_of(excinfo) == ["databases: must be a table (got 'app')"]


def test_timeouts_must_be_finite() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_settings(env={"PYPOOLER_SERVER_LIFETIME": "inf"})

    assert problems_of(excinfo) == ["server_lifetime: must be a finite number (got 'inf')"]


def test_listen_port_zero_is_allowed_but_database_port_zero_is_not() -> None:
    assert load_settings(env={}, listen_port=0).listen_port == 0

    with pytest.raises(ConfigError) as excinfo:
        load_settings(env={"PYPOOLER_DATABASES__APP__PORT": "0"})

    assert problems_of(excinfo) == ["databases.app.port: must be >= 1 (got '0')"]


def test_table_given_as_invalid_json_in_the_environment() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_settings(env={"PYPOOLER_DATABASES": "{app"})

    [problem] = problems_of(excinfo)
    assert problem.startswith("environment: PYPOOLER_DATABASES is not valid JSON: ")


@pytest.mark.parametrize("name", ["pgbouncer", "pypooler", "PgBouncer"])
def test_admin_console_names_are_reserved(tmp_path: Path, name: str) -> None:
    path = write_toml(tmp_path, f"[databases.{name}]\n")

    with pytest.raises(ConfigError) as excinfo:
        load_settings(path, env={})

    assert problems_of(excinfo) == [
        f"databases.{name}: database name {name!r} is reserved for the admin console"
    ]


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ('""', 'databases."": database name must not be empty'),
        ('"my db"', "databases.\"my db\": database name 'my db' must not contain whitespace"),
        ('"app\\t"', "databases.\"app\\t\": database name 'app\\t' must not contain whitespace"),
    ],
)
def test_database_names_without_whitespace(tmp_path: Path, key: str, problem: str) -> None:
    path = write_toml(tmp_path, f"[databases.{key}]\n")

    with pytest.raises(ConfigError) as excinfo:
        load_settings(path, env={})

    assert problems_of(excinfo) == [problem]


def test_bad_database_names_are_reported_with_other_problems(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'listen_port = -1\n[databases.pypooler]\n[databases."a b"]\n')

    with pytest.raises(ConfigError) as excinfo:
        load_settings(path, env={})

    assert problems_of(excinfo) == [
        "listen_port: must be >= 0 (got -1)",
        "databases.pypooler: database name 'pypooler' is reserved for the admin console",
        "databases.\"a b\": database name 'a b' must not contain whitespace",
    ]


def test_database_names_differing_only_in_case_are_refused(tmp_path: Path) -> None:
    # The environment can only spell "app", so this override would create a second database.
    path = write_toml(tmp_path, "[databases.App]\nhost = 'db.internal'\n")

    with pytest.raises(ConfigError) as excinfo:
        load_settings(path, env={"PYPOOLER_DATABASES__APP__PORT": "5433"})

    assert problems_of(excinfo) == [
        "databases: database names 'App' and 'app' differ only in case,"
        " which environment variables cannot tell apart"
    ]


def test_config_error_survives_pickling() -> None:
    error = ConfigError(["a: must be >= 1 (got 0)", "unknown setting 'b'"])

    copy = pickle.loads(pickle.dumps(error))

    assert copy.problems == error.problems
    assert str(copy) == "a: must be >= 1 (got 0)\nunknown setting 'b'"


# --- per-database fallbacks --------------------------------------------------------------


def test_per_database_values_fall_back_to_the_top_level(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        """
        pool_mode = "session"
        default_pool_size = 7

        [databases.plain]

        [databases.tuned]
        dbname = "tuned_on_server"
        pool_size = 3
        pool_mode = "statement"
        """,
    )

    settings = load_settings(path, env={})

    assert settings.pool_size_for("plain") == 7
    assert settings.pool_mode_for("plain") == "session"
    assert settings.server_dbname_for("plain") == "plain"
    assert settings.pool_size_for("tuned") == 3
    assert settings.pool_mode_for("tuned") == "statement"
    assert settings.server_dbname_for("tuned") == "tuned_on_server"


@pytest.mark.parametrize("method", ["pool_size_for", "pool_mode_for", "server_dbname_for"])
def test_per_database_lookup_of_an_unknown_database(method: str) -> None:
    settings = load_settings(env={})

    with pytest.raises(KeyError, match="'nope' is not configured"):
        getattr(settings, method)("nope")


# --- secrets -----------------------------------------------------------------------------


def test_password_is_not_in_repr() -> None:
    settings = load_settings(
        env={"PYPOOLER_DATABASES__APP__PASSWORD": "hunter2-secret"},
    )

    assert settings.databases["app"].password == "hunter2-secret"
    assert "hunter2-secret" not in repr(settings.databases["app"])
    assert "hunter2-secret" not in repr(settings)
    assert "hunter2-secret" not in str(settings)


def test_password_is_not_in_problems(tmp_path: Path) -> None:
    # A password that TOML reads as a number is the likeliest way to get one into an error.
    path = write_toml(tmp_path, "[databases.app]\npassword = 918273645\n")

    with pytest.raises(ConfigError) as excinfo:
        load_settings(path, env={})

    assert problems_of(excinfo) == ["databases.app.password: must be a string"]
    assert excinfo.value.__cause__ is None
    assert excinfo.value.__suppress_context__


# --- authentication and TLS ------------------------------------------------------------------


def test_auth_and_tls_defaults() -> None:
    settings = load_settings(env={})

    assert settings.auth_type == "trust"
    assert settings.auth_file == settings.auth_hba_file == settings.auth_user == ""
    assert settings.auth_query.startswith("SELECT rolname")
    assert "pg_catalog.pg_authid" in settings.auth_query and "rolvaliduntil" in settings.auth_query
    assert settings.auth_cache_seconds == 5.0
    assert settings.client_login_timeout == 60.0
    assert settings.client_tls_sslmode == "disable"
    assert settings.server_tls_sslmode == "prefer"
    assert DatabaseConfig().auth_type is None


def test_password_auth_needs_a_secret_source(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        'auth_type = "md5"\n[databases.app]\nauth_type = "scram-sha-256"\n[databases.other]\n',
    )

    with pytest.raises(ConfigError) as excinfo:
        load_settings(path, env={})

    assert problems_of(excinfo) == [
        "auth_type: md5 needs auth_file or auth_user (auth_query) to find passwords",
        "databases.app.auth_type: scram-sha-256 needs auth_file or auth_user (auth_query) to find passwords",
    ]


def test_auth_user_is_enough_for_password_auth() -> None:
    settings = load_settings(env={}, auth_type="scram-sha-256", auth_user="pgbouncer")

    assert settings.auth_type == "scram-sha-256"


def test_auth_problems_one_line_each(tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt"
    with pytest.raises(ConfigError) as excinfo:
        load_settings(
            env={},
            auth_type="hba",
            auth_file=str(missing),
            auth_user="pgbouncer",
            auth_query=" ",
            client_tls_sslmode="verify-full",
            server_tls_cert_file=str(tmp_path),
        )

    assert problems_of(excinfo) == [
        "auth_type: hba needs auth_hba_file",
        "auth_query: must not be empty when auth_user is set",
        "client_tls_cert_file: is required when client_tls_sslmode is verify-full",
        "client_tls_key_file: is required when client_tls_sslmode is verify-full",
        "client_tls_ca_file: is required when client_tls_sslmode is verify-full",
        "server_tls_cert_file and server_tls_key_file: set both or neither",
        f"auth_file: {missing}: not found",
        f"server_tls_cert_file: {tmp_path}: not a regular file",
    ]


def test_read_files_false_leaves_the_named_files_unchecked(tmp_path: Path) -> None:
    # pypooler advise: an operator who may not read the pooler's secrets still reads its settings.
    missing = {"auth_file": str(tmp_path / "userlist.txt"), "server_tls_ca_file": str(tmp_path / "ca.crt")}
    assert load_settings(env={}, read_files=False, **missing).auth_file == missing["auth_file"]
    with pytest.raises(ConfigError) as excinfo:
        load_settings(env={}, read_files=False, auth_type="hba", **missing)
    assert problems_of(excinfo) == ["auth_type: hba needs auth_hba_file"]  # the other checks stay


def test_cert_auth_needs_tls_and_a_ca() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_settings(env={}, auth_type="cert")

    assert problems_of(excinfo) == [
        "auth_type: cert needs client_tls_ca_file to verify client certificates",
        "auth_type: cert needs TLS (client_tls_sslmode is disable)",
    ]


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("auth_type", "ldap", "auth_type: must be one of"),
        ("client_tls_sslmode", "on", "client_tls_sslmode: must be one of"),
        ("server_tls_sslmode", "allow", "server_tls_sslmode: must be one of"),
        ("client_login_timeout", -1, "client_login_timeout: must be >= 0"),
        ("auth_cache_seconds", -1, "auth_cache_seconds: must be >= 0"),
    ],
)
def test_auth_setting_values_are_checked(key: str, value: object, problem: str) -> None:
    overrides: dict[str, Any] = {key: value}  # settings values, as load_settings takes them
    with pytest.raises(ConfigError) as excinfo:
        load_settings(env={}, **overrides)

    assert len(problems_of(excinfo)) == 1
    assert problems_of(excinfo)[0].startswith(problem)


# --- transaction-mode settings -------------------------------------------------------------


def test_transaction_mode_settings(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        'max_prepared_statements = 0\nignore_startup_parameters = ["Extra_Float_Digits", "search_path"]\n'
        'session_state_policy = "pin"\n',
    )

    settings = load_settings(path, env={"PYPOOLER_SESSION_STATE_POLICY": "error"})

    assert settings.max_prepared_statements == 0
    assert settings.ignore_startup_parameters == ["extra_float_digits", "search_path"]
    assert settings.session_state_policy == "error"


def test_transaction_mode_settings_are_validated(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        'max_prepared_statements = -1\nignore_startup_parameters = "x"\nsession_state_policy = "warn"\n',
    )

    with pytest.raises(ConfigError) as excinfo:
        load_settings(path, env={})

    assert problems_of(excinfo) == [
        "max_prepared_statements: must be >= 0 (got -1)",
        "ignore_startup_parameters: must be a list (got 'x')",
        "session_state_policy: must be one of 'log', 'error' or 'pin' (got 'warn')",
    ]
