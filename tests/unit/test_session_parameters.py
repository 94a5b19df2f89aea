"""Tests for pypooler.session_parameters: startup parameters and the SQL that applies them."""

from __future__ import annotations

import pytest

from pypooler.protocol.errors import UnsupportedStartupParameter
from pypooler.session_parameters import (
    clean_ascii,
    options_settings,
    same_value,
    settings_sql,
    spelling_sql,
    split_options,
    startup_settings,
)

REPORTED = {"datestyle": "DateStyle", "timezone": "TimeZone", "application_name": "application_name",
            "client_encoding": "client_encoding", "is_superuser": "is_superuser"}  # fmt: skip


def test_options_are_split_like_postgresql_does() -> None:
    assert split_options(r"-c search_path=a\ b  -c x=1") == ["-c", "search_path=a b", "-c", "x=1"]
    assert options_settings("-c statement_timeout=5s --work-mem=4MB -cdatestyle=ISO") == [
        ("statement_timeout", "5s"), ("work_mem", "4MB"), ("datestyle", "ISO"),
    ]  # fmt: skip


@pytest.mark.parametrize("options", ["-e", "-d 5", "-c", "-c novalue", "--=x", "stray"])
def test_options_other_than_settings_are_refused(options: str) -> None:
    with pytest.raises(UnsupportedStartupParameter):
        options_settings(options)


def test_startup_parameters_split_into_reported_and_other_settings() -> None:
    overrides, others = startup_settings(
        {
            "user": "u", "database": "d", "application_name": "app", "datestyle": "ISO",
            "options": "-c TimeZone=UTC -c statement_timeout=5s", "Search_Path": "s",
            "extra_float_digits": "3", "_pq_.something": "x",
        },
        REPORTED,
        ["extra_float_digits"],
    )  # fmt: skip
    assert overrides == {"application_name": "app", "DateStyle": "ISO", "TimeZone": "UTC"}
    assert others == {"statement_timeout": "5s", "search_path": "s"}


@pytest.mark.parametrize(
    "parameters", [{"replication": "true"}, {"is_superuser": "on"}, {"options": "-c is_superuser=on"}]
)
def test_startup_parameters_that_cannot_be_applied_are_refused(parameters: dict[str, str]) -> None:
    with pytest.raises(UnsupportedStartupParameter):
        startup_settings(parameters, REPORTED, [])


def test_same_value_where_postgresql_ignores_the_spelling() -> None:
    assert same_value("client_encoding", "utf-8", "UTF8")
    assert same_value("TimeZone", "utc", "UTC")
    assert not same_value("DateStyle", "ISO", "ISO, MDY")
    assert not same_value("application_name", "App", "app")


def test_application_name_is_cleaned_as_postgresql_cleans_it() -> None:
    assert clean_ascii("psql") == "psql"
    assert clean_ascii("h\u00e9llo\x01x") == "h??llo?x"  # as PostgreSQL 15 reports it
    assert clean_ascii("\U0001f600") == "????"


def test_spelling_sql_sets_each_value_locally_on_top_of_the_default() -> None:
    sql = spelling_sql([("DateStyle", "dmy"), ("x", "it's")], {"DateStyle": "ISO, MDY"})
    assert sql == (
        "SELECT pg_catalog.set_config(E'DateStyle', E'ISO, MDY', true),"
        " pg_catalog.set_config(E'DateStyle', E'dmy', true),"
        " NULL, pg_catalog.set_config(E'x', E'it''s', true)"
    )


def test_settings_sql() -> None:
    current = {"TimeZone": "UTC", "application_name": "", "server_version": "15"}
    wanted = {"TimeZone": "Asia/Tokyo", "application_name": "", "server_version": "16"}
    assert settings_sql(current, current, {}, {}) == ""
    assert settings_sql(wanted, current, {}, {}) == (
        "SELECT pg_catalog.set_config(E'TimeZone', E'Asia/Tokyo', false)"
    )
    assert settings_sql(current, current, {"work_mem": "4MB"}, {"work_mem": "4MB"}) == ""
    assert settings_sql(current, current, {"work_mem": "4MB"}, {"work_mem": "4MB"}, others_unknown=True) == (
        "SELECT pg_catalog.set_config(E'work_mem', E'4MB', false)"
    )
    resets = settings_sql(current, current, {}, {"work_mem": "4MB", "a.b": "x"})
    assert resets == 'RESET "work_mem"; RESET "a.b"'
    assert settings_sql(current, current, {"search_path": "it's\\here"}, {}) == (
        "SELECT pg_catalog.set_config(E'search_path', E'it''s\\\\here', false)"
    )


def test_values_are_sent_as_ascii_whatever_the_session_encoding() -> None:
    sql = settings_sql({"application_name": "café 🐘"}, {}, {}, {})
    assert sql == "SELECT pg_catalog.set_config(E'application_name', E'caf\\u00e9 \\U0001f418', false)"
    assert sql.isascii()
