"""pgbouncer.ini read as pypooler settings: PgBouncer's format, its defaults, its errors."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from pypooler import pgbouncer_ini
from pypooler.config import ConfigError, load_settings
from pypooler.pgbouncer_ini import parse_connection_string, read_ini, to_toml

# Debian's stock /etc/pgbouncer/pgbouncer.ini (comments dropped), with one database added.
STOCK = """\
[databases]
app = host=10.0.0.5 port=5433 dbname=app_prod pool_size=30

[users]

[pgbouncer]
logfile = /var/log/postgresql/pgbouncer.log
pidfile = /var/run/postgresql/pgbouncer.pid
listen_addr = localhost
listen_port = 6432
unix_socket_dir = /var/run/postgresql
auth_type = md5
auth_file = {auth_file}
"""


@pytest.fixture
def auth_file(tmp_path: Path) -> Path:
    path = tmp_path / "userlist.txt"
    path.write_text('"app" "md5a3556571e93b0d20722ba62be61e8c2d"\n')
    return path


def write(tmp_path: Path, text: str, name: str = "pgbouncer.ini") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_stock_debian_file_with_a_database(tmp_path: Path, auth_file: Path) -> None:
    ini = read_ini(write(tmp_path, STOCK.format(auth_file=auth_file)))
    assert ini.problems == []
    assert ini.values["databases"] == {
        "app": {"host": "10.0.0.5", "port": 5433, "dbname": "app_prod", "pool_size": 30}
    }
    assert ini.values["listen_addr"] == "localhost" and ini.values["listen_port"] == 6432
    assert ini.values["auth_type"] == "md5" and ini.values["auth_file"] == str(auth_file)
    # What the file leaves out is PgBouncer's default where pypooler's differs.
    assert ini.values["pool_mode"] == "session" and ini.values["max_client_conn"] == 100
    assert ini.values["admin_users"] == []
    warned = " | ".join(ini.warnings)
    assert "pgbouncer.ini:7: logfile is not needed by pypooler" in warned
    assert "pgbouncer.ini:8: pidfile is not needed" in warned
    assert ini.values["unix_socket_dir"] == "/var/run/postgresql"
    assert len(ini.warnings) == 2


def test_load_settings_reads_an_ini_file(tmp_path: Path, auth_file: Path) -> None:
    settings = load_settings(write(tmp_path, STOCK.format(auth_file=auth_file)), env={})
    assert settings.pool_mode == "session" and settings.databases["app"].port == 5433
    assert settings.pool_size_for("app") == 30 and settings.server_dbname_for("app") == "app_prod"


def test_environment_overrides_still_win(tmp_path: Path, auth_file: Path) -> None:
    env = {"PYPOOLER_POOL_MODE": "transaction", "PYPOOLER_DATABASES__APP__PORT": "6000"}
    settings = load_settings(write(tmp_path, STOCK.format(auth_file=auth_file)), env=env)
    assert settings.pool_mode == "transaction"
    assert settings.databases["app"].port == 6000 and settings.databases["app"].host == "10.0.0.5"


def test_an_unknown_key_is_an_error_at_its_line(tmp_path: Path) -> None:
    ini = read_ini(write(tmp_path, "[pgbouncer]\nlisten_port = 6432\nlisten_prot = 6433\n"))
    assert ini.problems == [f"{tmp_path}/pgbouncer.ini:3: unknown setting 'listen_prot'"]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = (
        "[databases]\n"
        "a = host=x port=five\n"
        "b = host=x bogus=1\n"
        "c = host=a,b port=1,2,3\n"
        "[users]\n"
        "bob = pool_size=lots\n"
        "[pgbouncer]\n"
        "max_client_conn = lots\n"
        "tcp_keepalive = maybe\n"
        "[pgboucner]\n"
        "just text\n"
    )
    problems = read_ini(write(tmp_path, text)).problems
    by_line = {int(problem.split(": ", 1)[0].rsplit(":", 1)[1]): problem for problem in problems}
    assert sorted(by_line) == [2, 3, 4, 6, 8, 9, 10, 11] and len(problems) == 8
    assert "port: must be an integer" in by_line[2]
    assert "unknown option 'bogus'" in by_line[3]
    assert "3 ports for 2 hosts" in by_line[4]
    assert "pool_size: must be an integer" in by_line[6]
    assert "max_client_conn: must be an integer (got 'lots')" in by_line[8]
    assert "unknown section [pgboucner]" in by_line[10]
    assert "expected key = value" in by_line[11]


def test_every_pgbouncer_setting_is_read_or_explained(tmp_path: Path) -> None:
    listed = Path(__file__).resolve().parents[1] / "fixtures" / "pgbouncer_1_18_keys.txt"
    keys = [line.strip() for line in listed.read_text().splitlines() if line and not line.startswith("#")]
    assert len(keys) == 85
    assert [
        key for key in keys if key not in pgbouncer_ini._SETTINGS and key not in pgbouncer_ini._NOT_NEEDED
    ] == []
    ini = read_ini(write(tmp_path, "[pgbouncer]\nlog_pooler_errors = 0\nsyslog = 1\n"))
    assert ini.problems == [] and ini.values["log_pooler_errors"] is False
    (warning,) = ini.warnings
    assert warning.split(": ", 1)[1].startswith("syslog is not needed by pypooler: pypooler logs to stderr")


def test_pgbouncer_limits_are_read(tmp_path: Path) -> None:
    text = (
        "[databases]\napp = host=db pool_size=10 min_pool_size=2 reserve_pool=3 max_db_connections=12\n"
        "[pgbouncer]\nmin_pool_size = 1\nreserve_pool_size = 4\nreserve_pool_timeout = 2.5\n"
        "max_db_connections = 50\nmax_user_connections = 40\nunix_socket_mode = 0700\n"
    )
    ini = read_ini(write(tmp_path, text))
    assert ini.problems == []
    assert ini.values["databases"]["app"] == {
        "host": "db", "pool_size": 10, "min_pool_size": 2, "reserve_pool": 3, "max_db_connections": 12,
    }  # fmt: skip
    values = ini.values
    assert (values["min_pool_size"], values["reserve_pool_size"], values["reserve_pool_timeout"]) == (
        1,
        4,
        2.5,
    )
    assert (values["max_db_connections"], values["max_user_connections"]) == (50, 40)
    assert values["unix_socket_mode"] == 0o700


def test_a_bad_value_is_reported_at_its_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, "[pgbouncer]\nauth_type = trust\n\npool_mode = sometimes\n"), env={})
    expected = "pool_mode: must be one of 'session', 'transaction' or 'statement' (got 'sometimes')"
    assert caught.value.problems == [f"{tmp_path}/pgbouncer.ini:4: {expected}"]


def test_include_is_read_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "conf.d").mkdir()
    write(tmp_path / "conf.d", "[databases]\napp = host=db1\n", "databases.ini")
    main = write(tmp_path, "[pgbouncer]\nauth_type = trust\n%include conf.d/databases.ini\n")
    monkeypatch.chdir(tmp_path)
    ini = read_ini(main)
    assert ini.problems == [] and ini.values["databases"] == {"app": {"host": "db1"}}


def test_an_include_loop_stops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "%include loop.ini\n", "loop.ini")
    assert "nested more than 10 deep" in read_ini(tmp_path / "loop.ini").problems[0]


def test_connection_strings_as_pgbouncer_reads_them() -> None:
    assert parse_connection_string("host=db port=5432 password='it''s a \\'secret\\'' user=x") == {
        "host": "db", "port": "5432", "password": "it's a 'secret'", "user": "x",
    }  # fmt: skip
    with pytest.raises(ValueError, match="not closed"):
        parse_connection_string("password='open")
    with pytest.raises(ValueError, match="expected key=value"):
        parse_connection_string("host db")


def test_quoted_database_names_and_the_fallback(tmp_path: Path) -> None:
    text = '[databases]\n"app-""v2""" = host=a dbname=b\n* = host=c\n[pgbouncer]\nauth_type = trust\n'
    settings = load_settings(write(tmp_path, text), env={})
    assert settings.databases['app-"v2"'].dbname == "b" and settings.databases["*"].host == "c"


