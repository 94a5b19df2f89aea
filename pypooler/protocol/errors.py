"""Errors pypooler reports to clients, one class per reason, and the one ErrorResponse builder.

Each class carries the SQLSTATE and severity a client sees, so the ErrorResponse is built in one
place (`to_error_response`, over `build_error_response`, which also builds NoticeResponses and,
in tests, PostgreSQL's own errors). FATAL errors end the client connection; ERROR ones leave it
open. `reason` is a short stable name used in logs and metrics labels.

Sans-IO and at the bottom of the protocol layer: it imports only `constants`, and `codec` (which
raises ProtocolViolation) imports it, never the other way round.
"""

from __future__ import annotations

import struct
from typing import ClassVar, Final

from pypooler.protocol import constants as c
from pypooler.protocol.constants import SQLState

_HEADER: Final = struct.Struct("!BI")  # a message's type byte and length (codec.pack_header's)


def _cstring(text: str) -> bytes:
    return text.encode("utf-8").replace(b"\0", b"") + b"\0"


def build_error_response(
    severity: str,
    sqlstate: str,
    message: str,
    *,
    detail: str | None = None,
    hint: str | None = None,
    notice: bool = False,
) -> bytes:
    """An ErrorResponse (NoticeResponse with `notice`): severity, SQLSTATE, message, detail, hint."""
    parts = [
        b"S" + _cstring(severity),
        b"V" + _cstring(severity),
        b"C" + _cstring(sqlstate),
        b"M" + _cstring(message),
    ]
    if detail:
        parts.append(b"D" + _cstring(detail))
    if hint:
        parts.append(b"H" + _cstring(hint))
    parts.append(b"\0")
    body = b"".join(parts)
    return _HEADER.pack(c.B_NOTICE_RESPONSE if notice else c.B_ERROR_RESPONSE, len(body) + 4) + body


def build_notice_response(message: str, *, sqlstate: str = "00000", detail: str | None = None) -> bytes:
    return build_error_response("NOTICE", sqlstate, message, detail=detail, notice=True)


