"""Wire-protocol numbers: message type bytes, protocol versions, SQLSTATE codes.

Type bytes are kept as `int` because indexing `bytes` yields `int`; comparing an int to an int is
the cheapest test on the forwarding path.
"""

from __future__ import annotations

from typing import Final

# Startup-phase request codes (they travel where a protocol version would).
PROTOCOL_3_0: Final = 196608  # 3 << 16
CANCEL_REQUEST_CODE: Final = 80877102
SSL_REQUEST_CODE: Final = 80877103
GSSENC_REQUEST_CODE: Final = 80877104
MAX_STARTUP_PACKET: Final = 10_000  # PostgreSQL's own limit for a startup packet, its length word not counted

# Frontend (client -> server) message types.
F_BIND: Final = ord("B")
F_CLOSE: Final = ord("C")
F_COPY_DATA: Final = ord("d")
F_COPY_DONE: Final = ord("c")
F_COPY_FAIL: Final = ord("f")
F_DESCRIBE: Final = ord("D")
F_EXECUTE: Final = ord("E")
F_FLUSH: Final = ord("H")
F_FUNCTION_CALL: Final = ord("F")
F_PARSE: Final = ord("P")
F_PASSWORD: Final = ord("p")  # also SASLInitialResponse / SASLResponse
F_QUERY: Final = ord("Q")
F_SYNC: Final = ord("S")
F_TERMINATE: Final = ord("X")

# Backend (server -> client) message types.
B_AUTHENTICATION: Final = ord("R")
B_BACKEND_KEY_DATA: Final = ord("K")
B_BIND_COMPLETE: Final = ord("2")
B_CLOSE_COMPLETE: Final = ord("3")
B_COMMAND_COMPLETE: Final = ord("C")
B_COPY_BOTH_RESPONSE: Final = ord("W")
B_COPY_DATA: Final = ord("d")
B_COPY_DONE: Final = ord("c")
B_COPY_IN_RESPONSE: Final = ord("G")
B_COPY_OUT_RESPONSE: Final = ord("H")
B_DATA_ROW: Final = ord("D")
B_EMPTY_QUERY_RESPONSE: Final = ord("I")
B_ERROR_RESPONSE: Final = ord("E")
B_NEGOTIATE_PROTOCOL_VERSION: Final = ord("v")
B_NO_DATA: Final = ord("n")
B_NOTICE_RESPONSE: Final = ord("N")
B_NOTIFICATION_RESPONSE: Final = ord("A")
B_PARAMETER_DESCRIPTION: Final = ord("t")
B_PARAMETER_STATUS: Final = ord("S")
B_PARSE_COMPLETE: Final = ord("1")
B_PORTAL_SUSPENDED: Final = ord("s")
B_READY_FOR_QUERY: Final = ord("Z")
B_ROW_DESCRIPTION: Final = ord("T")

# Type OIDs of the columns the admin console sends (all in text format).
OID_INT8: Final = 20
OID_INT4: Final = 23
OID_TEXT: Final = 25
OID_NUMERIC: Final = 1700

# ReadyForQuery transaction status bytes.
TX_IDLE: Final = ord("I")
TX_IN_TRANSACTION: Final = ord("T")
TX_FAILED: Final = ord("E")

# Authentication request codes (the Int32 after 'R').
AUTH_OK: Final = 0
AUTH_CLEARTEXT: Final = 3
AUTH_MD5: Final = 5
AUTH_SASL: Final = 10
AUTH_SASL_CONTINUE: Final = 11
AUTH_SASL_FINAL: Final = 12
AUTH_METHOD_NAMES: Final = {
    2: "KerberosV5",
    3: "cleartext password",
    5: "MD5 password",
    7: "GSSAPI",
    8: "GSSAPI continue",
    9: "SSPI",
    10: "SASL",
}

# ErrorResponse / NoticeResponse field codes.
FIELD_SEVERITY: Final = ord("S")
FIELD_SEVERITY_NONLOCALIZED: Final = ord("V")
FIELD_CODE: Final = ord("C")
FIELD_MESSAGE: Final = ord("M")
FIELD_DETAIL: Final = ord("D")
FIELD_HINT: Final = ord("H")


class SQLState:
    """SQLSTATE codes pypooler itself reports (PostgreSQL Appendix A)."""

    CONNECTION_EXCEPTION: Final = "08000"
    CONNECTION_FAILURE: Final = "08006"
    SQLCLIENT_UNABLE_TO_ESTABLISH: Final = "08001"
    PROTOCOL_VIOLATION: Final = "08P01"
    FEATURE_NOT_SUPPORTED: Final = "0A000"
    INVALID_AUTHORIZATION: Final = "28000"
    INVALID_PASSWORD: Final = "28P01"
    INVALID_CATALOG_NAME: Final = "3D000"
    DUPLICATE_PREPARED_STATEMENT: Final = "42P05"
    INVALID_SQL_STATEMENT_NAME: Final = "26000"
    UNDEFINED_OBJECT: Final = "42704"
    SYNTAX_ERROR: Final = "42601"
    INSUFFICIENT_PRIVILEGE: Final = "42501"
    INVALID_PARAMETER_VALUE: Final = "22023"
    OBJECT_NOT_IN_PREREQUISITE_STATE: Final = "55000"
    PROGRAM_LIMIT_EXCEEDED: Final = "54000"
    TOO_MANY_CONNECTIONS: Final = "53300"
    CONFIGURATION_LIMIT_EXCEEDED: Final = "53400"
    ACTIVE_SQL_TRANSACTION: Final = "25001"
    QUERY_CANCELED: Final = "57014"
    ADMIN_SHUTDOWN: Final = "57P01"
    IN_FAILED_SQL_TRANSACTION: Final = "25P02"
    CANNOT_CONNECT_NOW: Final = "57P03"
    INTERNAL_ERROR: Final = "XX000"