def test_a_database_without_host_reaches_the_unix_socket_as_in_pgbouncer(tmp_path: Path) -> None:
    ini = read_ini(write(tmp_path, "[databases]\napp = dbname=x\n"))
    assert ini.values["databases"]["app"]["host"] == "/tmp" and not ini.warnings
    # unix_socket_dir applies to server connections too, wherever the file sets it.
    ini = read_ini(write(tmp_path, "[databases]\napp = dbname=x\n[pgbouncer]\nunix_socket_dir = /run/pg\n"))
    assert ini.values["databases"]["app"]["host"] == "/run/pg"
    ini = read_ini(write(tmp_path, "[databases]\napp = dbname=x\n[pgbouncer]\nunix_socket_dir =\n"))
    assert ini.values["databases"]["app"]["host"] == "127.0.0.1"
    assert "no host= and unix_socket_dir is empty" in ini.warnings[0]


def test_a_unix_socket_host_is_kept(tmp_path: Path) -> None:
    ini = read_ini(write(tmp_path, "[databases]\napp = host=/var/run/postgresql port=5433\n"))
    assert ini.values["databases"]["app"]["host"] == "/var/run/postgresql"
    assert ini.values["databases"]["app"]["port"] == 5433 and not ini.problems


def test_listen_addr_star_is_every_address(tmp_path: Path) -> None:
    ini = read_ini(write(tmp_path, "[pgbouncer]\nlisten_addr = *\n"))
    assert ini.values["listen_addr"] == "*"
    problems = read_ini(write(tmp_path, "[pgbouncer]\nlisten_addr = 127.0.0.1, ::1\n")).problems
    assert "one address" in problems[0]