class PoolerError(Exception):
    """Base: a condition pypooler reports to a client as an ErrorResponse."""

    sqlstate: ClassVar[str] = SQLState.INTERNAL_ERROR
    severity: ClassVar[str] = "FATAL"
    reason: ClassVar[str] = "internal_error"
    # True: logged (quietly, rate-limited) and the connection closed, nothing sent to the client.
    silent: ClassVar[bool] = False

    def __init__(self, message: str, *, detail: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.hint = hint
        # Said in pypooler's log, never to the client (e.g. why a password check failed).
        self.log_detail: str | None = None

    def to_error_response(self, severity: str | None = None) -> bytes:
        """The ErrorResponse; `severity` overrides the class's (an ERROR where the class ends the
        connection elsewhere)."""
        return build_error_response(
            severity or self.severity, self.sqlstate, self.message, detail=self.detail, hint=self.hint
        )


class ProtocolViolation(PoolerError):
    sqlstate = SQLState.PROTOCOL_VIOLATION
    reason = "protocol_violation"


class InvalidStartupPacket(ProtocolViolation):
    """The first bytes are not a startup packet at all: a length word PostgreSQL rejects (a
    Terminate sent before the startup packet, an HTTP request, a port scanner). PostgreSQL
    logs "invalid length of startup packet" and closes without a word; so does pypooler."""

    reason = "invalid_startup_packet"
    silent = True


class UnsupportedProtocol(ProtocolViolation):
    # PostgreSQL itself says 0A000 here; pypooler reports every unusable startup packet as 08P01
    # so clients and log filters see one code for "cannot speak to this peer".
    reason = "unsupported_protocol"


class NoSuchDatabase(PoolerError):
    sqlstate = SQLState.INVALID_CATALOG_NAME
    reason = "no_such_database"


class TooManyClients(PoolerError):
    sqlstate = SQLState.TOO_MANY_CONNECTIONS
    reason = "max_client_conn"


class TooManyPools(PoolerError):
    """max_auto_pools pools for unconfigured databases or users are in use."""

    sqlstate = SQLState.CONFIGURATION_LIMIT_EXCEEDED
    reason = "max_auto_pools"


class QueryWaitTimeout(PoolerError):
    sqlstate = SQLState.CONNECTION_FAILURE
    reason = "query_wait_timeout"


class IdleTransactionTimeout(PoolerError):
    sqlstate = "25P03"  # idle_in_transaction_session_timeout, as PostgreSQL's own
    reason = "idle_transaction_timeout"


class ClientIdleTimeout(PoolerError):
    sqlstate = "57P05"  # idle_session_timeout, as PostgreSQL's own
    reason = "client_idle_timeout"


class QueryTimeout(PoolerError):
    sqlstate = SQLState.QUERY_CANCELED
    reason = "query_timeout"


class ServerConnectFailed(PoolerError):
    """Could not open or log in to a server connection for the pool."""

    sqlstate = SQLState.SQLCLIENT_UNABLE_TO_ESTABLISH
    reason = "server_connect_failed"


class ServerAuthIncomplete(ServerConnectFailed):
    """The server said AuthenticationOk before completing the SCRAM exchange it started: it never
    proved it knows the password, so pypooler does not use the connection."""

    reason = "server_auth_incomplete"


class ServerLoginFailed(ServerConnectFailed):
    """The server refused pypooler's login (bad password, unknown role, unsupported method)."""

    sqlstate = SQLState.INVALID_AUTHORIZATION
    reason = "server_login_failed"

    def __init__(
        self,
        message: str,
        *,
        detail: str | None = None,
        hint: str | None = None,
        sqlstate: str | None = None,
    ) -> None:
        super().__init__(message, detail=detail, hint=hint)
        if sqlstate:
            self.sqlstate = sqlstate  # type: ignore[misc]  # the server's own code wins


class ServerConnectionLost(PoolerError):
    sqlstate = SQLState.CONNECTION_FAILURE
    reason = "server_died"


class ServerFatalForwarded(ServerConnectionLost):
    """The server ended the connection with a FATAL of its own, which the client already got:
    PostgreSQL ends a connection with one FATAL, so pypooler adds none (the close only)."""

    silent = True


class StatementModeTransaction(PoolerError):
    """A multi-statement transaction in statement pool mode."""

    sqlstate = SQLState.ACTIVE_SQL_TRANSACTION
    reason = "statement_mode_transaction"


class DuplicatePreparedStatement(PoolerError):
    """A client's Parse reuses the name of a prepared statement it already holds.

    Worded exactly as PostgreSQL words it, so clients that match on it keep working.
    """

    sqlstate = SQLState.DUPLICATE_PREPARED_STATEMENT
    severity = "ERROR"
    reason = "duplicate_prepared_statement"


class UndefinedPreparedStatement(PoolerError):
    """A client names a statement it does not hold, in pypooler's own name space.

    Any other unknown name goes to the server, which answers it; one that looks like a
    server-side name of pypooler's must not reach the server, where it may exist.
    """

    sqlstate = SQLState.INVALID_SQL_STATEMENT_NAME
    severity = "ERROR"
    reason = "undefined_prepared_statement"


class SessionStateRefused(PoolerError):
    """session_state_policy = "error": a statement would leave state on a shared server."""

    sqlstate = SQLState.FEATURE_NOT_SUPPORTED
    severity = "ERROR"
    reason = "session_state_refused"


class UnsupportedStartupParameter(PoolerError):
    """A startup parameter (or `options` switch) pypooler cannot apply per client."""

    sqlstate = SQLState.FEATURE_NOT_SUPPORTED
    reason = "unsupported_startup_parameter"


class StartupParameterRejected(PoolerError):
    """The server refused a client's startup parameter when pypooler applied it."""

    reason = "startup_parameter_rejected"

    def __init__(
        self,
        message: str,
        *,
        detail: str | None = None,
        hint: str | None = None,
        sqlstate: str | None = None,
    ) -> None:
        super().__init__(message, detail=detail, hint=hint)
        if sqlstate:
            self.sqlstate = sqlstate  # type: ignore[misc]  # the server's own code wins


class InFailedTransaction(PoolerError):
    """A statement pypooler answers itself (LISTEN) in a transaction block that already failed."""

    sqlstate = SQLState.IN_FAILED_SQL_TRANSACTION
    severity = "ERROR"
    reason = "in_failed_transaction"


class ShuttingDown(PoolerError):
    sqlstate = SQLState.ADMIN_SHUTDOWN
    reason = "shutdown"


class PasswordAuthFailed(PoolerError):
    """Wrong password, unknown user, or no usable secret: one message for all three, so a client
    cannot tell which (no user enumeration)."""

    sqlstate = SQLState.INVALID_PASSWORD
    reason = "auth_failed"

    @classmethod
    def for_user(cls, user: str, why: str) -> PasswordAuthFailed:
        """PostgreSQL's wording; `why` goes to pypooler's log only."""
        error = cls(f'password authentication failed for user "{user}"')
        error.log_detail = why
        return error


class AuthRejected(PoolerError):
    """The connection is not allowed at all: an hba `reject` or no matching hba line, plaintext
    where TLS is required, a missing or wrong client certificate."""

    sqlstate = SQLState.INVALID_AUTHORIZATION
    reason = "auth_rejected"


class ChannelBindingError(AuthRejected):
    """SCRAM channel binding negotiation or check failed."""

    reason = "channel_binding"


class ClientLoginTimeout(PoolerError):
    """The client did not finish startup and authentication within client_login_timeout."""

    # PostgreSQL reports its authentication_timeout with this code too.
    sqlstate = SQLState.QUERY_CANCELED
    reason = "client_login_timeout"


class AuthLookupFailed(ServerConnectFailed):
    """auth_query could not be run (its server is down or the query failed)."""

    reason = "auth_query_failed"


class KilledByAdmin(PoolerError):
    """KILL on the admin console ended this client's database."""

    sqlstate = SQLState.ADMIN_SHUTDOWN
    reason = "admin_kill"


class DatabaseDisabled(PoolerError):
    """DISABLE on the admin console: the database refuses new logins."""

    # PostgreSQL's own code for a database that does not allow connections (datallowconn).
    sqlstate = SQLState.OBJECT_NOT_IN_PREREQUISITE_STATE
    reason = "database_disabled"


class AdminNotAllowed(PoolerError):
    """A user in neither admin_users nor stats_users asked for the admin console."""

    sqlstate = SQLState.INVALID_AUTHORIZATION
    reason = "admin_not_allowed"


class AdminCommandError(PoolerError):
    """A console command that cannot run; the console session goes on."""

    severity = "ERROR"
    sqlstate = SQLState.SYNTAX_ERROR
    reason = "admin_command"


class AdminPermissionDenied(AdminCommandError):
    """A stats_users member asked for more than SHOW."""

    sqlstate = SQLState.INSUFFICIENT_PRIVILEGE
    reason = "admin_permission"


class AdminUnsupported(AdminCommandError):
    """Extended query protocol (or anything else but a simple Query) on the console."""

    sqlstate = SQLState.FEATURE_NOT_SUPPORTED
    reason = "admin_unsupported"


class AdminInvalidValue(AdminCommandError):
    """A command naming an unknown database, or a RELOAD of a bad configuration."""

    sqlstate = SQLState.INVALID_PARAMETER_VALUE
    reason = "admin_invalid_value"


class HttpRequestInvalid(PoolerError):
    """A POST /sql request that cannot be run as sent: malformed JSON, a missing or unusable
    Neon-Connection-String, a bad batch header, a database the HTTP transport does not serve."""

    sqlstate = SQLState.PROTOCOL_VIOLATION
    severity = "ERROR"
    reason = "http_request_invalid"


class HttpLimitExceeded(PoolerError):
    """A POST /sql request past one of its limits (http_max_batch_queries,
    http_max_response_bytes, the protocol's 65535 parameters)."""

    sqlstate = SQLState.PROGRAM_LIMIT_EXCEEDED
    severity = "ERROR"
    reason = "http_limit"


class HttpRequestTimeout(PoolerError):
    """A POST /sql request past http_request_timeout."""

    sqlstate = SQLState.QUERY_CANCELED
    severity = "ERROR"
    reason = "http_request_timeout"


class HttpUnsupported(PoolerError):
    """A statement SQL over HTTP cannot carry (COPY: there is no stream to copy to or from)."""

    sqlstate = SQLState.FEATURE_NOT_SUPPORTED
    severity = "ERROR"
    reason = "http_unsupported"
