"""Named limits of the public contract (API.md, "Limits").

Every limit a user can hit lives here once, so the admin API, the host-API bridge
and the tests all check the same number.
"""

from __future__ import annotations

KIB = 1024
MIB = 1024 * KIB

MAX_REQUEST_BODY_BYTES = 1 * MIB
# A user-route request's headers (they are stored with its execution): at most this
# many, of at most this many bytes in all, names and values.
MAX_REQUEST_HEADERS = 100
MAX_REQUEST_HEADER_BYTES = 32 * KIB
# Any request's head (request line and headers, as they arrive on the wire) is cut
# off past this many bytes with 431 and a closed connection, before it is buffered
# whole. Above MAX_REQUEST_HEADER_BYTES, so that a user route's 431 between the two
# is still picloud's own answer.
MAX_REQUEST_HEAD_BYTES = 64 * KIB
# A request's head must arrive whole within this many seconds of its connection
# opening, or of the previous response on it ending: else 408, or a plain close
# when nothing of a request came. A client sends a head at once, in one or two
# packets; this leaves a slow link time for 64 KiB (about 8 s at 64 kbit/s), yet
# frees a connection slot held by a slow or silent client within seconds.
HEAD_READ_TIMEOUT_SECONDS = 10.0
# User-route request bodies a node holds at once, counted from each request's
# declared Content-Length (or its bytes so far): a request that cannot get its share
# within BODY_BUDGET_WAIT_SECONDS is answered 503 ``overloaded``.
MAX_BODY_BYTES_IN_FLIGHT = 64 * MIB
BODY_BUDGET_WAIT_SECONDS = 1.0
# A user-route request's whole body must arrive within this many seconds of the
# server starting to read it; a slower one is answered 408 and nothing runs.
BODY_READ_TIMEOUT_SECONDS = 30.0
# A sync request holds its execution slot at most this long while its body still
# arrives; then it gives the slot back and asks again once the body is whole.
BODY_SLOT_HOLD_SECONDS = 1.0
MIN_TOKEN_CHARS = 16  # an API token, the instance admin's included
MAX_KV_KEY_BYTES = 512
MAX_KV_VALUE_BYTES = 256 * KIB
MAX_DOCUMENT_BYTES = 1 * MIB
MAX_SCRIPT_SOURCE_BYTES = 256 * KIB
MAX_GLOB_CHARS = 256
MIN_TIMEOUT_SECONDS = 1
MAX_TIMEOUT_SECONDS = 300
DEFAULT_TIMEOUT_SECONDS = 10
MIN_MEMORY_LIMIT_MB = 16
MAX_MEMORY_LIMIT_MB = 2048
DEFAULT_MEMORY_LIMIT_MB = 128

MAX_APP_NAME_CHARS = 63
MAX_SCRIPT_NAME_CHARS = 63
MAX_COLLECTION_CHARS = 63
MAX_DOCUMENT_ID_CHARS = 128
MAX_LIST_LIMIT = 1000
# What a repo lists at most: a page of the API and one row more, which tells whether
# another page follows.
MAX_LIST_FETCH = MAX_LIST_LIMIT + 1
# What one app may hold: every request matches against its routes, every write
# against its triggers.
MAX_ROUTES_PER_APP = 500
MAX_TRIGGERS_PER_APP = 500
# Scripts are stored whole (up to MAX_SCRIPT_SOURCE_BYTES each, counted in the app's
# storage quota): without a cap one app could hold any number of them.
MAX_SCRIPTS_PER_APP = 500
# Apps a user (not an instance admin) created and that still exist: each app has its
# own storage quota, so without a cap one token multiplies the quota at will.
MAX_APPS_PER_USER = 100
MAX_ROUTE_PARAMS = 16  # {name} segments in one route path
MAX_ROUTE_PATH_CHARS = 1024
# JSON values (bodies, KV values, documents, host-call arguments): at most this many
# levels of arrays and objects.
MAX_JSON_DEPTH = 100
# ``ctx.docs.query``'s ``where``: at most this many fields.
MAX_WHERE_FIELDS = 32
DEFAULT_LIST_LIMIT = 100

# What one execution may produce or ask for.
MAX_LOG_BYTES = 64 * KIB
MAX_RESPONSE_BYTES = 1 * MIB
MAX_HOST_CALLS_PER_EXECUTION = 10_000
# Values and documents (as JSON) one execution's host calls may write: else a single
# execution could write 10 000 documents of 1 MiB in one transaction.
MAX_WRITE_BYTES_PER_EXECUTION = 64 * MIB
# A failed execution's error message and traceback (the traceback keeps its end).
MAX_MESSAGE_CHARS = 2000
MAX_TRACEBACK_CHARS = 16000
MAX_RETRY_ATTEMPTS = 100

# The HTTP wait of a sync route is the script's timeout plus this buffer.
SYNC_WAIT_BUFFER_SECONDS = 2.0
