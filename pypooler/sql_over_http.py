"""SQL over HTTP: `POST /sql` as @neondatabase/serverless's `neon()` speaks it.

The request (read from the driver's published source, version 1.2):
- body: JSON `{"query": text, "params": [...]}`, or `{"queries": [{"query", "params"}, ...]}` for
  a batch, which runs as one transaction; the driver sends it as text/plain (fetch's default for
  a string body), so text/plain and application/json are both taken, nothing else;
- `Neon-Connection-String: postgresql://user:password@host/database?application_name=...`: the
  credentials, checked as any login is (`auth.py`: auth_type, hba by address, auth_file,
  auth_query), then the pool of (database, user) as a TCP login would get;
- `Neon-Array-Mode` (rows as arrays, else objects keyed by column name), `Neon-Raw-Text-Output`
  (values as PostgreSQL's text, else bool/int/float/json as JSON values), and for a batch
  `Neon-Batch-Isolation-Level` (ReadUncommitted | ReadCommitted | RepeatableRead | Serializable),
  `Neon-Batch-Read-Only`, `Neon-Batch-Deferrable`.

The response: 200 with `{command, rowCount, rowAsArray, fields: [{name, tableID, columnID,
dataTypeID, dataTypeSize, dataTypeModifier, format}], rows}` (a batch: `{"results": [...]}`).
Any error with a SQLSTATE, PostgreSQL's or pypooler's own, is 400 with `{message, code, severity,
detail, hint, position, ...}`: the driver reads the JSON of a 400 only, and turns those fields into
its NeonDbError. Method and content type are the transport's business: 405 and 415.

Rules:
- A request is a client of its pool while it runs (http_client.py: SHOW CLIENTS, histograms,
  holders, query_wait_timeout and query_timeout) and borrows a server only for its statements,
  after giving it the session a fresh login would have (`_settings_sql`); they run with the
  extended protocol (text parameters, never spliced into SQL), and it gives the server back by
  the release rule (`releasable_after_internal`) or closes it.
  A batch is BEGIN + its statements + Sync, then COMMIT only once every result fitted (else
  ROLLBACK), so a refused response never commits.
- Memory is bounded: each row is encoded to JSON when it arrives and counted; past
  http_max_response_bytes the request is refused and its server closed (its backend cancelled),
  never read to the end.
- One-shot: nothing a request leaves on its server may reach the next borrower. A statement that
  leaves session state (session_state.scan_sql) closes its server instead of releasing it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final
from urllib.parse import unquote, urlsplit

from pypooler.auth import TRUSTED, AuthOutcome
from pypooler.http_client import HttpClient
from pypooler.http_types import HttpRequest, HttpResponse
from pypooler.pool import Pool
from pypooler.protocol import codec
from pypooler.protocol import constants as c
from pypooler.protocol.errors import (
    AuthRejected,
    HttpLimitExceeded,
    HttpRequestInvalid,
    HttpUnsupported,
    NoSuchDatabase,
    PoolerError,
    ProtocolViolation,
    ServerConnectionLost,
)
from pypooler.protocol.transaction import releasable_after_internal
from pypooler.session_parameters import clean_ascii, settings_sql
from pypooler.session_state import LEAK_KINDS, scan_sql

if TYPE_CHECKING:
    from pypooler.app import Pooler
    from pypooler.server import ServerConnection

log = logging.getLogger("pypooler.sql_over_http")

CONNECTION_STRING: Final = "neon-connection-string"
ARRAY_MODE: Final = "neon-array-mode"
RAW_TEXT_OUTPUT: Final = "neon-raw-text-output"
ISOLATION_LEVEL: Final = "neon-batch-isolation-level"
READ_ONLY: Final = "neon-batch-read-only"
DEFERRABLE: Final = "neon-batch-deferrable"

# The driver's isolationLevel values (its index.d.ts) and PostgreSQL's words for them.
ISOLATION_LEVELS: Final = {
    "readuncommitted": "READ UNCOMMITTED",
    "readcommitted": "READ COMMITTED",
    "repeatableread": "REPEATABLE READ",
    "serializable": "SERIALIZABLE",
}
# fetch() sends a string body as text/plain;charset=UTF-8 unless told otherwise.
CONTENT_TYPES: Final = frozenset({"", "application/json", "text/plain"})
MAX_PARAMETERS: Final = 65535  # Bind's parameter count is an Int16
JSON_TYPE: Final = ("Content-Type", "application/json")

# Type OIDs whose text output becomes a JSON value when raw text is not asked for: bool; int2,
# int4, oid, float4, float8 (int8 and numeric stay strings, as JSON numbers lose their precision
# in JavaScript); json, jsonb.
BOOL_OID: Final = 16
NUMBER_OIDS: Final = frozenset({21, 23, 26, 700, 701})
JSON_OIDS: Final = frozenset({114, 3802})

# ErrorResponse field codes and the names the driver gives them (its NeonDbError properties).
ERROR_FIELDS: Final = {
    "V": "severity",  # the non-localized severity; "S" below stands in on servers before 9.6
    "C": "code",
    "D": "detail",
    "H": "hint",
    "P": "position",
    "p": "internalPosition",
    "q": "internalQuery",
    "W": "where",
    "s": "schema",
    "t": "table",
    "c": "column",
    "d": "dataType",
    "n": "constraint",
    "F": "file",
    "L": "line",
    "R": "routine",
}


class ServerError(Exception):
    """PostgreSQL answered a statement of the request with an ErrorResponse (fields by code)."""

    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__(fields.get("M", "error"))
        self.fields = fields


# --------------------------------------------------------------------------- the request


# Plain classes rather than dataclasses: mypyc compiles their __init__ (made once per request).
class Statement:
    def __init__(self, sql: str, parameters: list[str | None]) -> None:
        self.sql = sql
        self.parameters = parameters


class SqlRequest:
    def __init__(
        self, statements: list[Statement], batch: bool, array_mode: bool, raw_text: bool, begin: str
    ) -> None:
        self.statements = statements
        self.batch = batch
        self.array_mode = array_mode
        self.raw_text = raw_text
        self.begin = begin  # the BEGIN a batch starts with; "" for a single query


@dataclass
class Credentials:
    user: str
    password: str | None
    database: str
    application_name: str


def _flag(headers: dict[str, str], name: str) -> bool:
    value = headers.get(name, "").strip().lower()
    if value in ("", "false"):
        return False
    if value == "true":
        return True
    raise HttpRequestInvalid(f"header {name} must be true or false, not {value!r}")


def _parameter(value: object) -> str | None:
    """A parameter as PostgreSQL's text input. The driver sends strings and nulls (it formats
    dates, arrays and buffers itself); other JSON values are taken as their obvious text."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if isinstance(value, float) else str(value)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _statement(item: object) -> Statement:
    if not isinstance(item, dict) or not isinstance(item.get("query"), str):
        raise HttpRequestInvalid('a query must be a JSON object with a "query" string')
    raw = item.get("params", [])
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise HttpRequestInvalid('"params" must be a JSON array')
    if len(raw) > MAX_PARAMETERS:
        raise HttpLimitExceeded(f"a query may have at most {MAX_PARAMETERS} parameters, not {len(raw)}")
    return Statement(item["query"], [_parameter(value) for value in raw])