def test_convert_gives_toml_that_loads_to_the_same_settings(tmp_path: Path, auth_file: Path) -> None:
    ini_path = write(
        tmp_path,
        STOCK.format(auth_file=auth_file) + "ignore_startup_parameters = extra_float_digits,search_path\n",
    )
    toml_text = to_toml(read_ini(ini_path).values)
    tomllib.loads(toml_text)
    toml_path = write(tmp_path, toml_text, "pypooler.toml")
    assert load_settings(toml_path, env={}) == load_settings(ini_path, env={})


def test_the_users_section(tmp_path: Path) -> None:
    text = "[users]\nbob = pool_mode=session max_user_connections=3\n[pgbouncer]\nauth_type = trust\n"
    settings = load_settings(write(tmp_path, text), env={})
    assert settings.users["bob"].pool_mode == "session" and settings.max_user_connections_of("bob") == 3
    toml_path = write(tmp_path, to_toml(read_ini(tmp_path / "pgbouncer.ini").values), "pypooler.toml")
    assert load_settings(toml_path, env={}) == settings


def test_several_hosts_with_their_ports(tmp_path: Path) -> None:
    ini = read_ini(
        write(tmp_path, "[databases]\napp = host=a,b,::1 port=5432,5433,5434\none = host=a,b port=6000\n")
    )
    assert ini.values["databases"]["app"] == {"host": "a:5432,b:5433,[::1]:5434"}
    assert ini.values["databases"]["one"] == {"host": "a,b", "port": 6000}
    problems = read_ini(write(tmp_path, "[databases]\napp = host=a,b port=1,2,3\n")).problems
    assert "3 ports for 2 hosts" in problems[0]


def test_auth_type_any_is_trust_with_every_entry_forcing_its_user(tmp_path: Path) -> None:
    ini = read_ini(write(tmp_path, "[databases]\napp = host=db user=svc\n[pgbouncer]\nauth_type = any\n"))
    assert ini.values["auth_type"] == "trust" and not ini.problems
    assert "auth_type = any is read as trust" in ini.warnings[0] and "admin_users" in ini.warnings[0]
    text = "[databases]\napp = host=db\n* = host=db user=svc\n[pgbouncer]\nauth_type = any\n"
    ini = read_ini(write(tmp_path, text))
    (problem,) = ini.problems
    assert problem.startswith(f"{tmp_path / 'pgbouncer.ini'}:2: database app: auth_type = any needs user=")
    problems = read_ini(write(tmp_path, "[pgbouncer]\nauth_type = pam\n")).problems
    assert "pam is not supported" in problems[0]