def parse_sql_request(request: HttpRequest, max_batch: int) -> SqlRequest:
    """What a POST /sql asks; HttpRequestInvalid / HttpLimitExceeded when it cannot be run."""
    try:
        document = json.loads(request.body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise HttpRequestInvalid(f"the request body is not valid JSON: {exc}") from None
    headers = request.headers
    array_mode = _flag(headers, ARRAY_MODE)
    raw_text = _flag(headers, RAW_TEXT_OUTPUT)
    if isinstance(document, dict) and "queries" in document:
        items = document["queries"]
        if not isinstance(items, list):
            raise HttpRequestInvalid('"queries" must be a JSON array')
        if len(items) > max_batch:
            raise HttpLimitExceeded(
                f"a batch may hold at most {max_batch} queries (http_max_batch_queries), not {len(items)}"
            )
        return SqlRequest([_statement(item) for item in items], True, array_mode, raw_text, _begin(headers))
    return SqlRequest([_statement(document)], False, array_mode, raw_text, "")


def _begin(headers: dict[str, str]) -> str:
    words = ["BEGIN"]
    level = headers.get(ISOLATION_LEVEL, "").strip()
    if level:
        spelled = ISOLATION_LEVELS.get(level.replace(" ", "").replace("_", "").lower())
        if spelled is None:
            raise HttpRequestInvalid(
                f"unknown {ISOLATION_LEVEL}: {level!r}",
                hint="ReadUncommitted, ReadCommitted, RepeatableRead or Serializable",
            )
        words.append(f"ISOLATION LEVEL {spelled}")
    if ISOLATION_LEVEL in headers or READ_ONLY in headers:
        words.append("READ ONLY" if _flag(headers, READ_ONLY) else "READ WRITE")
    if DEFERRABLE in headers:
        words.append("DEFERRABLE" if _flag(headers, DEFERRABLE) else "NOT DEFERRABLE")
    return " ".join(words)


def credentials_of(text: str) -> Credentials:
    """`parse_connection_string`, kept per connection string: a function's every request sends
    the same one (only those that parse are kept; past KEPT_PER_TEXT the memory starts again)."""
    known = _credentials.get(text)
    if known is None:
        known = parse_connection_string(text)
        if len(_credentials) >= KEPT_PER_TEXT:
            _credentials.clear()
        _credentials[text] = known
    return known


def parse_connection_string(text: str) -> Credentials:
    """User, password, database and application_name of a postgres(ql):// URL. Its host and
    port are the driver's business (they chose this endpoint), not ours."""
    if not text:
        raise HttpRequestInvalid(
            "no Neon-Connection-String header",
            hint="the driver sends it; postgresql://user:password@host/database",
        )
    try:
        url = urlsplit(text)
        user = unquote(url.username or "")
        password = None if url.password is None else unquote(url.password)
    except ValueError as exc:
        raise HttpRequestInvalid(f"Neon-Connection-String is not a valid URL: {exc}") from None
    if url.scheme not in ("postgres", "postgresql"):
        raise HttpRequestInvalid("Neon-Connection-String must be a postgres:// or postgresql:// URL")
    database = unquote(url.path.lstrip("/"))
    if not user or not database:
        raise HttpRequestInvalid("Neon-Connection-String names no user or no database")
    application_name = ""
    for pair in url.query.split("&"):
        name, _, value = pair.partition("=")
        if unquote(name) == "application_name":
            application_name = unquote(value.replace("+", " "))
    return Credentials(user, password, database, application_name)


# --------------------------------------------------------------------------- the login


def _peer_address(peer: str) -> str:
    host = peer.rpartition(":")[0] if ":" in peer else peer
    return host.strip("[]")


async def log_in(pooler: Pooler, credentials: Credentials, peer: str, *, tls: bool = False) -> Pool:
    """The pool this request runs in, after the checks a TCP login gets (client.py's
    _start_session: PoolManager.admit, Authenticator.method_for and the secret lookups), the
    password coming from the connection string rather than an exchange."""
    auth = pooler.auth
    manager = pooler.manager
    user, database = credentials.user, credentials.database
    if pooler.registry.admin_login is not None and database in ("pgbouncer", "pypooler"):
        raise NoSuchDatabase(f'the admin console "{database}" is not served over HTTP')
    database_config = manager.admit(database)
    method = auth.method_for(database_config, database, user, lambda: _peer_address(peer), tls=tls)
    outcome: AuthOutcome = TRUSTED
    if method in ("cert", "peer"):
        raise AuthRejected(f'{method} authentication is not available over HTTP for user "{user}"')
    if auth.needs_secret(method):
        known, secret = auth.cached_secret(database, user)
        if not known:
            secret = await auth.fetch_secret(database, user)
        outcome = auth.check_password(user, secret, credentials.password or "")
    pool = manager.get_pool(database, user)
    if pool is None:  # the configuration cannot change under a login, but be exact
        raise NoSuchDatabase(f'no such database: "{database}"')
    if outcome is not TRUSTED and pool.login.user == user:
        pool.login.learn(outcome.password, outcome.secret, outcome.client_key)
    return pool


def _logged_in(pooler: Pooler, request: HttpRequest, text: str) -> Pool | None:
    """The pool an earlier request on the same HTTP connection logged in to with the same
    connection string, if it is still the one served: a keep-alive connection logs in once, as a
    TCP client does (a RELOAD or DISABLE then holds for its next connection, as for TCP)."""
    pool = request.logins.get(text)
    if not isinstance(pool, Pool) or pool.closed:
        return None
    return pool if pooler.manager.pools.get((pool.database, pool.user)) is pool else None


# --------------------------------------------------------------------------- the results


def _json_value(oid: int, text: str) -> object:
    """A text value as a JSON value, for `Neon-Raw-Text-Output: false`."""
    if oid == BOOL_OID:
        return text == "t"
    if oid in NUMBER_OIDS:
        try:
            number = float(text) if oid >= 700 else int(text)
        except ValueError:
            return text
        return text if number != number or number in (float("inf"), float("-inf")) else number
    if oid in JSON_OIDS:
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


# One encoder for every response: json.dumps with options builds a new one per call.
_ENCODER: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
# What is worked out once per text and kept, since the same connection strings and statements
# come with request after request: RowDescription bodies as (columns, names, fields JSON),
# connection strings as Credentials, statements' session-state verdicts. Past this many entries
# a memory starts again.
KEPT_PER_TEXT: Final = 1024
_descriptions: dict[bytes, tuple[list[tuple[str, int]], list[str], bytes]] = {}
_credentials: dict[str, Credentials] = {}
_leaving: dict[str, bool] = {}


def _dumps(value: object) -> bytes:
    return _ENCODER.encode(value).encode("utf-8")


def describe_columns(body: bytes) -> tuple[list[tuple[str, int]], list[str], bytes]:
    """A RowDescription as (name, type oid) pairs, the names, and the driver's `fields` JSON."""
    known = _descriptions.get(body)
    if known is not None:
        return known
    columns = codec.parse_row_description(body)
    fields = _dumps(
        [
            {
                "name": name,
                "tableID": table,
                "columnID": column,
                "dataTypeID": oid,
                "dataTypeSize": size,
                "dataTypeModifier": modifier,
                "format": "binary" if form else "text",
            }
            for name, table, column, oid, size, modifier, form in columns
        ]
    )
    described = (
        [(name, oid) for name, _, _, oid, _, _, _ in columns],
        [name for name, *_ in columns],
        fields,
    )
    if len(_descriptions) >= KEPT_PER_TEXT:
        _descriptions.clear()
    _descriptions[body] = described
    return described


class ResultCollector:
    """The replies to one pipeline (Parse, Bind, Describe portal, Execute per statement, then
    Sync) as JSON results, bounded by `limit` bytes. Feed it every message; `feed` answers True at
    ReadyForQuery. Sans-IO: `handle_sql` pumps it from the server's internal reader."""

    __slots__ = (
        "_columns",
        "_fields",
        "_names",
        "_rows",
        "array_mode",
        "error",
        "limit",
        "over_limit",
        "raw_text",
        "ready_status",
        "results",
        "size",
        "unsupported",
    )

    def __init__(self, *, array_mode: bool, raw_text: bool, limit: int) -> None:
        self.array_mode = array_mode
        self.raw_text = raw_text
        self.limit = limit
        self.size = 0  # JSON bytes of the results so far
        self.results: list[bytes] = []  # one JSON object per statement that completed
        self.error: dict[str, str] | None = None
        self.over_limit = False
        self.unsupported = ""  # set when a statement started a COPY
        self.ready_status = b""
        self._columns: list[tuple[str, int]] = []  # (name, type oid) of the current statement
        self._fields = b"[]"  # its fields, as JSON
        self._names: list[str] = []
        self._rows: list[bytes] = []

    @property
    def failed(self) -> bool:
        """True once the request cannot succeed and its server must not be read to the end."""
        return self.over_limit or bool(self.unsupported)

    def feed(self, msg_type: int, body: bytes) -> bool:
        if msg_type == c.B_DATA_ROW:
            self._data_row(body)
        elif msg_type == c.B_ROW_DESCRIPTION:
            self._row_description(body)
        elif msg_type == c.B_NO_DATA:
            self._columns, self._names, self._fields = [], [], b"[]"
        elif msg_type == c.B_COMMAND_COMPLETE:
            self._complete(codec.read_cstring(body, 0, "command tag")[0])
        elif msg_type == c.B_EMPTY_QUERY_RESPONSE:
            self._complete("")
        elif msg_type == c.B_ERROR_RESPONSE:
            self.error = codec.parse_error_fields(body)
        elif msg_type in (c.B_COPY_IN_RESPONSE, c.B_COPY_OUT_RESPONSE, c.B_COPY_BOTH_RESPONSE):
            self.unsupported = "COPY"
            return True
        elif msg_type == c.B_READY_FOR_QUERY:
            self.ready_status = body
            return True
        return self.failed

    def _count(self, size: int) -> None:
        self.size += size
        if self.size > self.limit:
            self.over_limit = True
            self._rows = []  # freed at once: the request is refused

    def _row_description(self, body: bytes) -> None:
        self._columns, self._names, self._fields = describe_columns(body)
        self._rows = []

    def _data_row(self, body: bytes) -> None:
        if self.failed:
            return
        raw = codec.parse_data_row(body)
        values: list[object] = []
        columns = self._columns
        for index, value in enumerate(raw):
            if value is None:
                values.append(None)
                continue
            text = value.decode("utf-8", "replace")
            typed = not self.raw_text and index < len(columns)
            values.append(_json_value(columns[index][1], text) if typed else text)
        encoded = _dumps(values if self.array_mode else dict(zip(self._names, values, strict=False)))
        self._count(len(encoded) + 1)
        if not self.over_limit:
            self._rows.append(encoded)

    def _complete(self, tag: str) -> None:
        if self.failed:
            return
        command, _, rest = tag.partition(" ")
        count = rest.rpartition(" ")[2]
        head = b'{"command":%s,"rowCount":%s,"rowAsArray":%s,"fields":%s,"rows":[' % (
            b'"%s"' % command.encode() if command.isalpha() else _dumps(command),
            count.encode() if count.isdigit() else b"null",
            b"true" if self.array_mode else b"false",
            self._fields,
        )
        self._count(len(head) + 3)
        if not self.over_limit:
            self.results.append(head + b",".join(self._rows) + b"]}")
        self._rows = []
        self._columns, self._names, self._fields = [], [], b"[]"


# --------------------------------------------------------------------------- running


def build_pipeline(statements: list[Statement]) -> bytes:
    """Each statement bound and described (codec.build_bound_statement), then one Sync: one
    implicit transaction, in which an error skips the rest."""
    parts = [codec.build_bound_statement(s.sql, s.parameters, describe=True) for s in statements]
    return b"".join(parts) + codec.SYNC


async def _run(pool: Pool, server: ServerConnection, request: bytes, collector: ResultCollector) -> None:
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_message(msg_type: int, body: bytes) -> bool:
        if done.done():
            return True
        if msg_type == 0:
            done.set_exception(ServerConnectionLost("the server connection closed during the request"))
            return True
        try:
            finished = collector.feed(msg_type, body)
        except ProtocolViolation as exc:
            done.set_exception(exc)
            return True
        if finished:
            if collector.failed:  # closed now: its backend's further answers are not read
                pool.give_back(server, False, busy=True)
            done.set_result(None)
        return finished

    server.run_internal_request(request, on_message)
    await done


async def _simple_query(server: ServerConnection, sql: str) -> tuple[bool, dict[str, str] | None]:
    """A query of pypooler's own (COMMIT, ROLLBACK, session settings): whether the server is
    clean after it, and the server's error if any."""
    errors: list[dict[str, str]] = []
    _, clean = await server.query_first_row(codec.build_query(sql), errors)
    return clean, errors[0] if errors else None


def _leaves_state(statements: list[Statement]) -> bool:
    return any(_statement_leaves_state(statement.sql) for statement in statements)


def _statement_leaves_state(sql: str) -> bool:
    """session_state.scan_sql's answer, kept per text: the same statements come again and again."""
    known = _leaving.get(sql)
    if known is None:
        known = any(kind in LEAK_KINDS for kind in scan_sql(sql.encode("utf-8", "replace")))
        if len(_leaving) >= KEPT_PER_TEXT:
            _leaving.clear()
        _leaving[sql] = known
    return known


def _settings_sql(pool: Pool, server: ServerConnection, application_name: str) -> str:
    """SQL giving a borrowed server the session a fresh login would have (the pool's
    reported values, the request's application_name): a TCP client may have left its own
    TimeZone or DateStyle there. "" when it has them already, as nearly always."""
    wanted = dict(pool.parameters or server.parameters)
    if "application_name" in wanted:
        wanted["application_name"] = clean_ascii(application_name)
    return settings_sql(
        wanted, server.parameters, {}, server.other_settings, others_unknown=server.other_settings_unknown
    )


async def _apply_settings(server: ServerConnection, sql: str) -> bool:
    """Apply `_settings_sql`; whether the server is usable after it."""
    clean, error = await _simple_query(server, sql)
    if error is not None or not clean:
        return False
    server.other_settings = {}
    server.other_settings_unknown = False
    return True


async def run_request(client: HttpClient, request: SqlRequest, limit: int) -> list[bytes]:
    """The JSON result of each statement; ServerError, a PoolerError, or HttpLimitExceeded."""
    pool = client.pool
    collector = ResultCollector(array_mode=request.array_mode, raw_text=request.raw_text, limit=limit)
    statements = ([Statement(request.begin, [])] if request.batch else []) + request.statements
    first = request.statements[0].sql.encode("utf-8", "replace") if request.statements else b""
    server = await client.borrow(first)
    clean = False
    busy = True  # until its answers are all read, the backend may be working for us
    try:
        sql = _settings_sql(pool, server, client.application_name)
        if sql and not await _apply_settings(server, sql):
            raise ServerConnectionLost("the server could not be given this request's session settings")
        await _run(pool, server, build_pipeline(statements), collector)
        if collector.failed:
            if collector.unsupported:
                raise HttpUnsupported(f"{collector.unsupported} is not supported over HTTP")
            raise HttpLimitExceeded(
                f"the response is larger than http_max_response_bytes ({limit} bytes)",
                hint="select fewer rows or columns, or page with LIMIT",
            )
        busy = False
        error = collector.error
        if request.batch:
            clean, finish_error = await _simple_query(server, "ROLLBACK" if error is not None else "COMMIT")
            error = error or finish_error
        else:
            clean = releasable_after_internal(collector.ready_status)
        if error is not None:
            raise ServerError(error)
    finally:
        pool.give_back(server, clean and not _leaves_state(request.statements), busy=busy)
        client.returned(request.batch)
    results = collector.results
    return results[1:] if request.batch else results


# --------------------------------------------------------------------------- HTTP


def _error_body(error: PoolerError | ServerError) -> bytes:
    if isinstance(error, ServerError):
        fields = error.fields
        document: dict[str, str] = {"message": fields.get("M", "error")}
        for code, name in ERROR_FIELDS.items():
            if code in fields:
                document[name] = fields[code]
        if "severity" not in document and "S" in fields:
            document["severity"] = fields["S"]
    else:
        document = {"message": error.message, "code": error.sqlstate, "severity": error.severity}
        if error.detail:
            document["detail"] = error.detail
        if error.hint:
            document["hint"] = error.hint
    return _dumps(document)


def _json_response(status: int, body: bytes) -> HttpResponse:
    return HttpResponse(status, [JSON_TYPE], body)


def error_response(error: PoolerError | ServerError) -> HttpResponse:
    """400 and the error's fields: the one status whose JSON body the driver reads."""
    return _json_response(400, _error_body(error))


async def handle_sql(pooler: Pooler, request: HttpRequest) -> HttpResponse:
    """Answer one POST /sql (see the module docstring)."""
    if request.method != "POST":
        return HttpResponse(405, [("Allow", "POST"), JSON_TYPE], _dumps({"message": "use POST for /sql"}))
    content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if content_type not in CONTENT_TYPES:
        return _json_response(
            415, _dumps({"message": f"unsupported content type {content_type!r}: send JSON", "code": "08P01"})
        )
    settings = pooler.settings
    client: HttpClient | None = None
    try:
        pooler.registry.check_room()
        sql_request = parse_sql_request(request, settings.http_max_batch_queries)
        text = request.headers.get(CONNECTION_STRING, "")
        credentials = credentials_of(text)
        pool = _logged_in(pooler, request, text)
        if pool is None:
            pool = await log_in(pooler, credentials, request.peer, tls=request.tls)
            request.logins.clear()  # one login kept per connection
            request.logins[text] = pool
        with HttpClient(request, pool, credentials.user, credentials.application_name) as client:
            client.traffic.bytes_received += len(request.body)
            try:
                results = await run_request(client, sql_request, settings.http_max_response_bytes)
            except asyncio.CancelledError:
                if client.failure is None:  # not ours (the listener is closing): go on with it
                    raise
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
                raise client.failure from None
    except (PoolerError, ServerError) as exc:
        if isinstance(exc, PoolerError):
            if exc.log_detail:
                log.info("%s: %s (%s)", request.peer, exc.message, exc.log_detail)
            if client is None:
                pooler.registry.errors[exc.reason] += 1
            elif exc is not client.failure:  # fail() counted its own
                client.traffic.errors[exc.reason] += 1
        return error_response(exc)
    if sql_request.batch:
        body = b'{"results":[' + b",".join(results) + b"]}"
    else:
        body = results[0] if results else b"{}"
    client.traffic.bytes_sent += len(body)
    return _json_response(200, body)
