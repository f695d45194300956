#!/usr/bin/env python3
"""claude_proxy.py: an API server over the local `claude` CLI, in the three dialects its
users' clients speak: OpenAI Chat Completions, the OpenAI Responses API and the Anthropic
Messages API.

Any OpenAI client (the openai SDKs, LangChain, Continue, Open WebUI, Aider, Codex, the Agents
SDK, ...) pointed at http://127.0.0.1:8082/v1, and any Anthropic client (the anthropic SDKs,
Claude Code, OpenCode) pointed at http://127.0.0.1:8082, talks to the Claude the `claude` CLI
is logged into, with no API key; a browser at http://127.0.0.1:8082/ gets a chat page.
Standard library only, one file, Python 3.9+:

    python3 claude_proxy.py            # then: base_url="http://127.0.0.1:8082/v1"
    python3 claude_proxy.py --help     # every option, with its environment variable

Each dialect parses its requests into one neutral conversation and writes its replies from one
stream of neutral reply events; in between, a headless `claude -p` process gets the
conversation as real turns (its live process kept from the previous turn, or a session file it
resumes) and answers in stream-json events. The model is offered none of the CLI's own tools:
only the client's functions, which the client runs; except in Workspace mode (a client at
/workspace/v1), and only in the folder named with --workspace.
"""

__version__ = "0.2.0"

import argparse
import base64
import binascii
import calendar
import collections
import dataclasses
import hashlib
import errno
import hmac
import io
import ipaddress
import json
import os
import re
import selectors
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler
from typing import Optional
try:
    import fcntl  # POSIX: the owner lock of the proxy's folder (see ProxyFolder)
except ImportError:
    fcntl = None
try:
    import msvcrt  # Windows: the same lock
except ImportError:
    msvcrt = None
from http.server import ThreadingHTTPServer

# Defaults ###################################################################################

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8082
DEFAULT_TIMEOUT = 300.0
DEFAULT_MODELS = ("sonnet", "opus", "haiku")
DEFAULT_MAX_BODY = 32 * 1024 * 1024  # base64 images and files make bodies large
#: Used when a request has no system/developer message. Without --system-prompt-file the CLI
#: would use Claude Code's own agent prompt, which talks about tools the model is not given.
DEFAULT_SYSTEM_PROMPT = "You are Claude, a helpful AI assistant made by Anthropic."
#: The CLI retries 429/529/5xx by itself for minutes; the proxy answers 429/529 at the first
#: retry notice, and bounds the others (5xx, network) to a few seconds of retrying.
DEFAULT_CLI_MAX_RETRIES = "2"
DEFAULT_POOL_SIZE = 2  # warm processes waiting, and processes kept for a next turn; ~165 MB each
DEFAULT_POOL_IDLE = 300.0  # seconds a warm, kept or reset process may wait before it is retired
DEFAULT_MAX_CONCURRENCY = 4  # CLI runs at once
DEFAULT_MAX_QUEUE = 32  # requests waiting for a run slot; more get 429
DEFAULT_SHUTDOWN_GRACE = 10.0  # seconds running requests get to finish after SIGTERM/SIGHUP/SIGINT
DEFAULT_KEEPALIVE = 15.0  # seconds of stream silence before a keep-alive (CLAUDE_KEEPALIVE)
BUSY_RETRY_AFTER = 2  # Retry-After, in seconds, when every slot and queue place is taken
#: At a subscriber's reached limit, requests are refused from what the proxy knows, without a
#: run, but one probe run is let through this often: the user may have bought more usage.
PLAN_PROBE_SECONDS = 60.0
PLAN_WARN_LEVELS = (0.8, 0.95)  # a window's use the log mentions once, on the way up
CACHE_TTLS = ("auto", "5m", "1h")
#: With --cache-ttl auto, a conversation whose turns come further apart than this outlives the
#: API's 5-minute cache entries: it is given 1-hour entries from then on.
CACHE_5M_SECONDS = 270.0
#: The CLI's switches for its prompt cache's lifetime (cli_env); one set in the proxy's own
#: environment is the operator's choice, which --cache-ttl auto leaves alone.
CACHE_TTL_VARIABLES = ("FORCE_PROMPT_CACHING_5M", "ENABLE_PROMPT_CACHING_1H",
                       "CLAUDE_CODE_PROMPT_CACHE_TTL", "CLAUDE_CODE_MESSAGES_PROMPT_CACHE_TTL")
#: A connection costs a thread only once its request head has arrived whole: until then one
#: selectors loop holds it, for at most HEAD_READ_SECONDS and MAX_HEAD_BYTES (common servers'
#: default). When MAX_PENDING_HEADS connections are still sending heads, the oldest is dropped.
MAX_HEAD_BYTES = 64 * 1024  # a request line and its headers, in all
HEAD_RECV_BYTES = 16 * 1024  # read at a time while a head arrives
HEAD_READ_SECONDS = 10.0  # from connecting to the head's blank line
MAX_PENDING_HEADS = 500  # under the 512 sockets select() takes on Windows
BODY_READ_SECONDS = 30.0  # from the head to the body's last byte
DISCARD_SECONDS, DISCARD_BYTES = 2.0, 64 * 1024 * 1024  # unread body dropped after an early answer
EXTRA_CONNECTIONS = 64  # requests served at once beyond concurrency + queue (GETs, errors)
STOP_GRACE_SECONDS = 1.5  # how long a killed run may take to end, and its last stderr lines to arrive
#: A read or write of the client's socket that makes no progress for this long (or for the
#: run's timeout, if shorter) drops the client: a client that stops reading frees its run slot.
SOCKET_IO_SECONDS = 30.0
WRITE_PIECE_BYTES = 64 * 1024  # each piece of an answer must be taken within SOCKET_IO_SECONDS
#: What a broken CLI can make the proxy hold: real events are far below 1 MiB, stderr lines short.
MAX_EVENT_LINE = 16 * 1024 * 1024  # a longer stdout line stops the run: cli_bad_output
MAX_STDERR_LINE = 4 * 1024  # kept (and logged) per stderr line; the rest of a line is dropped
STDERR_TAIL_LINES = 40
TMPDIR_MIN_FREE_BYTES = 16 * 1024 * 1024  # less free space for a run's files: 503 tmpdir_unavailable

#: CLI effort levels, and what OpenAI's reasoning_effort values mean in them.
CLI_EFFORTS = ("low", "medium", "high", "xhigh", "max")
REASONING_EFFORT_TO_CLI = {
    "none": "low", "minimal": "low", "low": "low", "medium": "medium",
    "high": "high", "xhigh": "xhigh", "max": "max",
}
#: A model name goes into argv: it must never look like a flag, nor carry shell metacharacters
#: (on Windows claude.cmd runs under cmd.exe, which interprets & | ^ % and quotes).
#: `\Z`, not `$`, in every pattern that guards argv or a name: `$` also matches before a final
#: newline, so "sonnet\n" would pass.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@\[\]-]{0,127}\Z")
IMAGE_MEDIA_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
#: Files reach the model as Messages API `document` blocks, the way Claude reads them: a PDF as a
#: base64 source, a text file as a text source (the API takes text/plain only, so every text type
#: is sent as that). Text types: every text/*, and these.
PDF_MEDIA_TYPE = "application/pdf"
TEXT_FILE_TYPES = ("application/json", "application/x-ndjson", "application/jsonl", "application/xml",
                   "application/yaml", "application/x-yaml", "application/toml", "application/javascript",
                   "application/x-sh", "application/sql")
#: A client that does not know a file's type says application/octet-stream (browsers do for .md):
#: then the filename's extension names it.
FILE_EXTENSION_TYPES = {
    ".pdf": PDF_MEDIA_TYPE, ".txt": "text/plain", ".text": "text/plain", ".log": "text/plain",
    ".md": "text/markdown", ".markdown": "text/markdown", ".rst": "text/x-rst",
    ".csv": "text/csv", ".tsv": "text/tab-separated-values", ".html": "text/html", ".htm": "text/html",
    ".xml": "application/xml", ".json": "application/json", ".jsonl": "application/jsonl",
    ".ndjson": "application/x-ndjson", ".yaml": "application/yaml", ".yml": "application/yaml",
    ".toml": "application/toml", ".ini": "text/plain", ".sql": "application/sql"}
#: What the images and files of one conversation may weigh together, as sent (base64, or a text
#: file's UTF-8): the API takes requests of up to 32 MB, and the CLI's request holds its system
#: prompt, the tool definitions and the text as well. The API also refuses a PDF of more than 100
#: pages; counting pages would mean parsing the PDF, so that limit is the API's to tell.
MAX_FILES_BYTES = 30 * 1024 * 1024
#: The client's functions reach the model through an MCP server of this same file, named
#: MCP_SERVER: the CLI calls them mcp__fn__<name>. The API caps a tool name at 64 characters.
MCP_SERVER = "fn"
MCP_PREFIX = "mcp__%s__" % MCP_SERVER
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
TOOL_ID = re.compile(r"[A-Za-z0-9_-]{1,200}")  # the API's tool_use ids, used with fullmatch
API_TOOL_NAME_MAX = 64
#: The CLI's own tool for --json-schema: its input is the structured output.
STRUCTURED_OUTPUT_TOOL = "StructuredOutput"
#: Turns the CLI may take when it must produce structured output and no client tool is offered:
#: if the model answers in prose, the CLI asks again for the StructuredOutput call.
STRUCTURED_OUTPUT_MAX_TURNS = 3
#: The schema is an argument: measured in its argv form (cli_safe_json), under Linux's 128 KiB per
#: argument, and on Windows under CreateProcess's 32,767 characters for the whole command line.
MAX_SCHEMA_BYTES = 24 * 1024 if os.name == "nt" else 64 * 1024
MAX_TOKENS = 1000000  # past any model's output limit: a larger max_tokens is a typo
TOOL_LOOP_MAX_TURNS = 100  # model calls one client message may lead to in a tool loop
MCP_RESULTS_DIR = "results"  # in a run's directory: the client's tool results for the bridge
HISTORY_MODES = ("turns", "transcript")
RESUME_START_SECONDS = 15.0  # a resumed session the CLI cannot load hangs it: give up then
#: A resumed session names a model; the CLI runs it when the request names none. Until a run
#: has said which model the CLI's default is, this one stands in.
DEFAULT_SESSION_MODEL = "claude-sonnet-4-6"
CHUNK_SIZE = re.compile(rb"^[0-9A-Fa-f]{1,8}\Z")
CONTENT_LENGTH = re.compile(r"[0-9]{1,18}\Z")
#: A Host header: a name or [IPv6], then an optional port; nothing else (no userinfo, no path).
HOST_HEADER = re.compile(r"(?:\[(?P<ip6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9._-]+))(?::(?P<port>[0-9]{0,5}))?\Z")
HEADER_NAME_LIST = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+(?:[ \t]*,[ \t]*[!#$%&'*+.^_`|~0-9A-Za-z-]+)*\Z")
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")

DATA_URL = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)(?P<params>(;[^,;]*)*?);base64,", re.I)

# Logging ####################################################################################
#: One line per event on stderr, control characters from outside escaped; never a prompt
#: (unless --log-prompts).


_log_lock = threading.Lock()


#: Control characters from outside (ESC starts a terminal escape sequence) never reach the log.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
LOG_UNSAFE = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def escape_control(match):
    return "\\x%02x" % ord(match.group(0))


def printable(text, limit=200):
    """Text from outside (a path, a CLI's stderr) for one log line: at most `limit` characters,
    control characters as \\xNN."""
    if len(text) > limit:
        text = text[:limit] + "...(%d chars)" % len(text)
    return CONTROL_CHARACTERS.sub(escape_control, text)


def log(message):
    message = LOG_UNSAFE.sub(escape_control, message)  # line breaks stay: tracebacks
    with _log_lock:
        sys.stderr.write("%s claude-proxy: %s\n" % (time.strftime("%Y-%m-%d %H:%M:%S"), message))
        sys.stderr.flush()


def access_line(address, method, path, status, error, model, usage, cost, seconds):
    """One request's access-log line: client method path status [error=] model= tokens= [cost=]
    ms; what came from outside is cut and its control characters escaped (printable)."""
    usage = usage or {}
    tokens = "%s+%s" % (usage.get("prompt_tokens", "-"), usage.get("completion_tokens", "-"))
    return '%s %s %s %s%s model=%s tokens=%s%s %.0fms' % (
        address, printable(method, 20), printable((path or "-").split("?")[0]), status or "-",
        " error=%s" % error if error else "", model, tokens,
        " cost=$%.6f" % cost if cost is not None else "", seconds * 1000)


# Errors #####################################################################################


class ProxyError(Exception):
    """An error with its HTTP status and OpenAI error envelope; raised anywhere, sent once."""

    def __init__(self, status, message, type_="invalid_request_error", param=None, code=None,
                 headers=None, api_message=None, plan_window=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        self.api_message = api_message  # the Messages API's own wording, for the Anthropic dialect
        # A plan limit's (window, when it resets, the CLI's words): what PlanLimits refuses by.
        self.plan_window = plan_window

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def invalid(message, param=None, code=None, api_message=None):
    """A 400 for a request the client must change; the SDKs must not retry it."""
    return ProxyError(400, message, "invalid_request_error", param, code,
                      {"x-should-retry": "false"}, api_message)


def rate_limited(retry_after, message):
    return ProxyError(429, message, "rate_limit_error", None, "rate_limit_exceeded",
                      {"Retry-After": str(retry_after)})


def overloaded(retry_after, message):
    return ProxyError(503, message, "server_error", None, "overloaded",
                      {"Retry-After": str(retry_after)})


def not_logged_in(detail):
    # Not the client's key: the operator must log the CLI in. Retrying cannot help.
    return ProxyError(
        503, "The claude CLI behind this proxy is not logged in or its credentials were "
        "refused (%s). On the proxy's machine, run `claude` and log in, then retry." % detail,
        "server_error", None, "cli_not_logged_in", {"x-should-retry": "false"})


def cli_failed(message, code="cli_error"):
    return ProxyError(502, message, "server_error", None, code)


def workspace_unavailable(workspace):
    """A workspace's folder is gone (removed or renamed since the proxy started)."""
    return ProxyError(503, "The workspace folder %s is not there any more; create it again, or "
                      "restart the proxy with another --workspace." % workspace.root,
                      "server_error", None, "workspace_unavailable", {"Retry-After": "5"})


def tmpdir_unavailable(reason):
    """The proxy cannot write a run's files: the operator must free space or set TMPDIR."""
    return ProxyError(503, "The proxy cannot write its temporary files in %s (%s); free space "
                      "there or set TMPDIR to a writable folder." % (tempfile.gettempdir(), reason),
                      "server_error", None, "tmpdir_unavailable", {"Retry-After": "5"})


def timed_out(seconds, setting="CLAUDE_TIMEOUT"):
    return ProxyError(504, "The claude CLI did not finish within %g s (%s)." % (seconds, setting),
                      "server_error", None, "timeout")


def proxy_busy(message):
    """Every run slot and queue place is taken (CLAUDE_MAX_CONCURRENCY, CLAUDE_MAX_QUEUE)."""
    return ProxyError(429, message, "rate_limit_error", None, "proxy_busy",
                      {"Retry-After": str(BUSY_RETRY_AFTER)})


def forbidden(message, code):
    return ProxyError(403, message, "invalid_request_error", None, code, {"x-should-retry": "false"})


class ClientGone(Exception):
    """The client hung up while its request waited or ran: nobody is left to answer."""


def retry_after_seconds(delay_ms, default=1):
    """Whole seconds for Retry-After from the CLI's retry delay: at least 1."""
    try:
        return max(1, int(-(-float(delay_ms) // 1000)))
    except (TypeError, ValueError):
        return default


def retry_error(event):
    """A `system/api_retry` event -> the ProxyError to answer at once, or None to let the CLI retry.

    Rate limits, overload and refused credentials are answered at the first notice: the CLI's
    own retry loop would otherwise hold the client for minutes (CLI-FACTS)."""
    status = event.get("error_status")
    delay = retry_after_seconds(event.get("retry_delay_ms"))
    if status == 429:
        return rate_limited(delay, "Claude's API is rate limiting this account; retry after %d s." % delay)
    if status == 529:
        return overloaded(delay, "Claude's API is overloaded; retry after %d s." % delay)
    if status in (401, 403):
        return not_logged_in("API answered %s: %s" % (status, event.get("error") or "authentication failed"))
    return None


def _is_number(value):
    """A JSON number (json.loads gives bools as ints: true is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def iso_utc(seconds):
    """Epoch seconds -> ISO 8601 in UTC, to the second: 2026-12-06T04:17:00Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


#: How the CLI names a subscriber's windows in words (its rateLimitType and unifiedWindows keys).
PLAN_WINDOW_WORDS = {"five_hour": "5-hour", "seven_day": "weekly", "seven_day_opus": "weekly Opus",
                     "seven_day_sonnet": "weekly Sonnet", "overage": "extra usage"}
#: A limit further away than this is not worth a client's retry: x-should-retry: false.
PLAN_NO_RETRY_SECONDS = 60
#: The CLI's words for a subscriber's reached limit (2.1.197 and 2.1.332: "You've hit your
#: limit · resets 4:17am (UTC)", "You've hit your 5-hour limit", "your weekly limit · resets
#: Dec 9, 3:17am (UTC)"; 2.1.332 also says api_error "usage_limit_reached"), and for a plan's
#: spent usage credits ("You're out of extra usage. Add more at claude.ai/settings/usage and keep
#: going.", "Your org is out of usage · add funds to continue", "... requires usage credits.",
#: "Your usage allocation has been disabled by your admin"). The API's status decides first;
#: these only tell a plan's 429 from any other 429, and spent credits from any other 400. An
#: API key's "Credit balance is too low" is not the plan's: it stays the API's refusal.
PLAN_LIMIT_TEXT = re.compile(r"(?:hit|reached) your (?:[\w-]+ )*limit", re.I)
CREDITS_SPENT_TEXT = re.compile(r"out of (?:extra usage|usage credits|usage\b)|requires usage credits|"
                                r"usage allocation has been disabled|usage limit is set to \$0", re.I)
#: "resets 4:17am (UTC)" or "resets Dec 9, 3:17am (UTC)": the reset time, when the CLI printed
#: no rate_limit_event in this run to give it exactly (only read when the zone is UTC).
LIMIT_RESET_TEXT = re.compile(r"resets (?:(?P<month>[A-Z][a-z]{2}) (?P<day>\d{1,2}), )?"
                              r"(?P<hour>\d{1,2})(?::(?P<minute>\d{2}))?(?P<half>am|pm) \(UTC\)")
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def limit_reset_from_text(text, now):
    """The reset time a limit message names in UTC, as epoch seconds after `now`, or None."""
    match = LIMIT_RESET_TEXT.search(text or "")
    if not match:
        return None
    hour = int(match.group("hour")) % 12 + (12 if match.group("half") == "pm" else 0)
    minute = int(match.group("minute") or 0)
    today = time.gmtime(now)
    if match.group("month"):
        month, day = MONTHS.index(match.group("month")) + 1, int(match.group("day"))
        year = today.tm_year + (1 if month < today.tm_mon else 0)  # Dec 30 -> Jan 2
    else:
        year, month, day = today.tm_year, today.tm_mon, today.tm_mday
    reset = calendar.timegm((year, month, day, hour, minute, 0))
    if not match.group("month") and reset <= now:
        reset += 86400  # "resets 1:00am" said at 11pm: tomorrow
    return reset if reset > now else None


def plan_limit_reached(window, resets_at, now, detail=""):
    """A subscriber's plan window (five_hour, seven_day, ...) is used up until `resets_at`.

    429 with Retry-After to the reset, and x-should-retry: false when that is more than a
    minute away: the SDKs would otherwise retry at once, and frameworks for hours, each try a
    CLI run and a model request that cannot succeed."""
    words = PLAN_WINDOW_WORDS.get(window, window or "usage")
    if resets_at and resets_at > now:
        wait = max(1, int(-(-(resets_at - now) // 1)))
        message = ("Your Claude plan's %s limit is reached; it resets at %s (in %d s). Requests "
                   "are refused until then." % (words, iso_utc(resets_at), wait))
    else:  # the reset is unknown, or past: look again when the next probe may run
        wait = int(PLAN_PROBE_SECONDS)
        message = "Your Claude plan's %s limit is reached (the CLI said: %s)." % (words, detail[:200])
    headers = {"Retry-After": str(wait)}
    if wait > PLAN_NO_RETRY_SECONDS:
        headers["x-should-retry"] = "false"
    return ProxyError(429, message, "rate_limit_error", None, "plan_limit_reached", headers,
                      plan_window=(window, resets_at, detail))


def credits_spent(detail):
    """The plan's usage credits (what headless runs draw on) are spent: a quota, not a bad
    request. OpenAI answers a spent balance with 429 insufficient_quota; the Anthropic dialect
    says 402 billing_error (anthropic_error)."""
    said = detail[:300].rstrip()
    where = "" if "claude.ai/settings/usage" in said else " Add credits at claude.ai/settings/usage."
    return ProxyError(429, "The Claude plan's usage credits are spent (the CLI said: %s)%s Headless "
                      "runs draw on them; wait for the monthly credit to renew, or add more."
                      % (said, where), "insufficient_quota", None, "insufficient_quota",
                      {"x-should-retry": "false"})


def plan_limit_of(rate_limit, now):
    """(window, resets_at) of a rate_limit_event's info that says a limit is reached until after
    `now`, else None (a report whose reset has passed is no longer true)."""
    if not isinstance(rate_limit, dict) or rate_limit.get("status") != "rejected":
        return None
    window = rate_limit.get("rateLimitType")
    windows = rate_limit.get("unifiedWindows")
    reset = None
    if isinstance(windows, dict) and isinstance(windows.get(window), dict):
        reset = windows[window].get("resetsAt")
    if not _is_number(reset):
        reset = rate_limit.get("resetsAt")
    if _is_number(reset) and reset <= now:
        return None
    return (window if isinstance(window, str) else None), (reset if _is_number(reset) else None)


def context_length_exceeded(detail):
    """The conversation does not fit the model's window: OpenAI's code and wording (frameworks
    trim the history and retry on either), and for the Anthropic dialect the API's own words.
    The counts come from the API's message (2.1.332 and later pass it on) or the CLI's
    rewording of it (`the request is ~N tokens (limit M)`); the CLI's own bare refusal has none."""
    counts = (re.search(r"(\d[\d,]*) tokens > (\d[\d,]*) maximum", detail)
              or re.search(r"~(\d[\d,]*) tokens \(limit (\d[\d,]*)\)", detail))
    if counts:
        used, window = (int(n.replace(",", "")) for n in counts.groups())
        message = ("This model's maximum context length is %d tokens. However, your messages "
                   "resulted in %d tokens. Please reduce the length of the messages." % (window, used))
        api_message = "prompt is too long: %d tokens > %d maximum" % (used, window)
    else:
        message = ("The conversation is too long for the model's context window (the claude "
                   "CLI said: %s); shorten the messages." % detail)
        said = re.sub(r"^(API Error: \d+ )?prompt is too long\W*", "", detail, flags=re.I)
        api_message = "prompt is too long" + (": " + said if said else "")
    return invalid(message, "messages", "context_length_exceeded", api_message)


def api_refused(result, detail):
    return invalid("Claude's API refused the request: %s" % detail, None, "upstream_rejected")


def model_not_found(result, detail):
    return ProxyError(404, "Claude's API did not find that: %s" % detail, "invalid_request_error",
                      "model", "model_not_found", {"x-should-retry": "false"})


#: A failed run's result -> the answer, by what the API said rather than how this release of the
#: CLI words it: rows of (API statuses, CLI terminal reasons, message pattern, answer). A row
#: applies when the result's api_error_status is one of its statuses (None: the CLI refused by
#: itself, before or instead of an API call; ANY_STATUS: whatever it is) and, if the row names
#: reasons or a pattern, the terminal_reason is one of them or the message matches. The first
#: row that applies wins. Wordings read off CLI 2.1.197 and 2.1.332 (CLI-FACTS, the table test).
ANY_STATUS = object()
API_ERRORS = (
    # Context overflow: 2.1.197 may refuse itself (no status, "Prompt is too long",
    # blocking_limit); both releases pass the API's 400 "prompt is too long: N tokens > M
    # maximum" on, as such ("API Error: 400 prompt is too long: ...") or reworded ("Prompt is
    # too long · the request is ~N tokens (limit M)...", terminal_reason prompt_too_long).
    ((None, 400, 413), ("prompt_too_long", "blocking_limit"),
     re.compile(r"prompt is too long|prompt_too_long", re.I),
     lambda result, detail: context_length_exceeded(detail)),
    ((None,), ("image_error",), None,
     lambda result, detail: invalid("An image could not be used: %s" % detail, "messages",
                                    "invalid_image")),
    ((429,), (), None, lambda result, detail: rate_limited(
        5, "Claude's API is rate limiting this account: %s" % detail)),
    ((529, 503), (), None, lambda result, detail: overloaded(
        5, "Claude's API is overloaded: %s" % detail)),
    ((401, 403), (), None, lambda result, detail: not_logged_in(detail)),
    # Not logged in at all: no API call, so no status ("Not logged in · Please run /login").
    ((ANY_STATUS,), (), re.compile(r"/login|Not logged in"),
     lambda result, detail: not_logged_in(detail)),
    ((404,), (), None, model_not_found),
    ((400, 413, 422), (), None, api_refused),
)


def result_error(result, rate_limit=None, now=None):
    """A `result` event -> the ProxyError it stands for, or None for a successful run.

    rate_limit: the last rate_limit_event's info (this run's, or the one the proxy last saw):
    it says which plan window a 429 is about, and when it resets."""
    if not result.get("is_error") and result.get("subtype") in ("success", None):
        return None
    status = result.get("api_error_status")
    detail = str(result.get("result") or result.get("subtype") or "unknown error")[:500]
    now = time.time() if now is None else now
    limit = plan_limit_of(rate_limit, now)
    if status == 429 and (limit or PLAN_LIMIT_TEXT.search(detail)
                          or result.get("api_error") == "usage_limit_reached"):
        window, reset = limit or ((rate_limit or {}).get("rateLimitType"), None)
        return plan_limit_reached(window, reset or limit_reset_from_text(detail, now), now, detail)
    if status in (400, 402, 403) and CREDITS_SPENT_TEXT.search(detail):
        return credits_spent(detail)
    if result.get("subtype") == "error_max_budget_usd":
        # The CLI checks --max-budget-usd between model calls: this run made none for the
        # request (the call that crossed the cap was answered: see ReplyTranslator._result).
        errors = result.get("errors") if isinstance(result.get("errors"), list) else []
        return ProxyError(400, "This conversation's CLI run reached the per-run cost cap "
                          "(CLAUDE_MAX_REQUEST_USD): %s. Start a new conversation, or raise "
                          "the cap." % (str(errors[0]) if errors else detail)[:300],
                          "invalid_request_error", None, "request_budget_exceeded",
                          {"x-should-retry": "false"})
    for statuses, reasons, pattern, answer in API_ERRORS:
        if status not in statuses and ANY_STATUS not in statuses:
            continue
        if (reasons or pattern) and not (result.get("terminal_reason") in reasons
                                         or (pattern and pattern.search(detail))):
            continue
        return answer(result, detail)
    if status:
        return cli_failed("Claude's API answered %s: %s" % (status, detail), "upstream_error")
    return cli_failed("The claude CLI reported an error: %s" % detail)


# Conversation ###############################################################################
#: The neutral form every dialect parses into. A conversation is {"system": text or None,
#: "turns": [{"role": "user" | "assistant", "content": [block, ...]}, ...]}: roles alternate,
#: and the blocks are the Messages API's own, as the CLI sends them on:
#:   {"type": "text", "text"}          {"type": "image", "source": {base64 source}}
#:   {"type": "tool_use", "id", "name", "input": {...}}     (name: the client's function name)
#:   {"type": "tool_result", "tool_use_id", "content": [text, image and document blocks], "is_error"}
#:   {"type": "thinking", "thinking", "signature"}
#:   {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data"}
#:     | {"type": "text", "media_type": "text/plain", "data"} | {"type": "content", "content":
#:     [text and image blocks]}, "title"?, "context"?}   (user turns and tool results only)
#: Tool ids are the client's own; cli_tool_id() maps them to what the API accepts.


def _require(condition, message, param, code=None):
    if not condition:
        raise invalid(message, param, code)


def image_from_data_url(url, param):
    """A data:image/...;base64, URL -> an image block. Only data: URLs: fetching an http(s) URL
    on a client's behalf would let any client reach the proxy's network."""
    _require(isinstance(url, str) and url, "image_url.url must be a non-empty string", param)
    if re.match(r"^(https?|ftp|file):", url, re.I):
        raise invalid("Image URLs are not fetched by this proxy (no server-side requests); "
                      "send the image inline as a data:image/...;base64, URL.", param,
                      "image_url_not_supported")
    match = DATA_URL.match(url)
    _require(match, "image_url.url must be a data:image/...;base64, URL", param, "invalid_image_url")
    return image_block(match.group("type"), url[match.end():], param)


def image_block(media_type, data, param):
    """A base64 image -> an image block, its type and data checked."""
    media_type = str(media_type or "").lower()
    if media_type == "image/jpg":
        media_type = "image/jpeg"
    _require(media_type in IMAGE_MEDIA_TYPES,
             "Unsupported image type %s; use one of %s" % (media_type, ", ".join(IMAGE_MEDIA_TYPES)),
             param, "invalid_image_format")
    _require(isinstance(data, str), "The image data must be a base64 string", param, "invalid_image_url")
    data = data.strip()
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise invalid("The image's base64 data does not decode", param, "invalid_image_url")
    _require(data, "The image data is empty", param, "invalid_image_url")
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}


def document_block(media_type, data, param, title=None):
    """A file's base64 data -> a document block: a PDF as a base64 source, a text file as a text
    source, decoded as UTF-8. Other types are refused: these are what the model reads."""
    media_type = str(media_type or "").lower()
    _require(isinstance(data, str), "The file data must be a base64 string", param, "invalid_file_data")
    data = data.strip()
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise invalid("The file's base64 data does not decode", param, "invalid_file_data")
    _require(raw, "The file is empty", param, "invalid_file_data")
    if media_type == PDF_MEDIA_TYPE:
        # The PDF format allows up to 1024 bytes before its header.
        _require(b"%PDF-" in raw[:1024], "The file is not a PDF (it has no %PDF- header)", param,
                 "invalid_file_data")
        source = {"type": "base64", "media_type": PDF_MEDIA_TYPE, "data": data}
    elif media_type.startswith("text/") or media_type in TEXT_FILE_TYPES:
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise invalid("A %s file must be UTF-8 text" % media_type, param, "invalid_file_data")
        _require(text, "The file is empty", param, "invalid_file_data")
        source = {"type": "text", "media_type": "text/plain", "data": text}
    else:
        raise invalid("Unsupported file type %s; send a PDF (application/pdf) or a text file "
                      "(text/*, %s)" % (media_type or "(none)", ", ".join(TEXT_FILE_TYPES)), param,
                      "unsupported_file_type")
    block = {"type": "document", "source": source}
    if title:
        block["title"] = title
    return block


def openai_file(part, param):
    """An OpenAI file (Chat's `file` object, a Responses input_file part) -> a document block
    titled with its filename. Only inline data: the proxy has no Files API to resolve a file_id,
    and fetching a file_url on a client's behalf would let any client reach the proxy's network."""
    data, url, filename = part.get("file_data"), part.get("file_url"), part.get("filename")
    _require(filename is None or isinstance(filename, str), "`filename` must be a string",
             param + ".filename")
    if data is None and isinstance(url, str) and url.lower().startswith("data:"):
        data = url
    if data is None and url is not None:
        raise invalid("File URLs are not fetched by this proxy (no server-side requests); send the "
                      "file inline in `file_data`, as a data:application/pdf;base64, URL.",
                      param + ".file_url", "file_url_not_supported")
    if data is None and part.get("file_id") is not None:
        raise invalid("File ids cannot be resolved: this proxy has no Files API. Send the file "
                      "inline in `file_data`, as a data:application/pdf;base64, URL.",
                      param + ".file_id", "unsupported_content_type")
    param += ".file_data"
    _require(isinstance(data, str) and data, "A file needs `file_data`: a data:<media type>;base64, "
             "URL", param, "invalid_file_data")
    match = DATA_URL.match(data)
    _require(match, "file_data must be a data:<media type>;base64, URL, such as "
             "data:application/pdf;base64,...", param, "invalid_file_data")
    media_type = match.group("type").lower()
    if media_type == "application/octet-stream" and filename:
        media_type = FILE_EXTENSION_TYPES.get(os.path.splitext(filename)[1].lower(), media_type)
    return document_block(media_type, data[match.end():], param, filename)


def files_bytes(blocks):
    """What the images and files among blocks weigh as sent (see MAX_FILES_BYTES)."""
    total = 0
    for block in blocks:
        if block["type"] == "image":
            total += len(block["source"]["data"])
        elif block["type"] == "document" and block["source"]["type"] == "content":
            total += files_bytes(block["source"]["content"])
        elif block["type"] == "document" and block["source"]["type"] == "base64":
            total += len(block["source"]["data"])
        elif block["type"] == "document":
            total += len(block["source"]["data"].encode("utf-8"))
        elif block["type"] == "tool_result":
            total += files_bytes(block["content"])
    return total


def text_block(text):
    return {"type": "text", "text": text}


def blocks_text(blocks):
    return "".join(b["text"] for b in blocks if b["type"] == "text")


def without_empty_text(blocks):
    """The blocks less empty text blocks, which the API refuses."""
    return [b for b in blocks if b["type"] != "text" or b["text"]]


def merge_text_blocks(blocks):
    """Adjacent text blocks joined into one; empty text blocks dropped (the API refuses them)."""
    merged = []
    for block in without_empty_text(blocks):
        if block["type"] == "text":
            if merged and merged[-1]["type"] == "text":
                merged[-1] = {"type": "text", "text": merged[-1]["text"] + block["text"]}
                continue
        merged.append(block)
    return merged


def add_turn(turns, role, blocks):
    """Append blocks as a turn of `role`, joining a turn of the same role before it: the API
    wants roles to alternate, and clients send a tool's results and a user's words as separate
    messages. Tool results stay first in a user turn, where the API wants them."""
    blocks = without_empty_text(blocks)
    if not blocks:
        return
    if turns and turns[-1]["role"] == role:
        merged = turns[-1]["content"] + blocks
        if role == "user":
            merged = ([b for b in merged if b["type"] == "tool_result"]
                      + [b for b in merged if b["type"] != "tool_result"])
        turns[-1] = {"role": role, "content": merged}
    else:
        turns.append({"role": role, "content": blocks})


def conversation(system_parts, turns, param="messages"):
    """The neutral conversation, checked: it must end with something for the model to answer.

    System messages alone (OpenAI answers them; LangChain and some UIs send them) are the
    user's turn: the model answers the instructions themselves, under the default system
    prompt, and no words are made up for a user who said none."""
    system = "\n\n".join(p for p in system_parts if p.strip()) or None
    if system and not any(t["role"] == "user" for t in turns):
        turns = [{"role": "user", "content": [text_block(system)]}] + list(turns)
        system = None
    _require(any(t["role"] == "user" for t in turns), "`%s` needs at least one user message"
             % param, param)
    weight = sum(files_bytes(t["content"]) for t in turns)
    if weight > MAX_FILES_BYTES:
        raise invalid("The images and files of this conversation come to %d bytes as sent (base64, "
                      "or a text file's UTF-8), over the %d the proxy sends in one request (the API "
                      "takes at most 32 MB); send fewer or smaller files." % (weight, MAX_FILES_BYTES),
                      param, "files_too_large")
    return {"system": system, "turns": turns}


def ends_with_tool_results(conv):
    return any(b["type"] == "tool_result" for b in conv["turns"][-1]["content"])


def cli_tool_id(client_id):
    """A client's tool-call id -> the tool_use id the API accepts (^[A-Za-z0-9_-]+$), the same
    every time: our own call_<x> goes back to the toolu_<x> the model made, so the history
    the CLI sends is the one the model wrote (and the prompt cache recognises it)."""
    client_id = str(client_id or "")
    if client_id.startswith("call_") and TOOL_ID.fullmatch(client_id[5:]):
        return "toolu_" + client_id[5:]
    if TOOL_ID.fullmatch(client_id):
        return client_id
    return "toolu_" + hashlib.sha1(client_id.encode("utf-8")).hexdigest()[:24]


def transcript_prompt(conv):
    """The fallback rendering: the conversation as one user message, earlier turns as a tagged
    transcript and the last user turn after it. Used only where the CLI cannot be given real
    turns (see CliRunner.start); it defeats the prompt cache and lets the model read roles as text."""
    turns = conv["turns"]
    if len(turns) == 1 and not ends_with_tool_results(conv):
        return turns[0]["content"]
    final = [b for b in turns[-1]["content"] if b["type"] != "tool_result"]
    history = turns[:-1] + ([{"role": "user", "content": [b for b in turns[-1]["content"]
                                                         if b["type"] == "tool_result"]}]
                            if len(final) < len(turns[-1]["content"]) else [])
    if final:
        ask = "Reply as the assistant to the user's latest message, which follows."
    else:
        ask = "Continue the conversation as the assistant: reply to the last turn above, using the tool results."
    used_tools = any(b["type"] in ("tool_use", "tool_result") for t in history for b in t["content"])
    if used_tools:
        ask += (" Earlier tool calls and their results are shown above as <tool_call> and <tool> "
                "elements; to call a tool now, use the tools you are given, not such text.")
    blocks = [text_block("The conversation so far, oldest turn first:\n\n<conversation>\n")]
    for turn in history:
        pending = []  # a user turn's text and images, around its tool results
        for block in turn["content"]:
            if block["type"] == "tool_result":
                blocks.append(text_block('<tool tool_call_id="%s">\n' % block["tool_use_id"]))
                blocks.extend(block["content"])
                blocks.append(text_block("\n</tool>\n"))
            elif block["type"] == "tool_use":
                pending.append(text_block(('\n' if blocks_text(pending) else "")
                                          + '<tool_call id="%s" name="%s">%s</tool_call>' % (
                                              block["id"], block["name"],
                                              json.dumps(block["input"], ensure_ascii=False,
                                                         separators=(",", ":")))))
            elif block["type"] in ("text", "image", "document"):
                pending.append(block)
        if pending:
            blocks.append(text_block("<%s>\n" % turn["role"]))
            blocks.extend(pending)
            blocks.append(text_block("\n</%s>\n" % turn["role"]))
    blocks.append(text_block("</conversation>\n\n" + ask))
    return merge_text_blocks(blocks) + final


# Shared request fields ######################################################################
#: What every dialect's parser shares: the model and stream fields, function definitions and
#: tool choice, output formats, and the plan each parser hands on.


def request_model(body, default_model):
    """A request's `model` (every dialect's), checked: it goes into argv; else the default."""
    model = body.get("model")
    if model is None or model == "":
        return default_model
    _require(isinstance(model, str) and MODEL_NAME.match(model), "Invalid model name %r" % (model,),
             "model", "model_not_found")
    return model


def request_stream(body):
    """A request's `stream` (every dialect's): a boolean, or absent."""
    stream = body.get("stream", False)
    _require(stream is None or isinstance(stream, bool), "`stream` must be a boolean", "stream")
    return bool(stream)


@dataclasses.dataclass(frozen=True)
class Plan:
    """One request, in no dialect: what its parser understood and the run must do. Made by
    the dialect's parser; where the proxy's settings change it (an alias, a budget, a cache
    lifetime) a new plan is made with dataclasses.replace, so a plan never changes under a
    part that holds it."""
    conversation: dict                   # the neutral conversation (see Conversation)
    model: Optional[str] = None          # as asked: Proxy.answer() resolves aliases
    effort: Optional[str] = None         # --effort
    system_prompt: Optional[str] = None  # with any tool-choice instruction added
    stream: bool = False
    include_usage: bool = False          # Chat's stream_options.include_usage
    max_tokens: Optional[int] = None
    stop: list = dataclasses.field(default_factory=list)   # stop sequences, cut by the proxy
    tools: list = dataclasses.field(default_factory=list)  # the client's functions (parse_function)
    single_tool_call: bool = False       # parallel_tool_calls: false, or its dialect's equal
    legacy_functions: bool = False       # Chat's functions/function_call: reply in that form
    json_schema: Optional[dict] = None   # structured output (--json-schema)
    show_thinking: bool = False          # Messages' thinking enabled: thinking blocks shown
    max_budget_usd: Optional[float] = None  # --max-budget-usd, from CLAUDE_MAX_REQUEST_USD
    cache_ttl: Optional[str] = None      # the prompt cache's lifetime (TurnRhythm)
    workspace: "Optional[Workspace]" = None  # Workspace mode: the folder and its tools (route)


def mcp_tool_name(name):
    """The name the MCP server gives a client function: the same, unless mcp__fn__<name> would
    pass the API's 64-character limit; then a shortened name with a hash keeps it unique."""
    if len(MCP_PREFIX) + len(name) <= API_TOOL_NAME_MAX:
        return name
    room = API_TOOL_NAME_MAX - len(MCP_PREFIX) - 9
    return "%s_%s" % (name[:room], hashlib.sha1(name.encode("utf-8")).hexdigest()[:8])


def parse_function(function, param):
    """One OpenAI function definition -> {name, mcp_name, description, input_schema}."""
    _require(isinstance(function, dict), "a function definition must be an object", param)
    name = function.get("name")
    _require(isinstance(name, str) and TOOL_NAME.match(name),
             "function names must match ^[a-zA-Z0-9_-]{1,64}$", param + ".name", "invalid_function_name")
    description = function.get("description")
    _require(description is None or isinstance(description, str), "description must be a string",
             param + ".description")
    schema = function.get("parameters")
    if schema is None:
        schema = {"type": "object", "properties": {}}
    _require(isinstance(schema, dict) and schema.get("type", "object") == "object",
             "parameters must be a JSON Schema object with \"type\": \"object\"", param + ".parameters")
    schema = dict(schema, type="object")
    return {"name": name, "mcp_name": mcp_tool_name(name), "description": description or "",
            "input_schema": schema}


def with_instruction(system_prompt, tool_instruction):
    """The system prompt with a tool-choice instruction after it (the CLI has no tool_choice)."""
    if not tool_instruction:
        return system_prompt
    return (system_prompt or DEFAULT_SYSTEM_PROMPT) + "\n\n" + tool_instruction


def offered_tools(functions, mode, wanted, single, tools_param, choice_param):
    """What every dialect's tool choice comes to: (the functions the model is offered, the
    instruction for the system prompt). The CLI has no tool_choice: "required" and a named
    function are instructions, and a named function is the only one offered; "none" offers
    none. mode: auto, none, required (one call or more) or named (`wanted`)."""
    if mode == "none":
        return [], None  # nothing offered: the model can only answer in text
    if mode == "auto":
        instruction = None
    elif mode == "required":
        instruction = "You must answer by calling %s of the tools you are given." % (
            "exactly one" if single else "one or more")
    else:
        _require(wanted in [f["name"] for f in functions], "tool_choice names a function that is "
                 "not in `%s`" % tools_param, choice_param)
        functions = [f for f in functions if f["name"] == wanted]
        instruction = "You must answer by calling the tool %s%s." % (MCP_PREFIX, functions[0]["mcp_name"])
    if single:
        instruction = ((instruction + " ") if instruction else "") + "Call at most one tool in this reply."
    return functions, instruction


def output_format(form, param, schema_of):
    """An OpenAI output format (Chat's response_format, Responses' text.format) -> the JSON
    schema the CLI must fill (--json-schema), or None for text. schema_of(form) finds the
    schema where the dialect keeps it, as (schema, its param)."""
    if form is None:
        return None
    _require(isinstance(form, dict), "%s must be an object" % param, param)
    kind = form.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return {"type": "object"}
    _require(kind == "json_schema", "%s.type must be text, json_object or json_schema" % param,
             param + ".type")
    return cli_schema(*schema_of(form))


# OpenAI Chat Completions request ############################################################


def chat_content_blocks(content, param, images=True):
    """A message's OpenAI content (string, list of parts, or None) -> blocks. images: whether
    images and files may be among them (user messages only)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [text_block(content)]
    _require(isinstance(content, list), "content must be a string or an array of content parts", param)
    blocks = []
    for j, part in enumerate(content):
        where = "%s[%d]" % (param, j)
        if isinstance(part, str):  # some clients send bare strings in the array
            blocks.append(text_block(part))
            continue
        _require(isinstance(part, dict), "each content part must be an object", where)
        kind = part.get("type")
        if kind in ("text", "input_text", "refusal"):
            text = part.get("text", part.get("refusal"))
            _require(isinstance(text, str), "a %s part needs a string `%s`" % (kind, "refusal" if kind == "refusal" else "text"), where + ".text")
            blocks.append(text_block(text))
        elif kind == "image_url" and images:
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            blocks.append(image_from_data_url(url, where + ".image_url.url"))
        elif kind == "image_url":
            raise invalid("Images are only accepted in user messages", where + ".type")
        elif kind == "file" and images:
            _require(isinstance(part.get("file"), dict), "a file part needs a `file` object", where + ".file")
            blocks.append(openai_file(part["file"], where + ".file"))
        elif kind == "file":
            raise invalid("Files are only accepted in user messages", where + ".type")
        elif kind in ("input_audio", "audio", "input_file", "video_url"):
            raise invalid("Content parts of type %r are not supported by this proxy; send text, "
                          "data: URL images or files" % kind, where + ".type", "unsupported_content_type")
        else:
            raise invalid("Unknown content part type %r" % (kind,), where + ".type")
    return blocks


def tool_arguments(arguments, param):
    """A tool call's `arguments` JSON string -> the input object the API wants."""
    _require(arguments is None or isinstance(arguments, str),
             "function.arguments must be a JSON string", param)
    if not arguments or not arguments.strip():
        return {}
    try:
        value = json.loads(arguments)
    except ValueError:
        value = None
    _require(isinstance(value, dict), "function.arguments must be a JSON object, as a string",
             param, "invalid_tool_arguments")
    return value


def chat_tool_uses(tool_calls, param):
    """An assistant message's tool_calls -> tool_use blocks."""
    _require(isinstance(tool_calls, list), "tool_calls must be an array", param)
    blocks = []
    for k, call in enumerate(tool_calls):
        where = "%s[%d]" % (param, k)
        _require(isinstance(call, dict), "each tool call must be an object", where)
        function = call.get("function")
        _require(isinstance(function, dict) and isinstance(function.get("name"), str),
                 "a tool call needs function.name", where + ".function")
        call_id = call.get("id")
        _require(call_id is None or isinstance(call_id, str), "a tool call's id must be a string",
                 where + ".id")
        blocks.append({"type": "tool_use", "id": call_id or "call_%d" % k, "name": function["name"],
                       "input": tool_arguments(function.get("arguments"), where + ".function.arguments")})
    return blocks


def chat_conversation(messages):
    """Chat Completions messages -> the neutral conversation.

    system/developer messages, wherever they stand, become the system prompt; tool messages
    become tool_result blocks of a user turn; legacy function calls pair up by name."""
    _require(isinstance(messages, list) and messages, "`messages` must be a non-empty array",
             "messages")
    system_parts, turns = [], []
    for i, message in enumerate(messages):
        param = "messages[%d]" % i
        _require(isinstance(message, dict), "each message must be an object", param)
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            system_parts.append(blocks_text(chat_content_blocks(content, param + ".content", images=False)))
        elif role == "user":
            _require(content is not None, "a user message needs content", param + ".content")
            blocks = without_empty_text(chat_content_blocks(content, param + ".content"))
            _require(blocks or i < len(messages) - 1, "the user message is empty", param + ".content")
            add_turn(turns, "user", blocks)
        elif role == "assistant":
            blocks = chat_content_blocks(content, param + ".content", images=False)
            if message.get("tool_calls"):
                blocks += chat_tool_uses(message["tool_calls"], param + ".tool_calls")
            elif message.get("function_call"):
                call = message["function_call"]
                _require(isinstance(call, dict), "function_call must be an object", param + ".function_call")
                blocks += chat_tool_uses([{"id": "call_fn_%s" % call.get("name"), "function": call}],
                                         param + ".function_call")
            _require(content is not None or len(blocks), "an assistant message needs content or tool_calls",
                     param + ".content")
            add_turn(turns, "assistant", blocks)
        elif role in ("tool", "function"):
            if role == "tool":
                call_id = message.get("tool_call_id")
                _require(isinstance(call_id, str) and call_id, "a tool message needs `tool_call_id`",
                         param + ".tool_call_id")
            else:
                name = message.get("name")
                _require(isinstance(name, str) and name, "a function message needs `name`", param + ".name")
                call_id = "call_fn_%s" % name
            blocks = without_empty_text(chat_content_blocks(content, param + ".content", images=False))
            add_turn(turns, "user", [{"type": "tool_result", "tool_use_id": call_id,
                                      "content": blocks, "is_error": False}])
        else:
            raise invalid("Unknown role %r: use system, developer, user, assistant or tool" % (role,),
                          param + ".role")
    return conversation(system_parts, turns)


def messages_to_prompt(messages):
    """OpenAI messages -> (system prompt, the one user message of the transcript fallback)."""
    conv = chat_conversation(messages)
    return conv["system"], transcript_prompt(conv)


def parse_tools(body):
    """tools / tool_choice / parallel_tool_calls (or legacy functions / function_call) ->
    (the functions to offer, the instruction for the system prompt, whether one call at most,
    whether the request used the legacy fields)."""
    tools, choice, param = body.get("tools"), body.get("tool_choice"), "tools"
    legacy = tools is None and body.get("functions") is not None
    if legacy:  # legacy function calling maps onto tools one to one
        tools, choice, param = body["functions"], body.get("function_call"), "functions"
        if isinstance(choice, dict):
            choice = {"type": "function", "function": choice}
    if tools is None or tools == []:
        _require(choice in (None, "none", "auto"), "tool_choice needs tools", "tool_choice")
        return [], None, False, legacy
    _require(isinstance(tools, list), "`%s` must be an array" % param, param)
    functions = []
    for i, tool in enumerate(tools):
        where = "%s[%d]" % (param, i)
        if legacy:
            functions.append(parse_function(tool, where))
            continue
        _require(isinstance(tool, dict), "each tool must be an object", where)
        _require(tool.get("type", "function") == "function",
                 "Only tools of type \"function\" are supported, not %r" % (tool.get("type"),),
                 where + ".type", "unsupported_tool_type")
        functions.append(parse_function(tool.get("function"), where + ".function"))
    names = [f["name"] for f in functions]
    _require(len(set(names)) == len(names), "function names must be unique", param)

    single = body.get("parallel_tool_calls") is False
    choice_param = "tool_choice" if param == "tools" else "function_call"
    if choice in (None, "auto", "none", "required", "any"):
        mode, wanted = {None: "auto", "any": "required"}.get(choice, choice), None
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        mode, wanted = "named", choice["function"].get("name")
    else:
        raise invalid("tool_choice must be \"none\", \"auto\", \"required\" or "
                      "{\"type\": \"function\", \"function\": {\"name\": ...}}", choice_param)
    functions, instruction = offered_tools(functions, mode, wanted, single, param, choice_param)
    return functions, instruction, single and bool(functions), legacy


def chat_format_schema(response_format):
    """Chat Completions nests the schema: response_format.json_schema.schema."""
    spec = response_format.get("json_schema")
    _require(isinstance(spec, dict), "response_format.json_schema must be an object",
             "response_format.json_schema")
    return spec.get("schema"), "response_format.json_schema.schema"


def parse_response_format(response_format):
    """response_format -> the JSON schema the CLI must fill, or None for text."""
    return output_format(response_format, "response_format", chat_format_schema)


def parse_chat_request(body, default_model=None, default_effort=None):
    """A Chat Completions request body -> the plan for one CLI run (a dict), or a 400.

    Fields that would silently change the answer if ignored are refused; sampling knobs the
    CLI cannot set (temperature, top_p, seed, penalties, ...) are accepted and ignored."""
    _require(isinstance(body, dict), "The request body must be a JSON object", None)
    if "messages" not in body and ("input" in body or "instructions" in body):
        raise invalid("This is the Chat Completions endpoint, and the body looks like a Responses "
                      "API request (`input`). Send `messages` instead.", "input", "unsupported_api")
    if "messages" not in body and "prompt" in body:
        raise invalid("This is the Chat Completions endpoint, and the body looks like a legacy "
                      "Completions request (`prompt`). Send `messages` instead.", "prompt",
                      "unsupported_api")
    _require("messages" in body, "Missing required parameter: `messages`", "messages")
    conv = chat_conversation(body["messages"])
    system_prompt = conv["system"]

    model = request_model(body, default_model)

    stream = request_stream(body)
    stream_options = body.get("stream_options") or {}
    _require(isinstance(stream_options, dict), "`stream_options` must be an object", "stream_options")
    include_usage = bool(stream) and stream_options.get("include_usage") is True

    n = body.get("n")
    _require(n is None or (isinstance(n, int) and not isinstance(n, bool) and n >= 1),
             "`n` must be a positive integer", "n")
    _require(n in (None, 1), "Only n=1 is supported: the CLI gives one reply per run", "n")
    _require(not body.get("logprobs"), "logprobs are not available through the claude CLI", "logprobs")
    _require(not body.get("top_logprobs"), "logprobs are not available through the claude CLI",
             "top_logprobs")
    modalities = body.get("modalities")
    _require(not (isinstance(modalities, list) and "audio" in modalities) and not body.get("audio"),
             "Audio output is not supported", "modalities")

    effort = body.get("reasoning_effort")
    if effort is None:
        effort = default_effort
    else:
        _require(isinstance(effort, str) and effort in REASONING_EFFORT_TO_CLI,
                 "`reasoning_effort` must be one of %s"
                 % ", ".join(REASONING_EFFORT_TO_CLI), "reasoning_effort")
        effort = REASONING_EFFORT_TO_CLI[effort]

    max_tokens = None
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is not None:
            _require(isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_TOKENS,
                     "`%s` must be a whole number from 1 to %d" % (name, MAX_TOKENS), name)
            max_tokens = value if max_tokens is None else min(max_tokens, value)

    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    _require(isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4,
             "`stop` must be a string or an array of at most 4 strings", "stop")
    stop = [s for s in stop if s]

    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        _require(body.get(name) is None or _is_number(body[name]), "`%s` must be a number" % name, name)

    tools, tool_instruction, single_tool_call, legacy_functions = parse_tools(body)
    json_schema = parse_response_format(body.get("response_format"))
    return Plan(conv, model, effort, with_instruction(system_prompt, tool_instruction), stream,
                include_usage, max_tokens, stop, tools, single_tool_call,
                legacy_functions=legacy_functions and bool(tools), json_schema=json_schema)


# OpenAI Responses request ###################################################################
#: POST /v1/responses: `input` items (or a string) and `instructions` -> the same plan as a Chat
#: Completions request. Clients: the openai SDKs' client.responses, the OpenAI Agents SDK, Codex.

#: Input items of hosted tools a client may replay from a conversation it had elsewhere: there
#: is nothing of ours to map them to, and no client function ran, so they are dropped.
RESPONSES_DROPPED_ITEMS = ("reasoning", "web_search_call", "file_search_call", "image_generation_call",
                           "code_interpreter_call", "computer_call", "computer_call_output",
                           "local_shell_call", "local_shell_call_output", "mcp_list_tools",
                           "mcp_call", "mcp_approval_request", "mcp_approval_response",
                           "tool_search_call", "tool_search_output", "compaction",
                           "compaction_summary")
#: `include` values that would promise output the proxy cannot give.
RESPONSES_REFUSED_INCLUDES = ("message.output_text.logprobs",)
#: The model is offered a namespace's function as <namespace>__<name>: names stay unique and
#: the model sees the grouping; the call goes back to the client as {namespace, name}.
NAMESPACE_SEPARATOR = "__"

#: Compaction: an input ending with {"type": "compaction_trigger"} (what Codex sends for its
#: remote compaction to an OpenAI-like provider) and POST /v1/responses/compact ask for the
#: conversation so far compacted. The model writes a summary (offered no tools), answered as one
#: `compaction` item. Its encrypted_content is the proxy's own: this prefix and the summary in
#: base64, not encrypted (the client holds the conversation anyway); sent back as input, it is
#: the summary as user text. OpenAI's own encrypted compactions are opaque here, and dropped.
COMPACTION_PREFIX = "claude-proxy.compaction.v1."
COMPACTION_PROMPT = (
    "Compact this conversation: it will continue in a fresh context that holds only your "
    "summary and the user's own messages. Write the summary for whoever continues the work: "
    "the user's goals and constraints, what was done and found (files, commands, results, "
    "decisions), what is in progress, and what remains to do. Be concise and concrete. Reply "
    "with the summary only, and call no tools.")
COMPACTION_SUMMARY_HEADER = "A summary of the earlier part of this conversation, which was compacted:\n\n"


def compaction_item(summary, new_id=None):
    """The `compaction` output item that carries a summary (see COMPACTION_PREFIX)."""
    content = base64.b64encode(json.dumps({"summary": summary}, ensure_ascii=False).encode("utf-8"))
    return {"id": (new_id or new_item_id)("cmp"), "type": "compaction",
            "encrypted_content": COMPACTION_PREFIX + content.decode("ascii")}


def compacted_user_message(item):
    """A user message of a compacted conversation, as an output item (id, status, parts)."""
    content = item["content"]
    if isinstance(content, str):
        content = [{"type": "input_text", "text": content}]
    return {"id": item["id"] if isinstance(item.get("id"), str) else new_item_id("msg"),
            "type": "message", "status": "completed", "role": "user", "content": content}


def compaction_summary(encrypted_content):
    """The summary a compaction item of ours carries, or None for anyone else's."""
    if not isinstance(encrypted_content, str) or not encrypted_content.startswith(COMPACTION_PREFIX):
        return None
    try:
        data = json.loads(base64.b64decode(encrypted_content[len(COMPACTION_PREFIX):], validate=True))
    except (ValueError, binascii.Error):
        return None
    summary = data.get("summary") if isinstance(data, dict) else None
    return summary if isinstance(summary, str) else None


def responses_content_blocks(content, param, role):
    """A message item's content (a string or parts) -> blocks. Images and files only from the
    user (function outputs are read as the user's)."""
    if isinstance(content, str):
        return [text_block(content)]
    _require(isinstance(content, list), "content must be a string or an array of content parts", param)
    blocks = []
    for j, part in enumerate(content):
        where = "%s[%d]" % (param, j)
        _require(isinstance(part, dict), "each content part must be an object", where)
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text", "summary_text", "reasoning_text"):
            _require(isinstance(part.get("text"), str), "a %s part needs a string `text`" % kind,
                     where + ".text")
            blocks.append(text_block(part["text"]))
        elif kind == "refusal":
            _require(isinstance(part.get("refusal"), str), "a refusal part needs a string `refusal`",
                     where + ".refusal")
            blocks.append(text_block(part["refusal"]))
        elif kind == "input_image" and role == "user":
            _require(part.get("file_id") is None, "Uploaded files are not available through this "
                     "proxy; send the image inline as a data:image/...;base64, URL in `image_url`.",
                     where + ".file_id", "unsupported_content_type")
            blocks.append(image_from_data_url(part.get("image_url"), where + ".image_url"))
        elif kind == "input_image":
            raise invalid("Images are only accepted in user messages and function call outputs",
                          where + ".type")
        elif kind == "input_file" and role == "user":
            blocks.append(openai_file(part, where))
        elif kind == "input_file":
            raise invalid("Files are only accepted in user messages and function call outputs",
                          where + ".type")
        elif kind in ("input_audio", "input_video"):
            raise invalid("Content parts of type %r are not supported by this proxy; send text, "
                          "data: URL images or files" % kind, where + ".type", "unsupported_content_type")
        else:
            raise invalid("Unknown content part type %r" % (kind,), where + ".type")
    return blocks


def namespaced(namespace, name):
    """The name a function of a namespace is offered and recorded under."""
    return namespace + NAMESPACE_SEPARATOR + name if namespace else name


def responses_items(items, turns, system_parts, find_item=None):
    """`input` items -> turns (added to `turns`), system and developer text to `system_parts`.
    `find_item(id)` is a stored item for an item_reference, or None (see ResponseStore.item)."""
    for i, item in enumerate(items):
        responses_item(item, "input[%d]" % i, turns, system_parts, find_item)


def responses_item(item, param, turns, system_parts, find_item=None):
    """One `input` item (see responses_items)."""
    _require(isinstance(item, dict), "each input item must be an object", param)
    kind = item.get("type", "message")
    if kind == "item_reference":
        # An item of a stored response (or of its input) by id, as the AI SDK sends the
        # earlier steps of a tool loop with store: true: read as if sent in full.
        item_id = item.get("id")
        _require(isinstance(item_id, str) and item_id, "an item_reference needs `id`", param + ".id")
        found = find_item(item_id) if find_item else None
        if found is None:
            raise item_not_found(item_id, param + ".id")
        return responses_item(found, param, turns, system_parts)
    if kind == "message":
        role = item.get("role")
        content = item.get("content")
        _require(content is not None, "a message needs `content`", param + ".content")
        if role in ("system", "developer"):
            system_parts.append(blocks_text(responses_content_blocks(content, param + ".content", role)))
        elif role in ("user", "assistant"):
            add_turn(turns, role, responses_content_blocks(content, param + ".content", role))
        else:
            raise invalid("Unknown role %r: use user, assistant, system or developer" % (role,),
                          param + ".role")
    elif kind in ("function_call", "custom_tool_call"):
        call_id, name = item.get("call_id"), item.get("name")
        _require(isinstance(call_id, str) and call_id, "a %s needs `call_id`" % kind, param + ".call_id")
        _require(isinstance(name, str) and name, "a %s needs `name`" % kind, param + ".name")
        namespace = item.get("namespace")
        _require(namespace is None or isinstance(namespace, str), "`namespace` must be a string",
                 param + ".namespace")
        if kind == "function_call":
            arguments = tool_arguments(item.get("arguments"), param + ".arguments")
        else:  # a freeform tool's input is text; kept so the history reads right
            _require(isinstance(item.get("input", ""), str), "`input` must be a string", param + ".input")
            arguments = {"input": item.get("input", "")}
        add_turn(turns, "assistant", [{"type": "tool_use", "id": call_id,
                                       "name": namespaced(namespace, name), "input": arguments}])
    elif kind in ("function_call_output", "custom_tool_call_output"):
        call_id, output = item.get("call_id"), item.get("output")
        _require(output is not None, "a %s needs `output`" % kind, param + ".output")
        blocks = without_empty_text(responses_content_blocks(output, param + ".output", "user"))
        if call_id is None and isinstance(item.get("name"), str):
            # An output no call asked for (Codex adds some of its own, with only a name):
            # the API pairs every tool_result with a tool_use, so it is the user's text.
            name = namespaced(item.get("namespace") if isinstance(item.get("namespace"), str)
                              else None, item["name"])
            add_turn(turns, "user", [text_block("Output of the tool %s:\n" % name)] + blocks)
            return
        _require(isinstance(call_id, str) and call_id, "a %s needs `call_id`" % kind, param + ".call_id")
        add_turn(turns, "user", [{"type": "tool_result", "tool_use_id": call_id,
                                  "content": blocks, "is_error": False}])
    elif kind in ("compaction", "compaction_summary") and compaction_summary(
            item.get("encrypted_content")) is not None:
        add_turn(turns, "user", [text_block(COMPACTION_SUMMARY_HEADER
                                            + compaction_summary(item["encrypted_content"]))])
    elif kind == "compaction_trigger":
        raise invalid("A compaction_trigger must be the last input item", param + ".type")
    elif kind in RESPONSES_DROPPED_ITEMS:
        return  # reasoning: its encrypted_content is OpenAI's, opaque to us
    else:
        raise invalid("Unknown input item type %r" % (kind,), param + ".type", "unsupported_item_type")


def responses_tools(body):
    """tools / tool_choice / parallel_tool_calls / max_tool_calls -> (the functions to offer,
    the instruction for the system prompt, whether one call at most, {offered name:
    (namespace, name)} for the calls of namespaced functions).

    Function tools are offered, a namespace's functions too; tools of other types (web_search,
    file_search, custom/freeform, computer, mcp, ...) are left out: clients such as Codex send
    them as a matter of course, and refusing them would refuse the client."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    _require(tools is None or isinstance(tools, list), "`tools` must be an array", "tools")
    functions, namespaces = [], {}
    for i, tool in enumerate(tools or ()):
        where = "tools[%d]" % i
        _require(isinstance(tool, dict), "each tool must be an object", where)
        if tool.get("type") == "function":
            functions.append(parse_function(tool, where))
        elif tool.get("type") == "namespace":
            namespace = tool.get("name")
            _require(isinstance(namespace, str) and TOOL_NAME.match(namespace),
                     "a namespace needs a `name` matching ^[a-zA-Z0-9_-]{1,64}$", where + ".name")
            _require(isinstance(tool.get("tools"), list), "a namespace needs `tools`", where + ".tools")
            for j, inner in enumerate(tool["tools"]):
                if isinstance(inner, dict) and inner.get("type") == "function":
                    function = parse_function(inner, "%s.tools[%d]" % (where, j))
                    offered = namespaced(namespace, function["name"])
                    _require(TOOL_NAME.match(offered), "namespace and function names together must "
                             "fit in 64 characters", "%s.tools[%d].name" % (where, j), "invalid_function_name")
                    namespaces[offered] = (namespace, function["name"])
                    functions.append(dict(function, name=offered, mcp_name=mcp_tool_name(offered)))
    names = [f["name"] for f in functions]
    _require(len(set(names)) == len(names), "function names must be unique", "tools")

    max_calls = body.get("max_tool_calls")
    _require(max_calls is None or (isinstance(max_calls, int) and not isinstance(max_calls, bool)
                                   and max_calls >= 1), "`max_tool_calls` must be a positive integer",
             "max_tool_calls")
    parallel = body.get("parallel_tool_calls")
    _require(parallel is None or isinstance(parallel, bool), "`parallel_tool_calls` must be a boolean",
             "parallel_tool_calls")
    single = parallel is False or max_calls == 1
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        allowed = choice.get("tools")
        _require(isinstance(allowed, list), "allowed_tools needs `tools`", "tool_choice.tools")
        wanted = {namespaced(t.get("namespace"), t.get("name")) for t in allowed
                  if isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("name"), str)}
        functions = [f for f in functions if f["name"] in wanted]
        choice = choice.get("mode", "auto")
    if not functions:
        _require(choice in (None, "none", "auto"), "tool_choice needs function tools", "tool_choice")
        return [], None, False, {}
    if choice in (None, "auto", "none", "required"):
        mode, wanted = choice or "auto", None
    elif isinstance(choice, dict) and choice.get("type") == "function":
        mode, wanted = "named", namespaced(choice.get("namespace"), choice.get("name"))
    else:
        raise invalid("tool_choice must be \"none\", \"auto\", \"required\", {\"type\": \"function\", "
                      "\"name\": ...} or allowed_tools; tools of other types are not offered by "
                      "this proxy", "tool_choice")
    functions, instruction = offered_tools(functions, mode, wanted, single, "tools", "tool_choice")
    if not functions:
        return [], None, False, {}
    return functions, instruction, single, namespaces


def responses_text_format(text):
    """text.format -> the JSON schema the CLI must fill (--json-schema), or None for text."""
    if text is None:
        return None
    _require(isinstance(text, dict), "`text` must be an object", "text")
    return output_format(text.get("format"), "text.format",
                         lambda form: (form.get("schema"), "text.format.schema"))


def refuse_misleading_responses_options(body):
    """Options the proxy cannot honour and that a client would be misled by if ignored."""
    _require(not body.get("background"), "Background responses are not supported: the proxy "
             "answers while the client waits. Send background: false, or stream.", "background")
    _require(body.get("conversation") is None, "Conversation objects are not supported; continue "
             "with previous_response_id, or send the items in `input`.", "conversation")
    _require(body.get("prompt") is None, "Stored prompt templates are not available through this "
             "proxy; send `instructions` and `input`.", "prompt")
    _require(not body.get("top_logprobs"), "logprobs are not available through the claude CLI",
             "top_logprobs")
    include = body.get("include")
    _require(include is None or (isinstance(include, list) and all(isinstance(v, str) for v in include)),
             "`include` must be an array of strings", "include")
    for value in include or ():
        _require(value not in RESPONSES_REFUSED_INCLUDES, "logprobs are not available through the "
                 "claude CLI", "include")


def parse_responses_request(body, default_model=None, default_effort=None, previous=None,
                            find_item=None):
    """A Responses API request body -> (the plan for one CLI run, what the response echoes and
    the store needs), or a 400. `previous` is the stored response named by
    previous_response_id (its conversation goes first), already looked up by the caller;
    `find_item` finds the stored items that item_reference inputs name (else a 404)."""
    _require(isinstance(body, dict), "The request body must be a JSON object", None)
    if "input" not in body and "messages" in body:
        raise invalid("This is the Responses endpoint, and the body looks like a Chat Completions "
                      "request (`messages`). Send `input` instead, or POST to /v1/chat/completions.",
                      "messages", "unsupported_api")
    refuse_misleading_responses_options(body)
    _require("input" in body, "Missing required parameter: `input`", "input")
    items = body["input"]
    if isinstance(items, str):
        _require(items, "`input` is empty", "input")
        items = [{"role": "user", "content": items}]
    _require(isinstance(items, list), "`input` must be a string or an array of items", "input")
    # Compaction asked for: the summary is asked of the model as the conversation's last words.
    compacting = bool(items) and isinstance(items[-1], dict) and items[-1].get("type") == "compaction_trigger"
    if compacting:
        items = items[:-1] + [{"role": "user", "content": COMPACTION_PROMPT}]
    instructions = body.get("instructions")
    _require(instructions is None or isinstance(instructions, str), "`instructions` must be a string",
             "instructions")

    # Instructions are not carried over from a previous response; its input's system and
    # developer messages are, being part of its conversation (as OpenAI does).
    turns = list(previous["turns"]) if previous else []
    kept_system = list(previous["system_parts"]) if previous else []
    system_parts = []
    responses_items(items, turns, system_parts, find_item)
    conv = conversation([instructions or ""] + kept_system + system_parts, turns, "input")
    system_prompt = conv["system"]

    model = request_model(body, default_model)
    stream = request_stream(body)
    store = body.get("store", True)
    _require(store is None or isinstance(store, bool), "`store` must be a boolean", "store")

    reasoning = body.get("reasoning")
    _require(reasoning is None or isinstance(reasoning, dict), "`reasoning` must be an object", "reasoning")
    effort = (reasoning or {}).get("effort")
    if effort is None:
        effort = default_effort
    else:
        _require(isinstance(effort, str) and effort in REASONING_EFFORT_TO_CLI,
                 "reasoning.effort must be one of %s" % ", ".join(REASONING_EFFORT_TO_CLI),
                 "reasoning.effort")
        effort = REASONING_EFFORT_TO_CLI[effort]

    max_tokens = body.get("max_output_tokens")
    _require(max_tokens is None or (isinstance(max_tokens, int) and not isinstance(max_tokens, bool)
                                    and 1 <= max_tokens <= MAX_TOKENS),
             "`max_output_tokens` must be a whole number from 1 to %d" % MAX_TOKENS, "max_output_tokens")
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        _require(body.get(name) is None or _is_number(body[name]), "`%s` must be a number" % name, name)
    for name in ("safety_identifier", "prompt_cache_key"):
        _require(body.get(name) is None or isinstance(body[name], str), "`%s` must be a string" % name,
                 name)
    metadata = body.get("metadata")
    _require(metadata is None or isinstance(metadata, dict), "`metadata` must be an object", "metadata")

    tools, tool_instruction, single_tool_call, namespaces = responses_tools(body)
    json_schema = responses_text_format(body.get("text"))
    if compacting:  # a summary in words: no calls, no schema
        tools, tool_instruction, single_tool_call, json_schema = [], None, False, None
    plan = Plan(conv, model, effort, with_instruction(system_prompt, tool_instruction), stream,
                max_tokens=max_tokens, tools=tools, single_tool_call=single_tool_call,
                json_schema=json_schema)
    text = body.get("text") if isinstance(body.get("text"), dict) else {}
    request = {
        "store": store is not False,
        "system_parts": kept_system + system_parts,
        "namespaces": namespaces,
        "compacting": compacting,
        # The input items that carry an id, findable by item_reference once stored.
        "input_items": [item for item in items if isinstance(item, dict) and isinstance(
            item.get("id"), str) and item.get("type", "message") != "item_reference"],
        # Echoed in the response object, every field OpenAI's server sends (and the Open
        # Responses schema requires), with the values it gives those a request left out.
        "echo": {
            "frequency_penalty": _or(body.get("frequency_penalty"), 0.0),
            "instructions": instructions,
            "max_output_tokens": max_tokens,
            "max_tool_calls": body.get("max_tool_calls"),
            "metadata": metadata or {},
            "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
            "presence_penalty": _or(body.get("presence_penalty"), 0.0),
            "previous_response_id": body.get("previous_response_id"),
            "prompt_cache_key": body.get("prompt_cache_key"),
            "reasoning": {"effort": (reasoning or {}).get("effort"),
                          "summary": (reasoning or {}).get("summary")},
            "safety_identifier": body.get("safety_identifier"),
            # One tier here; OpenAI answers a request's "auto" with the tier that served it.
            "service_tier": "default",
            "store": store is not False,
            "temperature": _or(body.get("temperature"), 1.0),
            "text": dict(text, format=text.get("format") or {"type": "text"}),
            "tool_choice": body.get("tool_choice") or "auto",
            "tools": [responses_tool_echo(tool) for tool in body.get("tools") or []],
            "top_logprobs": 0,  # any other value is refused above
            "top_p": _or(body.get("top_p"), 1.0),
            "truncation": body.get("truncation") or "disabled",
        },
    }
    if isinstance(body.get("user"), str):  # a string or absent in OpenAI's schema, never null
        request["echo"]["user"] = body["user"]
    return plan, request


def _or(value, default):
    return default if value is None else value


def responses_tool_echo(tool):
    """A tool as the response echoes it: a function's `description`, `strict` and `parameters`
    are required (nullable) in OpenAI's schema and in Open Responses'."""
    if isinstance(tool, dict) and tool.get("type") == "function":
        return dict({"description": None, "strict": None, "parameters": None}, **tool)
    return tool


# Anthropic Messages request #################################################################
#: POST /v1/messages: the dialect closest to what the CLI itself speaks. Its content blocks are
#: the neutral ones already; what differs is checked and mapped here.

#: Server tools run on Anthropic's side (web search, code execution, ...): the CLI behind the
#: proxy cannot run them for a client, so they are left out of what the model is offered.
ANTHROPIC_CLIENT_TOOL_TYPES = (None, "custom")
ANTHROPIC_TOOL_CHOICES = ("auto", "any", "tool", "none")
ANTHROPIC_THINKING_TYPES = ("enabled", "adaptive", "disabled")
#: Message content the proxy cannot pass on: search results, uploads and results of server tools.
ANTHROPIC_UNSUPPORTED_BLOCKS = (
    "search_result", "container_upload", "server_tool_use", "web_search_tool_result",
    "web_fetch_tool_result", "code_execution_tool_result", "bash_code_execution_tool_result",
    "text_editor_code_execution_tool_result", "mcp_tool_use", "mcp_tool_result")


def thinking_budget_effort(budget):
    """thinking.budget_tokens -> the CLI effort closest to it (the CLI takes no token budget)."""
    for limit, effort in ((4096, "low"), (16384, "medium"), (32768, "high")):
        if budget <= limit:
            return effort
    return "max"


#: Claude Code, as a client, starts its system prompt with a block "x-anthropic-billing-header:
#: cc_version=<version>.<hex>; ..." whose hex changes with the conversation: a tag for the API's
#: billing that the real API leaves out of the prompt. Kept, it would make every conversation a
#: process shape of its own, and the warm pool would never serve Claude Code's first turns.
BILLING_HEADER = "x-anthropic-billing-header:"


def anthropic_text(content, param):
    """A string or an array of text blocks (system, a system-role message) -> its text."""
    if isinstance(content, str):
        return content
    _require(isinstance(content, list), "must be a string or an array of text blocks", param)
    parts = []
    for j, block in enumerate(content):
        where = "%s[%d]" % (param, j)
        _require(isinstance(block, dict) and block.get("type") == "text",
                 "only text blocks are allowed here", where + ".type")
        _require(isinstance(block.get("text"), str), "a text block needs a string `text`", where + ".text")
        if not block["text"].startswith(BILLING_HEADER):
            parts.append(block["text"])
    return "\n\n".join(p for p in parts if p)


def anthropic_image(block, param):
    """An image block -> the neutral image block. Only base64 sources: fetching a URL on a
    client's behalf would let any client reach the proxy's network."""
    source = block.get("source")
    _require(isinstance(source, dict), "an image block needs a `source` object", param + ".source")
    if source.get("type") in ("url", "file"):
        raise invalid("Image %s sources are not supported by this proxy (it fetches nothing); send "
                      "the image as a base64 source." % source["type"], param + ".source.type",
                      "image_url_not_supported")
    _require(source.get("type") == "base64", "source.type must be \"base64\"", param + ".source.type")
    return image_block(source.get("media_type"), source.get("data"), param + ".source")


def anthropic_document(block, param):
    """A document block -> the neutral one: a base64 PDF, plain text, or content (text and
    images), with its title and context. url and file sources are refused: the proxy fetches
    nothing and has no Files API. `citations` is accepted and dropped: the replies the proxy
    writes carry no citations, so the model is not asked for them."""
    source = block.get("source")
    _require(isinstance(source, dict), "a document block needs a `source` object", param + ".source")
    kind, where = source.get("type"), param + ".source"
    if kind == "url":
        raise invalid("Document url sources are not fetched by this proxy (no server-side requests); "
                      "send the PDF as a base64 source.", where + ".type", "file_url_not_supported")
    if kind == "file":
        raise invalid("Document file sources cannot be resolved: this proxy has no Files API; send "
                      "the document as a base64 or text source.", where + ".type",
                      "unsupported_content_type")
    if kind == "base64":
        _require(source.get("media_type") == PDF_MEDIA_TYPE, "a base64 document source must be "
                 "application/pdf; send a text file as a text source", where + ".media_type",
                 "unsupported_file_type")
        document = document_block(PDF_MEDIA_TYPE, source.get("data"), where)
    elif kind == "text":
        _require(source.get("media_type") in (None, "text/plain"),
                 "a text document source must be text/plain", where + ".media_type", "unsupported_file_type")
        _require(isinstance(source.get("data"), str) and source["data"],
                 "a text document source needs non-empty `data`", where + ".data", "invalid_file_data")
        document = {"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                                   "data": source["data"]}}
    elif kind == "content":
        content = source.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        _require(isinstance(content, list) and content, "a content document source needs `content`: "
                 "a string or an array of text and image blocks", where + ".content")
        parts = []
        for k, part in enumerate(content):
            at = "%s.content[%d]" % (where, k)
            _require(isinstance(part, dict) and part.get("type") in ("text", "image"),
                     "a content document source holds text and image blocks", at + ".type")
            if part["type"] == "text":
                _require(isinstance(part.get("text"), str), "a text block needs a string `text`", at + ".text")
                parts.append(text_block(part["text"]))
            else:
                parts.append(anthropic_image(part, at))
        parts = without_empty_text(parts)
        _require(parts, "the document's content is empty", where + ".content")
        document = {"type": "document", "source": {"type": "content", "content": parts}}
    else:
        raise invalid("source.type must be \"base64\", \"text\" or \"content\"", where + ".type")
    for name in ("title", "context"):
        value = block.get(name)
        _require(value is None or isinstance(value, str), "`%s` must be a string" % name, param + "." + name)
        if value:
            document[name] = value
    return document


def anthropic_tool_result(block, param):
    """A tool_result block -> the neutral one: content as text, image and document blocks
    (Claude Code's Read tool answers with a document for a PDF)."""
    tool_use_id = block.get("tool_use_id")
    _require(isinstance(tool_use_id, str) and tool_use_id, "a tool_result needs `tool_use_id`",
             param + ".tool_use_id")
    is_error = block.get("is_error", False)
    _require(is_error is None or isinstance(is_error, bool), "`is_error` must be a boolean",
             param + ".is_error")
    content = block.get("content")
    if content is None:
        blocks = []
    elif isinstance(content, str):
        blocks = [text_block(content)]
    else:
        _require(isinstance(content, list), "tool_result content must be a string or an array",
                 param + ".content")
        blocks = []
        for k, part in enumerate(content):
            where = "%s.content[%d]" % (param, k)
            _require(isinstance(part, dict), "each content block must be an object", where)
            if part.get("type") == "text":
                _require(isinstance(part.get("text"), str), "a text block needs a string `text`",
                         where + ".text")
                blocks.append(text_block(part["text"]))
            elif part.get("type") == "image":
                blocks.append(anthropic_image(part, where))
            elif part.get("type") == "document":
                blocks.append(anthropic_document(part, where))
            else:
                raise invalid("tool_result content may hold text, image and document blocks, not %r"
                              % (part.get("type"),), where + ".type", "unsupported_content_type")
    return {"type": "tool_result", "tool_use_id": tool_use_id,
            "content": without_empty_text(blocks), "is_error": bool(is_error)}


def anthropic_blocks(content, role, param):
    """A message's content (a string or an array of blocks) -> neutral blocks. cache_control and
    citations on blocks are accepted and dropped: the CLI places its own cache breakpoints."""
    if isinstance(content, str):
        return [text_block(content)]
    _require(isinstance(content, list), "content must be a string or an array of content blocks", param)
    blocks = []
    for j, block in enumerate(content):
        where = "%s[%d]" % (param, j)
        _require(isinstance(block, dict), "each content block must be an object", where)
        kind = block.get("type")
        allowed = {"user": ("text", "image", "document", "tool_result"),
                   "assistant": ("text", "tool_use", "thinking", "redacted_thinking")}[role]
        if kind in ANTHROPIC_UNSUPPORTED_BLOCKS:
            raise invalid("Content blocks of type %r are not supported by this proxy; send text, "
                          "base64 images, documents, tool_use and tool_result blocks" % kind,
                          where + ".type", "unsupported_content_type")
        _require(kind in allowed, "%s messages may hold %s blocks, not %r"
                 % (role, ", ".join(allowed), kind), where + ".type")
        if kind == "text":
            _require(isinstance(block.get("text"), str), "a text block needs a string `text`", where + ".text")
            blocks.append(text_block(block["text"]))
        elif kind == "image":
            blocks.append(anthropic_image(block, where))
        elif kind == "document":
            blocks.append(anthropic_document(block, where))
        elif kind == "tool_result":
            blocks.append(anthropic_tool_result(block, where))
        elif kind == "tool_use":
            _require(isinstance(block.get("id"), str) and block["id"], "a tool_use needs an `id`", where + ".id")
            _require(isinstance(block.get("name"), str) and block["name"], "a tool_use needs a `name`",
                     where + ".name")
            _require(isinstance(block.get("input", {}), dict), "a tool_use's `input` must be an object",
                     where + ".input")
            blocks.append({"type": "tool_use", "id": block["id"], "name": block["name"],
                           "input": block.get("input", {})})
        elif kind == "thinking":
            _require(isinstance(block.get("thinking"), str), "a thinking block needs a string `thinking`",
                     where + ".thinking")
            signature = block.get("signature")
            blocks.append({"type": "thinking", "thinking": block["thinking"],
                           "signature": signature if isinstance(signature, str) else ""})
        # redacted_thinking: encrypted for the API that made it; nothing the CLI can send on.
    return blocks


def anthropic_conversation(messages, system):
    """Messages API `system` and `messages` -> the neutral conversation. system-role messages
    inside `messages` (Claude Code sends them) join the system prompt, in order."""
    system_parts = [] if system is None else [anthropic_text(system, "system")]
    _require(isinstance(messages, list) and messages, "`messages` must be a non-empty array", "messages")
    turns = []
    for i, message in enumerate(messages):
        param = "messages[%d]" % i
        _require(isinstance(message, dict), "each message must be an object", param)
        role, content = message.get("role"), message.get("content")
        _require(content is not None, "a message needs `content`", param + ".content")
        if role == "system":
            system_parts.append(anthropic_text(content, param + ".content"))
        elif role in ("user", "assistant"):
            blocks = anthropic_blocks(content, role, param + ".content")
            # Tool results first, where the API wants them (the API itself would refuse others).
            blocks = ([b for b in blocks if b["type"] == "tool_result"]
                      + [b for b in blocks if b["type"] != "tool_result"])
            add_turn(turns, role, blocks)
        else:
            raise invalid("Unknown role %r: use user or assistant" % (role,), param + ".role")
    return conversation(system_parts, turns)


def anthropic_tools(tools, choice):
    """tools / tool_choice -> (functions, instruction, single call), through the same checks
    and instructions as Chat Completions' function calling."""
    if tools is None:
        tools = []
    _require(isinstance(tools, list), "`tools` must be an array", "tools")
    functions = []
    for i, tool in enumerate(tools):
        where = "tools[%d]" % i
        _require(isinstance(tool, dict), "each tool must be an object", where)
        if tool.get("type") not in ANTHROPIC_CLIENT_TOOL_TYPES:
            continue  # a server tool: not available through the CLI (see the README)
        schema = tool.get("input_schema")
        _require(isinstance(schema, dict) and schema.get("type", "object") == "object",
                 "input_schema must be a JSON Schema object with \"type\": \"object\"",
                 where + ".input_schema")
        functions.append(parse_function({"name": tool.get("name"), "description": tool.get("description"),
                                         "parameters": schema}, where))
    if choice is None:
        choice = {"type": "auto"}
    _require(isinstance(choice, dict) and choice.get("type") in ANTHROPIC_TOOL_CHOICES,
             "tool_choice must be {\"type\": \"auto\" | \"any\" | \"tool\" | \"none\"}", "tool_choice")
    parallel = choice.get("disable_parallel_tool_use")
    _require(parallel is None or isinstance(parallel, bool),
             "tool_choice.disable_parallel_tool_use must be a boolean", "tool_choice.disable_parallel_tool_use")
    kind = choice["type"]
    if kind == "tool":
        _require(isinstance(choice.get("name"), str), "tool_choice of type \"tool\" needs `name`",
                 "tool_choice.name")
    if kind != "auto" and not functions:
        _require(kind == "none", "tool_choice needs tools", "tool_choice")
    if not functions:
        return [], None, False
    names = [f["name"] for f in functions]
    _require(len(set(names)) == len(names), "tool names must be unique", "tools")
    single = parallel is True
    mode = {"auto": "auto", "any": "required", "none": "none", "tool": "named"}[kind]
    functions, instruction = offered_tools(functions, mode, choice.get("name"), single, "tools",
                                           "tool_choice")
    return functions, instruction, single and bool(functions)


def anthropic_output_schema(body):
    """output_config.format (or the older output_format) -> the JSON schema for --json-schema."""
    output_config = body.get("output_config")
    _require(output_config is None or isinstance(output_config, dict), "`output_config` must be an object",
             "output_config")
    spec, param = (output_config or {}).get("format"), "output_config.format"
    if spec is None and body.get("output_format") is not None:
        spec, param = body["output_format"], "output_format"
    if spec is None:
        return None
    _require(isinstance(spec, dict) and spec.get("type") == "json_schema",
             "%s must be {\"type\": \"json_schema\", \"schema\": {...}}" % param, param + ".type")
    return cli_schema(spec.get("schema"), param + ".schema")


def anthropic_effort(body, default_effort):
    """(effort for --effort, whether the client asked to see thinking). output_config.effort
    wins; else thinking.budget_tokens picks the nearest effort."""
    thinking = body.get("thinking")
    _require(thinking is None or (isinstance(thinking, dict) and thinking.get("type") in ANTHROPIC_THINKING_TYPES),
             "thinking must be {\"type\": \"enabled\" | \"adaptive\" | \"disabled\"}", "thinking.type")
    effort = default_effort
    if thinking and thinking["type"] == "enabled" and thinking.get("budget_tokens") is not None:
        budget = thinking["budget_tokens"]
        _require(isinstance(budget, int) and not isinstance(budget, bool) and budget >= 1,
                 "thinking.budget_tokens must be a positive whole number", "thinking.budget_tokens")
        effort = thinking_budget_effort(budget)
    wanted = (body.get("output_config") or {}).get("effort")
    if wanted is not None:
        _require(wanted in CLI_EFFORTS, "output_config.effort must be one of %s" % ", ".join(CLI_EFFORTS),
                 "output_config.effort")
        effort = wanted
    return effort, bool(thinking) and thinking["type"] != "disabled"


def parse_messages_request(body, default_model=None, default_effort=None):
    """A Messages API request body -> the plan for one CLI run, or a 400.

    temperature, top_p, top_k, metadata, service_tier and cache_control are accepted and
    ignored (the CLI has no knob for them). The plan's `show_thinking` says whether thinking
    blocks go to the client: the API sends them only when `thinking` asks for them."""
    _require(isinstance(body, dict), "The request body must be a JSON object", None)
    _require("messages" in body, "Missing required parameter: `messages`", "messages")
    conv = anthropic_conversation(body["messages"], body.get("system"))

    model = request_model(body, default_model)
    max_tokens = body.get("max_tokens")
    _require(max_tokens is None or (isinstance(max_tokens, int) and not isinstance(max_tokens, bool)
                                    and 1 <= max_tokens <= MAX_TOKENS),
             "`max_tokens` must be a whole number from 1 to %d" % MAX_TOKENS, "max_tokens")
    stream = request_stream(body)
    stop = body.get("stop_sequences")
    _require(stop is None or (isinstance(stop, list) and all(isinstance(s, str) for s in stop)),
             "`stop_sequences` must be an array of strings", "stop_sequences")
    for name in ("temperature", "top_p", "top_k"):
        _require(body.get(name) is None or _is_number(body[name]), "`%s` must be a number" % name, name)
    _require(body.get("metadata") is None or isinstance(body["metadata"], dict), "`metadata` must be an object",
             "metadata")
    _require(not body.get("mcp_servers"), "Remote MCP servers (`mcp_servers`) are not available through "
             "this proxy", "mcp_servers")

    effort, show_thinking = anthropic_effort(body, default_effort)
    tools, tool_instruction, single_tool_call = anthropic_tools(body.get("tools"), body.get("tool_choice"))
    return Plan(conv, model, effort, with_instruction(conv["system"], tool_instruction), stream,
                max_tokens=max_tokens, stop=[s for s in stop or [] if s], tools=tools,
                single_tool_call=single_tool_call, json_schema=anthropic_output_schema(body),
                show_thinking=show_thinking)


#: A PDF's page objects, counted for an estimate: pages kept in compressed object streams are
#: not seen, so a PDF counts at least one page.
PDF_PAGE = re.compile(rb"/Type\s*/Page(?![A-Za-z])")
PDF_PAGE_TOKENS = 3000


def estimate_tokens(plan):
    """POST /v1/messages/count_tokens: an estimate, never a model call (the CLI has no way to
    count without one): a token per 4 characters of the system prompt, text, text documents,
    tool results and tool definitions, 1,600 per image (Anthropic's figure for a large image),
    3,000 per PDF page (the top of Anthropic's 1,500-3,000 for a page's text: each page is also
    read as an image), and 4 per turn."""
    characters, images, pages = len(plan.system_prompt or ""), 0, 0
    def walk(blocks):
        nonlocal characters, images, pages
        for block in blocks:
            if block["type"] == "text":
                characters += len(block["text"])
            elif block["type"] == "image":
                images += 1
            elif block["type"] == "document" and block["source"]["type"] == "text":
                characters += len(block["source"]["data"])
            elif block["type"] == "document" and block["source"]["type"] == "content":
                walk(block["source"]["content"])
            elif block["type"] == "document":
                pages += max(1, len(PDF_PAGE.findall(base64.b64decode(block["source"]["data"]))))
            elif block["type"] == "thinking":
                characters += len(block["thinking"])
            elif block["type"] == "tool_use":
                characters += len(block["name"]) + len(json.dumps(block["input"], ensure_ascii=False))
            elif block["type"] == "tool_result":
                walk(block["content"])
    turns = plan.conversation["turns"]
    for turn in turns:
        walk(turn["content"])
    for tool in plan.tools:
        characters += len(json.dumps({"name": tool["name"], "description": tool["description"],
                                      "input_schema": tool["input_schema"]}, ensure_ascii=False))
    return -(-characters // 4) + 1600 * images + PDF_PAGE_TOKENS * pages + 4 * len(turns)


# Workspace mode #############################################################################
#: Claude Code's own tools, for the clients that asked for them by their base URL
#: (/workspace/v1, or /workspace/NAME/v1), in one folder the user named at start (--workspace).
#: Everything else runs as before: no CLI tool is offered anywhere else.
#:
#: How the CLI confines a run (2.1.332 and 2.1.197, measured against a fake API; README,
#: Workspace mode): in --permission-mode dontAsk a tool call that no rule allows is refused,
#: never asked about. Read, Glob and Grep are allowed by the mode itself inside the working
#: directory and refused outside it, so they are offered (--tools) but never given an allow
#: rule: a bare `Read` rule allows every path on the machine. A bare `Edit` or `Write` rule
#: would also write anywhere: the proxy turns it into `Edit(./**)` (Edit rules cover every
#: tool that writes files), the folder and below. Bash commands are allowed by the rules
#: granted (`Bash(git status:*)`); the CLI itself refuses a command that names a path outside
#: the folder as an argument, or chains another command, but not one that reaches outside
#: through its own options (`git diff --output=../x`): a Bash grant is no sandbox, so grants
#: of every command, of shells and launchers, and of paths outside are refused at start
#: (parse_workspace_grants), and the README says what is left. No settings file is loaded (--setting-sources ""):
#: neither the folder's own .claude/settings.json (its hooks, its allow rules) nor the user's,
#: whose allow rules would widen the grants (a user rule `Read` let the model read
#: /etc/hostname). A login from the environment or the CLI's credentials works as before.

#: Offered in every workspace: what reading and listing the folder takes (2.1.332 has no LS
#: tool: Glob lists files).
WORKSPACE_READ_TOOLS = ("Read", "Glob", "Grep")
#: The tools an `Edit(...)` rule governs: a bare grant of one of them is scoped to the folder.
WORKSPACE_EDIT_TOOLS = ("Edit", "Write", "MultiEdit", "NotebookEdit")
WORKSPACE_EDIT_RULE = "Edit(./**)"
DEFAULT_WORKSPACE_TIMEOUT = 1800.0  # an agent's run reads, searches and thinks for minutes
WORKSPACE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
WORKSPACE_PREFIX = "/workspace"
#: One rule as the CLI's --allowedTools takes it: a tool name, optionally (specifier).
WORKSPACE_GRANT = re.compile(r"[A-Za-z][A-Za-z0-9_]*(?:\([^()]*\))?\Z")
#: What each of the CLI's own tools acts on, for the activity a client sees and the log.
TOOL_TARGETS = {"Read": "file_path", "Write": "file_path", "Edit": "file_path",
                "MultiEdit": "file_path", "NotebookEdit": "notebook_path", "Glob": "pattern",
                "Grep": "pattern", "Bash": "command", "WebFetch": "url", "WebSearch": "query",
                "Task": "description"}

#: A workspace: its name ("" for the one at /workspace/v1), its folder (absolute, real), the
#: rules granted beyond reading (as --workspace-tools gave them), a run's timeout in seconds.
Workspace = collections.namedtuple("Workspace", "name root grants timeout")


def parse_workspaces(values, grants=(), timeout=DEFAULT_WORKSPACE_TIMEOUT, home=None):
    """--workspace values (DIR, or NAME=DIR) -> {name: Workspace}; ValueError says what is
    wrong. A folder must exist; the filesystem's root and the user's home folder itself are
    refused: every file the user has would be the model's to read."""
    home = os.path.realpath(home or os.path.expanduser("~"))
    private = [home] + [os.path.realpath(os.environ["CLAUDE_CONFIG_DIR"])
                        for _ in (1,) if os.environ.get("CLAUDE_CONFIG_DIR")]
    found = {}
    for value in values:
        name, folder = "", value
        head, sep, tail = value.partition("=")
        if sep and WORKSPACE_NAME.match(head) and not os.path.isdir(value):
            name, folder = head, tail
        if name == "v1":
            raise ValueError("%r: a workspace cannot be named v1 (its URL would be "
                             "/workspace/v1)" % value)
        if name in found:
            raise ValueError("%r: a second workspace named %s" % (value, repr(name) if name else
                                                                  "by no name (the default one)"))
        root = os.path.realpath(os.path.expanduser(folder)) if folder else ""
        if not root or not os.path.isdir(root):
            raise ValueError("%r: no such folder" % folder)
        if os.path.dirname(root) == root:
            raise ValueError("%r is the root of a filesystem: name a project's folder" % folder)
        if os.path.normcase(root) == os.path.normcase(home):
            raise ValueError("%r is the home folder itself: name a project's folder" % folder)
        for inner in private:  # /home, /Users: every user's keys and the CLI's credentials
            if folder_holds(root, inner):
                raise ValueError("%r holds %s (your files, the CLI's login): name a project's "
                                 "folder" % (folder, inner))
        found[name] = Workspace(name, root, tuple(grants), timeout)
    return found


def folder_holds(folder, inner):
    """Whether `inner` is `folder` or somewhere below it."""
    try:
        common = os.path.commonpath([folder, inner])
    except ValueError:  # Windows: another drive
        return False
    return os.path.normcase(common) == os.path.normcase(folder)


#: Commands whose grant by prefix would still run any command: shells, launchers, interpreters
#: (the command that follows, or the script they are given, is anything). Refused as grants.
WORKSPACE_LAUNCHERS = frozenset(
    "sh bash zsh dash fish ksh csh tcsh env sudo su doas xargs find eval exec command nohup "
    "timeout nice time watch parallel python python3 python2 node deno bun perl ruby php lua "
    "awk gawk sed npx pwsh powershell cmd ssh git".split())
#: Shell and cmd.exe metacharacters: a grant goes into argv, through cmd.exe for claude.cmd.
WORKSPACE_GRANT_UNSAFE = re.compile(r"[&|<>^%!\"`$;\n]")


def parse_workspace_grants(text):
    """--workspace-tools (comma or space separated, the CLI's --allowedTools syntax) -> the
    rules; ValueError for what is not one, or a grant of every command."""
    rules, rule, depth = [], "", 0
    for char in text or "":
        if char in ", \t" and depth == 0:
            if rule:
                rules.append(rule)
            rule = ""
            continue
        depth += {"(": 1, ")": -1}.get(char, 0)
        rule += char
    if rule:
        rules.append(rule)
    for rule in rules:
        if not WORKSPACE_GRANT.match(rule):
            raise ValueError("%r is not a tool rule (Edit, Write, Bash(git status:*), ...)" % rule)
        if WORKSPACE_GRANT_UNSAFE.search(rule):
            raise ValueError("%r: a grant may not hold & | < > ^ %% ! \" ` $ ; (shell and "
                             "cmd.exe metacharacters)" % rule)
        tool, _, spec = rule.partition("(")
        if tool not in ("Bash", "PowerShell") and spec and re.match(r"[/\\~]|[A-Za-z]:|.*\.\.", spec):
            raise ValueError("%r names paths outside the workspace: a file tool's rule may only "
                             "name paths inside it, e.g. Edit(src/**)" % rule)
        if tool in ("Bash", "PowerShell") and not command_prefix_grant(spec[:-1]):
            raise ValueError("%r would allow every command, which can read and change anything "
                             "the user can: grant a command by its prefix, e.g. Bash(git "
                             "status:*), not a shell, an interpreter or a launcher" % rule)
    return rules


def command_prefix_grant(spec):
    """Whether a Bash rule's specifier names commands by a literal prefix (`git status:*`,
    `npm test`): no wildcard but a trailing `:*` or ` *`, and a first word that does not run
    another command (WORKSPACE_LAUNCHERS; `git` alone runs hooks and aliases)."""
    for tail in (":*", " *"):
        if spec.endswith(tail):
            spec = spec[:-len(tail)]
            break
    words = spec.split()
    if not words or "*" in spec or "?" in spec:
        return False
    command = os.path.basename(words[0]).lower()
    return command not in WORKSPACE_LAUNCHERS or (command == "git" and len(words) > 1
                                                  and not words[1].startswith("-"))


def workspace_argv(workspace):
    """The flags that give a run its workspace tools (see the section's comment)."""
    offered, allowed = list(WORKSPACE_READ_TOOLS), []
    for rule in workspace.grants:
        tool = rule.split("(", 1)[0]
        if tool not in offered:
            offered.append(tool)
        if rule in WORKSPACE_EDIT_TOOLS:
            rule = WORKSPACE_EDIT_RULE  # the folder only, not every path
        elif rule in WORKSPACE_READ_TOOLS:
            continue  # the mode allows them in the folder; a rule would allow them anywhere
        if rule not in allowed:
            allowed.append(rule)
    argv = ["--tools", ",".join(offered), "--permission-mode", "dontAsk",
            "--setting-sources", ""]
    if allowed:
        argv += ["--allowedTools", ",".join(allowed)]
    return argv


def workspace_route(path, workspaces):
    """A path under /workspace -> (its workspace or None, the path of the endpoint below it,
    None or the ProxyError 404 for a workspace that is not there: the message names the option
    when there is none at all)."""
    segments = path[len(WORKSPACE_PREFIX):].split("/", 2)  # "", first segment, the rest
    first = segments[1] if len(segments) > 1 else ""
    name, rest = "", path[len(WORKSPACE_PREFIX):] or "/"
    if first and first != "v1":
        name, rest = first, "/" + (segments[2] if len(segments) > 2 else "")
    if not rest.startswith("/v1/"):
        rest = ""  # the API only: the page, /health and /metrics are the proxy's, in no workspace
    if not workspaces:
        return None, rest, ProxyError(
            404, "Workspace mode is off: start the proxy with --workspace DIR (env "
            "CLAUDE_WORKSPACE) to let clients at %s/v1 use Claude Code's tools in that folder."
            % WORKSPACE_PREFIX, "invalid_request_error", None, "workspace_not_found")
    if name not in workspaces:
        served = ", ".join("%s/%s/v1" % (WORKSPACE_PREFIX, n) if n else WORKSPACE_PREFIX + "/v1"
                           for n in sorted(workspaces))
        return None, rest, ProxyError(
            404, "No workspace %s; this proxy serves %s." % (
                repr(name) if name else "at %s/v1" % WORKSPACE_PREFIX, served),
            "invalid_request_error", None, "workspace_not_found")
    return workspaces[name], rest, None


def with_workspace(plan, workspace):
    """The plan of a request under /workspace (workspace_route) runs in its workspace, with the
    CLI's own tools; the client's own functions are not combined with them (a 400): the CLI's
    tool loop runs inside one request, a client's across requests."""
    if workspace is None:
        return plan
    _require(not plan.tools, "Workspace mode runs Claude Code's own tools; a request under %s "
             "cannot also offer its own `tools` (send them to /v1)" % WORKSPACE_PREFIX, "tools",
             "workspace_tools_conflict")
    return dataclasses.replace(plan, workspace=workspace)


def workspace_prompt(workspace):
    """What the system prompt adds in a workspace: the model is told where it works and what
    it may do there (the tools' own descriptions say how)."""
    granted = ", ".join(workspace.grants)
    return ("\n\nYou are working in the folder %s (the current directory) with Claude Code's "
            "tools: you may read and search files in it%s. Anything else is refused: say so "
            "rather than working around it." % (workspace.root,
                                                ", and use " + granted if granted else ""))


def log_activity(workspace, activity):
    """The proxy's log line for a tool call in a workspace: the tool and its target, and
    whether it was refused or failed, never why: the reason the CLI gives is the tool's own
    output (a failed command's first lines), which can hold what a file says."""
    kind = "" if activity["kind"] == "call" else " " + activity["kind"]
    log("workspace %s: %s" % (workspace.name or "(default)", printable(
        "[%s%s] %s" % (activity["tool"], kind, activity["target"]))))


def tool_target(name, tool_input, root=None):
    """What a tool call acts on, in a line: its file (relative to the workspace's folder
    `root` when inside it), pattern, command or URL."""
    tool_input = tool_input if isinstance(tool_input, dict) else {}
    field = TOOL_TARGETS.get(name)
    if field is None:  # another tool's input may be a prompt (Task): its name says enough
        return ""
    value = tool_input.get(field)
    value = "" if value is None else str(value)
    if root and field.endswith("_path") and value.startswith(os.path.join(root, "")):
        value = value[len(os.path.join(root, "")):]
    text = " ".join(value.split())
    if name in ("Grep", "Glob") and tool_input.get("path"):
        text += " in " + str(tool_input["path"])
    return text[:200] + ("..." if len(text) > 200 else "")


#: How the CLI's tool result for a refused call begins (2.1.197 and 2.1.332).
PERMISSION_REFUSAL = "Permission to use "


def activity_text(activity):
    """A tool call, its refusal or its failure as a line a chat client shows among the
    model's activity."""
    if activity["kind"] == "call":
        return "[%s] %s\n" % (activity["tool"], activity["target"])
    return "[%s %s] %s: %s\n" % (activity["tool"], activity["kind"], activity["target"],
                                  activity["reason"])


# CLI run: argv, environment, stdin ##########################################################
#: How a run is started: its arguments (nothing of a prompt in them), its environment, and
#: the user message that goes on its stdin.


def cli_argv(claude_path, plan, system_prompt_path, mcp_config_path=None, resume=None):
    """The argv of one run: headless, stream-json both ways, no MCP servers but ours; by default
    no built-in tools (Workspace mode offers its folder's) and nothing persisted (a resumed
    session goes on in its file). Nothing from the prompt is ever in argv (`ps` shows argv, and
    argv fails past ~128 KiB): the system prompt is a file, the conversation goes on stdin or,
    for its earlier turns, in a session file the run resumes (see CliRunner.start)."""
    argv = [claude_path, "-p", "--input-format", "stream-json", "--output-format", "stream-json",
            "--verbose", "--include-partial-messages", "--no-session-persistence",
            "--tools", "", "--strict-mcp-config", "--system-prompt-file", system_prompt_path]
    if resume:
        # A resumed run writes on in the proxy's own session file (removed with the run): what
        # the CLI adds there is how the proxy learns the run context it says (session_context).
        argv.remove("--no-session-persistence")
        argv += ["--resume", resume]
    if plan.workspace:
        # Workspace mode (the client asked for it by its base URL): the CLI's own tools in the
        # folder, for as many model calls as the work takes. Never a client's functions too.
        tools = argv.index("--tools")
        argv[tools:tools + 2] = workspace_argv(plan.workspace)
        argv += ["--max-turns", str(TOOL_LOOP_MAX_TURNS)]
    elif plan.tools:
        # The client's functions, through this file's MCP mode. A reply that calls them is
        # complete for the client at once; the CLI meanwhile waits in the bridge for the
        # results, which the client's next request brings (see Continuations). Turns are
        # counted per message: a tool loop of the client's may take many.
        argv += ["--mcp-config", mcp_config_path, "--max-turns", str(TOOL_LOOP_MAX_TURNS),
                 # Without this the CLI refuses the call itself ("Claude requested permissions
                 # to use ...") and asks the model again: only our server's tools, no others.
                 "--allowedTools", MCP_PREFIX.rstrip("_")]
    elif plan.json_schema:
        argv += ["--max-turns", str(STRUCTURED_OUTPUT_MAX_TURNS)]
    else:
        argv += ["--max-turns", "1"]
    if plan.json_schema:
        argv += ["--json-schema", cli_safe_json(plan.json_schema)]
    if plan.model:
        argv += ["--model", plan.model]
    if plan.effort:
        argv += ["--effort", plan.effort]
    if plan.max_budget_usd:  # CLAUDE_MAX_REQUEST_USD (see Spend and budgets)
        argv += ["--max-budget-usd", repr(float(plan.max_budget_usd))]
    return argv


#: Characters cmd.exe acts on even inside an argument (claude.cmd on Windows runs under it).
CMD_METACHARACTERS = re.compile(r'[&|<>^%!()"]')
JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def cli_safe_json(value):
    """JSON text for an argv slot that cmd.exe may parse: every character cmd acts on, inside
    strings, as a \\uXXXX escape (the same JSON to any parser). What remains outside strings
    is {}[]:, digits and letters, and the structural quotes always pair up."""
    def escape(match):
        body = match.group(0)[1:-1].replace('\\"', "\\u0022")
        return '"%s"' % CMD_METACHARACTERS.sub(lambda m: "\\u%04x" % ord(m.group(0)), body)
    return JSON_STRING.sub(escape, json.dumps(value, separators=(",", ":"), ensure_ascii=True))


def cli_schema(schema, param):
    """A structured-output schema (any dialect's) the CLI can be given, or a 400 naming `param`.
    The CLI silently drops a schema it cannot use (CLI-FACTS), which would turn a JSON answer
    into prose, and its StructuredOutput tool needs an object at the root. It takes the schema
    only as an argument: measured in the form it is really given, since cli_safe_json's escapes
    make it up to six times longer than its JSON."""
    _require(isinstance(schema, dict) and schema.get("type") == "object",
             "%s must be a JSON Schema with \"type\": \"object\" at the root" % param, param,
             "invalid_json_schema")
    size = len(cli_safe_json(schema))
    if size > MAX_SCHEMA_BYTES:
        raise invalid("%s is %d bytes as a command-line argument (with & | < > ^ %% ! ( ) \" "
                      "escaped), over the %d the CLI can be given; shorten it"
                      % (param, size, MAX_SCHEMA_BYTES), param, "invalid_json_schema")
    return schema


def cli_env(base_env, plan=None):
    """The child's environment: the proxy's own, minus what would stop or distract the CLI;
    with a plan, what its run needs (output limit, cache lifetime)."""
    env = dict(base_env)
    # The CLI refuses to start "nested" inside another Claude Code session.
    for name in ("CLAUDECODE", "CLAUDE_CODE_ENTRYPOINT"):
        env.pop(name, None)
    for name in [n for n in env if n.startswith("CLAUDE_PROXY_")]:
        env.pop(name)  # the proxy's own settings, its API keys among them, are not the CLI's
    # One request, one model call: no title-generation side call, telemetry or update check.
    env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] = "1"
    # The user's own CLAUDE.md files and auto-memory are notes for their coding sessions: they
    # would reach every API client's prompt. (Settings still load: they may hold the login or
    # a gateway.) An operator who wants them sets these to 0.
    env.setdefault("CLAUDE_CODE_DISABLE_CLAUDE_MDS", "1")
    env.setdefault("CLAUDE_CODE_DISABLE_AUTO_MEMORY", "1")
    # A conversation over the model's window is the client's to shorten: 2.1.332, refused by
    # the API, summarises the history itself and answers from the summary (four model calls and
    # a 200, the client's turns silently replaced). Not by the operator's choice either.
    env["DISABLE_AUTO_COMPACT"] = "1"
    # Attachments are the CLI's own context for a coding session, computed for every message:
    # with no tools and no files, all they add is a "<total_tokens>N tokens left" reminder (in
    # each user turn, and inside each tool result after its text). CLI 2.1.332 spends ~20 ms
    # of a warm process's first message on them (2.1.197's requests are the same either way).
    env.setdefault("CLAUDE_CODE_DISABLE_ATTACHMENTS", "1")
    env.setdefault("CLAUDE_CODE_MAX_RETRIES", DEFAULT_CLI_MAX_RETRIES)
    if plan is None:
        return env
    if plan.max_tokens:
        env["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] = str(plan.max_tokens)
    ttl = plan.cache_ttl
    if ttl in ("5m", "1h"):  # None: the CLI's own choice, as the environment gives it
        # The CLI writes a subscriber's prompt cache for 1 hour (a write costs 2x the input
        # price, a 5-minute one 1.25x), an API key's for 5 minutes. FORCE_PROMPT_CACHING_5M
        # and ENABLE_PROMPT_CACHING_1H decide it in 2.1.197 and 2.1.332 alike (5M wins over
        # 1H); 2.1.332 also reads CLAUDE_CODE_PROMPT_CACHE_TTL, and its MESSAGES_ variant.
        for name in CACHE_TTL_VARIABLES:
            env.pop(name, None)
        env["FORCE_PROMPT_CACHING_5M" if ttl == "5m" else "ENABLE_PROMPT_CACHING_1H"] = "1"
        env["CLAUDE_CODE_PROMPT_CACHE_TTL"] = ttl
    return env


def cli_stdin(content):
    """One stream-json user message: a line on the CLI's stdin (a client's words: never a
    command of the CLI's, see not_a_command)."""
    return cli_command_line(not_a_command(content))


def cli_command_line(content):
    """The stdin line as it is, which the CLI runs as a command of its own if its text starts
    with one (/clear): for the proxy's own commands only."""
    message = {"type": "user", "message": {"role": "user", "content": content}}
    return (json.dumps(message, ensure_ascii=False) + "\n").encode("utf-8")


def not_a_command(content):
    """A user message whose first block is text starting with "/" is split after the slash:
    the CLI runs a message that starts with one of its commands (/model opus, /clear,
    /heapdump, /config, ...; 2.1.197 and 2.1.332) instead of sending it to the model, and any
    client could so reach the CLI. The API joins adjacent text blocks: the model reads the
    same words."""
    if content and content[0].get("type") == "text" and content[0]["text"].startswith("/") \
            and len(content[0]["text"]) > 1:
        first = content[0]
        return [{"type": "text", "text": "/"}, dict(first, text=first["text"][1:])] + list(content[1:])
    return content


# CLI run: session files #####################################################################
#: A conversation's earlier turns, as a session file the CLI resumes (--resume): real turns,
#: read from the prompt cache, in the CLI's own undocumented format (checked with 2.1.197 and
#: 2.1.332).


#: The CLI's sessions live under its config directory, in a folder named after the working
#: directory with every character but letters and digits made "-" (checked with 2.1.197).
SESSION_NAME = re.compile(r"[^A-Za-z0-9]")
#: The session format written here is the one CLI 2.1.197 writes (CLI-FACTS, "Conversations").
SESSION_FORMAT_VERSION = "2.1.197"


def cli_config_dir(env):
    """Where the CLI keeps its sessions: $CLAUDE_CONFIG_DIR, else ~/.claude of its HOME."""
    if env.get("CLAUDE_CONFIG_DIR"):
        return env["CLAUDE_CONFIG_DIR"]
    # Node's os.homedir(), as the CLI finds it: USERPROFILE on Windows (even where HOME is set,
    # as Git Bash does), HOME elsewhere.
    names = ("USERPROFILE", "HOME") if os.name == "nt" else ("HOME", "USERPROFILE")
    home = next((env[n] for n in names if env.get(n)), None) or os.path.expanduser("~")
    return os.path.join(home, ".claude")


def session_name(path):
    """The name of the folder, in the CLI's projects folder, that holds the sessions of a
    working directory: the runs' own (ProxyFolder.cli_folder), so the user's own `claude
    --resume` never lists them."""
    return SESSION_NAME.sub("-", os.path.realpath(path))


def cli_blocks(blocks, role):
    """Neutral blocks -> the blocks the CLI sends the API: client functions under their MCP
    names, tool ids in the API's alphabet, thinking only where signed (the API refuses it
    otherwise)."""
    out = []
    for block in blocks:
        kind = block["type"]
        if kind == "tool_use":
            out.append({"type": "tool_use", "id": cli_tool_id(block["id"]),
                        "name": MCP_PREFIX + mcp_tool_name(block["name"]), "input": block["input"]})
        elif kind == "tool_result":
            result = {"type": "tool_result", "tool_use_id": cli_tool_id(block["tool_use_id"]),
                      "content": block["content"] or ""}
            if block.get("is_error"):
                result["is_error"] = True
            out.append(result)
        elif kind == "thinking":
            if role == "assistant" and block.get("signature"):
                out.append({"type": "thinking", "thinking": block["thinking"],
                            "signature": block["signature"]})
        elif kind in ("text", "image", "document"):
            out.append(block)
    return out


#: What CLI 2.1.332 tells the model about its run: a system message, "# Environment" (working
#: directory, platform, shell, OS), the model's name and today's date, kept in its sessions as
#: attachment entries after the first user turn. A new run sends that message right after the
#: first user message, with the cache breakpoint on it. Resuming a session without them, the
#: CLI sends it after the LAST user message, so no resumed request starts with the prefix the
#: one before wrote to the prompt cache. Given them, it sends the message where they sit, from
#: their fields (the text is rendered again), and adds a message at the end only for what
#: differs from its own run: another working directory, model or date (checked with 2.1.332;
#: 2.1.197 ignores them). The proxy cannot know a model's name as the CLI renders it, so it
#: takes these from what a resumed run wrote in its session file (session_context). For some
#: models (claude-sonnet-4-6, not claude-opus-5-5) the CLI sends them as <system-reminder>
#: blocks in the first user message instead, with one more, "<total_tokens>N tokens left",
#: which it also adds to every later user message: a reminder kept after each user turn. After
#: tool results it puts a countdown (N tokens left) inside the last result instead, whose N the
#: proxy cannot know: for such a model a resumed tool loop is not read back in full.
CONTEXT_ATTACHMENTS = ("environment", "model", "total_tokens_reminder")


def session_context(text):
    """The run context a session file's text holds: {kind: attachment} for each kind of
    CONTEXT_ATTACHMENTS it has, the last of each (a changed one is written again, later)."""
    found = {}
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict):
            continue
        attachment = entry.get("attachment")
        if (entry.get("type") == "attachment" and isinstance(attachment, dict)
                and attachment.get("type") in CONTEXT_ATTACHMENTS):
            found[attachment["type"]] = attachment
    return found


def session_lines(turns, session_id, cwd, model, deferred=None, context=(), reminder=None):
    """A session file the CLI resumes as real turns: one entry per turn, chained by parentUuid.
    It must end with an assistant turn: resuming a session that ends with a user turn makes
    the CLI add an answer of its own ("No response requested."), and tool results cannot come
    on stdin (the CLI drops a tool_use it finds unanswered in the session).

    context: attachments (CONTEXT_ATTACHMENTS, and the date) written after the first turn,
    where the CLI's own sessions have them, so that the run's context message sits where it
    sat in the conversation's first request; reminder: one written after each later user turn
    that is not tool results, as the CLI does.

    deferred: the one tool_use block of the last turn whose result the client has sent. The
    file then ends with the marker a PreToolUse hook's "defer" leaves (checked with 2.1.197):
    on resume the CLI runs that call itself, through the MCP bridge, which answers with the
    client's result, and goes on with the model, adding "Continue from where you left off." to
    the tool result. Only one call can be deferred."""
    lines, parent = [], None
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    for number, turn in enumerate(turns):
        after = ()
        if number == 1:
            after = context
        elif number > 1 and turns[number - 1]["role"] == "user" and reminder and not any(
                b["type"] == "tool_result" for b in turns[number - 1]["content"]):
            after = (reminder,)
        for attachment in after:
            entry_id = str(uuid.uuid4())
            lines.append(json.dumps({
                "parentUuid": parent, "isSidechain": False, "type": "attachment",
                "attachment": attachment, "uuid": entry_id, "timestamp": stamp,
                "userType": "external", "entrypoint": "sdk-cli", "cwd": cwd,
                "sessionId": session_id, "version": SESSION_FORMAT_VERSION},
                ensure_ascii=False))
            parent = entry_id
        entry_id = str(uuid.uuid4())
        content = cli_blocks(turn["content"], turn["role"])
        if turn["role"] == "user":
            message = {"role": "user", "content": content}
        else:
            message = {"id": "msg_%024x" % number, "type": "message", "role": "assistant",
                       "model": model, "content": content,
                       "stop_reason": "tool_use" if any(b["type"] == "tool_use" for b in content)
                       else "end_turn", "stop_sequence": None,
                       "usage": {"input_tokens": 0, "output_tokens": 0}}
        lines.append(json.dumps({
            "parentUuid": parent, "isSidechain": False, "type": turn["role"], "message": message,
            "uuid": entry_id, "timestamp": stamp, "userType": "external", "entrypoint": "sdk-cli",
            "cwd": cwd, "sessionId": session_id, "version": SESSION_FORMAT_VERSION},
            ensure_ascii=False))
        parent = entry_id
    if deferred:
        lines.append(json.dumps({
            "parentUuid": parent, "isSidechain": False, "type": "attachment",
            "attachment": {"type": "hook_deferred_tool", "toolUseID": cli_tool_id(deferred["id"]),
                           "toolName": MCP_PREFIX + mcp_tool_name(deferred["name"]),
                           "toolInput": deferred["input"], "hookName": "settings",
                           "hookEvent": "PreToolUse", "permissionMode": "default"},
            "uuid": str(uuid.uuid4()), "timestamp": stamp, "userType": "external",
            "entrypoint": "sdk-cli", "cwd": cwd, "sessionId": session_id,
            "version": SESSION_FORMAT_VERSION}, ensure_ascii=False))
    return "\n".join(lines) + "\n"


def deferrable_call(plan, turns):
    """The one tool_use block whose result alone makes the conversation's last turn, when the
    CLI can be resumed with that call deferred (session_lines): the call is the last assistant
    turn's only one and a function this request offers. Else None."""
    last, reply = turns[-1]["content"], turns[-2]["content"] if len(turns) > 1 else []
    calls = [b for b in reply if b["type"] == "tool_use"]
    if len(turns) < 3 or len(last) != 1 or last[0]["type"] != "tool_result" or len(calls) != 1:
        return None
    if cli_tool_id(calls[0]["id"]) != cli_tool_id(last[0]["tool_use_id"]):
        return None
    if calls[0]["name"] not in {t["name"] for t in plan.tools or ()}:
        return None
    if not bridgeable(last[0]):
        return None
    return calls[0]


# CLI run: the tool bridge ###################################################################
#: The client's functions reach the model through an MCP server that is this same file,
#: started by the CLI (mcp_config): it lists them as MCP tools, and answers each call with the
#: client's result when its next request brings it (CliRun.give_results writes it, result_waiter
#: reads it). It never runs a function: the proxy hands the model's calls back to the client.
#: `claude_proxy.py --mcp-tools FILE` runs it.


def mcp_config(tools_path):
    """The --mcp-config that starts this very file as the MCP server of the client's functions."""
    command = [sys.executable, "-I", "-S", os.path.abspath(__file__), "--mcp-tools", tools_path]
    return {"mcpServers": {MCP_SERVER: {"type": "stdio", "command": command[0], "args": command[1:]}}}


def bridgeable(result):
    """Whether a tool result can go through the MCP bridge as it is: text and images can; the
    CLI turns a PDF an MCP server returns into a file it saves and a line of text (checked
    with 2.1.332), so a result holding a document reaches the model another way."""
    return not any(b["type"] == "document" for b in result["content"])


def mcp_results(blocks):
    """A client's tool result blocks -> the MCP tools/call result the bridge answers with."""
    content = []
    for block in blocks:
        if block["type"] == "text":
            content.append({"type": "text", "text": block["text"]})
        elif block["type"] == "image":
            content.append({"type": "image", "data": block["source"]["data"],
                            "mimeType": block["source"]["media_type"]})
    return content or [{"type": "text", "text": ""}]


MCP_PROTOCOL_VERSION = "2025-06-18"


def mcp_reply(message, tools, wait_for_result=None):
    """One JSON-RPC message from the CLI -> the reply (a dict), or None for a notification.
    wait_for_result(name) gives a tools/call its result: the client's, when it comes."""
    if not isinstance(message, dict):
        return {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "Invalid Request"}}
    method, params, request_id = message.get("method"), message.get("params"), message.get("id")
    if params is None:
        params = {}
    if request_id is None:
        return None  # notifications/initialized, notifications/cancelled, ...
    if not isinstance(method, str):
        return {"jsonrpc": "2.0", "id": request_id, "error": {"code": -32600, "message": "Invalid Request"}}
    if not isinstance(params, dict):  # JSON-RPC allows positional params; MCP never sends them
        return {"jsonrpc": "2.0", "id": request_id, "error": {"code": -32602, "message": "Invalid params"}}
    if method == "initialize":
        result = {"protocolVersion": params.get("protocolVersion") or MCP_PROTOCOL_VERSION,
                  "capabilities": {"tools": {"listChanged": False}},
                  "serverInfo": {"name": "claude-proxy", "version": __version__}}
    elif method == "ping":
        result = {}
    elif method == "tools/list":
        result = {"tools": [{"name": t["mcp_name"], "description": t["description"],
                             "inputSchema": t["input_schema"]} for t in tools]}
    elif method == "tools/call" and wait_for_result is not None:
        result = wait_for_result(params.get("name"))
    elif method == "tools/call":
        result = {"isError": True, "content": [{"type": "text", "text":
                  "This function is run by the client application, not here."}]}
    else:
        return {"jsonrpc": "2.0", "id": request_id,
                "error": {"code": -32601, "message": "Method not found: %s" % method}}
    return {"jsonrpc": "2.0", "id": request_id, "result": result}


def result_waiter(folder, wait_seconds, owner_files=()):
    """tools/call results from the proxy: the n-th call gets the file n.json in `folder`,
    which the proxy writes when the client's next request brings the results. The bridge
    polls: a file is the one channel that works alike on every platform. If none comes in
    `wait_seconds`, the proxy has gone without stopping the run: end the run's whole process
    group, so that nothing is left running."""
    calls = [0]

    def proxy_gone():
        # Its owner lock can be taken: the proxy was killed, and nobody will bring a result.
        return any(owner_gone(os.path.dirname(path)) for path in owner_files)

    def wait_for_result(name):
        path = os.path.join(folder, "%d.json" % calls[0])
        calls[0] += 1
        deadline = time.monotonic() + wait_seconds
        checked = time.monotonic()
        while not os.path.exists(path):
            if time.monotonic() - checked > 0.5:
                checked = time.monotonic()
                if proxy_gone():
                    deadline = 0
            if time.monotonic() > deadline or not os.path.isdir(folder):
                # KILL, the CLI with us: given TERM, or the call's failure, it would ask the
                # model again, a paid call nobody reads.
                if os.name != "nt":
                    os.killpg(os.getpgid(0), signal.SIGKILL)
                else:
                    subprocess.run(["taskkill", "/T", "/F", "/PID", str(os.getppid())],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                sys.exit(1)
            time.sleep(0.02)
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    return wait_for_result


def mcp_serve(tools_path, stdin=None, stdout=None):
    """Serve MCP over stdio (newline-delimited JSON-RPC) until the CLI closes stdin."""
    stdin = stdin or sys.stdin.buffer
    stdout = stdout or sys.stdout.buffer
    with open(tools_path, encoding="utf-8") as f:
        spec = json.load(f)
    waiter = result_waiter(os.path.join(os.path.dirname(os.path.abspath(tools_path)), MCP_RESULTS_DIR),
                           float(spec.get("wait_seconds", DEFAULT_TIMEOUT)), spec.get("owner_files") or ())
    for line in iter(stdin.readline, b""):
        if not line.strip():
            continue
        try:
            message = json.loads(line)
        except ValueError:
            reply = {"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "Parse error"}}
        else:
            reply = mcp_reply(message, spec["tools"], waiter)
        if reply is not None:
            stdout.write(json.dumps(reply).encode("utf-8") + b"\n")
            stdout.flush()
    return 0


# CLI run: checking the CLI ##################################################################
#: What the proxy finds out about the binary without a model call: where it is, its version,
#: the flags its --help lists, where it keeps sessions, how it is logged in.


def find_claude(configured=None):
    """The CLI's path: CLAUDE_PATH if given, else `claude` on PATH (shutil.which also finds
    claude.cmd / claude.exe on Windows through PATHEXT). None when there is none."""
    if configured:
        found = shutil.which(configured) or (configured if os.path.isfile(configured) else None)
    else:
        found = shutil.which("claude")
    # Absolute: each run starts in a directory of its own, where ./claude means nothing.
    return os.path.abspath(found) if found else None


def cli_version(claude_path, timeout=15.0):
    """`claude --version`, or None when it cannot be run."""
    if not claude_path:
        return None
    try:
        done = subprocess.run([claude_path, "--version"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              timeout=timeout, env=cli_env(os.environ))
    except (OSError, subprocess.SubprocessError):
        return None
    text = done.stdout.decode("utf-8", "replace").strip()
    return text.splitlines()[0] if done.returncode == 0 and text else None


#: The oldest CLI release the proxy is tested with; an older one is said so at start and in
#: /health, and used as it is. A newer one is used too: its --help is checked for the flags the
#: proxy gives, and where it does not do what the proxy relies on (it cannot load a session
#: file, a flag is refused), the proxy falls back and says so.
OLDEST_SUPPORTED_CLI = (2, 1, 197)
#: The flags cli_argv gives the CLI that `claude --help` lists (2.1.197 and 2.1.332 list all of
#: these). --system-prompt-file and --max-turns work there but are not listed: a run the CLI
#: refuses for an unknown option is said so instead (CliRunner.note_refused_flag).
CLI_LISTED_FLAGS = ("--print", "--input-format", "--output-format", "--verbose",
                    "--include-partial-messages", "--no-session-persistence", "--tools",
                    "--strict-mcp-config", "--resume", "--mcp-config", "--allowedTools",
                    "--json-schema", "--model", "--effort", "--max-budget-usd",
                    "--permission-mode", "--setting-sources")  # the last two: workspace mode
UNKNOWN_OPTION = re.compile(r"unknown option '(--?[A-Za-z][\w-]*)'")
CLI_CHECK_SECONDS = 30.0


def parse_cli_version(text):
    """"2.1.332 (Claude Code)" -> (2, 1, 332), or None."""
    found = re.match(r"\s*(\d+)\.(\d+)\.(\d+)", text or "")
    return tuple(int(n) for n in found.groups()) if found else None


def cli_help(claude_path, env):
    """`claude --help`, or None when it cannot be run (no model call, no spend)."""
    try:
        done = subprocess.run([claude_path, "--help"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              timeout=CLI_CHECK_SECONDS, env=cli_env(env))
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.decode("utf-8", "replace") if done.returncode == 0 else None


def cli_sessions_root(claude_path, env, cwd):
    """Where this CLI keeps its sessions, asked of the CLI itself: (the projects folder, None,
    login) or (None, why it cannot be told, login); login is the init event's apiKeySource
    ("none": logged in with an account, as a subscriber is), or None. A wrapper script may give the CLI another HOME or
    CLAUDE_CONFIG_DIR than the proxy's, so the proxy's own environment cannot say.

    The CLI is given `/clear`, which it answers without a model call (CLI-FACTS), in `cwd`;
    its init event names its auto-memory folder, <config>/projects/<cwd's name>/memory/ (2.1.197
    and 2.1.332), when auto memory is on, which this run alone asks for. What the CLI makes
    there for `cwd` is removed."""
    env = dict(cli_env(env), CLAUDE_CODE_DISABLE_AUTO_MEMORY="0", TMPDIR=cwd, TEMP=cwd, TMP=cwd)
    argv = [claude_path, "-p", "--input-format", "stream-json", "--output-format", "stream-json",
            "--verbose", "--no-session-persistence", "--tools", "", "--strict-mcp-config",
            "--max-turns", "1"]
    try:
        done = subprocess.run(argv, input=cli_command_line([{"type": "text", "text": "/clear"}]),
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=cwd, env=env,
                              timeout=CLI_CHECK_SECONDS)
    except (OSError, subprocess.SubprocessError) as e:
        return None, "the CLI could not be run to ask it (%s)" % e, None
    init = None
    for line in done.stdout.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("type") == "system" and event.get("subtype") == "init":
            init = event
            break
    if init is None:
        return None, "the CLI printed no init event when asked (exit status %s)" % done.returncode, None
    login = init.get("apiKeySource") if isinstance(init.get("apiKeySource"), str) else None
    memory = (init.get("memory_paths") or {}).get("auto") if isinstance(init.get("memory_paths"), dict) else None
    if not isinstance(memory, str) or not memory:
        return None, ("the CLI's init event names no auto-memory folder: auto memory may be off, "
                      "in the CLI's settings or by CLAUDE_CODE_DISABLE_AUTO_MEMORY=1 in a wrapper"), login
    project = os.path.dirname(os.path.normpath(memory))
    root, name = os.path.split(project)
    if name != session_name(cwd) or os.path.basename(root) != "projects":
        return None, "the CLI keeps a working directory's sessions in %s, not where the proxy expects" % project, login
    shutil.rmtree(project, ignore_errors=True)
    return root, None, login


class CliCheck:
    """What the proxy found out about the CLI binary on disk, without a model call: its version,
    the flags its --help lacks, and where it keeps sessions (or why that cannot be told)."""

    def __init__(self, stamp=None, version=None, help_text=None, sessions_root=None,
                 sessions_problem=None, checked=True, login=None):
        self.stamp = stamp
        self.login = login  # the CLI's apiKeySource: "none" for an account's (OAuth) login
        self.version = version
        self.release = parse_cli_version(version)
        self.checked = checked
        self.help_found = help_text is not None
        self.flags_missing = ([f for f in CLI_LISTED_FLAGS
                               if not re.search(re.escape(f) + r"(?![\w-])", help_text)]
                              if help_text is not None else [])
        self.sessions_root = sessions_root
        self.sessions_problem = sessions_problem

    def supported(self):
        """True at or above the oldest supported release, False below, None if unknown."""
        return self.release >= OLDEST_SUPPORTED_CLI if self.release else None

    def problems(self):
        """What a user can act on, in words; empty when all is as expected."""
        out = []
        if self.checked and self.supported() is False:
            out.append("claude CLI %s is older than the oldest release this proxy supports (%s): "
                       "update it (`claude update`, or npm install -g @anthropic-ai/claude-code)."
                       % (self.version, ".".join(map(str, OLDEST_SUPPORTED_CLI))))
        if self.checked and not self.help_found:
            out.append("`claude --help` failed, so the flags the proxy uses could not be checked.")
        if self.flags_missing:
            out.append("`claude --help` does not list %s, which the proxy gives the CLI: runs "
                       "that need them may fail; update the proxy, or pin the CLI to a release "
                       "that has them." % ", ".join(self.flags_missing))
        if self.checked and self.sessions_root is None:
            out.append("where the CLI keeps its sessions cannot be told (%s): earlier turns of a "
                       "conversation go to it as session files in the folder the proxy's own "
                       "environment gives ($CLAUDE_CONFIG_DIR, else ~/.claude), which it may not "
                       "find; then they go as a transcript, which the prompt cache cannot reuse. "
                       "If CLAUDE_PATH is a wrapper that sets HOME or CLAUDE_CONFIG_DIR, set them "
                       "for the proxy too." % self.sessions_problem)
        return out


# CLI run: the process #######################################################################
#: One CLI process from start to stop, and the folders a proxy's runs leave on disk, found
#: and removed by the next start if the proxy dies.


def bounded_lines(stream, limit):
    """The lines of a binary stream as (line, whole) pairs, none longer than `limit` bytes: of a
    longer line, only its first bytes are kept (whole=False) and the rest is read and dropped, so
    a process that prints one enormous line costs at most `limit` bytes at a time."""
    for line in iter(lambda: stream.readline(limit), b""):
        if line.endswith(b"\n") or len(line) < limit:
            yield line, True
            continue
        start, line = line[:200], None
        yield start, False
        for rest in iter(lambda: stream.readline(limit), b""):
            if rest.endswith(b"\n"):
                break


def start_failure(error):
    """The ProxyError for a CLI process that could not be started (an OSError from Popen)."""
    if error.errno == errno.E2BIG:  # only a schema is ever long in argv
        return invalid("The response_format schema is too long to pass to the claude CLI.",
                       "response_format.json_schema.schema", "invalid_json_schema")
    if error.errno in (errno.ENOENT, errno.EACCES, errno.ENOEXEC, errno.ENOTDIR, errno.EISDIR,
                       errno.EPERM, errno.ELOOP):
        return cli_failed("The claude CLI could not be started (%s); check CLAUDE_PATH."
                          % (error.strerror or error), "cli_not_found")
    return ProxyError(503, "The claude CLI could not be started (%s); retry shortly."
                      % (error.strerror or error), "server_error", None, "cli_start_failed",
                      {"Retry-After": "5"})


#: A CliRun's state, one at a time, moved only by its CliRunner (RUN_MOVES), except that a stop
#: from anywhere (a timeout, a hang-up, a failed prime) ends it:
RUN_WARM = "warm"  # waiting for a new conversation: just started (the warm pool), or reset
RUN_SERVING = "serving"  # answering a request
RUN_KEPT = "kept"  # waiting for its conversation's next turn (Continuations)
RUN_RESETTING = "resetting"  # its conversation is over: /clear is being sent (CliRunner.retire);
#   it is warm again once sent, and its answer is read in the background (totals() and events()
#   wait for it)
RUN_STOPPED = "stopped"  # the process group is gone; nothing moves it again
RUN_MOVES = {RUN_WARM: (RUN_SERVING, RUN_STOPPED),
             RUN_SERVING: (RUN_KEPT, RUN_STOPPED),
             RUN_KEPT: (RUN_SERVING, RUN_RESETTING, RUN_STOPPED),
             RUN_RESETTING: (RUN_WARM, RUN_STOPPED),
             RUN_STOPPED: ()}


class CliRun:
    """One `claude -p` process: started in its working directory (the workspace's folder, else
    the folder every run shares: ProxyFolder.cli_folder()) and its own process group,
    given one message, read event by event, and stopped (the whole group) whatever happens.

    It may be started ahead of its request (the warm pool): the CLI prints nothing and calls
    no model until its message arrives on stdin (CLI-FACTS). A live run keeps stdin open after
    its message, so that it can be kept for the conversation's next turn (see Continuations):
    the CLI then holds the conversation as real turns, and the next turn is one more line (or,
    after tool calls, the results the MCP bridge is waiting for). Once that conversation is
    over, it may be reset and serve the next new conversation of the same client and shape
    (ReusePool). Where it is in that life is its `state` (RUN_MOVES), which only the runner
    moves (CliRunner.move); a stop, wherever it comes from (a timeout, a hang-up), ends it."""

    def __init__(self, runner, argv, env, workdir, shape=None, cwd=None, timeout=None,
                 session_file=None, session_model=None):
        self.runner = runner
        self.workdir = workdir
        self.cwd = cwd or workdir  # where the CLI runs (CliRunner.spawn chooses it)
        self.shape = shape
        self.binary = runner.binary_stamp()
        self.spawned_at = time.monotonic()
        self.timeout = timeout or runner.timeout  # a workspace's runs have their own
        self._state = RUN_WARM
        self.scope = None  # the client whose conversations it serves (set when it first serves)
        self.conversations = 0  # conversations it has begun: a reused process serves several
        self.live = False  # stdin stays open after the message: it can serve the next turn
        self.model = None  # the model the CLI said it runs (its init event)
        self.pending_calls = []  # (tool_use id, client name) the MCP bridge waits on, in order
        self.results_given = 0  # tool results handed to the bridge so far
        self.cost_seen = 0.0  # the CLI's total_cost_usd at its last result (it adds up)
        self.usage_before = {}  # usage of this message's model calls already answered
        self.model_usage_seen = {}  # the CLI's modelUsage totals at its last result
        self.cancelled = None  # why it was stopped early: "client_gone", "timeout", "shutdown", ...
        self.garbage_lines = 0
        self.stderr_tail = collections.deque(maxlen=STDERR_TAIL_LINES)
        self.returncode = None
        self._lock = threading.Lock()
        self._stopped = False
        self._timer = None
        # stdout is closed by whoever is done with it last: events() at its end, or stop() when
        # nothing reads it (a warm process never used). Closing it under a reader would make
        # the reader fail instead of ending.
        self._stdout_reader = False
        self._stdout_closed = False
        self._peeked = []
        self.session_file = session_file  # the session file it resumes, removed with it
        self.session_model = session_model  # the model its session file names (CliRunner.learn_context)
        self._priming = None  # the thread reading the CLI's answer to the prime (see prime())
        kwargs = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            kwargs["start_new_session"] = True  # its own process group: stop it and its children
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, cwd=self.cwd, env=env, **kwargs)
        try:  # for the next proxy, should this one die without stopping it (remove_leftovers)
            with open(workdir + CLI_PID_SUFFIX, "w", encoding="utf-8") as f:
                f.write("%d %s" % (self.proc.pid, process_start(self.proc.pid) or "-"))
        except OSError:
            pass
        self._stderr_reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._stderr_reader.start()

    @property
    def state(self):
        return self._state

    def enter(self, state, scope=None):
        """Move to `state`: for the runner only (CliRunner.move). False if the run is stopped
        already (a stop wins over any move); a move RUN_MOVES does not allow is a bug. From
        RUN_WARM to RUN_SERVING it begins a new conversation of client `scope`: a process serves
        one client's conversations only, never another's."""
        with self._lock:
            if self._state == RUN_STOPPED:
                return False
            if state not in RUN_MOVES[self._state] and state != self._state:
                raise ValueError("a CLI run cannot go from %s to %s" % (self._state, state))
            if self._state == RUN_WARM and state == RUN_SERVING:
                if self.scope is not None and scope != self.scope:
                    raise ValueError("a CLI run serves one client's conversations only")
                self.scope = scope
                self.conversations += 1
            self._state = state
            return True

    def stop_for_hang_up(self):
        """What a client's hang-up does to the run answering it (see ClientWatch)."""
        self.cancel("client_gone")

    def send(self, message, live=False):
        """Hand the run a message. Unless live, stdin is closed after it, so the CLI exits
        after replying. The timeout counts from here."""
        self.begin_turn(live)
        # Written from a thread: a large message must not deadlock against a CLI that writes
        # its first events before it has read all of stdin.
        threading.Thread(target=self._write_stdin, args=(message, not live), daemon=True).start()

    def begin_turn(self, live):
        """A request starts using the run: the timeout counts from here. live: stdin stays open
        after this turn's message (the run may be kept)."""
        with self._lock:
            self.live = live
            if self._stopped:
                return
            if self._timer:
                self._timer.cancel()
            self._timer = threading.Timer(self.timeout, self.cancel, ("timeout",))
            self._timer.daemon = True
            self._timer.start()

    def end_turn(self, reply):
        """The request is answered and the run is kept: no timeout while it waits. Its totals
        go on from this reply's (a ReplySummary): the CLI's result adds up over its life."""
        self.model = reply.model or self.model
        self.pending_calls = list(reply.call_names)
        if reply.total_cost_usd is not None:
            self.cost_seen = reply.total_cost_usd
        if reply.model_usage_total is not None:
            self.model_usage_seen = reply.model_usage_total
        if reply.stop_reason == "tool_use":  # the message goes on when the results come
            self.usage_before = {k: self.usage_before.get(k, 0) + v
                                 for k, v in reply.usage.items() if isinstance(v, int)}
        else:
            self.usage_before = {}
        with self._lock:
            if self._timer:
                self._timer.cancel()
                self._timer = None

    def totals(self):
        """What the CLI's result has added up over this process's life so far, for the next
        reply's translator: (total_cost_usd, usage of this message's calls already answered,
        modelUsage totals). After a reset, what the CLI said once it was reset (see prime)."""
        if self._priming is not None:
            self._priming.join()
        return self.cost_seen, dict(self.usage_before), dict(self.model_usage_seen)

    def give_results(self, results):
        """Tool results for the calls the MCP bridge is waiting on (see mcp_serve): one file
        each, numbered in the order the CLI makes the calls, each written whole at once."""
        folder = os.path.join(self.workdir, MCP_RESULTS_DIR)
        for result in results:
            path = os.path.join(folder, "%d.json" % self.results_given)
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                json.dump(result, f)
            os.replace(path + ".tmp", path)
            self.results_given += 1
        self.pending_calls = []

    def peek_until(self, wanted, seconds):
        """Read events until one for which wanted(event) is true and return it, or None if none
        came within `seconds` (the run is then stopped). events() gives them all again."""
        timer = threading.Timer(seconds, self.cancel, ("no_start",))
        timer.daemon = True
        timer.start()
        seen, self._peeked = self._peeked, []
        try:
            for event in seen:
                if wanted(event):
                    return event
            for event in self.events():
                seen.append(event)
                if wanted(event):
                    return event
            return None
        finally:
            self._peeked = seen + self._peeked
            timer.cancel()

    def prime(self, line, failed):
        """Send a warm process WARM_PRIME_TEXT ahead of its message (or a used one, to reset
        it: the same command). A thread reads the CLI's answer to it, which no request sees
        (events() starts after it); if the CLI made a model call of it instead, failed(run) is
        called, and the run is stopped unless a request holds it already. The command starts
        a new session: the CLI's totals start again from what its result says (0)."""
        self._write_stdin(line, close=False)

        def read_answer():
            seen, reader = [], self._events()
            try:
                for event in reader:
                    seen.append(event)
                    if event.get("type") == "result":
                        break
            finally:
                reader.close()  # stdout is free for events() from here
            if seen and seen[-1].get("type") == "result" and not prime_answered(seen):
                failed(self)
                if self.state != RUN_SERVING:
                    self.stop()
            elif seen and seen[-1].get("type") == "result":
                result = seen[-1]
                cost = result.get("total_cost_usd")
                self.cost_seen = float(cost) if isinstance(cost, (int, float)) else 0.0
                self.usage_before = {}
                self.model_usage_seen = model_usage_totals(result.get("modelUsage")) or {}
        self._priming = threading.Thread(target=read_answer, name="warm-prime", daemon=True)
        self._priming.start()

    def first_event(self, seconds):
        """The run's first event, or None if it printed none within `seconds` (the run is then
        stopped). events() gives it again."""
        timer = threading.Timer(seconds, self.cancel, ("no_start",))
        timer.daemon = True
        timer.start()
        try:
            for event in self.events():
                self._peeked.append(event)
                return event
            return None
        finally:
            timer.cancel()

    def alive(self):
        return not self._stopped and self.proc.poll() is None

    def _write_stdin(self, data, close=True):
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
            if close:
                self.proc.stdin.close()
        except (OSError, ValueError):
            pass  # the CLI exited early; its stdout and exit status tell why

    def _read_stderr(self):
        try:
            for raw, whole in bounded_lines(self.proc.stderr, MAX_STDERR_LINE):
                line = printable(raw.decode("utf-8", "replace").rstrip(), MAX_STDERR_LINE)
                self.stderr_tail.append(line if whole else line + "... (line cut)")
        finally:
            self.proc.stderr.close()  # at its end of file: the process group is gone

    def events(self):
        """Each JSON object the CLI prints, in order, until it exits or is stopped. A reader
        may stop early and call again for the next turn's events. A primed process's answer to
        the prime is not among them."""
        if self._priming is not None:
            self._priming.join()
        return self._events()

    def _events(self):
        while self._peeked:
            yield self._peeked.pop(0)
        with self._lock:
            if self._stdout_closed:
                return
            self._stdout_reader = True
        at_end = False
        try:
            for raw, whole in bounded_lines(self.proc.stdout, MAX_EVENT_LINE + 1):
                if not whole:
                    # No event is ever this long: the CLI is broken. Holding the line whole
                    # would let it grow the proxy without limit.
                    self.garbage_lines += 1
                    log("cli printed a line over %d bytes (%r...); stopping the run"
                        % (MAX_EVENT_LINE, raw[:100]))
                    self.cancel("bad_output")
                    continue
                line = raw.strip()
                if not line:
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    event = None
                if isinstance(event, dict):
                    yield event
                else:
                    self.garbage_lines += 1
                    if self.garbage_lines <= 3:
                        log("cli printed a line that is not a JSON event: %r" % line[:200])
            at_end = True
        finally:
            with self._lock:
                self._stdout_reader = False
                self._stdout_closed = self._stdout_closed or at_end
            if at_end:
                self.proc.stdout.close()

    def cancel(self, reason):
        """Stop the run early, remembering why (first reason wins)."""
        with self._lock:
            if self.cancelled is None and not self._stopped:
                self.cancelled = reason
        self.stop()

    def stop(self):
        """Stop the process group at once (KILL). Idempotent.

        Not TERM first: a CLI waiting in the MCP bridge for a tool result, given TERM, sees the
        bridge die before itself, takes the failed call as the tool's answer and asks the model
        again while it shuts down: a paid call nobody reads (seen with 2.1.197). It has nothing
        to save (--no-session-persistence), and its folder goes with it."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._state = RUN_STOPPED  # a stop wins over any move (see enter)
            if self._timer:
                self._timer.cancel()
        if self.proc.poll() is None:
            kill_group(self.proc)
            try:
                self.proc.wait(STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                log("a claude CLI process did not end after SIGKILL within %gs" % STOP_GRACE_SECONDS)
        elif os.name != "nt":
            # The CLI itself exited; anything it left behind in its group goes too.
            kill_group(self.proc)
        self.returncode = self.proc.returncode
        # Its last stderr lines explain a failure (run_failure reads them): the reader gets
        # them and its end of file once the process group is gone.
        self._stderr_reader.join(STOP_GRACE_SECONDS)
        with self._lock:
            close_stdout = not self._stdout_reader and not self._stdout_closed
            self._stdout_closed = True
        for stream in ((self.proc.stdin, self.proc.stdout) if close_stdout else (self.proc.stdin,)):
            try:
                stream.close()
            except OSError:
                pass
        shutil.rmtree(self.workdir, ignore_errors=True)
        try:
            os.remove(self.workdir + CLI_PID_SUFFIX)
        except OSError:
            pass
        if self.session_file:  # the session file the run resumed, once read for what it learnt
            try:
                with open(self.session_file, encoding="utf-8") as f:
                    self.runner.learn_context(self.session_model, session_context(f.read()))
            except (OSError, UnicodeDecodeError):
                pass
            try:
                os.remove(self.session_file)
            except OSError:
                pass
        self.runner.unregister(self)
        self.runner.forget(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def kill_group(proc):
    """KILL a run's whole process group; on Windows, its whole process tree."""
    try:
        if os.name == "nt":
            # claude.cmd is cmd.exe running node: ending cmd.exe alone would orphan the CLI,
            # and once cmd.exe is gone its tree cannot be found. Take the tree down at once.
            subprocess.run(["taskkill", "/T", "/F", "/PID", str(proc.pid)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        else:
            os.killpg(proc.pid, signal.SIGKILL)
    except (OSError, subprocess.SubprocessError):
        pass  # already gone


def stop_runs(runs, reason=None):
    """Stop several runs at once: each may take STOP_GRACE_SECONDS to end."""
    at_once((lambda run: run.cancel(reason)) if reason else (lambda run: run.stop()), runs)


def at_once(action, runs):
    """action(run) for each run, in parallel, and back when all are done: a stop may take
    STOP_GRACE_SECONDS."""
    threads = [threading.Thread(target=action, args=(run,)) for run in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


#: What a proxy leaves on disk is findable by the next one: every run's folder (system prompt,
#: MCP config, tool results, the CLI's own temporary files) is made inside the proxy's own
#: folder in TMPDIR, claude-proxy-<random>, which holds an owner file locked for the proxy's
#: whole life (flock on POSIX, msvcrt.locking on Windows: the system drops the lock when the
#: process dies, however it dies, so a reused pid cannot fool it). The session files of its
#: resumed runs sit in the CLI's projects folders under names that begin with the proxy
#: folder's own; the folders that hold them are listed in SESSION_ROOTS_FILE.
PROXY_FOLDER_PREFIX = "claude-proxy-"
OWNER_FILE = "owner.lock"
SESSION_ROOTS_FILE = "session-roots"
CLI_FOLDER = "cwd"  # the runs' working directory (ProxyFolder.cli_folder)
CLI_PID_SUFFIX = ".pid"  # beside a run's folder: "<pid> <start time>" of the CLI it runs


def lock_owner_file(fd):
    """Take the owner lock of an open owner file without waiting: True if taken, False if
    another process holds it, None where this system has no lock the proxy can use."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        if msvcrt is not None:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
    except OSError:
        return False
    return None


def owner_gone(folder):
    """True when the proxy that made this folder is gone (its owner lock can be taken), False
    while it lives, None when it cannot be told (no owner file, no lock on this system)."""
    try:
        fd = os.open(os.path.join(folder, OWNER_FILE), os.O_RDWR)
    except OSError:
        return None
    try:
        taken = lock_owner_file(fd)
        if taken and fcntl is None and msvcrt is not None:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)  # Windows may hold it a while past close
        return taken
    finally:
        os.close(fd)  # and with it the lock, if it was taken


def process_start(pid):
    """A token that tells this process from a later one with the same pid (Linux: its start
    time in clock ticks since boot), or None where it cannot be read."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError, ValueError):
        return None


def own_folder(path):
    """A real folder (not a link) of this user's: what a shared TMPDIR holds of another user's,
    who could write a pid file into it, is never acted on."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and (not hasattr(os, "getuid") or st.st_uid == os.getuid())


#: In a workspace run's folder: where it works and the session file it resumes, both outside
#: the proxy's folder, for the next proxy to clean up should this one be killed (see
#: remove_leftovers): {"cwd": the workspace's folder, "session": path or null}.
WORKSPACE_RUN_FILE = "workspace.json"


def workspace_run_note(run_folder):
    """(working directory, session file or None) of a dead proxy's workspace run, from its
    WORKSPACE_RUN_FILE; None for any other run."""
    try:
        with open(os.path.join(run_folder, WORKSPACE_RUN_FILE), encoding="utf-8") as f:
            note = json.load(f)
        return str(note["cwd"]), note["session"] if isinstance(note["session"], str) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def unregister_run(registry, pid, within, stopped_now=False):
    """Remove a run's entry from the CLI's registry of live sessions (<registry>/<pid>.json and
    <pid>.<hash>.key): only when the entry is that pid's and names a working directory at or
    inside `within` (the run's own, or a dead proxy's folder), so never another's.
    stopped_now: the proxy has just stopped that pid itself, so a lone <pid>.<hash>.key with
    no .json, or the temporary file the CLI writes it through (<pid>.<hash>.key.tmp.<hex>),
    is its run's: a run killed between the CLI writing them (seen with 2.1.332)."""
    try:
        with open(os.path.join(registry, "%d.json" % pid), encoding="utf-8") as f:
            registered = json.load(f)
    except (OSError, ValueError):
        if stopped_now:
            remove_files(registry, lambda name: name.startswith("%d." % pid)
                         and (name.endswith(".key") or ".tmp." in name))
        return
    if not isinstance(registered, dict) or registered.get("pid") != pid:
        return
    where, within = os.path.realpath(str(registered.get("cwd"))), os.path.realpath(within)
    if not (where == within or where.startswith(within + os.sep)):
        return
    remove_files(registry, lambda name: name.startswith("%d." % pid))


def remove_files(folder, chosen):
    """Remove the files of `folder` whose names chosen(name) picks; what cannot be, stays."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if chosen(name):
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass


def remove_leftovers(tmpdir=None, registries=None):
    """Before serving: remove what proxies that died (SIGKILL, a crash, a power cut) left in
    TMPDIR: their folders, the session files of their resumed runs, their runs' entries in the
    CLI's registry of live sessions (see CliRunner.unregister; `registries`: the CLI's
    <config>/sessions folders, by default the one the proxy's own environment gives, and those
    beside the projects folders it wrote sessions in), and any of their CLI processes still
    running (whose start time matches, so never a stranger reusing a pid; where
    start times cannot be read, the process is left: a waiting CLI ends when its stdin closes, a
    tool call's bridge when its folder goes). Only folders of this proxy's kind, with an owner
    file whose lock can be taken: folders of proxies still running, of any other program, or
    that cannot be told are left alone. Returns the folders removed."""
    tmpdir = tmpdir or tempfile.gettempdir()
    if registries is None:
        registries = [os.path.join(cli_config_dir(os.environ), "sessions")]
    removed = []
    try:
        names = sorted(os.listdir(tmpdir))
    except OSError:
        return removed
    for name in names:
        folder = os.path.join(tmpdir, name)
        if not name.startswith(PROXY_FOLDER_PREFIX) or not own_folder(folder):
            continue
        if owner_gone(folder) is not True:
            continue
        try:
            with open(os.path.join(folder, SESSION_ROOTS_FILE), encoding="utf-8") as f:
                roots = [line.strip() for line in f if line.strip()]
        except OSError:
            roots = []
        pids, cwds, sessions = [], {}, []
        for run in os.listdir(folder):
            if not run.endswith(CLI_PID_SUFFIX):
                continue
            try:
                with open(os.path.join(folder, run), encoding="utf-8") as f:
                    pid, start = f.read().split()
                pids.append(int(pid))
                # A workspace run works outside this folder, and its session file is among the
                # user's own sessions of that folder: only that file goes.
                note = workspace_run_note(os.path.join(folder, run[:-len(CLI_PID_SUFFIX)]))
                if note:
                    cwds[int(pid)] = note[0]
                    sessions += [note[1]] if note[1] else []
                if os.name != "nt" and process_start(int(pid)) == start:
                    os.killpg(int(pid), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        for registry in set(registries) | {os.path.join(os.path.dirname(r), "sessions") for r in roots}:
            for pid in pids:
                unregister_run(registry, pid, cwds.get(pid, folder))
        for path in sessions:
            if path.endswith(".jsonl") and any(os.path.dirname(os.path.dirname(path)) ==
                                               os.path.normpath(root) for root in roots):
                try:
                    os.remove(path)
                except OSError:
                    pass
        prefix = session_name(folder) + "-"
        for root in roots:
            try:
                for entry in os.listdir(root):
                    if entry.startswith(prefix):
                        shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
            except OSError:
                pass
        shutil.rmtree(folder, ignore_errors=True)
        if not os.path.exists(folder):
            removed.append(folder)
    return removed


class ProxyFolder:
    """The proxy's own folder in TMPDIR (see PROXY_FOLDER_PREFIX): made at its first run,
    locked while the proxy lives, removed at shutdown. TMPDIR is read at each run (it may be
    changed or become unwritable while the proxy runs): one folder per TMPDIR used."""

    def __init__(self):
        self._lock = threading.Lock()
        self._folders = {}  # TMPDIR -> (folder, owner file descriptor)
        self._roots = set()
        self._closed = False

    def folder(self):
        """This proxy's folder in the current TMPDIR; OSError if it cannot be made."""
        tmpdir = tempfile.gettempdir()
        with self._lock:
            if self._closed:
                raise OSError(errno.EINVAL, "the proxy is shutting down")
            if tmpdir not in self._folders:
                folder = tempfile.mkdtemp(prefix=PROXY_FOLDER_PREFIX, dir=tmpdir)
                try:
                    fd = os.open(os.path.join(folder, OWNER_FILE), os.O_RDWR | os.O_CREAT, 0o600)
                    os.write(fd, str(os.getpid()).encode("ascii"))
                except OSError:
                    shutil.rmtree(folder, ignore_errors=True)
                    raise
                if lock_owner_file(fd) is False:  # nobody else can hold a folder just made
                    log("cannot lock %s; a crash would leave it behind" % folder)
                self._folders[tmpdir] = (folder, fd)
                if self._roots:
                    self._write_roots(folder, self._roots)
            return self._folders[tmpdir][0]

    def run_folder(self):
        """A new private folder (0700) for one run, inside this proxy's folder."""
        return tempfile.mkdtemp(prefix="run-", dir=self.folder())

    def cli_folder(self):
        """The working directory of every run: one empty folder (0700) in this proxy's folder.
        The CLI names it to the model (CONTEXT_ATTACHMENTS) and keeps sessions by it: one for
        all runs keeps that text, and so the cached prefix, the same from run to run."""
        folder = os.path.join(self.folder(), CLI_FOLDER)
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            pass
        return folder

    def note_sessions(self, root):
        """Session folders may be made in `root`: the next proxy removes ours there if we die."""
        with self._lock:
            if root in self._roots:
                return
            for folder, _ in self._folders.values():
                self._write_roots(folder, [root])
            self._roots.add(root)

    @staticmethod
    def _write_roots(folder, roots):
        with open(os.path.join(folder, SESSION_ROOTS_FILE), "a", encoding="utf-8") as f:
            f.write("".join(root + "\n" for root in roots))

    def owner_files(self):
        with self._lock:
            return [os.path.join(folder, OWNER_FILE) for folder, _ in self._folders.values()]

    def close(self):
        """At shutdown, once every run is stopped: remove the folders and drop the locks."""
        with self._lock:
            folders, self._folders, self._closed = list(self._folders.values()), {}, True
        for folder, fd in folders:
            for root in self._roots:  # where resumed runs' session files were
                shutil.rmtree(os.path.join(root, session_name(os.path.join(folder, CLI_FOLDER))),
                              ignore_errors=True)
            os.close(fd)
            shutil.rmtree(folder, ignore_errors=True)


def run_files(plan, wait_seconds=DEFAULT_TIMEOUT, folders=None):
    """A run's private folder (0700) with its system prompt and, with tools, its MCP config:
    (folder, prompt path, config path or None). A 503 naming TMPDIR when they cannot be written
    or its disk is nearly full (the CLI would fail there with no word on stderr)."""
    workdir = None
    try:
        workdir = folders.run_folder() if folders else tempfile.mkdtemp(prefix=PROXY_FOLDER_PREFIX)
        free = shutil.disk_usage(workdir).free
        if free < TMPDIR_MIN_FREE_BYTES:
            raise OSError(errno.ENOSPC, "only %d KiB free" % (free // 1024))
        prompt_path = os.path.join(workdir, "system-prompt.txt")
        with open(prompt_path, "w", encoding="utf-8") as f:
            f.write(plan.system_prompt or DEFAULT_SYSTEM_PROMPT)
            if plan.workspace:
                f.write(workspace_prompt(plan.workspace))
        config_path = None
        if plan.tools:
            tools_path = os.path.join(workdir, "tools.json")
            config_path = os.path.join(workdir, "mcp-config.json")
            os.mkdir(os.path.join(workdir, MCP_RESULTS_DIR))
            with open(tools_path, "w", encoding="utf-8") as f:
                json.dump({"tools": plan.tools, "wait_seconds": wait_seconds,
                           "owner_files": folders.owner_files() if folders else []}, f)
            with open(config_path, "w", encoding="utf-8") as f:
                json.dump(mcp_config(tools_path), f)
        return workdir, prompt_path, config_path
    except OSError as e:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        log("cannot write a run's files in %s: %s" % (tempfile.gettempdir(), e))
        raise tmpdir_unavailable(e.strerror or e)


# CLI run: the runner ########################################################################
#: The one owner of every CLI process: how a conversation reaches the CLI, best first, and
#: whether a run is kept for its next turn, reset for its client's next conversation, or stopped.


class CliRunner:
    """Owns every CLI process the proxy starts: cold runs, the warm pool's, those kept for a
    conversation's next turn (Continuations) and those reset for the next (ReusePool); it alone
    moves their state, and stops them all at shutdown."""

    def __init__(self, claude_path, timeout=DEFAULT_TIMEOUT, env=None, log_prompts=False,
                 pool_size=0, pool_idle=DEFAULT_POOL_IDLE, history="turns", reuse=None):
        self.claude_path = claude_path
        self.timeout = timeout
        self.env = dict(os.environ if env is None else env)
        self.log_prompts = log_prompts
        self._runs = set()
        self._lock = threading.Lock()
        self._closed = False
        self.idle_seconds = pool_idle
        self.default_model = None  # the model the CLI runs when a request names none
        self._resume_failed = None  # the binary stamp of a CLI that could not load a session
        self._prime_failed = None  # the binary stamp of a CLI that made a model call of the prime
        self._logged = set()
        self._version_lock = threading.Lock()
        self._version = self._version_stamp = None
        self.folders = ProxyFolder()
        self._context_lock = threading.Lock()
        self._context_binary, self._context = None, {}  # learn_context
        self._check_lock = threading.Lock()
        self._check = CliCheck(checked=False)  # main() turns checking on (check_cli)
        self._deferred_failed = None  # the binary stamp of a CLI that ignored a deferred call
        self.refused_flags = []  # options the CLI refused as unknown, this binary
        self.pool = WarmPool(self, pool_size, pool_idle) if pool_size > 0 and claude_path else None
        self.real_turns = history != "transcript"
        self.continuations = (Continuations(pool_size, pool_idle, self.retire)
                              if pool_size > 0 and claude_path and self.real_turns else None)
        # reuse: a ReuseLimits, or None (off). Only processes that can be kept can be reused.
        self.reuse = ReusePool(reuse, pool_idle) if reuse and self.continuations else None

    def binary_stamp(self):
        """What identifies the CLI binary on disk; it changes when the CLI updates itself."""
        try:
            st = os.stat(os.path.realpath(self.claude_path))
        except (OSError, TypeError):
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def version(self):
        """`claude --version` of the binary on disk now (asked again when it changed), or None
        when there is none."""
        stamp = self.binary_stamp()
        if stamp is None:
            return None
        with self._version_lock:
            if stamp != self._version_stamp:
                self._version, self._version_stamp = cli_version(self.claude_path), stamp
            return self._version

    def known_version(self, version):
        """The version main() read at start-up, for the binary on disk now."""
        with self._version_lock:
            self._version, self._version_stamp = version, self.binary_stamp()

    def check_cli(self, again=True):
        """Check the CLI binary on disk now, without a model call: its version, the flags its
        --help lists, where it keeps sessions. Logs what a user must know, once per binary.
        From then on it is checked again whenever the binary changes (cli_check)."""
        with self._check_lock:
            stamp = self.binary_stamp()
            if not again and self._check.stamp == stamp:
                return self._check  # another request checked it while this one waited
            if not self.claude_path or stamp is None:
                self._check = CliCheck(stamp, checked=True)
                return self._check
            found = {}  # the three questions at once: each is a CLI start (about 0.5-2 s)
            asks = [threading.Thread(target=lambda: found.update(version=cli_version(self.claude_path))),
                    threading.Thread(target=lambda: found.update(help=cli_help(self.claude_path, self.env)))]
            for ask in asks:
                ask.start()
            root, problem, login = None, "the proxy's TMPDIR cannot be written", None
            try:
                probe = self.folders.run_folder()
            except OSError:
                probe = None
            if probe:
                try:
                    root, problem, login = cli_sessions_root(self.claude_path, self.env, probe)
                finally:
                    shutil.rmtree(probe, ignore_errors=True)
            for ask in asks:
                ask.join()
            version, help_text = found.get("version"), found.get("help")
            changed = self._check.checked and self._check.stamp != stamp
            self._check = CliCheck(stamp, version, help_text, root, problem, login=login)
            self.refused_flags = []
        with self._version_lock:
            self._version, self._version_stamp = version, stamp
        if changed:
            log("the claude CLI at %s changed: now %s" % (self.claude_path, version or "version unknown"))
        for problem in self._check.problems():
            log("WARNING: " + problem)
        return self._check

    def cli_check(self):
        """What is known of the CLI binary on disk now (checked again if it changed)."""
        check = self._check
        if check.checked and check.stamp != self.binary_stamp():
            return self.check_cli(again=False)
        return check

    def sessions_root(self, env):
        """The folder the CLI reads session files from: as the CLI said, or (not checked, or
        it could not be told) where it would be with the proxy's own environment."""
        check = self.cli_check()
        return check.sessions_root or os.path.join(cli_config_dir(env), "projects")

    def unregister(self, run):
        """Remove what a stopped run left in the CLI's registry of live sessions: 2.1.332 writes
        <config>/sessions/<pid>.json (its working directory, session id, status) and a
        <pid>.<hash>.key beside it, even with --no-session-persistence, and removes them only
        when it exits by itself; a run the proxy kills leaves them for good. Only the files of
        this pid that name this run's working directory are removed."""
        if run.proc.pid is not None and self.claude_path:
            unregister_run(os.path.join(os.path.dirname(self.sessions_root(self.env)), "sessions"),
                           run.proc.pid, run.cwd, stopped_now=True)

    def note_refused_flag(self, stderr_lines):
        """A run ended with `unknown option`: say so once, and in /health."""
        for line in stderr_lines:
            found = UNKNOWN_OPTION.search(line)
            if found and found.group(1) not in self.refused_flags:
                self.refused_flags.append(found.group(1))
                log("WARNING: the claude CLI at %s (%s) refused the option %s, which the proxy "
                    "gives it: update the proxy, or install a CLI release that has it."
                    % (self.claude_path, self._check.version or "version unknown", found.group(1)))

    def cli_report(self):
        """/health's account of the CLI: what was checked, what is in use, what fell back."""
        check = self.cli_check()
        return {"supported": check.supported(),
                "oldest_supported": ".".join(map(str, OLDEST_SUPPORTED_CLI)),
                "checked": check.checked,
                "flags_missing": check.flags_missing,
                "flags_refused": list(self.refused_flags),
                "sessions": {"folder": self.sessions_root(self.env) if self.claude_path else None,
                             "from": ("the CLI" if check.sessions_root else
                                      "the proxy's environment" if self.claude_path else None),
                             "problem": check.sessions_problem if check.checked else "not checked"},
                "features": self.features(),
                "problems": check.problems() + [
                    "the CLI refused the option %s, which the proxy gives it" % flag
                    for flag in self.refused_flags]}

    def features(self):
        """For /health: how conversations reach the CLI now, and what fell back and why."""
        check = self.cli_check()
        stamp = self.binary_stamp()
        if not self.real_turns:
            session_files = "off: --history transcript"
        elif "--resume" in check.flags_missing:
            session_files = "off: the CLI's --help does not list --resume"
        elif self._resume_failed is not None and self._resume_failed == stamp:
            session_files = ("off: the CLI did not load a session file the proxy wrote; earlier "
                             "turns go as a transcript")
        elif check.sessions_root:
            session_files = "on"
        elif not check.checked:
            session_files = ("on, in the folder the proxy's own environment gives (%s): the CLI "
                             "was not checked" % self.sessions_root(self.env))
        else:
            session_files = ("on, in the folder the proxy's own environment gives (%s); where the "
                             "CLI keeps sessions could not be told" % self.sessions_root(self.env))
        if not session_files.startswith("on"):
            deferred = session_files
        elif self._deferred_failed is not None and self._deferred_failed == stamp:
            deferred = ("off: the CLI did not run a deferred tool call the proxy resumed; such "
                        "tool results go as a transcript")
        else:
            deferred = "on"
        return {"session_files": session_files, "deferred_tool_results": deferred,
                "warm_pool": "on" if self.pool else "off: --pool-size 0",
                "kept_processes": ("on" if self.continuations else
                                   "off: --history transcript" if not self.real_turns
                                   else "off: --pool-size 0")}

    def reuse_report(self):
        """/health's account of reusing processes (ReusePool): whether it is on, else why not,
        and its counts."""
        if self.reuse:
            stamp = self.binary_stamp()
            status = "on" if self.prime_line() else (
                "off: the CLI made a model call of %s" % WARM_PRIME_TEXT
                if self._prime_failed is not None and self._prime_failed == stamp
                else "off: the CLI is older than %s, or its version is unknown"
                % ".".join(map(str, WARM_PRIME_SINCE)))
            return dict(self.reuse.stats(), status=status)
        return {"status": "off: --reuse off" if self.continuations else
                "off: --history transcript" if not self.real_turns else "off: --pool-size 0"}

    def prime_line(self):
        """What a warm process of the CLI on disk is primed with, or None (WARM_PRIME_SINCE;
        a binary that once answered the prime with a model call is not primed again)."""
        if self._prime_failed is not None and self._prime_failed == self.binary_stamp():
            return None
        release = parse_cli_version(self.version())
        if release is None or release < WARM_PRIME_SINCE:
            return None
        return cli_command_line([{"type": "text", "text": WARM_PRIME_TEXT}])

    def prime_failed(self, run):
        self._prime_failed = run.binary
        self._log_once("prime", "the claude CLI answered %s with a model call; warm processes "
                       "of this binary are no longer primed." % WARM_PRIME_TEXT)

    def spawn(self, plan, shape=None, history=None, deferred=None):
        """Start a process for a plan's shape, waiting for its message; with `history` (turns
        ending with an assistant turn), resuming a session file that holds them. Raises a
        ProxyError if it cannot start: 502 for the CLI, 503 for TMPDIR."""
        if not self.claude_path:
            raise cli_failed("The claude CLI was not found: install Claude Code, or set CLAUDE_PATH "
                             "to its full path.", "cli_not_found")
        with self._lock:
            if self._closed:
                raise overloaded(5, "The proxy is shutting down.")
        if plan.workspace and not os.path.isdir(plan.workspace.root):
            raise workspace_unavailable(plan.workspace)
        # The bridge waits this long for a tool result, then ends its run: nothing is left
        # running even if the proxy itself is killed.
        workdir, prompt_path, config_path = run_files(plan, self.timeout + self.idle_seconds,
                                                      self.folders)
        env = cli_env(self.env, plan)
        # The CLI's own temporary files (it makes a claude-<uid> folder) stay in the run's
        # folder and go with it: nothing is left in TMPDIR.
        for name in ("TMPDIR", "TEMP", "TMP"):
            env[name] = workdir
        session_id = path = model = None
        try:
            workspace = plan.workspace
            # A workspace's runs work in its folder; every other run in the proxy's empty one.
            cwd = workspace.root if workspace else self.folders.cli_folder()
            if history:
                session_id = str(uuid.uuid4())
                sessions = os.path.join(self.sessions_root(env), session_name(cwd))
                self.folders.note_sessions(os.path.dirname(sessions))
                os.makedirs(sessions, mode=0o700, exist_ok=True)
                path = os.path.join(sessions, session_id + ".jsonl")
            if workspace:  # before the session file: a killed proxy's successor finds it
                with open(os.path.join(workdir, WORKSPACE_RUN_FILE), "w", encoding="utf-8") as f:
                    json.dump({"cwd": cwd, "session": path}, f)
            if history:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                # The model the session names: the one the CLI runs, given no --model.
                model = plan.model or self.default_model or DEFAULT_SESSION_MODEL
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(session_lines(history, session_id, os.path.realpath(cwd), model,
                                          deferred, *self.context_for(model)))
            with self._lock:
                if self._closed:
                    raise overloaded(5, "The proxy is shutting down.")
                run = CliRun(self, cli_argv(self.claude_path, plan, prompt_path, config_path,
                                            session_id), env, workdir, shape, cwd,
                             workspace.timeout if workspace else None, session_file=path,
                             session_model=model)
                self._runs.add(run)
            return run
        except OSError as e:
            shutil.rmtree(workdir, ignore_errors=True)
            if path and os.path.exists(path):
                os.remove(path)
            log("cannot start the claude CLI at %s: %s" % (self.claude_path, e))
            raise start_failure(e)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            if path and os.path.exists(path):
                os.remove(path)
            raise

    def learn_context(self, model, found):
        """Keep what a resumed run's session file says of its run (session_context), for the
        session files of later runs: the environment, and per model (as the session named it,
        which the CLI runs given no --model) its name and reminder."""
        stamp = self.binary_stamp()
        with self._context_lock:
            if self._context_binary != stamp:
                self._context_binary, self._context = stamp, {}
            if "environment" in found:
                self._context["environment"] = found["environment"]
            if "model" in found:
                self._context[("model", model)] = (found["model"], found.get("total_tokens_reminder"))

    def context_for(self, model):
        """(attachments after the first turn, reminder after each later user turn) for the
        session file of a run of `model` (session_lines): none until a resumed run of this
        binary and model has shown them."""
        stamp = self.binary_stamp()
        with self._context_lock:
            if self._context_binary != stamp:
                return (), None
            environment = self._context.get("environment")
            named, reminder = self._context.get(("model", model), (None, None))
        if not environment or not named:
            return (), None
        # The CLI's own date: its local one, as it renders "Today's date is ...".
        date = {"type": "date", "date": time.strftime("%Y-%m-%d")}
        return (environment, named) + ((reminder,) if reminder else ()) + (date,), reminder

    def start(self, plan, scope=""):
        """A run for a parsed request, given its message. Never waits for the pool.

        How the conversation reaches the CLI, best first:
        1. its live process, kept after the previous reply (Continuations): the next line, or
           the tool results the CLI is waiting for; real turns, warm, and the CLI's history is
           the model's own;
        2. a new conversation (one user turn): a warm process of the same shape if the pool
           has one, else a new one;
        3. earlier turns as a session file the run resumes (`--resume`), the last user turn on
           stdin: real turns, read from the prompt cache, but a cold start;
        4. the transcript fallback (transcript_prompt): for what a session cannot say (a
           conversation that starts with the assistant, or ends with it or with tool results
           and has no live process), or when the CLI could not load the session."""
        shape = run_shape(plan)
        turns = plan.conversation["turns"]
        # Structured output (--json-schema) is kept and reused like any run (measured with CLI
        # 2.1.332: its result comes with stdin open, /clear resets it, the next conversation's
        # result is its own); with the client's tools too it is not: a call under a schema
        # comes back at once, and the run then waits on the bridge until it stops.
        live = self.continuations is not None and not (plan.json_schema and plan.tools)
        if self.continuations and len(turns) >= 3 and turns[-1]["role"] == "user":
            run = self.continuations.take(conversation_key(scope, shape, turns[:-1]))
            if run is not None and self.move(run, RUN_SERVING) and self._continue(run, turns[-1]["content"]):
                return run
            if run is not None:
                run.stop()
        real_turns = self.real_turns and turns[0]["role"] == "user" and turns[-1]["role"] == "user"
        if len(turns) == 1 and real_turns and not ends_with_tool_results(plan.conversation):
            return self._fresh(plan, shape, turns[0]["content"], live, scope)
        if real_turns and not ends_with_tool_results(plan.conversation):
            run = self._resumed(plan, shape, turns, live, scope)
            if run is not None:
                return run
        deferred = real_turns and deferrable_call(plan, turns)
        if deferred:
            run = self._resumed(plan, shape, turns, live, scope, deferred)
            if run is not None:
                return run
        return self._fresh(plan, shape, transcript_prompt(plan.conversation), live, scope)

    def _fresh(self, plan, shape, content, live, scope):
        """A new conversation: in a process this client's earlier conversation of this shape
        left (reset), else a warm one, else a new one."""
        run = self.reuse.take(scope, shape) if self.reuse and live else None
        if run is None:
            run = self.pool.take(shape, plan) if self.pool else None
        if run is None:
            run = self.spawn(plan, shape)
        self.move(run, RUN_SERVING, scope)
        self._send(run, content, live)
        return run

    def _send(self, run, content, live):
        message = cli_stdin(content)
        if self.log_prompts:
            log("prompt: %s" % message[:4000].decode("utf-8", "replace"))
        run.send(message, live)

    def _resumed(self, plan, shape, turns, live, scope, deferred=None):
        """A cold run resuming the earlier turns from a session file; None if the CLI could not
        load it (it may hang without a word: it gets RESUME_START_SECONDS). A CLI binary that
        failed once is not asked again: every continuation would pay the wait.

        deferred: the last turn is the result of this one call (deferrable_call): the session
        ends with it deferred, and the bridge gets its result; nothing goes on stdin."""
        if self._resume_failed is not None and self._resume_failed == self.binary_stamp():
            return None
        if "--resume" in self.cli_check().flags_missing:
            return None
        if deferred and self._deferred_failed is not None and self._deferred_failed == self.binary_stamp():
            return None
        run = self.spawn(plan, shape, history=turns[:-1], deferred=deferred)
        self.move(run, RUN_SERVING, scope)
        try:
            if deferred:
                [result] = turns[-1]["content"]
                run.give_results([{"content": mcp_results(result["content"]),
                                   "isError": bool(result.get("is_error"))}])
                run.begin_turn(live)
                if not live:  # the CLI exits once it has answered
                    threading.Thread(target=run._write_stdin, args=(b"",), daemon=True).start()
            else:
                self._send(run, turns[-1]["content"], live)
            first = run.first_event(RESUME_START_SECONDS)
        except BaseException:
            run.stop()  # no request holds it yet
            raise
        loaded = first is not None and not (first.get("type") == "result" and first.get("is_error"))
        if loaded and deferred:
            # The deferred call is undocumented: the CLI must run it, and print the client's
            # result as a `user` event (2.1.197 and 2.1.332 do, before their init event), before
            # it asks the model anything. If it asks without it, the client's tool result would
            # be silently lost: stop, and send a transcript.
            wanted = cli_tool_id(deferred["id"])
            ran = lambda e: e.get("type") == "user" and any(
                isinstance(b, dict) and b.get("type") == "tool_result" and b.get("tool_use_id") == wanted
                for b in ((e.get("message") or {}).get("content") or []) if isinstance(b, dict))
            try:
                seen = run.peek_until(lambda e: ran(e) or e.get("type") in ("stream_event", "assistant", "result"),
                                      RESUME_START_SECONDS)
            except BaseException:
                run.stop()
                raise
            if seen is None or not ran(seen):
                run.stop()
                self._deferred_failed = run.binary
                self._log_once(("deferred", run.binary), "WARNING: the claude CLI (%s) did not run a "
                               "tool call the proxy deferred in a session file before asking the "
                               "model; tool results now go to it as a transcript, which the prompt "
                               "cache cannot reuse. /health says so under cli.features."
                               % (self._check.version or "version unknown"))
                return None
            return run
        if loaded:
            return run
        run.stop()
        self._resume_failed = run.binary
        self._log_once(("resume", run.binary), "WARNING: the claude CLI did not load a session "
                       "file the proxy wrote in %s (%s); conversations go to it as a transcript "
                       "instead, which the prompt cache cannot reuse. If CLAUDE_PATH is a wrapper "
                       "that gives the CLI another HOME or CLAUDE_CONFIG_DIR, /health shows where "
                       "the CLI said it keeps sessions." % (
                           os.path.dirname(os.path.dirname(run.session_file or "")) or "?",
                           str((first or {}).get("errors") or "no output in %gs"
                               % RESUME_START_SECONDS)[:200]))
        return None

    def _continue(self, run, tail):
        """Hand a kept run the conversation's new last turn: tool results for exactly the
        calls it waits on, or (when it waits on none) a user message. False if it cannot take it."""
        results = [b for b in tail if b["type"] == "tool_result"]
        if run.pending_calls:
            by_id = {cli_tool_id(b["tool_use_id"]): b for b in results}
            wanted = [cli_tool_id(tool_id) for tool_id, _ in run.pending_calls]
            if len(results) != len(tail) or sorted(by_id) != sorted(wanted) or len(results) != len(wanted):
                return False
            if not all(bridgeable(b) for b in results):
                return False
            run.begin_turn(True)
            try:
                run.give_results([{"content": mcp_results(by_id[i]["content"]),
                                   "isError": bool(by_id[i].get("is_error"))} for i in wanted])
            except OSError:
                return False
            return True
        if results:
            return False
        self._send(run, tail, True)
        return True

    def finish(self, run, plan, reply, scope=""):
        """After a request: keep its run for the conversation's next turn if it can serve it
        (a live process whose reply was complete and sent as the CLI holds it), else stop it.
        reply: the run's ReplySummary; None when the reply could not be read or sent whole."""
        if reply is None:
            run.stop()
            return
        if reply.model and not plan.model and not run.session_file:
            # The CLI's default model, for the session files of later runs (DEFAULT_SESSION_MODEL):
            # only from a run that resumed none, which runs the model its session names.
            self.default_model = reply.model
        # A run that reached --max-budget-usd would refuse its next turn: not kept.
        if self.continuations is not None and run.live and reply.complete and run.alive():
            turns = plan.conversation["turns"] + [{"role": "assistant", "content": reply.blocks}]
            run.end_turn(reply)
            if self.move(run, RUN_KEPT) and self.continuations.park(conversation_key(scope, run.shape, turns), run):
                return
        run.stop()

    def move(self, run, state, scope=None):
        """The one place a run's state changes (see RUN_MOVES); False if it is stopped."""
        return run.enter(state, scope)

    def retire(self, run):
        """A kept run whose conversation is over (its wait expired, or newer ones pushed it
        out): reset and offered to the ReusePool for its client's next new conversation of its
        shape, or stopped (reuse off or not possible, or the process is due for recycling)."""
        line = self.prime_line() if self.reuse else None
        if line is None or not self.reuse.fit(run, self.reusable(run)) \
                or not self.move(run, RUN_RESETTING):
            run.stop()
            return
        run.prime(line, self.prime_failed)  # the same command as a warm process's prime
        if not (self.move(run, RUN_WARM) and self.reuse.offer(run)):
            run.stop()

    def reusable(self, run):
        """Why a kept run cannot start another conversation, or None: only a process that
        started its conversation from stdin (a resumed one writes on in a session file), waits
        on no tool call, has no per-run budget (the reset would start its count again), and
        runs the CLI binary on disk now."""
        if run.session_file:
            return "resumed"
        if run.pending_calls:
            return "tool call"
        if json.loads(run.shape)[SHAPE_FIELDS.index("max_budget_usd")]:
            return "budget"
        if not run.alive() or run.binary != self.binary_stamp():
            return "gone"
        return None

    def retire_kept(self, plan, scope):
        """Stop the process kept for this conversation's next turn under this plan's shape, if
        any: the conversation goes on in another shape (see TurnRhythm)."""
        turns = plan.conversation["turns"]
        if self.continuations is not None and len(turns) >= 3:
            run = self.continuations.take(conversation_key(scope, run_shape(plan), turns[:-1]))
            if run is not None:
                run.stop()

    def _log_once(self, what, message):
        if what not in self._logged:
            self._logged.add(what)
            log(message)

    def forget(self, run):
        with self._lock:
            self._runs.discard(run)

    def active(self):
        """How many runs are serving a request now (warm and kept processes not counted)."""
        with self._lock:
            return sum(1 for run in self._runs if run.state == RUN_SERVING)

    def processes(self):
        """How many CLI processes the proxy holds, warm ones included."""
        with self._lock:
            return len(self._runs)

    def stop_all(self):
        """At shutdown: refuse new runs, stop the pool and every running process."""
        with self._lock:
            self._closed = True
        if self.pool:
            self.pool.close()
        if self.continuations:
            self.continuations.close()
        if self.reuse:
            self.reuse.close()
        with self._lock:
            runs = list(self._runs)
        stop_runs(runs, "shutdown")
        self.folders.close()


# CLI run: reuse #############################################################################
#: Processes started ahead of their request (the warm pool, primed), kept after a reply for the
#: conversation's next turn (Continuations), and reset once it is over for the same client's
#: next new conversation (ReusePool), keyed by the process shape, and a conversation by its
#: client, shape and turns (conversation_key).


def normal_turns(turns):
    """Turns as a continuation is matched on: what clients change when they send a reply back
    (trailing whitespace, text split into parts, arguments re-serialised, thinking dropped,
    our call_ ids) is smoothed out; anything that changes meaning is kept."""
    normal = []
    for turn in turns:
        blocks = []
        for block in turn["content"]:
            kind = block["type"]
            if kind == "text":
                if block["text"].strip():
                    blocks.append(["text", block["text"].rstrip()])
            elif kind == "image":
                blocks.append(["image", hashlib.sha1(block["source"]["data"].encode()).hexdigest()])
            elif kind == "document":
                blocks.append(["document", hashlib.sha1(json.dumps(block, sort_keys=True).encode()).hexdigest()])
            elif kind == "tool_use":
                blocks.append(["tool_use", cli_tool_id(block["id"]), block["name"],
                               json.dumps(block["input"], sort_keys=True)])
            elif kind == "tool_result":
                blocks.append(["tool_result", cli_tool_id(block["tool_use_id"]),
                               normal_turns([{"role": "", "content": block["content"]}]),
                               bool(block.get("is_error"))])
        texts = [b for b in blocks if b[0] == "text"]
        if len(texts) > 1:  # "a" + "b" as two parts or one: the same words
            joined = ["text", "".join(b[1] for b in texts).rstrip()]
            blocks = [b for b in blocks if b[0] != "text"] + [joined]
        normal.append([turn["role"], blocks])
    return normal


def conversation_key(scope, shape, turns):
    """What a continuation is found by: the client's key, the process shape and the turns."""
    data = json.dumps([scope, shape, normal_turns(turns)], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(data.encode("utf-8")).hexdigest()


#: What a process must be started with, as opposed to what its message carries: requests whose
#: plans agree on these can be served by the same kind of warm process.
SHAPE_FIELDS = ("model", "effort", "system_prompt", "tools", "json_schema", "max_tokens",
                "max_budget_usd", "cache_ttl", "workspace")


def run_shape(plan):
    """The key of a plan's process shape (everything that goes into argv, files or env)."""
    return json.dumps([getattr(plan, field) for field in SHAPE_FIELDS], sort_keys=True)


def shape_plan(plan):
    """The part of a plan that a process is started with: no conversation."""
    return Plan(conversation={"system": None, "turns": []},
                **{field: getattr(plan, field) for field in SHAPE_FIELDS})


def shape_label(shape):
    """A short readable name for a shape, for /health: model/effort/hash."""
    model, effort = json.loads(shape)[:2]
    return "%s/%s/%s" % (model or "default", effort or "-",
                         hashlib.sha1(shape.encode("utf-8")).hexdigest()[:8])


#: A warm process is sent `/clear` as soon as it starts: a command the CLI runs itself, with no
#: model request, which takes it once along the path every message takes (reading the line,
#: building the system prompt and the init event). CLI 2.1.332 does that work lazily, at the
#: first message: primed, a warm process answered 30-40 ms sooner (see README, Benchmark). The
#: price: the next model request's first user message starts with three short text blocks the
#: CLI adds (a caveat that a local command ran, "<command-name>/clear</command-name>...", its
#: empty output; about 100 tokens), which a process kept for the conversation keeps sending.
#: Releases before WARM_PRIME_SINCE are not primed: 2.1.197 answers as fast without it, and its
#: caveat tells the model not to respond to the messages below it.
WARM_PRIME_TEXT = "/clear"
WARM_PRIME_SINCE = (2, 1, 332)


def prime_answered(events):
    """Whether the events a CLI printed for the prime (up to its result) show it ran the
    command itself: a result that is no error, with no model turn and no streamed reply."""
    result = events[-1] if events and events[-1].get("type") == "result" else None
    return (result is not None and not result.get("is_error") and not result.get("num_turns")
            and not any(e.get("type") == "stream_event" for e in events))


class WaitingRuns:
    """What Continuations and ReusePool share: processes waiting, each since a time, in the
    order they came; one that waits `idle_seconds` or dies is let go (let_go) by a thread of
    the holder's own, and close() stops all. A holder keeps them in `_waiting`, whose values
    end with the time the run began waiting, and says how a run is found (run_of)."""

    def __init__(self, idle_seconds, name):
        self.idle_seconds = idle_seconds
        self.retired = 0
        self._waiting = collections.OrderedDict()  # oldest first
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._retire_idle, name=name, daemon=True)
        self._thread.start()

    @staticmethod
    def run_of(key, value):
        raise NotImplementedError

    def let_go(self, runs):
        stop_runs(runs)

    def count(self):
        with self._cond:
            return len(self._waiting)

    def close(self):
        with self._cond:
            self._closed = True
            runs = [self.run_of(key, value) for key, value in self._waiting.items()]
            self._waiting.clear()
            self._cond.notify()
        self._thread.join(10)
        stop_runs(runs)

    def _retire_idle(self):
        while True:
            with self._cond:
                if self._closed:
                    return
                now = time.monotonic()
                old = [key for key, value in self._waiting.items()
                       if now - value[-1] >= self.idle_seconds or not self.run_of(key, value).alive()]
                expired = [self.run_of(key, self._waiting.pop(key)) for key in old]
                self.retired += len(expired)
                if not expired:
                    self._cond.wait(1.0)
            self.let_go(expired)


class Continuations(WaitingRuns):
    """Live CLI processes kept after a reply, each waiting for its conversation's next turn.

    When a reply ends, the next request of that conversation is known but for its last turn:
    the history so far plus this reply. Its process is kept under that history's key
    (conversation_key: the client's key, the process shape and the turns, as clients change
    them smoothed out), so the next turn starts warm and the CLI sends the API the whole
    conversation as real turns, its own earlier messages as the model wrote them: the prompt
    cache reads it all. At most `size` are kept; to make room, the oldest of the client and
    shape that holds the most goes first (so a pipeline's one-shot conversations push out each
    other, not another conversation that is going on); one waits at most `idle_seconds` (the
    API's cache lives 5 minutes: older, it buys little). A key is taken once: two requests can
    never share a process."""

    def __init__(self, size, idle_seconds, retire=None):
        self.size = size
        # What becomes of a run whose conversation is over (CliRunner.retire: reset for reuse,
        # or stopped); by default, stopped.
        self.retire = retire or CliRun.stop
        self.hits = self.kept = 0
        super().__init__(idle_seconds, "kept")  # _waiting: key -> (run, kept at)

    @staticmethod
    def run_of(key, value):
        return value[0]

    def let_go(self, runs):
        at_once(self.retire, runs)

    def park(self, key, run):
        """Keep `run` for the turn after `key`; False if closed (the caller stops it)."""
        victims = []
        with self._cond:
            if self._closed:
                return False
            if key in self._waiting:
                victims.append(self._waiting.pop(key)[0])
            while len(self._waiting) >= self.size:
                victims.append(self._waiting.pop(self._victim(run))[0])
                self.retired += 1
            self._waiting[key] = (run, time.monotonic())
            self.kept += 1
            self._cond.notify()
        for victim in victims:
            self.retire(victim)
        return True

    def _victim(self, coming):
        """The key of the kept run to push out for `coming`: the oldest of the client and shape
        with the most kept runs, `coming` counted. Call with the lock held."""
        group = lambda run: (run.scope, run.shape)
        counts = collections.Counter(group(run) for run, _ in self._waiting.values())
        counts[group(coming)] += 1
        most = max(counts[group(run)] for run, _ in self._waiting.values())
        return next(key for key, (run, _) in self._waiting.items() if counts[group(run)] == most)

    def take(self, key):
        """The run kept for this conversation, or None."""
        with self._cond:
            run, _ = self._waiting.pop(key, (None, 0))
        if run is None:
            return None
        if not run.alive() or run.binary != run.runner.binary_stamp():
            run.stop()
            return None
        self.hits += 1
        return run

    def stats(self):
        """For /health and /metrics: processes kept now, and what became of them."""
        return {"size": self.size, "idle_seconds": self.idle_seconds, "kept_now": self.count(),
                "kept": self.kept, "continued": self.hits, "retired": self.retired}


#: Measured with CLI 2.1.332 (API key, one process, a one-shot conversation after each /clear):
#: its resident memory grew from about 200 MB to 265 MB over 30 conversations, and went on
#: growing. A reused process is stopped (and a new one started when needed) after this many
#: conversations, or once its resident memory passes this many MB, whichever comes first.
DEFAULT_REUSE_CONVERSATIONS = 50
DEFAULT_REUSE_MEMORY_MB = 400


def reuse_size(max_concurrency, pool_size):
    """How many reset processes may wait at once: with the `pool_size` kept ones, as many
    processes wait between conversations as there are run slots (at least one). Each run that
    ends makes one waiting process, which the next request takes, so a pipeline needs no more;
    each holds ~200 MB (measured: 8 idle processes of 2.1.332 after a pipeline, 1.7 GB resident
    in all with 4 reset ones waiting)."""
    return max(1, max_concurrency - pool_size)


class ReuseLimits:
    """How long a process may go on serving new conversations (--reuse-conversations,
    --reuse-memory-mb) and how many reset processes may wait at once (reuse_size)."""

    __slots__ = ("conversations", "memory_mb", "size")

    def __init__(self, conversations=DEFAULT_REUSE_CONVERSATIONS, memory_mb=DEFAULT_REUSE_MEMORY_MB,
                 size=DEFAULT_MAX_CONCURRENCY):
        self.conversations, self.memory_mb, self.size = conversations, memory_mb, size


def process_memory_mb(pid):
    """A process's resident memory in MB, or None where it cannot be read (not Linux)."""
    try:
        with open("/proc/%d/status" % pid, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        return None
    return None


class ReusePool(WaitingRuns):
    """Processes whose conversation is over, reset with WARM_PRIME_TEXT (a new conversation in
    the same process, with no model request: CLI-FACTS), each waiting for the next new
    conversation of the same client (its scope: never another's) and shape. A new conversation
    started this way costs the CLI about a seventh of a new process's CPU. The CLI sends the
    model the same blocks as after a warm process's prime (README, "What the model sees").

    Bounded: at most `limits.size` wait, the oldest of the client and shape with the most
    waiting going first; one waits at most
    `idle_seconds`; a process is recycled (stopped instead of reset) after
    `limits.conversations` conversations or above `limits.memory_mb` of resident memory."""

    def __init__(self, limits, idle_seconds):
        self.limits = limits
        self.resets = self.reused = 0
        self.recycled = {"conversations": 0, "memory": 0}
        self.not_reusable = 0  # conversations over whose process could not be reset (reusable)
        super().__init__(idle_seconds, "reuse")  # _waiting: run -> (scope, shape, reset at)

    @staticmethod
    def run_of(key, value):
        return key

    def fit(self, run, why_not):
        """Whether a run whose conversation is over may be reset for another; counts why not
        (why_not: CliRunner.reusable's answer)."""
        memory = None if why_not or run.conversations >= self.limits.conversations \
            else process_memory_mb(run.proc.pid)
        with self._cond:
            if why_not:
                self.not_reusable += 1
            elif run.conversations >= self.limits.conversations:
                self.recycled["conversations"] += 1
            elif memory is not None and memory >= self.limits.memory_mb:
                self.recycled["memory"] += 1
            else:
                return True
        return False

    def offer(self, run):
        """Keep a reset run for its client's next new conversation of its shape; False if
        closed (the caller stops it)."""
        victims = []
        with self._cond:
            if self._closed:
                return False
            self.resets += 1
            self._waiting[run] = (run.scope, run.shape, time.monotonic())
            while len(self._waiting) > self.limits.size:
                victims.append(self._victim())
                self.retired += 1
            self._cond.notify()
        stop_runs(victims)
        return True

    def _victim(self):
        """Remove and return the process to push out: the oldest of the client and shape with
        the most waiting, so that one client's batch pushes out its own, not another's (as
        Continuations._victim). Call with the lock held."""
        counts = collections.Counter(entry[:2] for entry in self._waiting.values())
        most = max(counts.values())
        run = next(run for run, entry in self._waiting.items() if counts[entry[:2]] == most)
        del self._waiting[run]
        return run

    def take(self, scope, shape):
        """The most recently reset process of this client and shape, or None."""
        stale, found = [], None
        with self._cond:
            for run in reversed(list(self._waiting)):
                owner, kind, _ = self._waiting[run]
                if owner != scope or kind != shape:
                    continue
                del self._waiting[run]
                if run.alive() and run.binary == run.runner.binary_stamp():
                    found = run
                    self.reused += 1
                    break
                stale.append(run)
                self.retired += 1
        stop_runs(stale)
        return found

    def stats(self):
        """For /health and /metrics."""
        with self._cond:
            return {"waiting": len(self._waiting), "reused": self.reused, "resets": self.resets,
                    "recycled": dict(self.recycled), "retired": self.retired,
                    "not_reusable": self.not_reusable,
                    "max_conversations": self.limits.conversations,
                    "max_memory_mb": self.limits.memory_mb, "size": self.limits.size,
                    "idle_seconds": self.idle_seconds}



class WarmPool:
    """CLI processes started ahead of their requests, waiting on stdin, keyed by shape.

    The pool learns shapes from requests: after each take (a hit) or miss, a process of that
    shape is started in the background. At most `size` wait in all; to make room for a shape
    requested more than once, the one of the least recently requested other shape goes. A
    process waits at most `idle_seconds`; one that died, or whose CLI binary changed on disk
    since it started, is never handed out. A shape that failed to start is not tried again
    until the CLI binary changes (a transient 503 aside)."""

    MAX_REMEMBERED_SHAPES = 32

    def __init__(self, runner, size, idle_seconds):
        self.runner = runner
        self.size = size
        self.idle_seconds = idle_seconds
        self.hits = self.misses = self.started = self.retired = self.primed = 0
        self._idle = {}  # shape -> [CliRun], oldest first
        self._recent = collections.OrderedDict()  # shape -> shape_plan, least recently requested first
        self._seen_again = set()  # shapes requested more than once
        self._failed = collections.OrderedDict()  # shape -> binary stamp when it failed to start
        self._wanted = []  # (shape, monotonic time from which to start a process for it)
        self._working = False  # the maintenance thread is starting processes
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._maintain, name="warm-pool", daemon=True)
        self._thread.start()

    def take(self, shape, plan):
        """A waiting process of this shape, or None (a miss). Either way, one is started
        in the background for the next request of this shape."""
        stale = []
        with self._cond:
            if self._closed:
                return None
            if shape in self._recent:
                self._seen_again.add(shape)
            # Only what the process is started with is kept: no client's conversation stays here.
            self._recent[shape] = shape_plan(plan)
            self._recent.move_to_end(shape)
            while len(self._recent) > self.MAX_REMEMBERED_SHAPES:
                self._seen_again.discard(self._recent.popitem(last=False)[0])
            stamp = self.runner.binary_stamp()
            waiting, run = self._idle.get(shape, []), None
            while waiting:
                candidate = waiting.pop()
                if candidate.alive() and candidate.binary == stamp:
                    run = candidate
                    break
                stale.append(candidate)
            if run:
                self.hits += 1
            else:
                self.misses += 1
            self.retired += len(stale)
            self._wanted.append((shape, time.monotonic() + WARM_REFILL_DELAY))
            self._cond.notify()
        for candidate in stale:
            candidate.stop()
        return run

    def idle_count(self):
        with self._cond:
            return sum(len(runs) for runs in self._idle.values())

    def stats(self):
        with self._cond:
            return {"size": self.size, "idle_seconds": self.idle_seconds,
                    "idle": {shape_label(s): len(r) for s, r in self._idle.items() if r},
                    "hits": self.hits, "misses": self.misses, "started": self.started,
                    "primed": self.primed, "retired": self.retired}

    def close(self):
        with self._cond:
            self._closed = True
            runs = [run for waiting in self._idle.values() for run in waiting]
            self._idle.clear()
            self._cond.notify()
        self._thread.join(10)
        stop_runs(runs)

    def settled(self):
        """No process is waiting to be started (for tests and the benchmark to wait on)."""
        with self._cond:
            return not self._wanted and not self._working

    def _maintain(self):
        while True:
            with self._cond:
                self._working = False
                now = time.monotonic()
                if not self._closed and not any(due <= now for _, due in self._wanted):
                    self._cond.wait(min([due - now for _, due in self._wanted] + [1.0]))
                if self._closed:
                    return
                now = time.monotonic()
                wanted = list(dict.fromkeys(shape for shape, due in self._wanted if due <= now))
                self._wanted = [(shape, due) for shape, due in self._wanted if due > now]
                self._working = bool(wanted)
                expired = self._take_expired()
            stop_runs(expired)
            for shape in wanted:
                self._add(shape)

    def _take_expired(self):
        """Remove and return the waiting processes that must go: dead, too old, or from a CLI
        binary that has since changed on disk. Call with the lock held."""
        now, stamp, expired = time.monotonic(), self.runner.binary_stamp(), []
        for shape, waiting in self._idle.items():
            keep = []
            for run in waiting:
                fresh = now - run.spawned_at < self.idle_seconds
                (keep if run.alive() and run.binary == stamp and fresh else expired).append(run)
            self._idle[shape] = keep
        self.retired += len(expired)
        return expired

    def _add(self, shape):
        victim = None
        with self._cond:
            plan = self._recent.get(shape)
            if plan is None or self._closed:
                return
            if shape in self._failed and self._failed[shape] == self.runner.binary_stamp():
                return
            if sum(len(runs) for runs in self._idle.values()) >= self.size:
                # A shape seen once may be a one-off (a system prompt with a timestamp in it):
                # it takes a free place, but pushes out no other shape.
                victim = self._evict_for(shape) if shape in self._seen_again else None
                if victim is None:
                    return
        if victim:
            victim.stop()
        try:
            run = self.runner.spawn(plan, shape)
            line = self.runner.prime_line()
            if line:
                run.prime(line, self.runner.prime_failed)
        except ProxyError as error:
            log("warm pool: cannot start a process: %s" % error.message)
            if error.status != 503:
                with self._cond:
                    self._failed[shape] = self.runner.binary_stamp()
                    while len(self._failed) > self.MAX_REMEMBERED_SHAPES:
                        self._failed.popitem(last=False)
            return
        with self._cond:
            if not self._closed:
                self._idle.setdefault(shape, []).append(run)
                self.started += 1
                self.primed += 1 if line else 0
                return
        run.stop()

    def _evict_for(self, shape):
        """Remove and return the oldest waiting process of the least recently requested shape
        other than this one, or None. Call with the lock held."""
        for other in list(self._recent) + [s for s in self._idle if s not in self._recent]:
            if other != shape and self._idle.get(other):
                self.retired += 1
                return self._idle[other].pop(0)
        return None


# CLI events #################################################################################


#: The CLI's modelUsage fields -> the API's usage names.
MODEL_USAGE_FIELDS = {"inputTokens": "input_tokens", "outputTokens": "output_tokens",
                      "cacheReadInputTokens": "cache_read_input_tokens",
                      "cacheCreationInputTokens": "cache_creation_input_tokens"}


def model_usage_totals(model_usage):
    """A result's modelUsage ({model: {inputTokens, ...}}) -> usage counts summed over models,
    or None when there is none."""
    if not isinstance(model_usage, dict) or not model_usage:
        return None
    totals = dict.fromkeys(MODEL_USAGE_FIELDS.values(), 0)
    for counts in model_usage.values():
        for field, name in MODEL_USAGE_FIELDS.items():
            value = counts.get(field) if isinstance(counts, dict) else None
            if isinstance(value, int) and not isinstance(value, bool):
                totals[name] += value
    return totals


def held_back(text, stops):
    """How many characters at the end of `text` could be the start of a stop sequence."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


def call_id(tool_use_id, number):
    """A stable OpenAI tool-call id from the model's tool_use id: call_<same suffix>
    (call_<number> if the model gave none)."""
    suffix = re.sub(r"[^A-Za-z0-9_-]", "", str(tool_use_id or ""))
    if suffix.startswith("toolu_"):
        suffix = suffix[len("toolu_"):]
    return "call_" + (suffix or str(number))


@dataclasses.dataclass(frozen=True)
class ReplySummary:
    """A finished reply, as ReplyTranslator.summary() gives it to the runner."""
    complete: bool           # read whole, no error, ended as the CLI holds it: a run may be kept
    stop_reason: Optional[str]
    model: Optional[str]     # the model the CLI named
    call_names: tuple        # ((call id, client function name), ...) the client must answer
    total_cost_usd: Optional[float]   # the CLI's running totals at this reply's result
    model_usage_total: Optional[dict]
    usage: dict              # this reply's usage (a tool-call turn's adds to the next)
    blocks: list             # the reply as an assistant turn


class ReplyTranslator:
    """CLI stream-json events -> neutral reply events, plus how the reply finished.

    Pure state, no IO: feed() takes one event and returns the reply events it yields, each a
    small dict:
      {"text": s}                      a piece of the answer
      {"thinking": s}                  a piece of the model's visible thinking
      {"signature": s}                 the thinking block's signature (Anthropic clients keep it)
      {"call": n, "id", "name"}        tool call n opens (name: the client's function name)
      {"call": n, "arguments": s}      a fragment of call n's JSON arguments
      {"revised": s}                   the whole answer, when the CLI's final result says the
                                       streamed text was not all of it (see _result)
      {"activity": {"kind": "call", "tool", "target", "id"}}   workspace mode: the CLI runs one
                                       of its own tools (activity_text renders it)
      {"activity": {"kind": "refused" | "failed", "tool", "target", "id", "reason"}}   ... or
                                       refused it (a permission), or it failed (no such file)
    After `done`, look at `error`, `stop_reason` (end_turn, max_tokens, stop_sequence,
    tool_use), `stop_sequence`, `usage` (the CLI's, Anthropic-shaped), `model`, `cost_usd`.

    tools: the offered functions ({name, mcp_name}); their tool_use blocks become tool calls.
    single_tool_call: keep only the first call (parallel_tool_calls: false).
    structured: --json-schema is on; the StructuredOutput call is the answer, prose is dropped.
    live_structured: stream that call's JSON as it comes (else the checked result, at the end).
    A reply whose tool calls end the turn is done at message_stop: the CLI then waits for the
    results (see Continuations), and no result event comes.
    workspace: the run's Workspace, whose folder has the CLI's own tools (Workspace mode):
    each call and each refusal is an activity event, and the text of each model call is the
    answer's next paragraph."""

    def __init__(self, stop=(), tools=(), single_tool_call=False, structured=False,
                 live_structured=False, rate_limit=None, totals=None, workspace=None):
        self.stop = list(stop)
        # The subscriber's plan as the CLI last reported it (a rate_limit_event's info): a kept
        # process prints one only when the figures change, so the proxy's last one stands in.
        self.rate_limit = rate_limit
        self.tool_names = {MCP_PREFIX + t["mcp_name"]: t["name"] for t in tools}
        self.single_tool_call = single_tool_call
        self.structured = structured
        self.live_structured = live_structured
        self.done = False
        self.error = None
        self.stop_reason = None
        self.stop_sequence = None
        self.usage = None
        self.model = None
        self.result = None
        self.cost_usd = None
        # A kept run's result counts more than this request: total_cost_usd adds up over the
        # process's life, and usage over one message's model calls, the calls of a tool loop
        # answered earlier included. What those came to is taken off (_result); CliRun.end_turn
        # carries the totals on to the next turn.
        # totals: the run's (cost, usage, modelUsage) so far, as CliRun.totals() gives them.
        self.cost_before, self.usage_before, self.model_usage_before = totals or (0.0, {}, {})
        self.total_cost_usd = None
        self.model_usage_total = None  # modelUsage summed over models: it adds up like the cost
        self.budget_reached = False  # the run reached --max-budget-usd: it takes no more calls
        self.tool_calls = 0
        self.skipped_calls = 0  # tool_use blocks not passed on (not the client's, or over one)
        self.calls = []  # [(tool_use id, client name, input JSON text)] in order
        self.text = ""  # the answer's text as sent on, for checking against the result
        self.content = []  # the reply as neutral blocks, for the conversation's next turn
        self._pending = ""  # text held back while it may be the start of a stop sequence
        self._structured_sent = ""
        self._stream_usage = {}
        self._blocks = {}  # content block index -> ["call", n, arguments so far] | ["structured"] | ["skip"]
        self.workspace = workspace
        self.activity = []  # workspace mode: the activity events so far
        self._tool_uses = {}  # tool_use id -> (tool, target) of the CLI's own calls
        self._refused = set()  # tool_use ids whose refusal the client was told of
        self._call_start = 0  # where the current model call's text starts in self.text
        self._paragraph = False

    @property
    def call_usage(self):
        """The usage the current model call has reported so far (its input, at message_start)."""
        return dict(self._stream_usage)

    def feed(self, event):
        if self.done:
            return []
        kind = event.get("type")
        if kind == "system":
            return self._system(event)
        if kind == "stream_event":
            inner = event.get("event")
            return self._stream_event(inner if isinstance(inner, dict) else {})
        if kind == "result":
            return self._result(event)
        if kind == "rate_limit_event" and isinstance(event.get("rate_limit_info"), dict):
            self.rate_limit = event["rate_limit_info"]
        if self.workspace and kind == "assistant":
            return self._tool_calls(event.get("message") or {})
        if self.workspace and kind == "user":
            return self._tool_results(event)
        return []  # "assistant"/"user" repeat what the stream events already carried

    def _tool_calls(self, message):
        """Workspace mode: the CLI's own tool calls in an assistant event (which has each
        call's whole input, unlike the stream's fragments), as activity."""
        out = []
        for block in message.get("content") or []:
            # (StructuredOutput is the answer itself, with response_format: not an activity.)
            if isinstance(block, dict) and block.get("type") == "tool_use" \
                    and block.get("name") != STRUCTURED_OUTPUT_TOOL:
                tool, tool_id = str(block.get("name") or "?"), str(block.get("id") or "")
                target = tool_target(tool, block.get("input"), self.workspace.root)
                self._tool_uses[tool_id] = (tool, target)
                out.append({"activity": {"kind": "call", "tool": tool, "target": target, "id": tool_id}})
        self.activity += out
        return self._flush() + out if out else []

    def _tool_results(self, event):
        """Workspace mode: a tool result the CLI made of a refusal, as activity (a permission
        refusal, or an error such as a missing file; what a tool read is never shown)."""
        message = event.get("message") or {}
        out = []
        for block in message.get("content") or []:
            if isinstance(block, dict) and block.get("type") == "tool_result" and block.get("is_error"):
                content = block.get("content")
                if isinstance(content, list):
                    content = " ".join(str(c.get("text", "")) for c in content if isinstance(c, dict))
                content = str(content or "")
                kind = "refused" if content.startswith(PERMISSION_REFUSAL) else "failed"
                out += self._refusal(str(block.get("tool_use_id") or ""), None, None, content, kind)
        return out

    def _refusal(self, tool_id, tool, tool_input, reason, kind="refused"):
        if tool_id in self._refused:
            return []
        self._refused.add(tool_id)
        known = self._tool_uses.get(tool_id)
        tool = tool or (known[0] if known else "?")
        target = known[1] if known else tool_target(tool, tool_input, self.workspace.root)
        # The CLI's refusal goes on to tell the model how to work around it: its first sentence.
        reason = " ".join(reason.split()).split(". ", 1)[0].rstrip(".")[:300]
        activity = {"activity": {"kind": kind, "tool": tool, "target": target, "id": tool_id,
                                 "reason": reason}}
        self.activity.append(activity)
        return [activity]

    def _system(self, event):
        subtype = event.get("subtype")
        if subtype == "init" and isinstance(event.get("model"), str):
            self.model = event["model"]
        elif subtype == "api_retry":
            error = retry_error(event)
            if error:
                self.error, self.done = error, True
        return []

    def _stream_event(self, event):
        kind = event.get("type")
        if kind == "message_start":
            usage = (event.get("message") or {}).get("usage") or {}
            # A new model call: in a tool loop the CLI makes one per round.
            self._stream_usage = dict(usage)
            if self.workspace and self.text:
                self._paragraph = True  # the next call's words start a new paragraph
        elif kind == "message_delta":
            self._stream_usage.update(event.get("usage") or {})
            reason = (event.get("delta") or {}).get("stop_reason")
            if reason:
                self.stop_reason = reason
        elif kind == "message_stop":
            if self.tool_calls:
                # The calls are the client's to run: the reply is complete, and the CLI (which
                # now waits in the MCP bridge for their results) sends no result event. So
                # also with structured output on, and for a call cut short by max_tokens.
                self.done = True
                if self.stop_reason != "max_tokens":
                    self.stop_reason = "tool_use"
                self.usage = dict(self._stream_usage)
                return self._flush()
        elif kind == "content_block_start":
            block = event.get("content_block") or {}
            if block.get("type") == "tool_use":
                return self._tool_start(event.get("index"), block)
        elif kind == "content_block_delta":
            delta = event.get("delta") or {}
            kind = delta.get("type")
            if kind == "text_delta" and delta.get("text"):
                return [] if self.structured else self._content(delta["text"])
            if kind == "thinking_delta" and delta.get("thinking"):
                self._add_content("thinking", delta["thinking"])
                return [{"thinking": delta["thinking"]}]
            if kind == "signature_delta" and delta.get("signature"):
                self._add_content("signature", delta["signature"])
                return [{"signature": delta["signature"]}]
            if kind == "input_json_delta" and delta.get("partial_json"):
                return self._tool_input(event.get("index"), delta["partial_json"])
        elif kind == "content_block_stop":
            block = self._blocks.pop(event.get("index"), None)
            if block and block[0] == "call":
                self.calls[block[1]] = self.calls[block[1]][:2] + (block[2] or "{}",)
                if not block[2]:
                    # A call without arguments: "{}" so clients can json.loads() it.
                    return [{"call": block[1], "arguments": "{}"}]
                return []
            return self._flush()
        return []

    def _tool_start(self, index, block):
        name = block.get("name")
        if self.structured and name == STRUCTURED_OUTPUT_TOOL:
            self._blocks[index] = ["structured"]
            return []
        if name not in self.tool_names or (self.single_tool_call and self.tool_calls):
            self._blocks[index] = ["skip"]
            if not (self.workspace and name not in self.tool_names):
                self.skipped_calls += 1  # (a workspace's tools are the CLI's to run: see feed)
            return []
        number = self.tool_calls
        self.tool_calls += 1
        self._blocks[index] = ["call", number, ""]
        tool_id = str(block.get("id") or "")
        self.calls.append((tool_id, self.tool_names[name], "{}"))
        # Text held back for a stop sequence goes out before the call opens.
        return self._flush() + [{"call": number, "id": call_id(tool_id, number),
                                 "name": self.tool_names[name]}]

    def _tool_input(self, index, fragment):
        block = self._blocks.get(index)
        if not block or block[0] == "skip":
            return []
        if block[0] == "structured":
            self._structured_sent += fragment
            if self.live_structured:
                self.text += fragment
                return [{"text": fragment}]
            return []
        block[2] += fragment
        return [{"call": block[1], "arguments": fragment}]

    def _add_content(self, kind, text):
        """Keep the reply as blocks: the next turn of this conversation starts from them."""
        if kind == "signature":
            if self.content and self.content[-1]["type"] == "thinking":
                self.content[-1]["signature"] += text
            return
        if not self.content or self.content[-1]["type"] != kind:
            self.content.append({"type": kind, kind: ""} if kind == "text" else
                                {"type": "thinking", "thinking": "", "signature": ""})
        self.content[-1][kind] += text

    def _content(self, text):
        if not self.stop:
            return self._emit(text)
        self._pending += text
        cuts = [(self._pending.find(s), s) for s in self.stop if s in self._pending]
        if cuts:
            cut, stop = min(cuts)
            before = self._pending[:cut]
            self._pending = ""
            self.stop_reason, self.stop_sequence, self.done = "stop_sequence", stop, True
            self.usage = dict(self._stream_usage)
            return self._emit(before)
        keep = held_back(self._pending, self.stop)
        ready = self._pending[:len(self._pending) - keep]
        self._pending = self._pending[len(ready):]
        return self._emit(ready)

    def _emit(self, text):
        if not text:
            return []
        if self._paragraph:
            # The result event holds only the last model call's words: they start here.
            self._paragraph = False
            self._call_start = len(self.text) + 2
            text = "\n\n" + text
        self.text += text
        self._add_content("text", text)
        return [{"text": text}]

    def _flush(self):
        text, self._pending = self._pending, ""
        return self._emit(text)

    def _result(self, event):
        self.result = event
        self.done = True
        cost = event.get("total_cost_usd")
        if isinstance(cost, (int, float)) and not isinstance(cost, bool):
            self.total_cost_usd = float(cost)
            self.cost_usd = max(0.0, self.total_cost_usd - self.cost_before)
        events = self._flush()
        # The result's usage is the truth: it covers every model call of the message, and it
        # is there when the stream's was cut short (a retried call).
        usage = event.get("usage")
        if isinstance(usage, dict):
            self.usage = {k: max(0, v - self.usage_before.get(k, 0)) if isinstance(v, int) else v
                          for k, v in usage.items()}
        else:
            self.usage = dict(self._stream_usage)
        self.model_usage_total = model_usage_totals(event.get("modelUsage"))
        if self.model_usage_total and not any(self.usage.get(k) for k in MODEL_USAGE_FIELDS.values()):
            # After a dropped connection and a retry the result's usage is all zeros (seen with
            # 2.1.197); modelUsage still has what the retry used, added up over the process.
            self.usage = {k: max(0, v - self.model_usage_before.get(k, 0))
                          for k, v in self.model_usage_total.items()}
        stop_reason = event.get("stop_reason") or self.stop_reason
        self.stop_reason = stop_reason if isinstance(stop_reason, str) else None
        if self.tool_calls:
            # A reply that calls tools may also end as "error_max_turns": for the client that
            # is simply a finished reply with tool calls.
            self.stop_reason = "tool_use"
            return events
        if self.workspace:
            # Refusals the stream did not show (the CLI's list is the whole of them).
            for denial in event.get("permission_denials") or []:
                if isinstance(denial, dict):
                    events += self._refusal(str(denial.get("tool_use_id") or ""),
                                            str(denial.get("tool_name") or "?"),
                                            denial.get("tool_input"), "permission denied")
        if event.get("subtype") == "error_max_turns" and self.workspace:
            self.error = cli_failed("The model's work in the workspace took more than %d model "
                                    "calls and was stopped." % TOOL_LOOP_MAX_TURNS, "no_answer")
            return events
        if event.get("subtype") == "error_max_turns":
            # No call of the client's came back: the model used a tool it was not given, or
            # (with response_format) never produced the structured output.
            self.error = cli_failed(
                "The model's reply ended without an answer: " + (
                    "it did not produce the structured output that response_format asked for."
                    if self.structured else "it tried to use a tool that was not offered."),
                "no_structured_output" if self.structured else "no_answer")
            return events
        if event.get("subtype") == "error_max_budget_usd":
            self.budget_reached = True
            if self.text and self.stop_reason in ("end_turn", "max_tokens", "stop_sequence"):
                # The model call that crossed the cap answered in full (its cost is spent):
                # the answer goes out; the run is not kept for more. This result's usage is
                # all zeros (CLI 2.1.197): without modelUsage, the stream's counts are the call's.
                event = dict(event, subtype="success", is_error=False)
                if not any(self.usage.get(k) for k in MODEL_USAGE_FIELDS.values()):
                    self.usage = dict(self._stream_usage)
        self.error = result_error(event, self.rate_limit)
        if self.error:
            return events
        if self.stop_reason not in ("max_tokens", "stop_sequence"):
            self.stop_reason = "end_turn"
        if self.structured:
            return events + self._structured_result(event)
        return events + self._check_against_result(event.get("result"))

    def _check_against_result(self, final):
        """The CLI's result text is the whole answer. When the connection to the API dropped
        mid-reply, the CLI asked again without streaming: the stream then holds a part, and
        only the result holds it all. Send what is missing, or say the text was revised."""
        # The result holds the last model call's words (several calls: workspace mode).
        before, said = self.text[:self._call_start], self.text[self._call_start:]
        if not isinstance(final, str) or not final or final == said:
            return []
        if final.startswith(said):
            return self._emit(final[len(said):])
        final = before + final
        self.text = final
        self.content = [b for b in self.content if b["type"] != "text"] + [text_block(final)]
        return [{"revised": final}]

    def _structured_result(self, event):
        """The CLI's checked structured_output is the answer; what was streamed must match it."""
        if "structured_output" not in event:
            self.error = cli_failed("The model did not produce the structured output that "
                                    "response_format asked for.", "no_structured_output")
            return []
        value = event["structured_output"]
        if not self.live_structured or not self._structured_sent:
            return self._emit(json.dumps(value, ensure_ascii=False))
        try:
            same = json.loads(self._structured_sent) == value
        except ValueError:
            same = False
        if not same:  # the CLI had the model try again after streaming began
            return [{"revised": json.dumps(value, ensure_ascii=False)}]
        self._add_content("text", self._structured_sent)
        return []

    def summary(self):
        """How the reply ended, fixed: what the runner decides a process's next life by."""
        return ReplySummary(
            complete=self.done and not self.error and not self.budget_reached
            and self.stop_reason in ("end_turn", "max_tokens", "tool_use")
            and not (self.calls and self.stop_reason == "max_tokens")  # a call cut short
            and not self.skipped_calls,
            stop_reason=self.stop_reason, model=self.model,
            call_names=tuple((call_id(tool_id, n), name) for n, (tool_id, name, _) in enumerate(self.calls)),
            total_cost_usd=self.total_cost_usd, model_usage_total=self.model_usage_total,
            usage=dict(self.usage or {}), blocks=self.reply_blocks())

    def reply_blocks(self):
        """The reply as the assistant turn a client will send back: text and tool calls."""
        blocks = [dict(b) for b in self.content]
        for number, (tool_id, name, arguments) in enumerate(self.calls):
            try:
                value = json.loads(arguments)
            except ValueError:
                value = {}
            blocks.append({"type": "tool_use", "id": call_id(tool_id, number), "name": name,
                           "input": value if isinstance(value, dict) else {}})
        return blocks


def run_failure(run, plan):
    """Why a run that ended without a usable result failed, as a ProxyError."""
    if plan.json_schema and any("--json-schema" in line for line in run.stderr_tail):
        return invalid("The claude CLI refused the response_format schema: %s"
                       % " ".join(run.stderr_tail)[:300], "response_format.json_schema.schema",
                       "invalid_json_schema")
    if run.cancelled == "timeout":
        return timed_out(run.timeout, "CLAUDE_WORKSPACE_TIMEOUT" if plan.workspace
                         else "CLAUDE_TIMEOUT")
    if run.cancelled == "shutdown":
        return overloaded(5, "The proxy is shutting down; the run was stopped.")
    run.runner.note_refused_flag(list(run.stderr_tail))
    tail = " | ".join(list(run.stderr_tail)[-5:])
    log("claude CLI ended without a result (exit %s, %d unreadable lines); stderr: %s"
        % (run.returncode, run.garbage_lines, tail or "(empty)"))
    if run.garbage_lines:
        return cli_failed("The claude CLI printed output the proxy could not read (exit status %s)."
                          % run.returncode, "cli_bad_output")
    return cli_failed("The claude CLI exited (status %s) without a reply; the proxy's log has its "
                      "error output." % run.returncode, "cli_crashed")


# Writing a reply ############################################################################
#: A reply leaves through a sink (one per dialect and kind: stream writer or collector), which
#: writes through a ReplyChannel: the three things a sink may do to the HTTP exchange. Server-
#: sent events are the streams' framing.


class ReplyChannel:
    """The narrow writer a sink gets instead of the HTTP handler: send one whole JSON reply, or
    open a stream and write its bytes. The handler adds its own headers (request-id, CORS, the
    plan's headers) on the way out; a sink sees none of its other state."""

    def __init__(self, handler):
        self._handler = handler
        self.request_id = handler.request_id

    def send_json(self, status, obj):
        self._handler.send_json(status, obj)

    def open_stream(self):
        """200 and the event-stream headers: sent at a stream's first write, so that errors
        before any output are still real HTTP statuses."""
        handler = self._handler
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream; charset=utf-8")
        handler.send_header("Cache-Control", "no-cache")
        handler.send_header("X-Accel-Buffering", "no")
        handler.send_header("Connection", "close")
        handler.end_headers()

    def write(self, data):
        self._handler.wfile.write(data)
        self._handler.wfile.flush()


class ReplySink:
    """What a dialect's writer or collector is to Proxy.answer: it takes one reply's neutral
    events and writes them in its dialect, through its ReplyChannel. A sink implements
    event(reply event), finish(translator) and fail(ProxyError), and says whether anything was
    written (`started`); a stream writer also has `stream` (its SseStream) and keepalive(), the
    bytes that keep a silent stream alive. The proxy tells it the run's translator and the model to
    name through use() and name_model(), not by setting its fields."""

    model = None
    translator = None
    started = False

    def use(self, translator):
        """The run's translator, before its first event: a sink may read the usage from it."""
        self.translator = translator

    def name_model(self, model):
        """The model the response names: the CLI's own, when the request named none."""
        self.model = model


def sse_event(obj, event=None):
    """One SSE event: `data: <one-line JSON>\\n\\n`, with an `event:` line only when named.
    Chat Completions streams have none: older openai SDKs mangle event:, id: and retry: lines."""
    data = b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"
    return (b"event: " + event.encode("ascii") + b"\n" + data) if event else data


class SseStream:
    """The HTTP side of every stream: 200 and the event-stream headers at the first write (so
    that errors before any output are still real HTTP statuses), then events, flushed.

    Keep-alives: while nothing has been written for `keepalive` seconds (before the first
    event, while the model prefills a long prompt or thinks unseen, and in any later silence),
    a heartbeat thread writes the dialect's keep-alive, committing the 200 and its headers if
    they were not sent: reverse proxies cut idle upstreams (nginx after 60 s) and clients give
    up on a read timeout. Every write holds `lock`, so a sink that also holds it while it
    decides what to write (ChatStreamWriter) never interleaves with a heartbeat."""

    def __init__(self, channel):
        self.channel = channel
        self.started = False
        self.lock = threading.RLock()
        self.last_write = time.monotonic()
        self._beating = None  # (stop event, thread) while keep-alives are on
        self.keepalives = 0  # how many were sent (tests and the log look at it)

    def begin(self):
        if self.started:
            return
        self.started = True
        self.channel.open_stream()

    def write(self, data):
        with self.lock:
            self.begin()
            self.channel.write(data)
            self.last_write = time.monotonic()

    def keep_alive(self, seconds, keepalive):
        """Write keepalive() (bytes, made under the lock) after every `seconds` of silence,
        until stop_keep_alive(). Silence counts from now."""
        if not seconds or self._beating:
            return
        self.last_write = time.monotonic()
        stop = threading.Event()

        def beat():
            wait = seconds
            while not stop.wait(wait):
                with self.lock:
                    if stop.is_set():
                        return
                    idle = time.monotonic() - self.last_write
                    if idle >= seconds:
                        try:
                            self.write(keepalive())
                            self.keepalives += 1
                        except (OSError, ValueError):
                            return  # the client is gone: the request's own writes will say so
                        idle = 0.0
                wait = max(0.01, seconds - idle)
        self._beating = (stop, threading.Thread(target=beat, name="sse-keepalive", daemon=True))
        self._beating[1].start()

    def stop_keep_alive(self):
        """No keep-alive is written after this returns."""
        if self._beating:
            stop, thread = self._beating
            stop.set()
            with self.lock:  # a beat that is writing finishes first
                pass
            if thread is not threading.current_thread():
                thread.join()


SSE_COMMENT_KEEPALIVE = b": keep-alive\n\n"


def revised_error(structured):
    """A streamed answer the CLI's final result contradicts: what was sent cannot be unsent."""
    if structured:
        return cli_failed("The model's structured output was revised after it began streaming; "
                          "retry, or request it without streaming.", "structured_output_revised")
    return cli_failed("The answer was cut off upstream and completed differently than it began "
                      "streaming; retry, or request it without streaming.", "reply_revised")


# OpenAI Chat Completions response ###########################################################

#: The neutral stop reason -> Chat Completions' finish_reason.
CHAT_FINISH_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
                       "tool_use": "tool_calls"}


def chat_usage(usage):
    """Anthropic usage (as the CLI reports it) -> OpenAI usage. Cache reads and writes are
    prompt tokens too; reads are reported as cached_tokens, writes as cache_write_tokens."""
    usage = usage or {}
    def count(name):
        value = usage.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0
    cached = count("cache_read_input_tokens")
    prompt = count("input_tokens") + count("cache_creation_input_tokens") + cached
    completion = count("output_tokens")
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached,
                                      "cache_write_tokens": count("cache_creation_input_tokens")}}


def chat_delta(event):
    """A neutral reply event -> its Chat Completions delta, or None (signatures)."""
    if "text" in event:
        return {"content": event["text"]}
    if "thinking" in event:
        return {"reasoning_content": event["thinking"]}
    if "activity" in event:  # what chat clients show as the model's activity, apart from the answer
        return {"reasoning_content": activity_text(event["activity"])}
    if "call" in event and "id" in event:
        return {"tool_calls": [{"index": event["call"], "id": event["id"], "type": "function",
                                "function": {"name": event["name"], "arguments": ""}}]}
    if "call" in event:
        return {"tool_calls": [{"index": event["call"], "function": {"arguments": event["arguments"]}}]}
    return None


def completion_chunk(completion_id, created, model, delta, finish_reason=None, usage=False):
    """One chat.completion.chunk. `usage=False` leaves the key out; None writes null."""
    chunk = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
             "model": model,
             "choices": [{"index": 0, "delta": delta, "logprobs": None,
                          "finish_reason": finish_reason}]}
    if usage is not False:
        chunk["usage"] = usage
    return chunk


def usage_chunk(completion_id, created, model, usage):
    """The last chunk under stream_options.include_usage: no choices, just usage."""
    return {"id": completion_id, "object": "chat.completion.chunk", "created": created,
            "model": model, "choices": [], "usage": usage}


def chat_completion(completion_id, created, model, message, finish_reason, usage):
    """The non-streaming response. OpenAI's schema wants system_fingerprint a string when
    present: it is left out (there is no backend configuration to fingerprint)."""
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": usage}


def merge_delta(message, delta):
    """Fold one delta into an accumulating assistant message (the non-streaming path)."""
    for key in ("content", "reasoning_content"):
        if key in delta:
            message[key] = (message.get(key) or "") + delta[key]
    for call in delta.get("tool_calls", ()):
        calls = message.setdefault("tool_calls", [])
        if "id" in call:  # a call opens: calls arrive one after another, index == position
            calls.append({"id": call["id"], "type": "function",
                          "function": {"name": call["function"]["name"], "arguments": ""}})
        calls[call["index"]]["function"]["arguments"] += call["function"].get("arguments", "")
    return message


SSE_DONE = b"data: [DONE]\n\n"


class ChatStreamWriter(ReplySink):
    """Writes one streamed completion: the role chunk with the first delta, then chunks,
    finish, usage, [DONE]."""

    def __init__(self, channel, completion_id, created, model, include_usage, structured=False):
        self.stream = SseStream(channel)
        self.id, self.created, self.model = completion_id, created, model
        self.include_usage = include_usage
        self.structured = structured
        self.opened = False  # the role chunk went out
        self.chunk_model = None  # every chunk names the same model: the first one's

    @property
    def started(self):
        return self.stream.started

    def _chunk(self, delta, finish_reason=None):
        return completion_chunk(self.id, self.created, self.chunk_model, delta, finish_reason,
                                None if self.include_usage else False)

    def _begin(self):
        if not self.opened:
            # openai-python concatenates `role` strings: send it exactly once.
            self.opened = True
            self.chunk_model = self.model or "claude"
            self.stream.write(sse_event(self._chunk({"role": "assistant", "content": ""})))

    def keepalive(self):
        """An empty content delta (the role chunk, if none went out yet), not an SSE comment:
        comments are skipped by the openai SDKs but break clients with simpler parsers, while
        every Chat Completions client takes a delta that adds nothing."""
        if not self.opened:
            self.opened = True
            self.chunk_model = self.model or "claude"
            return sse_event(self._chunk({"role": "assistant", "content": ""}))
        return sse_event(self._chunk({"content": ""}))

    def event(self, event):
        if "revised" in event:
            raise revised_error(self.structured)
        delta = chat_delta(event)
        if delta:
            with self.stream.lock:
                self._begin()
                self.stream.write(sse_event(self._chunk(delta)))

    def finish(self, reply):
        with self.stream.lock:
            self._begin()
            usage = chat_usage(reply.usage)
            data = sse_event(self._chunk({}, CHAT_FINISH_REASONS.get(reply.stop_reason, "stop")))
            if self.include_usage:
                data += sse_event(usage_chunk(self.id, self.created, self.chunk_model, usage))
            self.stream.write(data + SSE_DONE)

    def fail(self, error):
        """After the headers went out, an error is one `data: {"error": ...}` event, then the end."""
        if not self.stream.started:
            raise error
        self.stream.write(sse_event(error.body()))


class ChatMessageCollector(ReplySink):
    """The non-streaming counterpart of ChatStreamWriter: gathers deltas into one message."""

    started = False

    def __init__(self, channel, completion_id, created, model, legacy_functions=False):
        self.channel = channel
        self.id, self.created, self.model = completion_id, created, model
        self.legacy_functions = legacy_functions
        # refusal: required (nullable) by OpenAI's schema; the CLI reports no refusals apart.
        self.message = {"role": "assistant", "content": None, "refusal": None}

    def event(self, event):
        if "revised" in event:  # not sent yet: the whole answer replaces the part
            self.message["content"] = event["revised"]
            return
        delta = chat_delta(event)
        if delta:
            merge_delta(self.message, delta)

    def finish(self, reply):
        calls = self.message.get("tool_calls")
        if self.message["content"] is None and not calls:
            self.message["content"] = ""  # content is null only beside tool calls
        if calls and self.legacy_functions:
            # A client that sent legacy `functions` reads message.function_call.
            self.message["function_call"] = dict(calls[0]["function"])
        self.channel.send_json(200, chat_completion(
            self.id, self.created, self.model, self.message,
            CHAT_FINISH_REASONS.get(reply.stop_reason, "stop"), chat_usage(reply.usage)))

    def fail(self, error):
        raise error


def chat_sink(channel, plan, completion_id, created):
    """The sink a Chat Completions request is answered into: a stream writer or a collector."""
    if plan.stream:
        return ChatStreamWriter(channel, completion_id, created, plan.model, plan.include_usage,
                                bool(plan.json_schema))
    return ChatMessageCollector(channel, completion_id, created, plan.model, plan.legacy_functions)


# OpenAI Responses response ##################################################################
#: The response object and its stream of typed events. One builder, ResponsesOutput, turns
#: neutral reply events into output items and the events that build them; the stream writer
#: sends those events, the collector keeps only the items.

RESPONSES_STATUS = {"end_turn": "completed", "stop_sequence": "completed", "tool_use": "completed",
                    "max_tokens": "incomplete"}


def responses_usage(usage):
    """Anthropic usage -> the Responses API's usage, both detail objects always present.
    Thinking tokens are not counted apart by the CLI: reasoning_tokens is 0."""
    counts = chat_usage(usage)
    return {"input_tokens": counts["prompt_tokens"],
            # Both required by OpenAI's schema (ResponseUsage).
            "input_tokens_details": dict(counts["prompt_tokens_details"]),
            "output_tokens": counts["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": counts["total_tokens"]}


def response_object(response_id, created_at, model, echo, status, output, usage=None, error=None,
                    incomplete_details=None, completed_at=None):
    """The response object: the answer, and what the request asked for, echoed."""
    text = "".join(part["text"] for item in output if item["type"] == "message"
                   for part in item["content"] if part["type"] == "output_text")
    obj = {"id": response_id, "object": "response", "created_at": created_at, "status": status,
           # When the response completed; null before, and for one that failed or was cut.
           "completed_at": completed_at if status == "completed" else None,
           "background": False, "error": error, "incomplete_details": incomplete_details,
           "model": model, "output": output, "output_text": text}
    obj.update(echo)
    # Null while unknown (response.created, .in_progress, .failed), as OpenAI's server sends it
    # and the Open Responses schema requires; OpenAI's OpenAPI document leaves it out instead.
    obj["usage"] = usage
    return obj


def new_item_id(prefix):
    return "%s_%s" % (prefix, uuid.uuid4().hex)


class ResponsesOutput:
    """Neutral reply events -> output items, and the typed stream events (type, fields) that
    build them, in the documented order: an item is added, its parts and deltas follow, and it
    is done before the next one is added. Pure: item ids come from `new_id`.

    namespaces: {offered name: (namespace, name)} for the functions of namespace tools."""

    def __init__(self, namespaces=None, new_id=new_item_id):
        self.namespaces = namespaces or {}
        self.new_id = new_id
        self.items = []  # the output items so far
        self.open = None  # the item being built, if any
        self.calls = {}  # call number -> its item
        self.positions = {}  # item id -> its output_index

    def event(self, event):
        """One reply event -> the stream events it makes."""
        if "text" in event:
            out = [] if self._is_open("message") else self.close() + self._open_message()
            self.open["content"][0]["text"] += event["text"]
            return out + [self._typed("response.output_text.delta", content_index=0,
                                      delta=event["text"], logprobs=[])]
        if "thinking" in event or "activity" in event:
            # Workspace activity, like thinking, is a reasoning item's summary: what Responses
            # clients show of the model's work before its answer (a client sends it back, or
            # not: either way it is dropped from the next request's input).
            words = event["thinking"] if "thinking" in event else activity_text(event["activity"])
            out = [] if self._is_open("reasoning") else self.close() + self._open_reasoning()
            self.open["summary"][0]["text"] += words
            return out + [self._typed("response.reasoning_summary_text.delta", summary_index=0,
                                      delta=words)]
        if "call" in event and "id" in event:
            out = self.close()
            namespace, name = self.namespaces.get(event["name"], (None, event["name"]))
            item = {"id": self.new_id("fc"), "type": "function_call", "status": "in_progress",
                    "arguments": "", "call_id": event["id"], "name": name}
            if namespace:
                item["namespace"] = namespace
            self.calls[event["call"]] = item
            return out + [self._add(item)]
        if "call" in event:
            item = self.calls[event["call"]]
            item["arguments"] += event["arguments"]
            return [self._typed("response.function_call_arguments.delta", item, delta=event["arguments"])]
        return []  # signatures: the summary is all a Responses client is given of thinking

    def revise(self, text):
        """The whole answer replaces what was gathered (not streamed: see ReplyTranslator)."""
        self.close()
        self.items = [item for item in self.items if item["type"] != "message"]
        self.positions = {item["id"]: n for n, item in enumerate(self.items)}
        self._open_message()
        self.open["content"][0]["text"] = text
        self.close()

    def close(self, status="completed"):
        """Finish the open item: its closing events, then output_item.done."""
        item, self.open = self.open, None
        if item is None:
            return []
        out = []
        if item["type"] == "message":
            part = item["content"][0]
            out += [self._typed("response.output_text.done", item, content_index=0, text=part["text"],
                                logprobs=[]),
                    self._typed("response.content_part.done", item, content_index=0, part=dict(part))]
        elif item["type"] == "reasoning":
            part = item["summary"][0]
            out += [self._typed("response.reasoning_summary_text.done", item, summary_index=0,
                                text=part["text"]),
                    self._typed("response.reasoning_summary_part.done", item, summary_index=0,
                                part=dict(part))]
        elif item["type"] == "function_call":
            item["arguments"] = item["arguments"] or "{}"
            out.append(self._typed("response.function_call_arguments.done", item,
                                   name=item["name"], arguments=item["arguments"]))
        if "status" in item:
            item["status"] = status
        return out + [("response.output_item.done", {"output_index": self.positions[item["id"]],
                                                     "item": json.loads(json.dumps(item))})]

    def _is_open(self, kind):
        return self.open is not None and self.open["type"] == kind

    def _add(self, item):
        self.positions[item["id"]] = len(self.items)
        self.items.append(item)
        self.open = item
        # A copy: the item goes on growing, the event must say what it was when added.
        return ("response.output_item.added", {"output_index": len(self.items) - 1,
                                               "item": json.loads(json.dumps(item))})

    def _open_message(self):
        item = {"id": self.new_id("msg"), "type": "message", "status": "in_progress",
                "role": "assistant", "content": []}
        added = self._add(item)
        item["content"].append({"type": "output_text", "text": "", "annotations": [], "logprobs": []})
        return [added, self._typed("response.content_part.added", content_index=0,
                                   part=dict(item["content"][0], text=""))]

    def _open_reasoning(self):
        item = {"id": self.new_id("rs"), "type": "reasoning", "summary": []}
        added = self._add(item)
        item["summary"].append({"type": "summary_text", "text": ""})
        return [added, self._typed("response.reasoning_summary_part.added", summary_index=0,
                                   part={"type": "summary_text", "text": ""})]

    def _typed(self, kind, item=None, **fields):
        item = item or self.open
        return (kind, dict({"item_id": item["id"], "output_index": self.positions[item["id"]]}, **fields))


class CompactionOutput(ResponsesOutput):
    """The output of a compaction: the model's words are the summary, gathered unseen, and the
    output is one `compaction` item, added and done when the reply is (see COMPACTION_PREFIX).
    A reply that is cut or fails gives no item: half a summary would lose the rest."""

    def __init__(self, namespaces=None, new_id=new_item_id):
        super().__init__(namespaces, new_id)
        self.summary = ""

    def event(self, event):
        self.summary += event.get("text", "")
        return []

    def revise(self, text):
        self.summary = text

    def close(self, status="completed"):
        if status != "completed" or self.items:
            return []
        return [self._add(compaction_item(self.summary.strip(), self.new_id)),
                ("response.output_item.done", {"output_index": 0, "item": dict(self.items[0])})]


def responses_outcome(reply):
    """How a finished reply ends: (status, incomplete_details)."""
    status = RESPONSES_STATUS.get(reply.stop_reason, "completed")
    return status, ({"reason": "max_output_tokens"} if status == "incomplete" else None)


def responses_error(error):
    """A ProxyError as a failed response's `error`."""
    return {"code": error.code or error.type, "message": error.message}


class ResponsesSink(ReplySink):
    """What the stream writer and the collector share: the request's id and echo, the output
    builder, and `keep`, called with the final response object before the client gets it (so a
    client that continues at once with previous_response_id finds it stored)."""

    def __init__(self, response_id, created_at, model, echo, namespaces=None, keep=None,
                 structured=False, new_id=new_item_id, clock=time.time, compacting=False):
        self.id, self.created_at, self.model, self.echo = response_id, created_at, model, echo
        self.output = (CompactionOutput if compacting else ResponsesOutput)(namespaces, new_id)
        self.keep = keep
        self.structured = structured
        self.clock = clock

    def response(self, status, usage=None, error=None, incomplete_details=None):
        return response_object(self.id, self.created_at, self.model, self.echo, status,
                               json.loads(json.dumps(self.output.items)), usage, error,
                               incomplete_details, int(self.clock()))

    def final(self, reply):
        """The finished response object (and it is kept)."""
        status, details = responses_outcome(reply)
        response = self.response(status, responses_usage(reply.usage), None, details)
        if self.keep:
            self.keep(response, reply)
        return response


class ResponsesStreamWriter(ResponsesSink):
    """Writes one streamed response: response.created and response.in_progress with the first
    event, then the builder's events, then response.completed (or .incomplete / .failed).
    Every event is `event: <type>` and `data: {"type", ..., "sequence_number"}`."""

    def __init__(self, channel, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stream = SseStream(channel)
        self.sequence = 0
        self.opened = False  # response.created went out

    def keepalive(self):
        """An SSE comment: the openai SDKs and Codex skip them; the API has no no-op event."""
        return SSE_COMMENT_KEEPALIVE

    @property
    def started(self):
        return self.stream.started

    def _send(self, events, last=False):
        data = b""
        for kind, fields in events:
            payload = dict({"type": kind}, **fields)
            payload["sequence_number"] = self.sequence
            self.sequence += 1
            data += sse_event(payload, event=kind)
        self.opened = True  # every send starts with _opening()'s events
        # The Open Responses spec ends a stream with `data: [DONE]`; every client tried stops
        # at it or skips it (README: Responses API, Streaming).
        self.stream.write(data + SSE_DONE if last else data)

    def _opening(self):
        """response.created and .in_progress, if not sent yet: the response before any output."""
        if self.opened:
            return []
        in_progress = self.response("in_progress")
        return [("response.created", {"response": in_progress}),
                ("response.in_progress", {"response": in_progress})]

    def event(self, event):
        if "revised" in event and isinstance(self.output, CompactionOutput):
            return self.output.revise(event["revised"])  # nothing of it was sent yet
        if "revised" in event:
            raise revised_error(self.structured)
        opening = self._opening()
        events = self.output.event(event)
        if events:
            self._send(opening + events)

    def finish(self, reply):
        status, _ = responses_outcome(reply)
        events = self._opening() + self.output.close(status)
        response = self.final(reply)
        self._send(events + [("response." + status, {"response": response})], last=True)

    def fail(self, error):
        """After the headers went out, an error is a response.failed event, then the end."""
        if not self.stream.started:
            raise error
        events = self._opening() + self.output.close("incomplete")
        self._send(events + [("response.failed", {"response": self.response(
            "failed", None, responses_error(error))})], last=True)


class ResponsesCollector(ResponsesSink):
    """The non-streaming counterpart: gathers the output items into one response object."""

    started = False

    def __init__(self, channel, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.channel = channel

    def event(self, event):
        if "revised" in event:
            self.output.revise(event["revised"])
        else:
            self.output.event(event)

    def finish(self, reply):
        status, _ = responses_outcome(reply)
        self.output.close(status)
        self.channel.send_json(200, self.final(reply))

    def fail(self, error):
        raise error


class CompactCollector(ResponsesCollector):
    """POST /v1/responses/compact: the compacted conversation, as OpenAI answers it: the
    input's user messages, then the one `compaction` item."""

    def __init__(self, channel, retained, *args, **kwargs):
        super().__init__(channel, *args, compacting=True, **kwargs)
        self.retained = retained

    def finish(self, reply):
        status, _ = responses_outcome(reply)
        if status != "completed":
            raise cli_failed("The summary was cut off (the model's output limit); the "
                             "conversation was not compacted.", "compaction_incomplete")
        self.output.close(status)
        self.channel.send_json(200, {"id": self.id, "object": "response.compaction",
                                     "created_at": self.created_at,
                                     "output": self.retained + self.output.items,
                                     "usage": responses_usage(reply.usage)})


def websocket_refused():
    """The Responses API's WebSocket mode (GET /v1/responses, upgraded) is not served: a 426,
    sent in HTTP/1.1, which WebSocket clients read (Codex then goes on over HTTP at once; a 405
    in the proxy's HTTP/1.0 it takes for a broken handshake, and retries 5 times)."""
    return ProxyError(426, "WebSocket mode is not supported by this proxy; POST /v1/responses "
                      "over HTTP instead (with \"stream\": true to stream).",
                      "invalid_request_error", None, "websocket_not_supported",
                      {"Upgrade": "HTTP/1.1", "Connection": "close", "x-should-retry": "false"})


# Stored responses ###########################################################################
#: store: true (OpenAI's default) keeps a response for GET /v1/responses/{id} and for
#: previous_response_id: in memory only, bounded by count, age and size, and visible only to
#: the API key that made it. The proxy's restart forgets them all.

RESPONSE_STORE_SIZE = 1000  # responses kept at most
RESPONSE_STORE_SECONDS = 3600.0  # how long one is kept
RESPONSE_STORE_BYTES = 64 * 1024 * 1024  # their conversations together, as JSON (images count)


def item_not_found(item_id, param):
    return ProxyError(404, "No stored item %r: its response was never stored (store: false), "
                      "it expired or was deleted, or it belongs to another API key. Send the "
                      "item itself instead of an item_reference." % str(item_id)[:100],
                      "invalid_request_error", param, "item_not_found", {"x-should-retry": "false"})


def response_not_found(response_id, param=None):
    return ProxyError(404, "No stored response %r: it was never stored (store: false), it "
                      "expired, or it belongs to another API key." % str(response_id)[:100],
                      "invalid_request_error", param, "response_not_found",
                      {"x-should-retry": "false"})


class ResponseStore:
    """Stored responses by id: {scope, stored_at, size, record}, oldest first. A record is
    {"response": the object GET returns, "turns": the conversation with the reply as its last
    turn, "system_parts": its input's system and developer text, "items": {id: item} of its
    output items and of the input items that had an id}. An item lives as long as its
    response, and is found by the same API key only."""

    def __init__(self, size=RESPONSE_STORE_SIZE, seconds=RESPONSE_STORE_SECONDS,
                 max_bytes=RESPONSE_STORE_BYTES, clock=time.monotonic):
        self.size, self.seconds, self.max_bytes, self.clock = size, seconds, max_bytes, clock
        self.bytes = 0
        self._entries = collections.OrderedDict()
        # (scope, item id) -> the response id that holds it (the newest, if several): one key's
        # items never shadow another's, whatever ids a client gives its input items.
        self._items = {}
        self._lock = threading.Lock()

    def put(self, scope, response_id, record):
        weight = len(json.dumps([record["turns"], record.get("items")], ensure_ascii=False))
        if weight > self.max_bytes:
            return  # larger than the whole store: kept nowhere, found by nobody
        with self._lock:
            self._entries[response_id] = (scope, self.clock(), weight, record)
            self.bytes += weight
            for item_id in record.get("items") or ():
                self._items[scope, item_id] = response_id
            self._expire()
            while len(self._entries) > self.size or self.bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))

    def item(self, scope, item_id):
        """A stored item by id, or None: unknown, expired, or another key's (indistinguishable)."""
        with self._lock:
            self._expire()
            entry = self._entries.get(self._items.get((scope, item_id)))
            if not entry or not hmac.compare_digest(entry[0], scope):
                return None
            return json.loads(json.dumps(entry[3]["items"][item_id]))  # a copy to read from

    def get(self, scope, response_id):
        """The record, or None: unknown, expired, or another key's (indistinguishable)."""
        with self._lock:
            self._expire()
            entry = self._entries.get(response_id)
            return entry[3] if entry and hmac.compare_digest(entry[0], scope) else None

    def delete(self, scope, response_id):
        with self._lock:
            self._expire()
            entry = self._entries.get(response_id)
            if not entry or not hmac.compare_digest(entry[0], scope):
                return False
            self._drop(response_id)
            return True

    def __len__(self):
        with self._lock:
            return len(self._entries)

    def _expire(self):
        cutoff = self.clock() - self.seconds
        while self._entries and next(iter(self._entries.values()))[1] <= cutoff:
            self._drop(next(iter(self._entries)))

    def _drop(self, response_id):
        scope, _, weight, record = self._entries.pop(response_id)
        self.bytes -= weight
        for item_id in record.get("items") or ():
            if self._items.get((scope, item_id)) == response_id:
                del self._items[scope, item_id]


def stored_record(plan, request, response, reply):
    """What previous_response_id continues from: the conversation with the reply as its turn."""
    turns = list(plan.conversation["turns"])
    add_turn(turns, "assistant", reply.reply_blocks())
    items = {item["id"]: item for item in request.get("input_items", ())}
    items.update((item["id"], item) for item in response["output"])
    return {"response": response, "turns": turns, "system_parts": request["system_parts"],
            "items": items}


def responses_request(store, body, scope, response_id, model, effort):
    """A POST /v1/responses body -> (plan, request, keep): previous_response_id and
    item references are looked up among this client's stored responses in `store`; keep(response,
    reply) stores the answer under response_id when the request asks to be stored."""
    previous = None
    if isinstance(body, dict) and body.get("previous_response_id") is not None:
        previous_id = body["previous_response_id"]
        _require(isinstance(previous_id, str), "`previous_response_id` must be a string",
                 "previous_response_id")
        previous = store.get(scope, previous_id)
        if previous is None:
            raise response_not_found(previous_id, "previous_response_id")
    plan, request = parse_responses_request(
        body, model, effort, previous,
        lambda item_id: store.item(scope, item_id))
    keep = None
    if request["store"]:
        def keep(response, reply):
            store.put(scope, response_id, stored_record(plan, request, response, reply))
    return plan, request, keep

def compaction_request(store, body, scope, model, effort):
    """A POST /v1/responses/compact body -> (plan, request, the user messages it retains):
    the conversation, with a compaction trigger, offered no tools and never streamed."""
    _require(isinstance(body, dict), "The request body must be a JSON object", None)
    items = body.get("input", [])
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    _require(isinstance(items, list), "`input` must be a string or an array of items", "input")
    _require(items or body.get("previous_response_id") is not None,
             "Nothing to compact: send `input`, or `previous_response_id`", "input")
    previous = None
    if body.get("previous_response_id") is not None:
        _require(isinstance(body["previous_response_id"], str),
                 "`previous_response_id` must be a string", "previous_response_id")
        previous = store.get(scope, body["previous_response_id"])
        if previous is None:
            raise response_not_found(body["previous_response_id"], "previous_response_id")
    # Only what shapes the conversation: this endpoint offers no tools and never streams.
    compacting = {name: body[name] for name in ("model", "instructions", "reasoning")
                  if name in body}
    compacting.update(input=items + [{"type": "compaction_trigger"}], store=False)
    plan, request = parse_responses_request(
        compacting, model, effort, previous,
        lambda item_id: store.item(scope, item_id))
    retained = [compacted_user_message(item) for item in items if isinstance(item, dict)
                and item.get("type", "message") == "message" and item.get("role") == "user"]
    return plan, request, retained


# Anthropic Messages response ################################################################

#: ProxyError status -> Anthropic's error type. The statuses the proxy answers are already the
#: API's; overload is 529 there (Claude Code and the SDKs retry it).
ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                         402: "billing_error", 403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                         429: "rate_limit_error", 529: "overloaded_error"}
#: Failures a retry cannot fix are 4xx here: Claude Code retries a 5xx about ten times.
ANTHROPIC_PERMANENT = {"cli_not_logged_in", "cli_not_found"}


def anthropic_error(error, request_id):
    """A ProxyError -> (status, Anthropic error body, headers): the one place this dialect's
    errors are rendered, as responses and as a stream's `error` event."""
    status = error.status
    if error.code in ANTHROPIC_PERMANENT:
        status = 403
    elif error.code == "overloaded":
        status = 529
    elif error.code == "insufficient_quota":
        status = 402  # what Claude's API answers for a spent balance: billing_error
    kind = ANTHROPIC_ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    headers = dict(error.headers)
    if status >= 500 and "x-should-retry" in headers:
        del headers["x-should-retry"]
    return status, {"type": "error", "error": {"type": kind,
                                               "message": error.api_message or error.message},
                    "request_id": request_id}, headers


def anthropic_usage(usage):
    """The CLI's usage -> the Messages API's four counts (0 where the CLI said nothing)."""
    usage = usage or {}
    return {name: usage[name] if isinstance(usage.get(name), int) and not isinstance(usage[name], bool) else 0
            for name in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",
                         "output_tokens")}


def anthropic_message(message_id, model, content, stop_reason, stop_sequence, usage):
    """The non-streaming response (and, empty, the message of a stream's message_start)."""
    return {"id": message_id, "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
            "usage": usage}


def anthropic_stop_reason(reply):
    return reply.stop_reason if reply.stop_reason in (
        "end_turn", "max_tokens", "stop_sequence", "tool_use", "refusal") else "end_turn"


class AnthropicBlocks:
    """Neutral reply events -> the Messages API's content block events (start, delta, stop),
    numbered from 0: the one builder behind both the stream writer and the collector. Events
    arrive in order: text, thinking or a call of a kind other than the open block's opens a new
    block; signatures and argument fragments belong to the open one. Thinking is shown only when
    the request asked for it, as the API does."""

    def __init__(self, show_thinking):
        self.show_thinking = show_thinking
        self.index = -1  # the newest block's; -1 before the first
        self.open = None  # the open block's kind: "text", "thinking", "call" or None

    def events(self, event):
        if "activity" in event:
            # Workspace activity: a thinking block of its own, shown whatever `thinking` says
            # (the block clients render as the model's work). Unsigned: sent back, it is
            # dropped from the next request (see cli_blocks).
            kind, block = "activity", {"type": "thinking", "thinking": "", "signature": ""}
            delta = {"type": "thinking_delta", "thinking": activity_text(event["activity"])}
            out = self.close() if self.open != kind else []
            if self.open != kind:
                self.index += 1
                self.open = kind
                out.append({"type": "content_block_start", "index": self.index, "content_block": block})
            return out + [self._delta(delta)]
        if ("thinking" in event or "signature" in event) and not self.show_thinking:
            return []
        if "signature" in event:
            return [self._delta({"type": "signature_delta", "signature": event["signature"]})] \
                if self.open == "thinking" else []
        if "arguments" in event:
            return [self._delta({"type": "input_json_delta", "partial_json": event["arguments"]})] \
                if self.open == "call" else []
        if "text" in event:
            kind, block = "text", {"type": "text", "text": ""}
            delta = {"type": "text_delta", "text": event["text"]}
        elif "thinking" in event:
            kind, block = "thinking", {"type": "thinking", "thinking": "", "signature": ""}
            delta = {"type": "thinking_delta", "thinking": event["thinking"]}
        elif "call" in event and "id" in event:
            kind, delta = "call", None
            block = {"type": "tool_use", "id": cli_tool_id(event["id"]), "name": event["name"], "input": {}}
        else:
            return []
        out = []
        if kind != self.open or kind == "call":
            out = self.close()
            self.index += 1
            self.open = kind
            out.append({"type": "content_block_start", "index": self.index, "content_block": block})
        return out + ([self._delta(delta)] if delta else [])

    def _delta(self, delta):
        return {"type": "content_block_delta", "index": self.index, "delta": delta}

    def close(self):
        """The open block's content_block_stop, if one is open."""
        if self.open is None:
            return []
        self.open = None
        return [{"type": "content_block_stop", "index": self.index}]


class AnthropicStreamWriter(ReplySink):
    """Writes one streamed message: message_start (with the input usage so far) before the first
    block, the content block events, one message_delta with the stop reason and the whole
    usage, message_stop. Every data line has its `event:` line: the SDKs dispatch on it."""

    def __init__(self, channel, message_id, model, show_thinking, structured=False):
        self.stream = SseStream(channel)
        self.channel = channel
        self.id, self.model = message_id, model
        self.blocks = AnthropicBlocks(show_thinking)
        self.structured = structured
        self.translator = None  # use() gives it: message_start reads the input usage from it
        self.opened = False  # message_start went out

    @property
    def started(self):
        return self.stream.started

    def keepalive(self):
        """The API's own keep-alive: the SDKs skip `ping` events wherever they come."""
        return sse_event({"type": "ping"}, "ping")

    def _send(self, events):
        self.stream.write(b"".join(sse_event(e, e["type"]) for e in events))

    def _begin(self):
        if not self.opened:
            self.opened = True
            usage = anthropic_usage(self.translator.call_usage if self.translator else None)
            self._send([{"type": "message_start", "message": anthropic_message(
                self.id, self.model, [], None, None, usage)}])

    def event(self, event):
        if "revised" in event:
            raise revised_error(self.structured)
        events = self.blocks.events(event)
        if events:
            self._begin()
            self._send(events)

    def finish(self, reply):
        self._begin()
        self._send(self.blocks.close() + [
            {"type": "message_delta", "delta": {"stop_reason": anthropic_stop_reason(reply),
                                                "stop_sequence": reply.stop_sequence},
             "usage": anthropic_usage(reply.usage)},
            {"type": "message_stop"}])

    def fail(self, error):
        """After message_start, an error is one `event: error`, then the end."""
        if not self.stream.started:
            raise error
        self._send([anthropic_error(error, self.channel.request_id)[1]])


class AnthropicMessageCollector(ReplySink):
    """The non-streaming counterpart: folds the same block events into one message."""

    started = False

    def __init__(self, channel, message_id, model, show_thinking):
        self.channel = channel
        self.id, self.model = message_id, model
        self.blocks = AnthropicBlocks(show_thinking)
        self.content = []
        self._arguments = {}  # tool_use block index -> its input JSON so far

    def event(self, event):
        if "revised" in event:  # not sent yet: the whole answer replaces the part
            self.content = [b for b in self.content if b["type"] != "text"] + [text_block(event["revised"])]
            return
        for block_event in self.blocks.events(event):
            if block_event["type"] == "content_block_start":
                self.content.append(dict(block_event["content_block"]))
            elif block_event["type"] == "content_block_delta":
                block, delta = self.content[block_event["index"]], block_event["delta"]
                if delta["type"] == "input_json_delta":
                    self._arguments[block_event["index"]] = (self._arguments.get(block_event["index"], "")
                                                             + delta["partial_json"])
                else:
                    field = delta["type"][:-len("_delta")]  # text, thinking, signature
                    block[field] += delta[field]

    def finish(self, reply):
        for index, arguments in self._arguments.items():
            try:
                value = json.loads(arguments)
            except ValueError:
                value = {}
            self.content[index]["input"] = value if isinstance(value, dict) else {}
        self.channel.send_json(200, anthropic_message(
            self.id, self.model, self.content, anthropic_stop_reason(reply), reply.stop_sequence,
            anthropic_usage(reply.usage)))

    def fail(self, error):
        raise error


def anthropic_model_entry(model_id, created):
    """GET /v1/models for a request carrying anthropic-version: Anthropic's model shape."""
    return {"type": "model", "id": model_id, "display_name": model_id,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))}


def anthropic_sink(channel, plan, message_id):
    """The sink a Messages API request is answered into: a stream writer or a collector."""
    if plan.stream:
        return AnthropicStreamWriter(channel, message_id, plan.model, plan.show_thinking,
                                     bool(plan.json_schema))
    return AnthropicMessageCollector(channel, message_id, plan.model, plan.show_thinking)


# Access, limits and metrics #################################################################


def is_loopback_host(host):
    """Whether a bind address or Host name is on this machine only."""
    host = (host or "").strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_header_name(value):
    """The name part of a Host header (without its port or IPv6 brackets), or None when it is
    not a host and an optional port: `[::1]evil.com` and `127.0.0.1:80@evil.com` are not."""
    match = HOST_HEADER.match((value or "").strip())
    if not match or int(match.group("port") or 0) > 65535:
        return None
    return match.group("ip6") or match.group("name")


def origin_allowed(origin, allowed):
    """Whether a browser Origin may use the proxy (CLAUDE_PROXY_CORS_ORIGINS, or `*`)."""
    return "*" in allowed or origin.rstrip("/") in allowed


def header_text(value):
    """A header value as the client wrote it: the stdlib reads header bytes as Latin-1, so a
    UTF-8 value (a non-ASCII API key) is read back as UTF-8 when it is that."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value


def is_own_origin(origin, host):
    """Whether a browser Origin is the proxy's own: http, the Host the request came to, and its
    port (80 when neither says). Browsers send Origin on same-origin POSTs too: the built-in
    page calling its API."""
    origin, host = (origin or "").strip().lower().rstrip("/"), (host or "").strip().lower()
    if not origin.startswith("http://") or not host:
        return False

    def with_port(authority):
        return authority if re.search(r":[0-9]+$", authority) else authority + ":80"
    return with_port(origin[len("http://"):]) == with_port(host)


def presented_key(headers):
    """The API key a request presents: `Authorization: Bearer <key>` (scheme in any case) or
    `x-api-key: <key>`; None when neither."""
    authorization = header_text(headers.get("Authorization") or "")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return header_text(headers.get("x-api-key") or "").strip() or None


def allowed_request_headers(requested):
    """What a CORS preflight may echo of Access-Control-Request-Headers: the header names only.
    A folded line or anything else that is not a name is left out (never sent back raw)."""
    first_line = re.split(r"[\r\n]", (requested or "").strip(), 1)[0].strip()
    if HEADER_NAME_LIST.match(first_line):
        return first_line
    names = [name.strip() for name in first_line.split(",") if HEADER_NAME.match(name.strip())]
    return ", ".join(names) or None


def key_matches(key, keys):
    """Constant-time comparison against every configured key (no early exit to time)."""
    if not key:
        return False
    matched = False
    for candidate in keys:
        matched |= hmac.compare_digest(key.encode("utf-8"), candidate.encode("utf-8"))
    return matched


def is_json_content_type(value):
    """`application/json`, parameters allowed. Anything else could be a browser's "simple"
    cross-site request (text/plain, forms), which needs no CORS preflight."""
    return (value or "").split(";", 1)[0].strip().lower() == "application/json"


def access_origin(config, headers):
    """Host and Origin, before anything else is looked at: raises the refusal, or returns the
    origin to answer CORS for (None when the request is not an allowed page's).

    A web page the user visits can reach a loopback server: through DNS rebinding (its own
    name resolving to 127.0.0.1: a foreign Host), or with a cross-site request (a foreign
    Origin). Neither may run anything."""
    cors_origin = None
    hosts = headers.get_all("Host") or []
    if len(hosts) > 1 or (hosts and host_header_name(hosts[0]) is None):
        raise invalid("The Host header must be one host name or [IPv6 address], with an "
                      "optional port; got %r." % ", ".join(hosts)[:100], None, "invalid_host")
    if config.loopback_only and hosts and not is_loopback_host(host_header_name(hosts[0])):
        raise forbidden("Host %r is not this machine; the proxy is bound to loopback and "
                        "answers only localhost, 127.0.0.1 or [::1]." % hosts[0][:100],
                        "host_not_allowed")
    origin = headers.get("Origin")
    if origin is not None:
        if origin_allowed(origin, config.cors_origins):
            cors_origin = "*" if "*" in config.cors_origins else origin
        # Its own origin, where the Host check or a key guards it: with neither (--no-auth
        # beyond loopback) a DNS-rebound page would pass as the proxy's own.
        elif not (is_own_origin(origin, headers.get("Host"))
                  and (config.loopback_only or config.api_keys)):
            raise forbidden("Origin %r may not use this proxy; allow it with "
                            "CLAUDE_PROXY_CORS_ORIGINS." % origin[:100], "origin_not_allowed")
    return cors_origin


def require_key(config, headers, public, command):
    """The API key, after the Host and Origin (a refusal still carries CORS headers, so a page
    can read it). public: the route needs no key (/health, the page)."""
    if config.api_keys and not public and command != "OPTIONS" and not is_key_holder(config, headers):
        raise ProxyError(401, "A valid API key is required: Authorization: Bearer <key> "
                         "or x-api-key (CLAUDE_PROXY_API_KEY).", "invalid_request_error",
                         None, "invalid_api_key",
                         {"WWW-Authenticate": "Bearer", "x-should-retry": "false"})


def is_key_holder(config, headers):
    """Whether a request may see what is for key holders: no key is set, or it has a valid one."""
    return not config.api_keys or key_matches(presented_key(headers), config.api_keys)


def preflight_headers(allowed, cors_origin, requested):
    """OPTIONS: the CORS preflight's headers when the Origin is allowed, a plain Allow otherwise."""
    allowed = allowed + (("HEAD",) if "GET" in allowed else ()) + ("OPTIONS",)
    headers = {"Allow": ", ".join(allowed)}
    if cors_origin:
        # Echo the names the page asks for: `*` never covers Authorization, and the browser
        # openai SDK adds X-Stainless-* headers.
        headers.update({"Access-Control-Allow-Methods": ", ".join(allowed),
                        "Access-Control-Allow-Headers": allowed_request_headers(requested)
                        or "Authorization, Content-Type",
                        "Access-Control-Max-Age": "600"})
    return headers


class Admission:
    """At most `concurrency` CLI runs at once and `queue` requests waiting for one; past that,
    429 at once. A waiter leaves when its client hangs up, the deadline passes, or the proxy
    shuts down. Waiters are served first come, first served."""

    def __init__(self, concurrency, queue):
        self.concurrency = concurrency
        self.queue = queue
        self.running = 0
        self.waiting = 0
        self._cond = threading.Condition()
        self._closed = False

    def acquire(self, deadline, abandoned):
        """Take a slot; `abandoned` is a threading.Event set when the client hangs up."""
        with self._cond:
            if self._closed:
                raise overloaded(5, "The proxy is shutting down.")
            if self.running < self.concurrency:
                self.running += 1
                return
            if self.waiting >= self.queue:
                raise proxy_busy("The proxy is busy: %d requests are running and %d waiting "
                                 "(CLAUDE_MAX_CONCURRENCY, CLAUDE_MAX_QUEUE); retry shortly."
                                 % (self.running, self.waiting))
            self.waiting += 1
            try:
                while self.running >= self.concurrency:
                    if self._closed:
                        raise overloaded(5, "The proxy is shutting down.")
                    if abandoned.is_set():
                        raise ClientGone()
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise proxy_busy("The proxy stayed busy for the whole wait (CLAUDE_TIMEOUT); "
                                         "retry shortly.")
                    self._cond.wait(remaining)
                self.running += 1
            finally:
                self.waiting -= 1

    def release(self):
        with self._cond:
            self.running -= 1
            self._cond.notify()

    def wake(self):
        """Let waiters look again (a client left, or the proxy is closing)."""
        with self._cond:
            self._cond.notify_all()

    def close(self):
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class Summary:
    """Count, sum and quantiles over the most recent observations, for Prometheus."""

    def __init__(self, window=1000):
        self.count, self.total = 0, 0.0
        self.recent = collections.deque(maxlen=window)

    def observe(self, value):
        self.count += 1
        self.total += value
        self.recent.append(value)

    def quantile(self, q):
        ordered = sorted(self.recent)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class Metrics:
    """What /metrics reports. Every update takes the one lock; reads render a snapshot."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = collections.Counter()  # (endpoint, status) -> count
        self.errors = collections.Counter()  # error code -> count
        self.tokens = collections.Counter()  # prompt / completion -> count
        self.cli_runs = 0
        self.in_flight = 0
        self.ttft = Summary()
        self.duration = Summary()

    def started(self):
        with self._lock:
            self.in_flight += 1

    def finished(self, endpoint, status, seconds, error_code=None, usage=None):
        with self._lock:
            self.in_flight -= 1
            self.requests[(endpoint, str(status))] += 1
            if error_code:
                self.errors[error_code] += 1
            if endpoint in ("chat_completions", "create_response") and status == 200:
                self.duration.observe(seconds)
            for kind in ("prompt", "completion"):
                self.tokens[kind] += (usage or {}).get(kind + "_tokens", 0)

    def first_token(self, seconds):
        with self._lock:
            self.ttft.observe(seconds)

    def cli_run(self):
        with self._lock:
            self.cli_runs += 1

    def render(self, admission, runner):
        """The Prometheus text exposition (format 0.0.4)."""
        lines = []

        def metric(name, kind, help_text, samples):
            lines.append("# HELP claude_proxy_%s %s" % (name, help_text))
            lines.append("# TYPE claude_proxy_%s %s" % (name, kind))
            for labels, value in samples:
                label_text = ",".join('%s="%s"' % (k, str(v).replace("\\", "\\\\").replace('"', '\\"'))
                                      for k, v in labels)
                lines.append("claude_proxy_%s%s %s" % (name, "{%s}" % label_text if label_text else "",
                                                       repr(float(value)) if isinstance(value, float) else value))

        def summary(name, help_text, data):
            metric(name, "summary", help_text,
                   [((("quantile", q),), data.quantile(q)) for q in (0.5, 0.9, 0.99)])
            lines.append("claude_proxy_%s_sum %r" % (name, data.total))
            lines.append("claude_proxy_%s_count %d" % (name, data.count))

        with self._lock:
            metric("requests_total", "counter", "HTTP requests answered, by endpoint and status.",
                   [((("endpoint", e), ("status", st)), n) for (e, st), n in sorted(self.requests.items())])
            metric("requests_in_flight", "gauge", "HTTP requests being answered now.", [((), self.in_flight)])
            metric("requests_queued", "gauge", "Requests waiting for a CLI run slot.", [((), admission.waiting)])
            metric("cli_runs_total", "counter", "CLI runs that served a request.", [((), self.cli_runs)])
            metric("cli_runs_active", "gauge", "CLI runs serving a request now.", [((), runner.active())])
            metric("errors_total", "counter", "Error answers, by OpenAI error code.",
                   [((("code", c),), n) for c, n in sorted(self.errors.items())])
            metric("tokens_total", "counter", "Tokens reported by the CLI, by kind.",
                   [((("kind", k),), self.tokens[k]) for k in ("prompt", "completion")])
            summary("time_to_first_token_seconds", "From request to the first token (recent requests).",
                    self.ttft)
            summary("request_duration_seconds", "Whole successful chat completions and responses "
                    "(recent requests).",
                    self.duration)
        kept = runner.continuations.stats() if runner.continuations else None
        if kept:
            metric("conversations_kept", "gauge", "CLI processes kept for a conversation's next turn.",
                   [((), kept["kept_now"])])
            metric("conversations_continued_total", "counter",
                   "Requests served by their conversation's kept process.", [((), kept["continued"])])
        reuse = runner.reuse.stats() if runner.reuse else None
        if reuse:
            metric("reuse_waiting", "gauge", "CLI processes reset and waiting for a new conversation.",
                   [((), reuse["waiting"])])
            metric("reuse_conversations_total", "counter",
                   "New conversations served by a process an earlier one left (reset).",
                   [((), reuse["reused"])])
            metric("reuse_resets_total", "counter", "Processes reset for another conversation.",
                   [((), reuse["resets"])])
            metric("reuse_recycled_total", "counter", "Processes stopped instead of reset, by why.",
                   [((("reason", r),), n) for r, n in sorted(reuse["recycled"].items())])
        pool = runner.pool.stats() if runner.pool else None
        if pool:
            metric("pool_idle", "gauge", "Warm CLI processes waiting.", [((), sum(pool["idle"].values()))])
            for name in ("hits", "misses", "started", "retired"):
                metric("pool_%s_total" % name, "counter", "Warm pool %s." % name, [((), pool[name])])
        return "\n".join(lines) + "\n"


# Model aliases ##############################################################################
#: Clients that hard-code OpenAI model names (gpt-4o, gpt-4o-mini) are served by the Claude
#: model an alias names (CLAUDE_MODEL_ALIASES); the response says the name the client asked for.


def parse_model_aliases(text):
    """`gpt-4o=sonnet,gpt-4o-mini=haiku` -> {"gpt-4o": "sonnet", ...}; ValueError names the
    bad entry. Both sides are model names as argv takes them."""
    aliases = {}
    for entry in (text or "").split(","):
        if not entry.strip():
            continue
        alias, sep, target = (part.strip() for part in entry.partition("="))
        if not sep or not MODEL_NAME.match(alias) or not MODEL_NAME.match(target):
            raise ValueError("%r is not alias=model (e.g. gpt-4o=sonnet)" % entry.strip()[:100])
        aliases[alias] = target
    return aliases


def listed_models(config):
    """What GET /v1/models lists: the configured models, then the aliases."""
    return list(config.models) + [alias for alias in config.model_aliases if alias not in config.models]


def unknown_model(model, config, detail=""):
    """A 404 for a model Claude's API does not know, naming what is available and the option
    that maps another name onto one of them."""
    return ProxyError(
        404, "The model %r does not exist or is not available to the claude CLI's account%s. "
        "Available: %s. To serve another name, map it with CLAUDE_MODEL_ALIASES (or "
        "--model-alias), e.g. %s=sonnet." % (
            model, " (%s)" % detail[:200] if detail else "", ", ".join(listed_models(config)),
            model if model and MODEL_NAME.match(model) else "gpt-4o"),
        "invalid_request_error", "model", "model_not_found", {"x-should-retry": "false"})


def model_entry(model_id, created):
    return {"id": model_id, "object": "model", "created": created, "owned_by": "anthropic"}


def model_listing(config, dialect):
    """GET /v1/models: the configured models and the aliases, in the dialect's shape."""
    if dialect == "anthropic":
        data = [anthropic_model_entry(m, config.started) for m in listed_models(config)]
        return {"data": data, "has_more": False, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None}
    return {"object": "list", "data": [model_entry(m, config.started) for m in listed_models(config)]}


def model_lookup(config, model_id, dialect):
    """GET /v1/models/{id}: its entry, or 404. Any Claude model name the CLI would take is
    "there": clients that verify their configured model with this call must not be turned
    away for a valid full name."""
    if model_id not in listed_models(config) and not (model_id.startswith("claude-")
                                                      and MODEL_NAME.match(model_id)):
        raise ProxyError(404, "The model %r does not exist; GET /v1/models lists them." % model_id,
                         "invalid_request_error", "model", "model_not_found")
    return (anthropic_model_entry if dialect == "anthropic" else model_entry)(model_id, config.started)


# Spend and budgets ##########################################################################
#: The CLI's result carries total_cost_usd: what its run would cost at API prices, from the
#: CLI's own price table (the translator keeps this request's share). Spend adds it up by model
#: and by day, with the tokens by kind, for /metrics, /health, the access log and the daily
#: budget (CLAUDE_PROXY_DAILY_BUDGET_USD). Today's spend is kept in a small state file, so a
#: restart does not reset the budget.

SPEND_FILE = "spend.json"
TOKEN_KINDS = (("input", "input_tokens"), ("output", "output_tokens"),
               ("cache_read", "cache_read_input_tokens"), ("cache_write", "cache_creation_input_tokens"))


def state_dir(env=None, platform=None):
    """Where the proxy keeps its state: CLAUDE_PROXY_STATE_DIR, else the platform's per-user
    state folder: $XDG_STATE_HOME or ~/.local/state (Linux and others), ~/Library/Application
    Support (macOS), %LOCALAPPDATA% (Windows); claude-proxy/ inside it."""
    env = os.environ if env is None else env
    platform = platform or sys.platform
    if env.get("CLAUDE_PROXY_STATE_DIR"):
        return env["CLAUDE_PROXY_STATE_DIR"]
    home = env.get("USERPROFILE" if platform == "win32" else "HOME") or os.path.expanduser("~")
    if platform == "win32":
        base = env.get("LOCALAPPDATA") or os.path.join(home, "AppData", "Local")
    elif platform == "darwin":
        base = os.path.join(home, "Library", "Application Support")
    else:
        base = env.get("XDG_STATE_HOME") or os.path.join(home, ".local", "state")
    return os.path.join(base, "claude-proxy")


def next_midnight(now):
    """The epoch time of the local midnight after `now` (DST changes included)."""
    t = time.localtime(now)
    return time.mktime((t.tm_year, t.tm_mon, t.tm_mday + 1, 0, 0, 0, 0, 0, -1))


def budget_exceeded(spent, budget, retry_after):
    # x-should-retry: false, or the SDKs retry at once (a Retry-After of hours is past what
    # they wait for, so they use their own short backoff instead).
    return ProxyError(429, "The proxy's daily budget of $%g is used up ($%.4f spent since "
                      "local midnight; CLAUDE_PROXY_DAILY_BUDGET_USD). New requests are refused "
                      "until midnight, in %d s." % (budget, spent, retry_after),
                      "rate_limit_error", None, "budget_exceeded",
                      {"Retry-After": str(retry_after), "x-should-retry": "false"})


class Spend:
    """What the CLI runs cost: since the proxy started by model and token kind (for /metrics),
    and since local midnight (for the budget and /health).

    folder: where today's spend is kept (None: memory only); clock: time.time (tests pass
    their own). The file is written whole and replaced, mode 0600. One that cannot be read or
    written is a warning in the log, never an error: the spend then counts from zero."""

    def __init__(self, daily_budget=None, folder=None, clock=time.time):
        self.daily_budget = daily_budget or None
        self.folder = folder
        self.path = os.path.join(folder, SPEND_FILE) if folder else None
        self.clock = clock
        self.cost_by_model = collections.Counter()  # since start
        self.tokens = collections.Counter()  # kind -> tokens since start
        self.runs_costed = 0
        self._lock = threading.Lock()
        self._day = self._today()
        self._today_usd = 0.0
        self._write_failed = False
        self._load()

    def _today(self):
        return time.strftime("%Y-%m-%d", time.localtime(self.clock()))

    def _roll(self):
        """At local midnight today's spend starts again (called under the lock)."""
        day = self._today()
        if day != self._day:
            self._day, self._today_usd = day, 0.0

    def _load(self):
        if not self.path:
            return
        try:
            with open(self.path, encoding="utf-8") as f:
                state = json.load(f)
            spent = state["spent_usd"]
            if not isinstance(spent, (int, float)) or isinstance(spent, bool) or not 0 <= spent < 1e9:
                raise ValueError("spent_usd is %r" % (spent,))
            if state.get("date") == self._day:
                self._today_usd = float(spent)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log("WARNING: the spend state file %s cannot be read (%s); today's spend counts "
                "from zero." % (self.path, printable(str(e))))

    def _save(self):
        """Write today's spend (called under the lock). A failure is logged once, until a
        write succeeds again."""
        if not self.path:
            return
        data = json.dumps({"date": self._day, "spent_usd": self._today_usd}).encode("utf-8")
        temporary = self.path + ".tmp"
        try:
            os.makedirs(self.folder, mode=0o700, exist_ok=True)
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(temporary, self.path)
            self._write_failed = False
        except OSError as e:
            if not self._write_failed:
                log("WARNING: cannot write the spend state file %s (%s); a restart will count "
                    "today's spend from zero." % (self.path, e.strerror or e))
            self._write_failed = True

    def record(self, model, cost_usd, usage):
        """One request's share of a run: its cost (None when the CLI reported none) and usage."""
        with self._lock:
            for kind, field in TOKEN_KINDS:
                value = (usage or {}).get(field)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    self.tokens[kind] += value
            if cost_usd is None:
                return
            self.runs_costed += 1
            if cost_usd:  # a model the API refused costs 0: a client's made-up name is no label
                self.cost_by_model[model or "unknown"] += cost_usd
            self._roll()
            self._today_usd += cost_usd
            if cost_usd:
                self._save()

    def check(self):
        """Before a request starts a run: 429 budget_exceeded once today's spend reached the
        daily budget, with Retry-After until local midnight."""
        if not self.daily_budget:
            return
        with self._lock:
            self._roll()
            spent = self._today_usd
        if spent >= self.daily_budget:
            now = self.clock()
            raise budget_exceeded(spent, self.daily_budget, max(1, int(-(-(next_midnight(now) - now) // 1))))

    def today(self):
        with self._lock:
            self._roll()
            return self._today_usd

    def summary(self):
        """The `spend` object of /health."""
        spent = self.today()
        now = self.clock()
        return {"today_usd": round(spent, 6),
                "daily_budget_usd": self.daily_budget,
                "remaining_usd": (round(max(0.0, self.daily_budget - spent), 6)
                                  if self.daily_budget else None),
                "resets_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(next_midnight(now))),
                "since_start_usd": round(sum(self.cost_by_model.values()), 6)}

    def render(self):
        """The spend's Prometheus metrics (appended to Metrics.render's)."""
        def label(value):
            return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        with self._lock:
            self._roll()
            lines = ["# HELP claude_proxy_cost_usd_total What the CLI runs cost at API prices "
                     "(the CLI's total_cost_usd), by model, since the proxy started.",
                     "# TYPE claude_proxy_cost_usd_total counter"]
            lines += ['claude_proxy_cost_usd_total{model="%s"} %r' % (label(m), c)
                      for m, c in sorted(self.cost_by_model.items())]
            lines += ["# HELP claude_proxy_tokens_by_kind_total Tokens the CLI reported, by kind "
                      "(cache_write: cache creation), since the proxy started.",
                      "# TYPE claude_proxy_tokens_by_kind_total counter"]
            lines += ['claude_proxy_tokens_by_kind_total{kind="%s"} %d' % (kind, self.tokens[kind])
                      for kind, _ in TOKEN_KINDS]
            lines += ["# HELP claude_proxy_spend_today_usd Spent since local midnight (the daily "
                      "budget's count).", "# TYPE claude_proxy_spend_today_usd gauge",
                      "claude_proxy_spend_today_usd %r" % self._today_usd]
            if self.daily_budget:
                lines += ["# HELP claude_proxy_daily_budget_usd CLAUDE_PROXY_DAILY_BUDGET_USD.",
                          "# TYPE claude_proxy_daily_budget_usd gauge",
                          "claude_proxy_daily_budget_usd %r" % float(self.daily_budget)]
        return "\n".join(lines) + "\n"


# Your plan's limits #########################################################################
#: A subscriber's CLI (logged in with a Pro or Max plan, not an API key) prints a
#: rate_limit_event in its runs: each window's use (five_hour, seven_day, ...) and when it
#: resets. PlanLimits keeps the last of them for /health, /metrics, the chat page and the
#: Anthropic dialect's headers; and once a window is used up (the CLI's result: a 429 naming the
#: limit) or the plan's usage credits are spent, it refuses new requests from that record,
#: without a run, but for one probe run a minute, until a run succeeds again. TurnRhythm picks
#: the prompt cache's lifetime for a subscriber's conversations (--cache-ttl auto).

#: The unified rate-limit headers' names for the windows that have them (anthropic-ratelimit-
#: unified-5h-utilization, ...): the ones Claude's API sends a subscriber's client.
UNIFIED_WINDOW_HEADERS = {"five_hour": "5h", "seven_day": "7d"}
#: rate_limit_info fields that PlanLimits reads; any others are kept as they came, under "other".
RATE_LIMIT_INFO_FIELDS = ("status", "resetsAt", "rateLimitType", "utilization", "unifiedWindows",
                          "overageStatus", "isUsingOverage", "overageDisabledReason",
                          "overageResetsAt")


def plan_windows(info):
    """A rate_limit_event's info -> {window: {"utilization", "resets_at", "status", ...}}, in the
    CLI's own window names; the fields a window has beyond those are kept as they came.

    The info's `status` is its representative window's (rateLimitType); another window's status
    is read off its use: rejected at 100 %, allowed_warning from 80 %."""
    windows = {}
    named = info.get("unifiedWindows") if isinstance(info.get("unifiedWindows"), dict) else {}
    representative = info.get("rateLimitType") if isinstance(info.get("rateLimitType"), str) else None
    if representative and not isinstance(named.get(representative), dict):
        named = dict(named, **{representative: {"utilization": info.get("utilization"),
                                                "resetsAt": info.get("resetsAt")}})
    for name, window in named.items():
        if not isinstance(window, dict) or not isinstance(name, str):
            continue
        used = window.get("utilization")
        used = used if _is_number(used) else None
        status = window.get("status")
        if not isinstance(status, str):
            if name == representative and isinstance(info.get("status"), str):
                status = info["status"]
            elif used is not None:
                status = ("rejected" if used >= 1 else "allowed_warning" if used >= PLAN_WARN_LEVELS[0]
                          else "allowed")
        entry = {"utilization": used,
                 "resets_at": iso_utc(window["resetsAt"]) if _is_number(window.get("resetsAt")) else None,
                 "status": status}
        entry.update((k, v) for k, v in window.items() if k not in ("utilization", "resetsAt", "status"))
        windows[name] = entry
    return windows


def plan_overage(info):
    """The overage (extra usage) part of a rate_limit_event's info, or None when it has none."""
    fields = {"status": info.get("overageStatus"), "in_use": info.get("isUsingOverage"),
              "disabled_reason": info.get("overageDisabledReason"),
              "resets_at": iso_utc(info["overageResetsAt"]) if _is_number(info.get("overageResetsAt")) else None}
    fields = {k: v for k, v in fields.items() if v is not None}
    return fields or None


class PlanLimits:
    """The subscriber's plan as the CLI last reported it, and whether it is refusing requests.

    observe() takes each rate_limit_event's info, from every kind of run; after_run() learns
    from each finished run's result: a reached limit or spent credits start refusing, a success
    ends it. admit() is asked before a request's run: while refusing, it raises the refusal
    (429 with Retry-After to the reset) at once, but lets one run through every probe_seconds,
    or as soon as the window's reset time has passed. clock: time.time (tests pass their own)."""

    def __init__(self, clock=time.time, probe_seconds=PLAN_PROBE_SECONDS):
        self.clock = clock
        self.probe_seconds = probe_seconds
        self.refused = 0  # requests answered from the record, without a run
        self.probes = 0  # runs let through while refusing
        self._lock = threading.Lock()
        self._info = None  # the last rate_limit_event's info, as the CLI printed it
        self._windows = {}
        self._overage = None
        self._other = {}
        self._updated_at = None
        self._refusal = None  # {"kind": "limit"|"credits", "window", "resets_at", "detail", "since"}
        self._last_try = 0.0  # when the last run was let through (or ended) while refusing
        self._limits_seen = 0  # refusals begun so far: a ticket from admit() names the count
        self._login = None  # the CLI's apiKeySource, from its init events
        self._warned = {}  # window -> the highest PLAN_WARN_LEVELS mark logged

    def last_info(self):
        with self._lock:
            return self._info

    def observe_login(self, api_key_source):
        """The init event's apiKeySource: "none" when the CLI is logged in with an account (a
        subscriber's OAuth login), else where its API key comes from."""
        if isinstance(api_key_source, str):
            with self._lock:
                self._login = api_key_source

    def subscriber(self):
        """Whether the CLI is logged in as a subscriber, as far as its runs have told: True,
        False (an API key's login), or None while no run or check has said."""
        with self._lock:
            if self._updated_at is not None or self._login == "none":
                return True
            return None if self._login is None else False

    def observe(self, info):
        """A rate_limit_event's rate_limit_info: the record now says what it says. A field of
        the wrong type is left out; none is fatal (the event changes between CLI releases)."""
        if not isinstance(info, dict):
            return
        windows = plan_windows(info)
        notes = []
        with self._lock:
            self._info = info
            self._windows.update(windows)
            self._overage = plan_overage(info) or self._overage
            self._other = {k: v for k, v in info.items() if k not in RATE_LIMIT_INFO_FIELDS}
            self._updated_at = self.clock()
            for name, window in windows.items():
                used = window["utilization"]
                if used is None:
                    continue
                mark = max([level for level in PLAN_WARN_LEVELS if used >= level] or [0])
                if mark > self._warned.get(name, 0):
                    notes.append("the plan's %s window is at %d %% (resets %s)"
                                 % (PLAN_WINDOW_WORDS.get(name, name), round(used * 100),
                                    window["resets_at"] or "at an unknown time"))
                self._warned[name] = mark  # lower again once the window has reset
        for note in notes:
            log(note)

    def admit(self):
        """Before a request's run: raise the refusal while a limit holds, but for a probe.
        Returns a ticket for still_admitted(), after the request's wait for a run slot."""
        with self._lock:
            refusal = self._refusal
            if refusal is None:
                return (self._limits_seen, False)
            now = self.clock()
            reset = refusal["resets_at"]
            if (now - self._last_try >= self.probe_seconds
                    or (reset is not None and self._last_try < reset <= now)):
                self._last_try = now
                self.probes += 1
                return (self._limits_seen, True)
            self.refused += 1
        raise self._refusal_error(refusal, now)

    def still_admitted(self, ticket):
        """After a request waited for a run slot: raise the refusal if a limit was reached
        meanwhile (requests queued behind the run that found it would each start a run and a
        model request in vain); a probe goes on."""
        seen, probe = ticket
        with self._lock:
            refusal = self._refusal
            if refusal is None or probe or seen == self._limits_seen:
                return
            self.refused += 1
            now = self.clock()
        raise self._refusal_error(refusal, now)

    def after_run(self, error):
        """A run finished with this error (None: it succeeded)."""
        now = self.clock()
        code = error.code if error is not None else None
        with self._lock:
            was = self._refusal
            self._last_try = now
            if code == "plan_limit_reached":
                window, reset, said = error.plan_window or (None, None, error.message)
                self._refusal = {"kind": "limit", "window": window, "resets_at": reset,
                                 "detail": said, "since": (was or {}).get("since", now)}
            elif code == "insufficient_quota":
                self._refusal = {"kind": "credits", "window": None, "resets_at": None,
                                 "detail": error.message, "since": (was or {}).get("since", now)}
            elif error is None:
                self._refusal = None
                if was:
                    # The last report said "rejected"; a run has just succeeded, and a kept
                    # process reports again only when its figures change: until a report comes,
                    # the rejected windows are not shown (nor sent as headers) as they were.
                    self._windows = {name: window for name, window in self._windows.items()
                                     if window.get("status") != "rejected"}
                    if (self._info or {}).get("status") == "rejected":
                        self._info = None
            refusal = self._refusal
            if refusal and not was:
                self._limits_seen += 1
        if refusal and not was:
            log("%s; new requests are refused without a run (429), one probe run a minute "
                "excepted, until one succeeds." % (
                    "the plan's usage credits are spent" if refusal["kind"] == "credits" else
                    "the plan's %s limit is reached, until %s" % (
                        PLAN_WINDOW_WORDS.get(refusal["window"], refusal["window"] or "usage"),
                        iso_utc(refusal["resets_at"]) if refusal["resets_at"] else "an unknown time")))
        elif was and not refusal:
            log("the plan's limit has lifted: a run succeeded; requests are served again.")

    def _refusal_error(self, refusal, now):
        if refusal["kind"] == "credits":
            return ProxyError(429, refusal["detail"], "insufficient_quota", None,
                              "insufficient_quota", {"x-should-retry": "false"})
        return plan_limit_reached(refusal["window"], refusal["resets_at"], now, refusal["detail"])

    def snapshot(self):
        """The `plan` object of /health: None until a run has reported the plan (always, for
        an API key); then each window, the overage, when it was last seen, and any limit."""
        with self._lock:
            if self._updated_at is None and self._refusal is None:
                return None
            snapshot = {name: dict(window) for name, window in self._windows.items()}
            snapshot["overage"] = self._overage
            snapshot["updated_at"] = iso_utc(self._updated_at) if self._updated_at else None
            refusal = self._refusal
            snapshot["limit_reached"] = refusal and {
                "kind": refusal["kind"], "window": refusal["window"],
                "resets_at": iso_utc(refusal["resets_at"]) if refusal["resets_at"] else None,
                "since": iso_utc(refusal["since"]), "message": refusal["detail"]}
            if self._other:
                snapshot["other"] = dict(self._other)
            return snapshot

    def headers(self):
        """The anthropic-ratelimit-unified-* headers Claude's API sends a subscriber's client,
        from the last report: Anthropic clients (Claude Code) show their own usage warnings."""
        with self._lock:
            info = self._info
            if info is None:
                return {}
            prefix = "anthropic-ratelimit-unified-"
            headers = {}
            if isinstance(info.get("status"), str):
                headers[prefix + "status"] = info["status"]
            if _is_number(info.get("resetsAt")):
                headers[prefix + "reset"] = str(int(info["resetsAt"]))
            if isinstance(info.get("rateLimitType"), str):
                headers[prefix + "representative-claim"] = info["rateLimitType"]
            windows = info.get("unifiedWindows") if isinstance(info.get("unifiedWindows"), dict) else {}
            for name, short in UNIFIED_WINDOW_HEADERS.items():
                window = windows.get(name) if isinstance(windows.get(name), dict) else {}
                if _is_number(window.get("utilization")):
                    headers[prefix + short + "-utilization"] = "%g" % window["utilization"]
                if _is_number(window.get("resetsAt")):
                    headers[prefix + short + "-reset"] = str(int(window["resetsAt"]))
            if isinstance(info.get("overageStatus"), str):
                headers[prefix + "overage-status"] = info["overageStatus"]
            if isinstance(info.get("overageDisabledReason"), str):
                headers[prefix + "overage-disabled-reason"] = info["overageDisabledReason"]
            return {k: printable(v, 100) for k, v in headers.items()}

    def render(self):
        """The plan's Prometheus metrics (appended to Metrics.render's)."""
        def label(value):
            return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        with self._lock:
            windows = sorted(self._windows.items())
            limited = self._refusal is not None
            lines = ["# HELP claude_proxy_plan_utilization A subscriber's plan window's use, 0-1, "
                     "as the CLI last reported it (window: the CLI's name).",
                     "# TYPE claude_proxy_plan_utilization gauge"]
            lines += ['claude_proxy_plan_utilization{window="%s"} %r' % (label(name), float(w["utilization"]))
                      for name, w in windows if w["utilization"] is not None]
            lines += ["# HELP claude_proxy_plan_resets_at_seconds When a plan window resets (Unix time).",
                      "# TYPE claude_proxy_plan_resets_at_seconds gauge"]
            lines += ['claude_proxy_plan_resets_at_seconds{window="%s"} %d' % (
                label(name), calendar.timegm(time.strptime(w["resets_at"], "%Y-%m-%dT%H:%M:%SZ")))
                for name, w in windows if w["resets_at"]]
            lines += ["# HELP claude_proxy_plan_limited 1 while a reached limit or spent credits "
                      "make the proxy refuse requests.", "# TYPE claude_proxy_plan_limited gauge",
                      "claude_proxy_plan_limited %d" % limited,
                      "# HELP claude_proxy_plan_refused_total Requests refused at a plan limit "
                      "without a run.", "# TYPE claude_proxy_plan_refused_total counter",
                      "claude_proxy_plan_refused_total %d" % self.refused,
                      "# HELP claude_proxy_plan_probes_total Runs let through while at a plan "
                      "limit, to see whether it lifted.", "# TYPE claude_proxy_plan_probes_total counter",
                      "claude_proxy_plan_probes_total %d" % self.probes]
        return "\n".join(lines) + "\n"


class TurnRhythm:
    """How far apart a conversation's turns come, for --cache-ttl auto: which prompt-cache
    lifetime its runs get.

    A 5-minute cache entry costs 1.25x the input price to write, a 1-hour one 2x; a read costs
    0.1x either way, and a read refreshes the entry. Turns seconds or a few minutes apart (an
    agent, a tool loop, a quick chat) read every earlier turn from 5-minute entries, at the lower
    write price. A conversation whose turns come further apart than CACHE_5M_SECONDS (a person
    who reads, thinks and comes back) would write its whole history again each turn: from the
    first such gap on it gets 1-hour entries. Its process shape then differs (cache_ttl is a
    SHAPE_FIELD), so its next turn resumes in a run started with the longer lifetime.

    Only for a subscriber's CLI, whose own choice is 1 hour: an API key's CLI writes 5-minute
    entries, and with an API key nothing changes. Nor where the operator set a lifetime in the
    CLI's environment (CACHE_TTL_VARIABLES): that choice stands.

    The gap is counted from when the previous turn's request began (when its model call wrote
    or refreshed the entries), not from when its reply ended. Remembered per conversation
    (conversation_key, without the lifetime), for an hour past its last reply, at most `size`
    conversations."""

    def __init__(self, mode="auto", gap_seconds=CACHE_5M_SECONDS, size=4096, clock=time.monotonic,
                 env=None):
        self.mode = mode
        self.gap_seconds = gap_seconds
        self.size = size
        self.clock = clock
        self.operator_set = sorted(name for name in CACHE_TTL_VARIABLES if (env or {}).get(name))
        self.slow = 0  # conversations given 1-hour entries
        self._seen = collections.OrderedDict()  # key -> (previous request began at, its lifetime)
        self._lock = threading.Lock()

    @staticmethod
    def _key(scope, plan, turns):
        return conversation_key(scope, run_shape(dataclasses.replace(plan, cache_ttl=None)), turns)

    def ttl_for(self, scope, plan, subscriber):
        """(the cache lifetime a request's run gets, whether its conversation just turned slow):
        the mode's, or for auto, its rhythm's (None: the CLI's own choice). A conversation keeps
        the lifetime its earlier turns had, so that its kept process serves it, until it turns
        slow."""
        if self.mode != "auto":
            return self.mode, False
        if self.operator_set or subscriber is False:  # an API key's: nothing to remember either
            return None, False
        turns = plan.conversation["turns"]
        if len(turns) >= 3:
            with self._lock:
                began, ttl = self._seen.get(self._key(scope, plan, turns[:-1]), (None, None))
                if began is not None:
                    if ttl == "1h":
                        return "1h", False
                    if subscriber and self.clock() - began > self.gap_seconds:
                        self.slow += 1
                        return "1h", True
                    return ttl, False
        return ("5m" if subscriber else None), False

    def replied(self, scope, plan, reply_blocks, began, subscriber):
        """A reply was sent to a request that began at `began` (this clock): the conversation's
        next turn will follow these turns."""
        if self.mode != "auto" or self.operator_set or subscriber is False:
            return
        turns = plan.conversation["turns"] + [{"role": "assistant", "content": reply_blocks}]
        key = self._key(scope, plan, turns)
        now = self.clock()
        with self._lock:
            self._seen[key] = (began, plan.cache_ttl)
            self._seen.move_to_end(key)
            while self._seen and (len(self._seen) > self.size
                                  or now - next(iter(self._seen.values()))[0] > 3600):
                self._seen.popitem(last=False)


#: A process taken from the pool is replaced this long after the take, not at once: a CLI starting
#: up keeps both cores of a small machine busy for most of a second, and the process just taken
#: needs them for the ~0.1 s before its model request. Measured with the CLI alone (2 cores): a
#: start-up alongside added ~45 ms to the first token, with CLI 2.1.197 and with 2.1.332.
WARM_REFILL_DELAY = 0.25


# Answering a request ########################################################################
#: One owner of a request's life, with no HTTP in it: Proxy holds the stateful parts (the
#: runner and its processes, admission, spend, the plan's limits, the cache lifetimes, metrics,
#: stored responses) and answers a parsed request into a dialect's sink: aliases and budgets
#: applied, the plan's limits asked, a run slot taken, the run started, its events translated
#: and handed to the sink, the run kept or stopped, its cost counted, errors rendered.


class RequestClient:
    """What the proxy knows of a request's client: its scope (whose conversations are its own:
    a hash of its API key), its socket (to notice a hang-up) and when its request began."""

    __slots__ = ("scope", "connection", "started")

    def __init__(self, scope, connection, started):
        self.scope, self.connection, self.started = scope, connection, started


class AnswerLog:
    """What an answered request leaves for the access log and the reply's headers (headers:
    the handler's own dict, read when the reply's headers are written)."""

    __slots__ = ("model", "usage", "error", "cost", "headers")

    def __init__(self, headers):
        self.model, self.usage, self.error, self.cost = "-", None, None, None
        self.headers = headers

    def ran(self, requested, model):
        """The model a request ran on, and the alias it asked for if it asked for one."""
        self.model = model or "default"
        if requested and requested != model:
            self.model = "%s(%s)" % (requested, model)

    def failed(self, error):
        self.error = error.code or error.type

    def billed(self, usage, cost, in_header):
        """The reply's usage and cost; a cost known before the body also goes in a header."""
        if usage is not None:
            self.usage = usage
        if cost is not None:
            self.cost = cost
            if in_header:
                self.headers["x-claude-cost-usd"] = "%.6f" % cost


class Proxy:
    """Owns every request's life after parsing, and the stateful parts it needs, built once by
    ProxyServer from the Config."""

    def __init__(self, config, runner=None):
        self.config = config
        self.runner = runner or CliRunner(config.claude_path, config.timeout,
                                          log_prompts=config.log_prompts,
                                          pool_size=config.pool_size, pool_idle=config.pool_idle,
                                          history=config.history,
                                          reuse=ReuseLimits(config.reuse_conversations,
                                                            config.reuse_memory_mb,
                                                            reuse_size(config.max_concurrency,
                                                                       config.pool_size))
                                          if config.reuse else None)
        self.runner.known_version(config.claude_version)
        self.admission = Admission(config.max_concurrency, config.max_queue)
        self.metrics = Metrics()
        self.spend = Spend(config.daily_budget, config.state_dir)
        self.plan_limits = PlanLimits()
        self.rhythm = TurnRhythm(config.cache_ttl, config.cache_gap, env=self.runner.env)
        self.response_store = ResponseStore()

    def health(self, details, reading_heads):
        """GET /health: (status, body). 200 while the CLI binary is on disk, else 503. Open to
        load balancers without the key; the details are for key holders."""
        config, runner = self.config, self.runner
        # The binary as it is on disk now: the CLI updates itself, and may be removed.
        found = runner.binary_stamp() is not None
        status = 200 if found else 503
        if not details:
            return status, {"status": "ok" if found else "cli_not_found", "version": __version__}
        return status, {
            "status": "ok" if found else "cli_not_found",
            "version": __version__,
            "cli": dict(runner.cli_report(), path=config.claude_path, found=found,
                        version=runner.version() if found else None),
            "default_model": config.model,
            "default_effort": config.effort,
            "active_runs": runner.active(),
            "cli_processes": runner.processes(),
            "pool": runner.pool.stats() if runner.pool else None,
            "conversations": runner.continuations.stats() if runner.continuations else None,
            "reuse": runner.reuse_report(),
            "limits": {"max_concurrency": self.admission.concurrency,
                       "max_queue": self.admission.queue,
                       "running": self.admission.running,
                       "queued": self.admission.waiting,
                       "reading_heads": reading_heads},
            "auth": bool(config.api_keys),
            "spend": self.spend.summary(),
            "plan": self.plan_limits.snapshot(),
            "cache_ttl": {"mode": self.rhythm.mode, "conversations_given_1h": self.rhythm.slow},
            "workspaces": [{"name": w.name or None, "folder": w.root,
                            "tools": list(WORKSPACE_READ_TOOLS) + list(w.grants),
                            "timeout": w.timeout} for _, w in sorted(config.workspaces.items())],
        }

    def metrics_text(self):
        """GET /metrics: the Prometheus text exposition (format 0.0.4)."""
        return (self.metrics.render(self.admission, self.runner) + self.spend.render()
                + self.plan_limits.render())

    def answer(self, plan, sink, client, record):
        """Run a parsed request through the CLI and hand its reply events to a dialect's sink
        (its stream writer or message collector): the one path every dialect shares.

        The sink is a ReplySink. Model aliases and the daily budget are applied here. A
        ProxyError raised from here is the HTTP answer (nothing was written yet)."""
        config = self.config
        requested = plan.model  # what the client asked for: the response says this name
        plan = dataclasses.replace(plan, model=config.model_aliases.get(requested, requested),
                                   max_budget_usd=config.max_request_usd or plan.max_budget_usd)
        self.spend.check()  # a spent daily budget: 429 before any run or wait
        admitted = self.plan_limits.admit()  # a reached plan limit: 429 without a run, but probes
        cache_ttl, slowed = self.rhythm.ttl_for(client.scope, plan, self.plan_limits.subscriber())
        plan = dataclasses.replace(plan, cache_ttl=cache_ttl)
        if slowed:  # its process, kept with 5-minute entries, will not serve it again
            self.runner.retire_kept(dataclasses.replace(plan, cache_ttl="5m"), client.scope)
        stream = getattr(sink, "stream", None)
        if stream is not None and config.keepalive:
            stream.keep_alive(config.keepalive, sink.keepalive)
        try:
            self._answer(plan, sink, requested, admitted, client, record)
        except ProxyError as error:
            if stream is not None:
                stream.stop_keep_alive()
            if not sink.started:
                raise  # nothing committed: a real HTTP status
            # Keep-alives committed the 200 (a long wait for a run slot): the error event.
            log("request failed: %s %s" % (error.status, error.message))
            record.failed(error)
            sink.fail(error)
        finally:
            if stream is not None:
                stream.stop_keep_alive()

    def _answer(self, plan, sink, requested, admitted, client, record):
        config, limits = self.config, self.plan_limits
        record.ran(requested, plan.model)
        admission, metrics = self.admission, self.metrics
        run = translator = error = None
        with ClientWatch(client.connection) as watch:
            watch.on_gone(admission.wake)
            admission.acquire(time.monotonic() + config.timeout, watch.gone)
            try:
                events = None
                limits.still_admitted(admitted)  # a limit reached while this one waited
                run = self.runner.start(plan, client.scope)
                # The run's totals so far: a kept run's result adds up over its life.
                translator = ReplyTranslator(plan.stop, plan.tools, plan.single_tool_call,
                                             bool(plan.json_schema), live_structured=plan.stream,
                                             rate_limit=limits.last_info(), totals=run.totals(),
                                             workspace=plan.workspace)
                sink.use(translator)  # a sink may read the usage as it goes (message_start)
                metrics.cli_run()
                # Only while this request holds the run: once kept for the next turn, it is not
                # this client's hang-up to act on (dropped below).
                watch.on_gone(run.stop_for_hang_up)
                first_token = False
                events = run.events()
                for event in events:
                    if event.get("type") == "rate_limit_event":  # from any kind of run
                        limits.observe(event.get("rate_limit_info"))
                    elif event.get("type") == "system" and event.get("subtype") == "init":
                        limits.observe_login(event.get("apiKeySource"))
                    try:
                        reply_events = translator.feed(event)
                    except (TypeError, AttributeError, KeyError, ValueError, IndexError):
                        # An event of the right kind with fields of the wrong JSON types.
                        log("cli printed an event the proxy cannot read: %s" % str(event)[:200])
                        error = cli_failed("The claude CLI printed an event the proxy could not "
                                           "read.", "cli_bad_output")
                        break
                    # The init event comes first and names the model the CLI really runs:
                    # the response says that one when the request named none.
                    sink.name_model(requested or translator.model or run.model or "claude")
                    if reply_events and not first_token:
                        first_token = True
                        metrics.first_token(time.monotonic() - client.started)
                    for reply_event in reply_events:
                        if "activity" in reply_event:
                            log_activity(plan.workspace, reply_event["activity"])
                        sink.event(reply_event)
                    if translator.done:
                        break
            except ProxyError as refused:
                if not (translator and translator.done):
                    raise
                error = refused  # a sink refused the reply (revised after streaming)
            finally:
                try:
                    if run is not None:
                        if events is not None:
                            events.close()  # stdout stays open for a kept run's next turn
                        watch.drop(run.stop_for_hang_up)
                        if translator is not None:
                            # Kept for the next turn, or stopped; unread or unreadable, stopped.
                            summary = translator.summary() if error is None else None
                            self.runner.finish(run, plan, summary, client.scope)
                            self._account(plan, sink, translator, run, record)
                            if translator.done and summary is not None:
                                limits.after_run(translator.error)
                                if not translator.error:
                                    self.rhythm.replied(client.scope, plan, summary.blocks,
                                                        client.started, limits.subscriber())
                        else:
                            run.stop()
                finally:
                    admission.release()
        # The run is stopped or kept for the conversation's next turn by now.
        error = error or translator.error
        if not translator.done and error is None:
            if run.cancelled == "client_gone":
                raise ClientGone()
            error = run_failure(run, plan)
        if error and error.code == "model_not_found":
            error = unknown_model(requested, config, "" if requested == plan.model
                                  else "it is an alias of %r" % plan.model)
        stream = getattr(sink, "stream", None)
        if stream is not None:
            stream.stop_keep_alive()  # the reply's end is written by the sink alone
        if error:
            log("request failed: %s %s" % (error.status, error.message))
            record.failed(error)  # a stream's status is already 200
            sink.fail(error)
            return
        record.billed(chat_usage(translator.usage), None, False)
        sink.finish(translator)

    def _account(self, plan, sink, translator, run, record):
        """Count what the run cost for this request (also when it failed, if the CLI said)."""
        cost = translator.cost_usd
        self.spend.record(translator.model or run.model or plan.model or "claude",
                          cost, translator.usage)
        record.billed(None, cost, getattr(sink, "stream", None) is None)


# HTTP connections ###########################################################################
#: Bytes in and out, before and beside the handler: request heads read without a thread per
#: connection, deadlines for heads and bodies, strict framing, a watch for clients that hang
#: up, and writes that give up on a client that stops reading.


class ClientWatch:
    """While a request waits for a slot or runs, notice a client that hangs up (even when
    nothing is being written to it: a non-streaming request, a queue, a long silence) and call
    back at once, to drop it from the queue or stop its CLI run."""

    def __init__(self, sock):
        self.sock = sock
        self.gone = threading.Event()
        self._callbacks = []
        self._lock = threading.Lock()
        # A socket pair wakes the watcher the moment the request is over (select() on Windows
        # takes only sockets, so not a pipe).
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def on_gone(self, callback):
        """Call `callback` when the client hangs up; at once if it already has."""
        with self._lock:
            if not self.gone.is_set():
                self._callbacks.append(callback)
                return
        callback()

    def drop(self, callback):
        """No longer call `callback` (given to on_gone) when the client hangs up."""
        with self._lock:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._wake_w.send(b"x")
        self._thread.join()
        self._wake_r.close()
        self._wake_w.close()

    def _hung_up(self):
        with self._lock:
            self.gone.set()
            callbacks = list(self._callbacks)
        for callback in callbacks:
            with self._lock:  # dropped meanwhile (a run handed back): not this client's any more
                if callback not in self._callbacks:
                    continue
            callback()

    def _watch(self):
        # selectors, not select(): select() fails on descriptors past 1024.
        with selectors.DefaultSelector() as selector:
            selector.register(self.sock, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while True:
                ready = [key.fileobj for key, _ in selector.select()]
                if self._wake_r in ready:
                    return
                try:
                    # The request was read whole and HTTP/1.0 serves no second one: anything
                    # more the client sends is dropped; an empty read is the hang-up.
                    if self.sock.recv(65536) == b"":
                        break
                except (BlockingIOError, InterruptedError, socket.timeout):
                    continue
                except OSError:
                    break
        self._hung_up()


def head_length(data, searched=0):
    """Where the request head in `data` ends (just past its blank line), or None while it has
    not arrived whole. `searched`: how much of `data` an earlier call has looked through.

    Lines end at LF, as the stdlib reads them. A request line of fewer than three words is a
    head by itself (the stdlib reads no headers after it)."""
    first = data.find(b"\n")
    if first < 0:
        return None
    if len(data[:first].decode("latin-1").split()) < 3:
        return first + 1
    at = max(first, searched - 2)
    while True:
        at = data.find(b"\n", at)
        if at < 0:
            return None
        if data.startswith(b"\n", at + 1):
            return at + 2
        if data.startswith(b"\r\n", at + 1):
            return at + 3
        at += 1


def body_framing(headers):
    """How a request body is delimited: ("length", n), ("chunked", None) or ("none", None).

    A 400 for anything two parsers could read two ways (request smuggling): a Content-Length
    that is not plain digits (int() takes "+63" and "6_3"), two of them, a Transfer-Encoding
    other than exactly `chunked`, or both headers."""
    lengths = headers.get_all("Content-Length") or []
    codings = headers.get_all("Transfer-Encoding") or []
    if codings:
        if len(codings) > 1 or codings[0].strip().lower() != "chunked":
            raise invalid("Transfer-Encoding %r is not supported; send Content-Length, or "
                          "Transfer-Encoding: chunked alone." % ", ".join(codings)[:100], None,
                          "unsupported_transfer_encoding")
        if lengths:
            raise invalid("A request may not have both Content-Length and Transfer-Encoding.",
                          None, "invalid_content_length")
        return "chunked", None
    if not lengths:
        return "none", None
    if len(lengths) > 1 or not CONTENT_LENGTH.match(lengths[0].strip()):
        raise invalid("Content-Length must be one whole number of bytes.", None,
                      "invalid_content_length")
    return "length", int(lengths[0])


def request_body(rfile, framing, limit, close):
    """The request body, as body_framing() said it is delimited: 411 without a length, 413 past
    `limit` (close() is called: the rest is not read), 400 when it ends early or its chunks are
    malformed."""
    kind, length = framing
    if kind == "chunked":
        return chunked_body(rfile, limit, close)
    if kind == "none":
        raise ProxyError(411, "A Content-Length header is required", "invalid_request_error",
                         None, "length_required", {"x-should-retry": "false"})
    if length > limit:
        close()
        raise ProxyError(413, "The request body is %d bytes; this proxy accepts at most %d "
                         "(CLAUDE_MAX_BODY)." % (length, limit), "invalid_request_error", None,
                         "request_too_large", {"x-should-retry": "false"})
    body = rfile.read(length)
    if len(body) < length:
        raise invalid("The request body ended early", None, "incomplete_body")
    return body


def chunked_body(rfile, limit, close):
    parts, size = [], 0
    while True:
        line = rfile.readline(1024).split(b";")[0].strip()
        if not CHUNK_SIZE.match(line):  # hex digits only: int() would take "-1"
            raise invalid("Malformed chunked request body", None, "invalid_body")
        chunk = int(line, 16)
        if chunk == 0:
            while rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(parts)
        size += chunk
        if size > limit:
            close()
            raise ProxyError(413, "The request body is over %d bytes (CLAUDE_MAX_BODY)." % limit,
                             "invalid_request_error", None, "request_too_large",
                             {"x-should-retry": "false"})
        parts.append(rfile.read(chunk))
        if len(parts[-1]) < chunk:
            raise invalid("The request body ended early", None, "incomplete_body")
        rfile.readline(1024)


def json_body(raw):
    try:
        body = json.loads(raw)
        # JSON may spell lone surrogates (\\ud800) that no UTF-8 file or pipe can carry.
        json.dumps(body, ensure_ascii=False).encode("utf-8")
        return body
    except (ValueError, RecursionError) as e:
        raise invalid("The request body is not valid JSON: %s" % str(e)[:200], None, "invalid_json")


def discard_body(wfile, connection):
    """After answering without reading the body (401, 403, 413, 415, ...): read and drop what
    the client is still sending, within limits. Closing with unread data would reset the
    connection, and the client could lose the answer it has not read yet."""
    try:
        wfile.flush()
        connection.shutdown(socket.SHUT_WR)  # the answer is complete: the client may close
        connection.settimeout(DISCARD_SECONDS)
        deadline, left = time.monotonic() + DISCARD_SECONDS, DISCARD_BYTES
        while left > 0 and time.monotonic() < deadline:
            data = connection.recv(min(left, 65536))
            if not data:
                break
            left -= len(data)
    except OSError:
        pass


def method_refusal(route, method, path, content_type):
    """Why a request cannot go to its route (404 no route, 405 another method, 415 a POST body
    that is not JSON), or None. HEAD is GET without a body."""
    if route is None:
        return ProxyError(404, "No route %s %s; the API is under /v1 (POST /v1/chat/completions, "
                          "POST /v1/messages, GET /v1/models)." % (method, path.split("?")[0]),
                          "invalid_request_error", None, "not_found")
    allowed = route[0]
    if method == "HEAD" and "GET" in allowed:
        method = "GET"  # send_body leaves the body out for HEAD
    if method not in allowed:
        return ProxyError(405, "Method %s is not allowed here; use %s." % (method, " or ".join(allowed)),
                          "invalid_request_error", None, "method_not_allowed",
                          {"Allow": ", ".join(allowed)})
    if method == "POST" and not is_json_content_type(content_type):
        return ProxyError(415, "POST bodies must be sent as Content-Type: application/json.",
                          "invalid_request_error", None, "unsupported_media_type",
                          {"x-should-retry": "false"})
    return None


def raw_error_response(error):
    """A whole HTTP response for an error found before any handler exists (a head too large,
    every worker busy): the same envelope, written straight to the socket."""
    body = json.dumps(error.body()).encode("utf-8")
    headers = dict(error.headers, **{"Content-Type": "application/json",
                                     "Content-Length": str(len(body)), "Connection": "close"})
    reason = BaseHTTPRequestHandler.responses.get(error.status, ("Error",))[0]
    return ("HTTP/1.0 %d %s\r\n%s\r\n" % (error.status, reason, "".join(
        "%s: %s\r\n" % item for item in headers.items()))).encode("latin-1") + body


TOO_MANY_CONNECTIONS = raw_error_response(ProxyError(
    503, "Too many requests are being served by the proxy; retry shortly.", "server_error",
    None, "too_many_connections", {"Retry-After": str(BUSY_RETRY_AFTER)}))
HEAD_TOO_LARGE = raw_error_response(ProxyError(
    431, "The request line and headers are over %d bytes in all." % MAX_HEAD_BYTES,
    "invalid_request_error", None, "request_header_fields_too_large", {"x-should-retry": "false"}))


class HeadThenSocket(io.RawIOBase):
    """A handler's request stream: the head HeadReader already read, then the socket."""

    def __init__(self, head, sock):
        self._head = memoryview(head)
        self._sock = sock

    def readable(self):
        return True

    def readinto(self, buffer):
        if self._head:
            size = min(len(buffer), len(self._head))
            buffer[:size] = self._head[:size]
            self._head = self._head[size:]
            return size
        return self._sock.recv_into(buffer)


class SocketWriter(io.BufferedIOBase):
    """A handler's answer stream, unbuffered: each write goes out in pieces, and the socket's
    timeout bounds the wait for each piece, so a client that stops reading is dropped (and its
    run stopped) instead of holding its slot."""

    def __init__(self, sock):
        self._sock = sock

    def writable(self):
        return True

    def write(self, data):
        with memoryview(data) as view:
            view = view.cast("B")
            for start in range(0, len(view), WRITE_PIECE_BYTES):
                self._sock.sendall(view[start:start + WRITE_PIECE_BYTES])
            return len(view)

    def fileno(self):
        return self._sock.fileno()


class PendingHead:
    """A connection whose head is still arriving, or that is being drained after an early answer."""

    __slots__ = ("sock", "address", "data", "searched", "deadline", "draining")

    def __init__(self, sock, address, deadline):
        self.sock, self.address, self.deadline = sock, address, deadline
        self.data = bytearray()
        self.searched = 0
        self.draining = 0  # bytes still to read and drop, once answered


class HeadReader:
    """Reads request heads without a thread per connection: one selectors loop holds every
    new connection until its head (request line and headers) has arrived whole, then hands the
    connection and its head to a worker thread (ProxyServer.hand_over).

    A head is bounded by MAX_HEAD_BYTES (then 431) and by `seconds` (then the connection is
    dropped). At most `max_pending` connections wait here; when one more arrives, the one that
    has waited longest goes: slow or idle connections cost a few KiB each and cannot keep
    normal clients, whose heads arrive at once, from being served."""

    def __init__(self, server, max_pending=MAX_PENDING_HEADS, seconds=HEAD_READ_SECONDS):
        self.server = server
        self.max_pending = max_pending
        self.seconds = seconds
        self.largest = 0  # the most bytes one head has held (tests look at it)
        self._pending = collections.OrderedDict()  # socket -> PendingHead, oldest first
        self._arrived = collections.deque()  # (socket, address) from the accepting thread
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="head-reader", daemon=True)
        self._thread.start()

    def add(self, sock, address):
        """A new connection (called by the accepting thread)."""
        self._arrived.append((sock, address))
        self._wake()

    def pending(self):
        return len(self._pending)

    def close(self):
        """Stop reading heads and drop every connection still here."""
        self._closed = True
        self._wake()
        self._thread.join(10)

    def _wake(self):
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # already awake (its buffer is full), or closed

    def _run(self):
        checked = 0.0
        try:
            while not self._closed:
                for key, _ in self._selector.select(0.25):
                    if key.fileobj is self._wake_r:
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except OSError:
                            pass
                    else:
                        self._readable(key.data)
                while self._arrived:
                    self._admit(*self._arrived.popleft())
                now = time.monotonic()
                if now - checked >= 0.1:
                    checked = now
                    for pending in [p for p in self._pending.values() if p.deadline < now]:
                        self._drop(pending)
        finally:
            for pending in list(self._pending.values()):
                self._drop(pending)
            while self._arrived:
                self.server.shutdown_request(self._arrived.popleft()[0])
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()

    def _admit(self, sock, address):
        while len(self._pending) >= self.max_pending:
            self._drop(next(iter(self._pending.values())))
        try:
            sock.setblocking(False)
            pending = PendingHead(sock, address, time.monotonic() + self.seconds)
            self._selector.register(sock, selectors.EVENT_READ, pending)
        except (OSError, ValueError):
            self.server.shutdown_request(sock)
            return
        self._pending[sock] = pending

    def _drop(self, pending):
        self._forget(pending)
        self.server.shutdown_request(pending.sock)

    def _forget(self, pending):
        if self._pending.pop(pending.sock, None) is not None:
            try:
                self._selector.unregister(pending.sock)
            except (KeyError, ValueError, OSError):
                pass

    def _readable(self, pending):
        try:
            data = pending.sock.recv(HEAD_RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return self._drop(pending)
        if pending.draining:
            pending.draining -= len(data)
            if not data or pending.draining <= 0:
                self._drop(pending)
            return
        if not data:
            # The client sent all it will (a half-close): what arrived is the head, as the
            # stdlib would read it; nothing at all is a connection that just closed.
            return self._start(pending) if b"\n" in pending.data else self._drop(pending)
        pending.data += data
        self.largest = max(self.largest, len(pending.data))
        end = head_length(pending.data, pending.searched)
        pending.searched = len(pending.data)
        if (end or len(pending.data)) > MAX_HEAD_BYTES:
            return self._answer(pending, HEAD_TOO_LARGE)
        if end is not None:
            self._start(pending)

    def _start(self, pending):
        self._forget(pending)
        try:
            pending.sock.setblocking(True)
            handed = self.server.hand_over(pending.sock, pending.address, bytes(pending.data))
        except Exception:
            self.server.handle_error(pending.sock, pending.address)
            return self.server.shutdown_request(pending.sock)
        if not handed:
            self._answer(pending, TOO_MANY_CONNECTIONS, again=True)

    def _answer(self, pending, response, again=False):
        """Answer at once, then read and drop what the client still sends for a moment:
        closing with unread data would reset the connection and lose the answer."""
        try:
            pending.sock.setblocking(False)
            pending.sock.send(response)  # a small answer into an empty socket buffer
            pending.sock.shutdown(socket.SHUT_WR)
        except OSError:
            if not again:
                self._drop(pending)
            else:
                self.server.shutdown_request(pending.sock)
            return
        pending.data = bytearray()
        pending.draining = DISCARD_BYTES
        pending.deadline = time.monotonic() + DISCARD_SECONDS
        if again:
            try:
                self._selector.register(pending.sock, selectors.EVENT_READ, pending)
            except (OSError, ValueError):
                return self.server.shutdown_request(pending.sock)
            self._pending[pending.sock] = pending


class ReadDeadlines:
    """Drops connections whose request body has not fully arrived within BODY_READ_SECONDS of
    its head: a client that trickles its body cannot pin a thread for long. One thread watches
    every connection. (Heads have their own, shorter deadline: HeadReader.)"""

    def __init__(self, seconds):
        self.seconds = seconds
        self._reading = {}  # handler -> deadline
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._watch, name="read-deadlines", daemon=True).start()

    def begin(self, handler):
        with self._lock:
            self._reading[handler] = time.monotonic() + self.seconds

    def end(self, handler):
        with self._lock:
            self._reading.pop(handler, None)

    def close(self):
        self._stop.set()

    def _watch(self):
        while not self._stop.wait(0.5):
            now = time.monotonic()
            with self._lock:
                late = [h for h, deadline in self._reading.items() if deadline < now]
                for handler in late:
                    del self._reading[handler]
            for handler in late:
                try:
                    handler.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


# HTTP handler ###############################################################################


class ProxyHandler(BaseHTTPRequestHandler):
    """Routes requests; every error leaves in its dialect's error envelope, never an HTML page."""

    server_version = "claude-proxy/" + __version__
    # HTTP/1.0: one response per connection, so a stream ends when the connection closes and
    # no Content-Length or chunked framing is needed for SSE.
    protocol_version = "HTTP/1.0"
    # A request line without a version is HTTP/0.9 to the stdlib, which answers it with a bare
    # body and no status line: answer it as HTTP/1.0 instead, status and headers included.
    default_request_version = "HTTP/1.0"

    def do_any(self):
        self.dispatch(self.command)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_any

    def route(self, method, path):
        """(allowed methods, handler method, its arguments) for a path, or None."""
        path = path.split("?", 1)[0].rstrip("/") or "/"
        self.workspace = self.workspace_refusal = None
        if path == WORKSPACE_PREFIX or path.startswith(WORKSPACE_PREFIX + "/"):
            # The API below it, in that workspace; refused once the client has shown its key.
            self.workspace, path, self.workspace_refusal = workspace_route(
                path, self.server.config.workspaces)
        if path in ("/v1/chat/completions", "/chat/completions"):
            return ("POST",), self.chat_completions, ()
        if path in ("/v1/responses", "/responses"):
            return ("POST",), self.create_response, ()
        if path in ("/v1/responses/compact", "/responses/compact"):  # no response id is "compact"
            return ("POST",), self.compact_response, ()
        if path.startswith(("/v1/responses/", "/responses/")) and path.count("/") == path.startswith("/v1") + 2:
            return ("GET", "DELETE"), self.stored_response, (path.rsplit("/", 1)[1],)
        if path in ("/v1/messages", "/messages"):
            return ("POST",), self.messages, ()
        if path in ("/v1/messages/count_tokens", "/messages/count_tokens"):
            return ("POST",), self.count_tokens, ()
        if path in ("/v1/models", "/models"):
            return ("GET",), self.list_models, ()
        if path.startswith(("/v1/models/", "/models/")):
            return ("GET",), self.get_model, (path.split("/models/", 1)[1],)
        if path == "/health":
            return ("GET",), self.health, ()
        if path == "/metrics":
            return ("GET",), self.metrics, ()
        if path == "/":
            # The chat page; without it, a small JSON: Claude Code probes the base URL (HEAD /).
            return ("GET",), self.web_page if self.server.config.ui else self.root, ()
        return None

    def setup(self):
        """Started by ProxyServer.hand_over once the head has arrived (HeadReader): the request
        is read from that head, then from the socket; every read or write that makes no
        progress for the server's io_seconds drops the client."""
        self.connection = self.request
        self.connection.settimeout(self.server.io_seconds)
        self.rfile = io.BufferedReader(HeadThenSocket(self.server.take_head(self.request), self.connection))
        self.wfile = SocketWriter(self.connection)
        self.cors_origin = None
        self.body_read = False
        self.framing = None
        self.server.read_deadlines.begin(self)

    def finish(self):
        self.server.read_deadlines.end(self)
        super().finish()

    def dispatch(self, method):
        self.started = time.monotonic()
        self.log_model, self.log_usage, self.log_error, self.status = "-", None, None, None
        self.log_cost, self.reply_headers = None, {}
        self.server.metrics.started()
        if method != "POST":
            self.server.read_deadlines.end(self)  # the whole request has arrived
        route = None
        self.request_id = "req_" + uuid.uuid4().hex[:24]
        try:
            self.framing = body_framing(self.headers)
            route = self.route(method, self.path)
            self.dialect = self.request_dialect(route)
            self.cors_origin = access_origin(self.server.config, self.headers)
            require_key(self.server.config, self.headers, route is not None and
                        route[1] in (self.health, self.web_page, self.root), self.command)
            if route is not None and method == "OPTIONS":
                return self.preflight(route[0])
            if route is not None and self.workspace_refusal:
                raise self.workspace_refusal
            if route is not None and route[1] == self.create_response and method == "GET" and "websocket" in (
                    self.headers.get("Upgrade") or "").lower():
                self.protocol_version = "HTTP/1.1"  # what WebSocket clients read a refusal in
                raise websocket_refused()
            refusal = method_refusal(route, method, self.path, self.headers.get("Content-Type"))
            if refusal is not None:
                if refusal.status == 415:
                    self.close_connection = True
                raise refusal
            route[1](*route[2])
        except ProxyError as error:
            self.send_error_body(error)
        except (BrokenPipeError, ConnectionResetError, socket.timeout, ClientGone):
            self.status = 499  # the client left (nginx's code for it; only ever logged)
            self.close_connection = True
        except Exception:
            log("internal error on %s %s:\n%s" % (method, printable(self.path), traceback.format_exc()))
            self.send_error_body(ProxyError(500, "Internal proxy error; see the proxy's log.",
                                            "server_error", None, "internal_error"))
        finally:
            self.server.metrics.finished(route[1].__name__ if route else "other", self.status,
                                         time.monotonic() - self.started, self.log_error,
                                         self.log_usage)
            self.log_access(method)
            if not self.body_read and self.framing not in (("none", None), ("length", 0)):
                self.close_connection = True
                discard_body(self.wfile, self.connection)  # a body was sent (or its framing could not be read)

    def preflight(self, allowed):
        self.send_body(204, b"", None, preflight_headers(
            allowed, self.cors_origin, self.headers.get("Access-Control-Request-Headers")))

    def end_headers(self):
        if self.cors_origin:  # on every response to an allowed page: errors and streams too
            self.send_header("Access-Control-Allow-Origin", self.cors_origin)
            self.send_header("Access-Control-Expose-Headers",
                             "Retry-After, x-should-retry, request-id, x-claude-cost-usd")
            self.send_header("Vary", "Origin")
        if getattr(self, "dialect", None) == "anthropic":
            self.send_header("request-id", self.request_id)
            # The plan's use is the key holders' to see, as /health's details are.
            if is_key_holder(self.server.config, self.headers):
                for name, value in self.server.plan_limits.headers().items():
                    self.send_header(name, value)
        for name, value in getattr(self, "reply_headers", {}).items():
            self.send_header(name, value)
        super().end_headers()

    # --- responses

    def send_json(self, status, obj, headers=None):
        self.send_body(status, json.dumps(obj, ensure_ascii=False).encode("utf-8"),
                       "application/json", headers)

    def send_body(self, status, data, content_type, headers=None):
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def request_dialect(self, route):
        """Whose conventions the answer follows, errors included: "anthropic" for the Messages
        API and for requests carrying anthropic-version (except to the OpenAI endpoints)."""
        if route is not None and route[1] in (self.messages, self.count_tokens):
            return "anthropic"
        if self.headers.get("anthropic-version") and not (route and route[1] == self.chat_completions):
            return "anthropic"
        return "openai"

    def send_error_body(self, error):
        self.log_error = error.code or error.type
        if self.status is not None:  # headers already sent: nothing more can be said
            return
        try:
            if getattr(self, "dialect", "openai") == "anthropic":
                self.send_json(*anthropic_error(error, self.request_id))
            else:
                self.send_json(error.status, error.body(), error.headers)
        except OSError:
            pass

    def send_error(self, code, message=None, explain=None):
        """The stdlib's own errors (bad request line, header too long, ...) as JSON envelopes."""
        self.started = getattr(self, "started", time.monotonic())
        self.log_model, self.log_usage, self.log_error, self.status = "-", None, None, None
        self.cors_origin = None
        self.close_connection = True
        # A malformed request is the client's fault, never a 5xx: the stdlib's 501 (unknown
        # method) and 505 (unknown HTTP version) become 405 and 400.
        code = {501: 405, 505: 400}.get(code, code)
        self.send_error_body(ProxyError(code, message or "Bad request", "invalid_request_error",
                                        None, "bad_http_request", {"x-should-retry": "false"}))
        self.log_access(getattr(self, "command", None) or "-")

    def send_response(self, code, message=None):
        self.status = code
        super().send_response(code, message)

    def log_message(self, format, *args):
        pass  # one access-log line per request instead, from log_access

    def log_access(self, method):
        log(access_line(self.client_address[0], method, getattr(self, "path", None), self.status,
                        self.log_error, self.log_model, self.log_usage,
                        getattr(self, "log_cost", None), time.monotonic() - self.started))

    # --- request bodies

    def read_json(self):
        """The request's body as JSON (request_body, json_body); the read deadline ends."""
        raw = request_body(self.rfile, self.framing, self.server.config.max_body, self.close)
        self.body_read = True
        self.server.read_deadlines.end(self)
        return json_body(raw)

    def close(self):
        self.close_connection = True

    # --- endpoints

    def health(self):
        details = is_key_holder(self.server.config, self.headers)
        self.send_json(*self.server.proxy.health(details, self.server.heads.pending()))

    def web_page(self):
        """The chat page: served without a key, it holds nothing but itself."""
        self.send_body(200, WEB_PAGE, "text/html; charset=utf-8", WEB_PAGE_HEADERS)

    def metrics(self):
        self.send_body(200, self.server.proxy.metrics_text().encode("utf-8"),
                       "text/plain; version=0.0.4; charset=utf-8")

    def root(self):
        """GET or HEAD /: Claude Code probes the base URL before its first request."""
        self.send_json(200, {"name": "claude-proxy", "version": __version__})

    def list_models(self):
        self.send_json(200, model_listing(self.server.config, self.dialect))

    def get_model(self, model_id):
        self.send_json(200, model_lookup(self.server.config, model_id, self.dialect))

    def defaults(self):
        """The model and effort a request that names none gets (--model, --effort)."""
        return self.server.config.model, self.server.config.effort

    def chat_completions(self):
        plan = with_workspace(parse_chat_request(self.read_json(), *self.defaults()), self.workspace)
        self.answer(plan, chat_sink(ReplyChannel(self), plan, "chatcmpl-" + uuid.uuid4().hex, int(time.time())))

    def messages(self):
        """POST /v1/messages: the Anthropic Messages API over the same runs."""
        plan = with_workspace(parse_messages_request(self.read_json(), *self.defaults()), self.workspace)
        self.answer(plan, anthropic_sink(ReplyChannel(self), plan, "msg_" + uuid.uuid4().hex[:24]))

    def create_response(self):
        """POST /v1/responses: the Responses API over the same runs as Chat Completions."""
        response_id = "resp_" + uuid.uuid4().hex
        plan, request, keep = responses_request(self.server.response_store, self.read_json(),
                                                self.client_scope(), response_id, *self.defaults())
        plan = with_workspace(plan, self.workspace)
        sink_type = ResponsesStreamWriter if plan.stream else ResponsesCollector
        self.answer(plan, sink_type(ReplyChannel(self), response_id, int(time.time()), plan.model, request["echo"],
                                    request["namespaces"], keep, bool(plan.json_schema),
                                    compacting=request["compacting"]))

    def compact_response(self):
        """POST /v1/responses/compact: the conversation (input, or a stored response and
        input) compacted into its user messages and one `compaction` item (see
        COMPACTION_PREFIX). Nothing is stored."""
        plan, request, retained = compaction_request(self.server.response_store, self.read_json(),
                                                     self.client_scope(), *self.defaults())
        self.answer(plan, CompactCollector(ReplyChannel(self), retained, "resp_" + uuid.uuid4().hex, int(time.time()),
                                           plan.model, request["echo"]))

    def stored_response(self, response_id):
        """GET or DELETE /v1/responses/{id}: a stored response of this API key's."""
        store, scope = self.server.response_store, self.client_scope()
        if self.command == "DELETE":
            if not store.delete(scope, response_id):
                raise response_not_found(response_id)
            return self.send_json(200, {"id": response_id, "object": "response", "deleted": True})
        record = store.get(scope, response_id)
        if record is None:
            raise response_not_found(response_id)
        self.send_json(200, record["response"])

    def count_tokens(self):
        """POST /v1/messages/count_tokens: an estimate (see estimate_tokens); no CLI run."""
        plan = parse_messages_request(self.read_json(), *self.defaults())
        self.send_json(200, {"input_tokens": estimate_tokens(plan)})

    def answer(self, plan, sink):
        """Hand a parsed request and its dialect's sink to the proxy (Proxy.answer), which
        owns the request's life from here; what it leaves for the access log comes back."""
        record = AnswerLog(self.reply_headers)
        try:
            self.server.proxy.answer(plan, sink, RequestClient(self.client_scope(), self.connection,
                                                               self.started), record)
        finally:
            self.log_model, self.log_usage, self.log_cost = record.model, record.usage, record.cost
            self.log_error = record.error or self.log_error

    def client_scope(self):
        """Whose conversations these are: a continuation is only ever found by the same key."""
        key = presented_key(self.headers) or ""
        return hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()[:16]


# Main #######################################################################################


class Config:
    """What the server needs to know, from flags and environment."""

    def __init__(self, claude_path=None, model=None, effort=None, timeout=DEFAULT_TIMEOUT,
                 models=DEFAULT_MODELS, max_body=DEFAULT_MAX_BODY, log_prompts=False,
                 claude_version=None, pool_size=0, pool_idle=DEFAULT_POOL_IDLE, api_keys=(),
                 cors_origins=(), max_concurrency=DEFAULT_MAX_CONCURRENCY,
                 max_queue=DEFAULT_MAX_QUEUE, loopback_only=True,
                 shutdown_grace=DEFAULT_SHUTDOWN_GRACE, ui=True, history="turns",
                 keepalive=DEFAULT_KEEPALIVE, model_aliases=None, daily_budget=None,
                 max_request_usd=None, state_dir=None, cache_ttl="auto",
                 cache_gap=CACHE_5M_SECONDS, reuse=False,
                 reuse_conversations=DEFAULT_REUSE_CONVERSATIONS,
                 reuse_memory_mb=DEFAULT_REUSE_MEMORY_MB, workspaces=None):
        self.claude_path = claude_path
        self.history = history  # "turns", or "transcript": how earlier turns reach the CLI
        self.model = model or None
        self.effort = effort or None
        self.timeout = timeout
        self.models = list(models)
        if self.model and self.model not in self.models:
            self.models.insert(0, self.model)
        self.max_body = max_body
        self.log_prompts = log_prompts
        self.claude_version = claude_version
        self.pool_size = pool_size  # main() turns the pool on (DEFAULT_POOL_SIZE); tests opt in
        self.pool_idle = pool_idle
        self.api_keys = [k for k in api_keys if k]
        self.cors_origins = [o.rstrip("/") for o in cors_origins if o]
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.loopback_only = loopback_only  # bound to loopback: answer loopback Host names only
        self.shutdown_grace = shutdown_grace
        self.ui = ui  # the chat page at GET /
        self.keepalive = keepalive  # seconds of stream silence before a keep-alive; 0: none
        self.model_aliases = dict(model_aliases or {})  # client's name -> the Claude model run
        self.daily_budget = daily_budget or None  # USD since local midnight; then 429
        self.max_request_usd = max_request_usd or None  # --max-budget-usd of each run
        self.state_dir = state_dir  # where today's spend is kept; None: memory only (tests)
        self.cache_ttl = cache_ttl  # the prompt cache's lifetime: auto, 5m or 1h (TurnRhythm)
        self.cache_gap = cache_gap  # with auto: a longer wait between turns gives a conversation 1h
        self.reuse = reuse  # main() turns reusing processes on (--reuse); tests opt in
        self.reuse_conversations = reuse_conversations  # then a reused process is recycled
        self.reuse_memory_mb = reuse_memory_mb  # or past this much resident memory
        self.workspaces = dict(workspaces or {})  # name ("" the default) -> Workspace (Workspace mode)
        self.started = int(time.time())


class ProxyServer(ThreadingHTTPServer):
    """Accepts connections and gives each to the HeadReader; a connection whose head has
    arrived gets a worker thread (ProxyHandler), up to max_connections at once."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, config, runner=None):
        self.config = config
        self.proxy = Proxy(config, runner)  # what outlives a request, and answers it
        # Its parts, for those outside Proxy that read them: the handler (metrics, plan_limits,
        # response_store), main() (runner, spend) and the tests.
        self.runner, self.admission, self.metrics = self.proxy.runner, self.proxy.admission, self.proxy.metrics
        self.spend, self.plan_limits = self.proxy.spend, self.proxy.plan_limits
        self.rhythm, self.response_store = self.proxy.rhythm, self.proxy.response_store
        self.read_deadlines = ReadDeadlines(BODY_READ_SECONDS)
        self.io_seconds = min(SOCKET_IO_SECONDS, config.timeout)
        self.max_connections = config.max_concurrency + config.max_queue + EXTRA_CONNECTIONS
        self.connections = 0  # requests being served: worker threads
        self._connections_lock = threading.Lock()
        self._heads = {}  # socket -> its head, from hand_over to the handler's setup
        try:
            super().__init__(address, ProxyHandler)
        except BaseException:
            self.runner.stop_all()
            self.read_deadlines.close()
            raise
        self.heads = HeadReader(self)

    def process_request(self, request, client_address):
        """A new connection: the HeadReader holds it until its head has arrived."""
        self.heads.add(request, client_address)

    def hand_over(self, request, client_address, head):
        """A connection whose head has arrived gets a worker thread; False when all
        max_connections are busy (the HeadReader then answers 503)."""
        with self._connections_lock:
            if self.connections >= self.max_connections:
                return False
            self.connections += 1
            self._heads[request] = head
        try:
            super().process_request(request, client_address)
        except BaseException:
            with self._connections_lock:
                self._heads.pop(request, None)
            self._connection_closed()
            raise
        return True

    def take_head(self, request):
        with self._connections_lock:
            return self._heads.pop(request, b"")

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connection_closed()

    def _connection_closed(self):
        with self._connections_lock:
            self.connections -= 1

    def stop(self, grace=0.0):
        """Stop accepting; give running requests up to `grace` seconds; then stop every CLI
        process and close. Call from another thread than serve_forever's."""
        self.shutdown()
        self.socket.close()  # new connections are refused from now on
        self.heads.close()  # and those still sending their head are dropped
        self.admission.close()  # queued requests leave with 503
        # Wait for whole HTTP answers, not just CLI runs: a run ends before its answer is
        # written, and handler threads die with the process.
        self._wait_for_requests(time.monotonic() + grace)
        self.runner.stop_all()
        self._wait_for_requests(time.monotonic() + STOP_GRACE_SECONDS)  # their error answers
        self.read_deadlines.close()
        self.server_close()

    def server_close(self):
        if hasattr(self, "heads"):  # not yet there when the address could not be bound
            self.heads.close()
        super().server_close()

    def _wait_for_requests(self, deadline):
        while self.metrics.in_flight and time.monotonic() < deadline:
            time.sleep(0.02)


#: Every signal whose default would end the proxy at once (leaving clients without an answer and
#: the runs' system-prompt files in TMPDIR) is a graceful shutdown instead: SIGHUP comes from a
#: closed terminal or ssh session. Only SIGKILL (and a crash) cannot be handled.
GRACEFUL_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGBREAK", "SIGUSR1", "SIGUSR2",
                    "SIGALRM", "SIGXCPU", "SIGXFSZ", "SIGVTALRM", "SIGPROF", "SIGPWR")


def env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def parse_args(argv=None):
    """Flags, each defaulting to its environment variable. String defaults go through the same
    type checks as flags, so a bad PORT is a usage error, not a traceback."""
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="claude_proxy.py",
        description="An API server over the local claude CLI, in three dialects: OpenAI Chat "
        "Completions, the OpenAI Responses API and the Anthropic Messages API.")
    add = parser.add_argument
    add("--host", default=env("HOST", DEFAULT_HOST),
        help="Default: %s (env HOST). Address to bind; keep it loopback." % DEFAULT_HOST)
    add("--port", type=int, default=env("PORT", str(DEFAULT_PORT)),
        help="Default: %d (env PORT). 0 picks a free port." % DEFAULT_PORT)
    add("--claude-path", default=env("CLAUDE_PATH") or None,
        help="Default: `claude` found on PATH (env CLAUDE_PATH).")
    add("--model", default=env("CLAUDE_MODEL") or None,
        help="Default: the CLI's own default (env CLAUDE_MODEL). Used when a request names none.")
    add("--effort", default=env("CLAUDE_EFFORT") or None,
        help="Default: the CLI's own (env CLAUDE_EFFORT). One of %s; used when a request has "
        "no reasoning_effort." % ", ".join(CLI_EFFORTS))
    add("--timeout", type=float, default=env("CLAUDE_TIMEOUT", str(DEFAULT_TIMEOUT)),
        help="Default: %g (env CLAUDE_TIMEOUT). Seconds one CLI run may take; then 504." % DEFAULT_TIMEOUT)
    add("--models", default=env("CLAUDE_MODELS", ",".join(DEFAULT_MODELS)),
        help="Default: %s (env CLAUDE_MODELS). What GET /v1/models lists." % ",".join(DEFAULT_MODELS))
    add("--max-body", type=int, default=env("CLAUDE_MAX_BODY", str(DEFAULT_MAX_BODY)),
        help="Default: %d (env CLAUDE_MAX_BODY). Largest request body in bytes; larger is 413."
        % DEFAULT_MAX_BODY)
    add("--pool-size", type=int, default=env("CLAUDE_POOL_SIZE", str(DEFAULT_POOL_SIZE)),
        help="Default: %d (env CLAUDE_POOL_SIZE). Warm CLI processes kept waiting, in all "
        "(~165 MB each), and as many kept for conversations' next turns; 0 turns off the pool, "
        "kept processes and --reuse." % DEFAULT_POOL_SIZE)
    add("--pool-idle", type=float, default=env("CLAUDE_POOL_IDLE", str(DEFAULT_POOL_IDLE)),
        help="Default: %g (env CLAUDE_POOL_IDLE). Seconds a warm process, one kept for a "
        "conversation's next turn, or a reset one may wait unused." % DEFAULT_POOL_IDLE)
    add("--reuse", choices=("on", "off"), default=env("CLAUDE_REUSE", "on"),
        help="Default: on (env CLAUDE_REUSE). A process whose conversation is over (kept for a "
        "next turn that did not come in time, or pushed out by newer ones) is reset and serves "
        "the same client's next new conversation of the same kind: several times the requests/s "
        "for many short requests. CLI %s or newer; see the README for what the model sees."
        % ".".join(map(str, WARM_PRIME_SINCE)))
    add("--reuse-conversations", type=int,
        default=env("CLAUDE_REUSE_CONVERSATIONS", str(DEFAULT_REUSE_CONVERSATIONS)),
        help="Default: %d (env CLAUDE_REUSE_CONVERSATIONS). Conversations one process may serve "
        "before it is recycled." % DEFAULT_REUSE_CONVERSATIONS)
    add("--reuse-memory-mb", type=float,
        default=env("CLAUDE_REUSE_MEMORY_MB", str(DEFAULT_REUSE_MEMORY_MB)),
        help="Default: %g (env CLAUDE_REUSE_MEMORY_MB). A process whose resident memory passes "
        "this is recycled instead of reused." % DEFAULT_REUSE_MEMORY_MB)
    add("--history", choices=HISTORY_MODES, default=env("CLAUDE_HISTORY", "turns"),
        help="Default: turns (env CLAUDE_HISTORY). How a conversation's earlier turns reach the "
        "CLI: `turns`, as the API's own messages (read from the prompt cache: see the README), or "
        "`transcript`, as one tagged text (0.1.0's way: every turn pays for the whole history again).")
    add("--api-key", default=env("CLAUDE_PROXY_API_KEY") or "",
        help="Default: none (env CLAUDE_PROXY_API_KEY). Keys clients must send, comma-separated; "
        "prefer the environment variable (argv is visible to other local users).")
    add("--no-auth", action="store_true", default=env_flag("CLAUDE_PROXY_NO_AUTH"),
        help="Default: off (env CLAUDE_PROXY_NO_AUTH=1). Allow a non-loopback --host without a key.")
    add("--cors-origins", default=env("CLAUDE_PROXY_CORS_ORIGINS") or "",
        help="Default: none, CORS off (env CLAUDE_PROXY_CORS_ORIGINS). Browser origins allowed, "
        "comma-separated, or *.")
    add("--max-concurrency", type=int, default=env("CLAUDE_MAX_CONCURRENCY", str(DEFAULT_MAX_CONCURRENCY)),
        help="Default: %d (env CLAUDE_MAX_CONCURRENCY). CLI runs at once." % DEFAULT_MAX_CONCURRENCY)
    add("--max-queue", type=int, default=env("CLAUDE_MAX_QUEUE", str(DEFAULT_MAX_QUEUE)),
        help="Default: %d (env CLAUDE_MAX_QUEUE). Requests waiting for a run; more get 429."
        % DEFAULT_MAX_QUEUE)
    add("--shutdown-grace", type=float, default=env("CLAUDE_SHUTDOWN_GRACE", str(DEFAULT_SHUTDOWN_GRACE)),
        help="Default: %g (env CLAUDE_SHUTDOWN_GRACE). Seconds running requests get to finish "
        "after SIGTERM, SIGHUP or Ctrl-C." % DEFAULT_SHUTDOWN_GRACE)
    add("--no-ui", action="store_true",
        default=env("CLAUDE_PROXY_UI", "").strip().lower() in ("0", "false", "no", "off"),
        help="Default: the chat page is on (env CLAUDE_PROXY_UI=0 turns it off). Serve no page "
        "at /: it answers a small JSON instead (for Claude Code's HEAD / probe).")
    add("--keepalive", type=float, default=env("CLAUDE_KEEPALIVE", str(DEFAULT_KEEPALIVE)),
        help="Default: %g (env CLAUDE_KEEPALIVE). Seconds a stream may stay silent before a "
        "keep-alive is sent (the headers too, if not sent yet); 0 sends none." % DEFAULT_KEEPALIVE)
    add("--model-alias", action="append", default=[env("CLAUDE_MODEL_ALIASES") or ""],
        metavar="ALIAS=MODEL", help="Default: none (env CLAUDE_MODEL_ALIASES, comma-separated). "
        "Serve a model name clients hard-code with a Claude model, e.g. gpt-4o=sonnet; repeatable.")
    add("--daily-budget", type=float, default=env("CLAUDE_PROXY_DAILY_BUDGET_USD") or "0",
        help="Default: none (env CLAUDE_PROXY_DAILY_BUDGET_USD). US dollars the CLI runs may "
        "cost since local midnight (at API prices); past it, new requests get 429.")
    add("--cache-ttl", choices=CACHE_TTLS, default=env("CLAUDE_CACHE_TTL", "auto"),
        help="Default: auto (env CLAUDE_CACHE_TTL). How long the prompt cache the CLI writes "
        "lives: 5m (a write costs 1.25x the input price), 1h (2x), or auto: 5m, and 1h for a "
        "conversation once its turns come more than --cache-gap seconds apart.")
    add("--cache-gap", type=float, default=env("CLAUDE_CACHE_GAP", "%g" % CACHE_5M_SECONDS),
        help="Default: %g (env CLAUDE_CACHE_GAP). With --cache-ttl auto: a wait between a "
        "conversation's turns longer than this outlives 5-minute cache entries, and gives the "
        "conversation 1-hour ones." % CACHE_5M_SECONDS)
    add("--max-request-usd", type=float, default=env("CLAUDE_MAX_REQUEST_USD") or "0",
        help="Default: none (env CLAUDE_MAX_REQUEST_USD). Each CLI run's --max-budget-usd.")
    add("--log-prompts", action="store_true", default=env_flag("CLAUDE_PROXY_LOG_PROMPTS"),
        help="Default: off (env CLAUDE_PROXY_LOG_PROMPTS=1). Log each prompt to stderr.")
    add("--workspace", action="append", default=[], metavar="[NAME=]DIR",
        help="Default: none, workspace mode off (env CLAUDE_WORKSPACE, several separated by %r). "
        "A folder where clients whose base URL is /workspace/v1 (NAME=DIR: /workspace/NAME/v1) "
        "get Claude Code's own tools, read-only unless --workspace-tools; repeatable."
        % os.pathsep)
    add("--workspace-tools", default=env("CLAUDE_WORKSPACE_TOOLS") or "",
        help="Default: none, reading only (env CLAUDE_WORKSPACE_TOOLS). More tools for the "
        "workspaces, in the CLI's --allowedTools syntax: Edit, Write, Bash(git status:*), ... "
        "(a Bash grant runs commands as you: see the README)")
    add("--workspace-timeout", type=float,
        default=env("CLAUDE_WORKSPACE_TIMEOUT", "%g" % DEFAULT_WORKSPACE_TIMEOUT),
        help="Default: %g (env CLAUDE_WORKSPACE_TIMEOUT). Seconds one run in a workspace may "
        "take (it reads and searches for minutes); then 504." % DEFAULT_WORKSPACE_TIMEOUT)
    add("--version", action="version", version="claude_proxy.py " + __version__)
    add("--mcp-tools", metavar="FILE", help="Internal: run as the MCP server of a request's "
        "functions (the CLI starts this itself).")
    args = parser.parse_args(argv)
    if args.model and not MODEL_NAME.match(args.model):
        parser.error("invalid --model / CLAUDE_MODEL %r" % args.model)
    if args.effort and args.effort not in CLI_EFFORTS:
        parser.error("--effort / CLAUDE_EFFORT must be one of %s" % ", ".join(CLI_EFFORTS))
    try:
        args.model_aliases = {}
        for text in args.model_alias:
            args.model_aliases.update(parse_model_aliases(text))
    except ValueError as e:
        parser.error("--model-alias / CLAUDE_MODEL_ALIASES: %s" % e)
    for name in ("port", "pool_size", "max_queue", "shutdown_grace", "keepalive", "daily_budget",
                 "max_request_usd"):
        if getattr(args, name) < 0:
            parser.error("--%s must be 0 or more" % name.replace("_", "-"))
    if args.cache_ttl not in CACHE_TTLS:  # argparse checks a flag's choices, not a default's
        parser.error("--cache-ttl / CLAUDE_CACHE_TTL must be one of %s" % ", ".join(CACHE_TTLS))
    if args.reuse not in ("on", "off"):
        parser.error("--reuse / CLAUDE_REUSE must be on or off")
    for name in ("timeout", "max_body", "pool_idle", "max_concurrency", "cache_gap",
                 "reuse_conversations", "reuse_memory_mb", "workspace_timeout"):
        if getattr(args, name) <= 0:
            parser.error("--%s must be more than 0" % name.replace("_", "-"))
    folders = args.workspace or [f for f in (env("CLAUDE_WORKSPACE") or "").split(os.pathsep) if f]
    try:
        grants = parse_workspace_grants(args.workspace_tools)
    except ValueError as e:
        parser.error("--workspace-tools / CLAUDE_WORKSPACE_TOOLS: %s" % e)
    try:
        args.workspaces = parse_workspaces(folders, grants, args.workspace_timeout)
    except ValueError as e:
        parser.error("--workspace / CLAUDE_WORKSPACE: %s" % e)
    if grants and not args.workspaces:
        parser.error("--workspace-tools needs --workspace DIR")
    return args


def client_snippet(url):
    return ('  from openai import OpenAI\n'
            '  client = OpenAI(base_url="%s", api_key="not-needed")\n'
            '  print(client.chat.completions.create(model="sonnet",\n'
            '        messages=[{"role": "user", "content": "Hello"}]).choices[0].message.content)'
            % url)


def main(argv=None):
    args = parse_args(argv)
    if args.mcp_tools:
        return mcp_serve(args.mcp_tools)
    api_keys = [k.strip() for k in args.api_key.split(",") if k.strip()]
    loopback = is_loopback_host(args.host)
    if not loopback and not api_keys and args.workspaces:
        sys.stderr.write(
            "claude_proxy.py: refusing to listen on %s with a workspace and no API key: anyone "
            "who can reach it could have the model read the workspace's files (--no-auth does "
            "not lift this).\nSet CLAUDE_PROXY_API_KEY (or --api-key).\n" % args.host)
        return 2
    if not loopback and not api_keys and not args.no_auth:
        sys.stderr.write(
            "claude_proxy.py: refusing to listen on %s without an API key: anyone who can reach "
            "it could spend this machine's Claude subscription.\nSet CLAUDE_PROXY_API_KEY (or "
            "--api-key), or say --no-auth if that is really intended.\n" % args.host)
        return 2
    left = remove_leftovers()
    claude_path = find_claude(args.claude_path)
    version = None  # read with the rest of the check, below
    config = Config(claude_path, args.model, args.effort, args.timeout,
                    [m.strip() for m in args.models.split(",") if m.strip()], args.max_body,
                    args.log_prompts, version, args.pool_size, args.pool_idle, api_keys,
                    [o.strip() for o in args.cors_origins.split(",") if o.strip()],
                    args.max_concurrency, args.max_queue, loopback, args.shutdown_grace,
                    not args.no_ui, args.history, args.keepalive, args.model_aliases,
                    args.daily_budget, args.max_request_usd, state_dir(), args.cache_ttl,
                    args.cache_gap, args.reuse == "on", args.reuse_conversations,
                    args.reuse_memory_mb, args.workspaces)
    try:
        server = ProxyServer((args.host, args.port), config)
    except OSError as e:
        sys.stderr.write("claude_proxy.py: cannot listen on %s:%s: %s\n" % (args.host, args.port, e))
        return 1
    host, port = server.server_address[:2]
    url = "http://%s:%d/v1" % (host if ":" not in host else "[%s]" % host, port)
    if claude_path:
        # The check starts the CLI (about a second): a signal meanwhile stops the proxy cleanly.
        def starting(signum, frame):
            raise KeyboardInterrupt
        previous = {name: signal.signal(getattr(signal, name), starting)
                    for name in GRACEFUL_SIGNALS if hasattr(signal, name)}
        try:
            check = server.runner.check_cli()  # logs what a user must act on
            server.plan_limits.observe_login(check.login)  # a subscriber's first run gets --cache-ttl
        except KeyboardInterrupt:
            server.runner.stop_all()
            server.server_close()
            log("stopped while checking the claude CLI")
            return 0
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)
        log("claude CLI: %s (%s; oldest supported %s); sessions: %s" % (
            claude_path, check.version or "version unknown: `claude --version` failed",
            ".".join(map(str, OLDEST_SUPPORTED_CLI)),
            check.sessions_root or "unknown, see the warning above"))
    else:
        log("WARNING: no claude CLI found (set CLAUDE_PATH); requests will fail with 502")
    if left:
        log("removed what proxies that did not stop cleanly left in %s: %d folder(s), with their "
            "runs' files, session files and CLI processes" % (tempfile.gettempdir(), len(left)))
    if not loopback and not api_keys:
        log("WARNING: listening on %s with no API key (--no-auth)" % args.host)
    log("serving the OpenAI and Anthropic APIs on %s  (model: %s, timeout: %gs, warm pool: %s, "
        "API key: %s)" % (url, config.model or "CLI default", config.timeout,
                          "%d processes" % config.pool_size if config.pool_size else "off",
                          "required" if api_keys else "off"))
    if config.ui:
        log("chat and status page on %s/  (--no-ui turns it off)" % url[:-len("/v1")])
    if config.model_aliases:
        log("model aliases: %s" % ", ".join("%s=%s" % item for item in config.model_aliases.items()))
    for name, workspace in sorted(config.workspaces.items()):
        log("workspace %s/%s: %s  (tools: %s; runs up to %gs)" % (
            url[:-len("/v1")] + WORKSPACE_PREFIX, (name + "/v1") if name else "v1", workspace.root,
            ", ".join(list(WORKSPACE_READ_TOOLS) + list(workspace.grants)), workspace.timeout))
    if any(rule.startswith(("Bash(", "PowerShell(")) for w in config.workspaces.values()
           for rule in w.grants):
        log("workspace: the commands granted run as you, and the CLI's checks are no sandbox "
            "(an option of a granted command can reach outside the folder); grant only what "
            "anyone who can reach this proxy may run there.")
    if config.daily_budget or config.max_request_usd:
        log("budget: %s a day (spent today: $%.4f, kept in %s), %s a run" % (
            "$%g" % config.daily_budget if config.daily_budget else "no limit",
            server.spend.today(), server.spend.path,
            "$%g" % config.max_request_usd if config.max_request_usd else "no limit"))
    sys.stderr.write("Point any OpenAI client at it, e.g.:\n%s\n" % client_snippet(url))
    sys.stderr.flush()

    stopping = []

    def on_signal(signum, frame):
        if stopping:  # a second Ctrl-C: no more grace
            log("signal %d again: stopping every CLI run now" % signum)
            server.runner.stop_all()
            return
        log("signal %d: no new requests; running ones get up to %gs" % (signum, config.shutdown_grace))
        stopper = threading.Thread(target=server.stop, args=(config.shutdown_grace,))
        stopping.append(stopper)
        stopper.start()

    for name in GRACEFUL_SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), on_signal)
    try:
        server.serve_forever()
    finally:
        if stopping:
            stopping[0].join()
        else:
            server.runner.stop_all()
            server.server_close()
    log("stopped")
    return 0


# Web page ###################################################################################
#: GET /: a chat and status page for someone who has a browser and nothing else. One document,
#: its style and script inline and allowed by hash in a strict Content-Security-Policy: it loads
#: nothing from anywhere, and talks only to this proxy's own API (same origin, so CORS stays
#: off). Model and user text reach the page's DOM only as text nodes: its Markdown renderer
#: builds elements, and the policy's Trusted Types clause makes any HTML sink throw.

WEB_PAGE_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<meta name="referrer" content="no-referrer">
<title>claude-proxy</title>
<link rel="icon" href="data:,">
<style>/*STYLE*/</style>
</head>
<body>
<div id="app">
<aside id="sidebar" aria-label="Conversations">
  <div class="side-head">
    <button id="new-chat" type="button">+ New chat</button>
    <button id="close-sidebar" class="icon narrow-only" type="button" aria-label="Close the conversation list">&#x2715;</button>
  </div>
  <ul id="conversations"></ul>
  <p class="side-note">Conversations are kept in this browser only (localStorage), never on the proxy.</p>
</aside>
<main>
  <header>
    <button id="open-sidebar" class="icon narrow-only" type="button" aria-label="Conversations" aria-controls="sidebar" aria-expanded="false">&#x2630;</button>
    <label>Model <select id="model"></select></label>
    <label>Effort <select id="effort">
      <option value="">default</option><option>low</option><option>medium</option>
      <option>high</option><option>xhigh</option><option>max</option>
    </select></label>
    <div id="status" aria-label="Proxy status"><span class="dot"></span><span id="status-text">connecting&#x2026;</span></div>
  </header>
  <div id="messages">
    <div id="empty"><h1>claude-proxy</h1><p>Talk to Claude through the <code>claude</code> CLI on this machine.
    Enter sends, Shift+Enter starts a new line. Attach or paste PNG or JPEG images.</p></div>
  </div>
  <form id="composer" autocomplete="off">
    <div id="notice" role="alert"></div>
    <ul id="attachments" aria-label="Attached images"></ul>
    <textarea id="input" rows="1" aria-label="Message" placeholder="Message Claude" aria-describedby="hint"></textarea>
    <div class="actions">
      <button id="attach" type="button">Attach image</button>
      <input id="file" type="file" accept="image/png,image/jpeg,image/gif,image/webp" multiple tabindex="-1" aria-hidden="true">
      <span id="hint" class="spacer">Enter sends, Shift+Enter starts a new line</span>
      <button id="regenerate" type="button" disabled>Regenerate</button>
      <button id="stop" type="button" hidden>Stop</button>
      <button id="send" type="submit" class="primary">Send</button>
    </div>
  </form>
</main>
</div>
<dialog id="key-dialog" aria-labelledby="key-title">
  <form id="key-form">
    <h2 id="key-title">This proxy needs an API key</h2>
    <p>Enter one of the keys set in <code>CLAUDE_PROXY_API_KEY</code>. It is kept in this tab only
    (sessionStorage) and sent only to this proxy.</p>
    <input id="key-input" type="password" aria-label="API key" autocomplete="off" spellcheck="false">
    <p id="key-error" role="alert"></p>
    <button type="submit" class="primary">Use this key</button>
  </form>
</dialog>
<script>//SCRIPT</script>
</body>
</html>
"""

WEB_PAGE_STYLE = r"""
:root { --bg: #ffffff; --fg: #1f1f23; --muted: #66666f; --line: #dedee4; --panel: #f5f5f7;
  --accent: #a3481f; --accent-fg: #ffffff; --user: #eef0f5; --code: #f2f2f5; --focus: #1a5fd0;
  --err-bg: #fdecea; --err-fg: #8a1c12; --ok: #2e7d32; --warn: #b26a00; color-scheme: light dark; }
@media (prefers-color-scheme: dark) {
  :root { --bg: #1a1a1e; --fg: #e7e7ea; --muted: #a0a0aa; --line: #34343c; --panel: #222228;
    --accent: #e5956b; --accent-fg: #1a1a1e; --user: #2a2d36; --code: #26262d; --focus: #7fb0ff;
    --err-bg: #3b1f1c; --err-fg: #ffb4a8; --ok: #7bc47f; --warn: #f0b14a; }
}
* { box-sizing: border-box; }
html, body { margin: 0; height: 100%; }
body { background: var(--bg); color: var(--fg); font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
button, select, input, textarea { font: inherit; color: inherit; }
button, select { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; padding: 6px 12px; cursor: pointer; }
button:hover:not(:disabled) { border-color: var(--muted); }
button:disabled { opacity: .5; cursor: default; }
button.primary { background: var(--accent); color: var(--accent-fg); border-color: var(--accent); }
:focus-visible { outline: 2px solid var(--focus); outline-offset: 2px; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 13.5px; }
#app { display: grid; grid-template-columns: 270px 1fr; height: 100vh; height: 100dvh; }
#sidebar { background: var(--panel); border-right: 1px solid var(--line); display: flex; flex-direction: column; min-height: 0; }
.side-head { display: flex; gap: 8px; padding: 12px; }
#new-chat { flex: 1; text-align: left; }
#conversations { list-style: none; margin: 0; padding: 0 8px; overflow-y: auto; flex: 1; }
#conversations li { display: flex; align-items: center; border-radius: 8px; margin-bottom: 2px; }
#conversations li[aria-current="true"] { background: var(--user); }
#conversations .open { flex: 1; min-width: 0; text-align: left; background: none; border: 0; padding: 7px 8px; }
#conversations .title { display: block; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
#conversations .when { display: block; color: var(--muted); font-size: 12px; }
#conversations .delete { background: none; border: 0; color: var(--muted); padding: 4px 8px; }
.side-note { color: var(--muted); font-size: 12px; padding: 0 14px; }
main { display: flex; flex-direction: column; min-width: 0; min-height: 0; }
header { display: flex; flex-wrap: wrap; align-items: center; gap: 8px 14px; padding: 10px 16px; border-bottom: 1px solid var(--line); }
header label { display: flex; align-items: center; gap: 6px; color: var(--muted); font-size: 13px; }
header select { padding: 4px 8px; }
#status { margin-left: auto; display: flex; align-items: center; gap: 6px; color: var(--muted); font-size: 13px; }
#status .dot { width: 8px; height: 8px; border-radius: 50%; background: var(--muted); flex: none; }
#status.ok .dot { background: var(--ok); } #status.bad .dot { background: var(--err-fg); } #status.warn .dot { background: var(--warn); }
#messages { flex: 1; overflow-y: auto; padding: 16px; }
#messages > * { max-width: 820px; margin-left: auto; margin-right: auto; }
#empty { color: var(--muted); text-align: center; margin-top: 12vh; }
#empty h1 { color: var(--fg); font-size: 24px; font-weight: 600; }
.message { margin-bottom: 18px; }
.message .who { font-size: 12px; font-weight: 600; color: var(--muted); margin-bottom: 2px; }
.message.user .body { background: var(--user); border-radius: 12px; padding: 8px 12px; white-space: pre-wrap; overflow-wrap: anywhere; }
.message.assistant .body { overflow-wrap: anywhere; }
.message .body > :first-child { margin-top: 0; } .message .body > :last-child { margin-bottom: 0; }
.message .images { display: flex; flex-wrap: wrap; gap: 6px; margin-top: 6px; }
.message .images img, #attachments img { max-width: 160px; max-height: 120px; border-radius: 6px; border: 1px solid var(--line); display: block; }
.message .note { color: var(--muted); font-size: 13px; font-style: italic; }
.message .error { background: var(--err-bg); color: var(--err-fg); border-radius: 8px; padding: 8px 12px; margin-top: 6px; }
.cursor::after { content: "\25CD"; color: var(--accent); margin-left: 2px; }
details.thinking { border-left: 3px solid var(--line); padding: 2px 10px; margin-bottom: 8px; color: var(--muted); }
details.thinking summary { cursor: pointer; font-size: 13px; }
details.thinking div { white-space: pre-wrap; font-size: 13.5px; }
.body pre { margin: 0; padding: 10px 12px; overflow-x: auto; background: var(--code); border-radius: 0 0 8px 8px; }
.body :not(pre) > code { background: var(--code); border-radius: 4px; padding: 1px 4px; }
.codeblock { border: 1px solid var(--line); border-radius: 8px; margin: 10px 0; }
.codeblock .head { display: flex; align-items: center; justify-content: space-between; padding: 2px 4px 2px 12px; font-size: 12px; color: var(--muted); border-bottom: 1px solid var(--line); }
.codeblock .copy { padding: 2px 10px; font-size: 12px; }
.body table { border-collapse: collapse; margin: 10px 0; display: block; overflow-x: auto; }
.body th, .body td { border: 1px solid var(--line); padding: 4px 10px; }
.body th { background: var(--panel); }
.body blockquote { margin: 8px 0; padding-left: 12px; border-left: 3px solid var(--line); color: var(--muted); }
.body a { color: var(--focus); }
.body h1, .body h2, .body h3, .body h4, .body h5, .body h6 { line-height: 1.25; margin: 16px 0 8px; }
.body h1 { font-size: 1.4em; } .body h2 { font-size: 1.25em; } .body h3 { font-size: 1.1em; } .body h4, .body h5, .body h6 { font-size: 1em; }
.align-left { text-align: left; } .align-center { text-align: center; } .align-right { text-align: right; }
#composer { border-top: 1px solid var(--line); padding: 10px 16px 14px; }
#composer > * { max-width: 820px; margin-left: auto; margin-right: auto; }
#input { display: block; width: 100%; resize: none; min-height: 44px; max-height: 40vh; padding: 10px 12px; border: 1px solid var(--line); border-radius: 10px; background: var(--bg); }
.actions { display: flex; align-items: center; gap: 8px; margin-top: 8px; }
.actions .spacer { flex: 1; color: var(--muted); font-size: 12px; text-align: center; }
.offscreen { position: fixed; left: -9999px; top: 0; }
#file { position: absolute; width: 1px; height: 1px; opacity: 0; pointer-events: none; }
#attachments { list-style: none; padding: 0; display: flex; flex-wrap: wrap; gap: 8px; }
#attachments:empty, #notice:empty { display: none; }
#attachments li { position: relative; }
#attachments button { position: absolute; top: -8px; right: -8px; padding: 0 6px; border-radius: 50%; font-size: 12px; }
#notice { background: var(--err-bg); color: var(--err-fg); border-radius: 8px; padding: 6px 12px; margin-bottom: 8px; }
dialog { border: 1px solid var(--line); border-radius: 12px; background: var(--bg); color: var(--fg); max-width: min(440px, 92vw); padding: 20px; }
dialog::backdrop { background: rgba(0, 0, 0, .5); }
dialog h2 { margin-top: 0; font-size: 18px; }
#key-input { width: 100%; padding: 8px 10px; border: 1px solid var(--line); border-radius: 8px; background: var(--bg); }
#key-error { color: var(--err-fg); min-height: 1.5em; }
.narrow-only { display: none; }
.icon { padding: 4px 10px; }
@media (max-width: 760px) {
  #app { grid-template-columns: 1fr; }
  .narrow-only { display: inline-block; }
  #sidebar { position: fixed; z-index: 10; top: 0; bottom: 0; left: 0; width: min(300px, 86vw); transform: translateX(-105%); transition: transform .15s; box-shadow: 0 0 24px rgba(0, 0, 0, .25); visibility: hidden; }
  #sidebar.open { transform: none; visibility: visible; }
  header { padding: 8px 10px; gap: 6px 10px; }
  #status { margin-left: 0; width: 100%; }
  #messages { padding: 12px 10px; }
  #composer { padding: 8px 10px 10px; }
  .actions .spacer { font-size: 0; }
}
"""

WEB_PAGE_SCRIPT = r"""
"use strict";
(function () {
  var CONVERSATIONS = "claude-proxy.conversations", PREFS = "claude-proxy.prefs", KEY = "claude-proxy.api-key";
  var IMAGE_TYPES = ["image/png", "image/jpeg", "image/gif", "image/webp"];
  var $ = function (id) { return document.getElementById(id); };

  // --- Markdown -------------------------------------------------------------------------
  // Builds DOM nodes: every piece of text goes in as a text node, so nothing in a reply can
  // become markup. Links only to http(s) and mailto, opened with rel=noopener noreferrer;
  // images are never loaded (an image in Markdown becomes a link).

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function safeHref(url) {
    url = url.trim();
    if (url.charAt(0) === "<" && url.charAt(url.length - 1) === ">") url = url.slice(1, -1);
    // Absolute http(s) and mailto only; no whitespace or control characters that a browser
    // would strip to reveal another scheme.
    return /^(https?:\/\/|mailto:)[^\s\x00-\x1f\x7f]+$/i.test(url) ? url : null;
  }

  function link(href, parent) {
    var a = el("a");
    a.href = href;
    a.target = "_blank";
    a.rel = "noopener noreferrer";
    parent.appendChild(a);
    return a;
  }

  function findClosing(text, marker, from) {
    for (var j = text.indexOf(marker, from); j !== -1; j = text.indexOf(marker, j + 1)) {
      if (j === from || /\s/.test(text.charAt(j - 1))) continue;
      var ch = marker.charAt(0);
      if (marker.length === 1 && (text.charAt(j + 1) === ch || text.charAt(j - 1) === ch)) continue;
      if (ch === "_" && /[A-Za-z0-9]/.test(text.charAt(j + marker.length))) continue;
      return j;
    }
    return -1;
  }

  function bracketEnd(text, start, open, close) {
    for (var depth = 0, j = start; j < text.length; j++) {
      var c = text.charAt(j);
      if (c === "\\") { j++; continue; }
      if (c === open) depth++;
      else if (c === close && --depth === 0) return j;
    }
    return -1;
  }

  function renderInline(text, parent) {
    var buffer = "", i = 0, m;
    function flush() { if (buffer) { parent.appendChild(document.createTextNode(buffer)); buffer = ""; } }
    while (i < text.length) {
      var c = text.charAt(i), rest = text.slice(i);
      if (c === "\\" && /^[!-\/:-@\[-`{-~]$/.test(text.charAt(i + 1))) { buffer += text.charAt(i + 1); i += 2; continue; }
      if (c === "\n") { flush(); parent.appendChild(el("br")); i++; continue; }
      if (c === "`") {
        var run = /^`+/.exec(rest)[0], close = text.indexOf(run, i + run.length);
        while (close !== -1 && text.charAt(close + run.length) === "`") close = text.indexOf(run, close + run.length + 1);
        if (close === -1) { buffer += run; i += run.length; continue; }
        var code = text.slice(i + run.length, close).replace(/\n/g, " ");
        if (/^ .*[^ ].* $/.test(code)) code = code.slice(1, -1);
        flush(); parent.appendChild(el("code", null, code)); i = close + run.length; continue;
      }
      if (c === "*" || c === "_" || c === "~") {
        var marker = rest.slice(0, 2) === c + c ? c + c : c;
        var before = text.charAt(i - 1), after = text.charAt(i + marker.length);
        var opens = after && !/\s/.test(after) && !(c === "_" && /[A-Za-z0-9]/.test(before)) && !(c === "~" && marker.length === 1);
        var end = opens ? findClosing(text, marker, i + marker.length) : -1;
        if (end > i + marker.length) {
          flush();
          var tag = c === "~" ? "del" : marker.length === 2 ? "strong" : "em";
          var node = el(tag);
          renderInline(text.slice(i + marker.length, end), node);
          parent.appendChild(node);
          i = end + marker.length; continue;
        }
        buffer += marker; i += marker.length; continue;
      }
      if (c === "[") {
        var labelEnd = bracketEnd(text, i, "[", "]");
        if (labelEnd !== -1 && text.charAt(labelEnd + 1) === "(") {
          var urlEnd = bracketEnd(text, labelEnd + 1, "(", ")");
          if (urlEnd !== -1) {
            var target = text.slice(labelEnd + 2, urlEnd).replace(/\s+("[^"]*"|'[^']*')\s*$/, "");
            var href = safeHref(target);
            if (href) {
              flush();
              renderInline(text.slice(i + 1, labelEnd), link(href, parent));
              i = urlEnd + 1; continue;
            }
            // A link to anything else (javascript:, data:, relative) stays visible as text.
            buffer += text.slice(i, urlEnd + 1); i = urlEnd + 1; continue;
          }
        }
      }
      if (c === "<" && (m = /^<((?:https?:\/\/|mailto:)[^\s<>]+)>/i.exec(rest))) {
        flush(); link(m[1], parent).textContent = m[1]; i += m[0].length; continue;
      }
      if ((c === "h" || c === "H") && !/[A-Za-z0-9]/.test(text.charAt(i - 1)) && (m = /^https?:\/\/[^\s<>"]+/i.exec(rest))) {
        var url = m[0].replace(/[.,;:!?'")\]*_~]+$/, "");
        flush(); link(url, parent).textContent = url; i += url.length; continue;
      }
      buffer += c; i++;
    }
    flush();
  }

  var FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)[^`]*$/, HEADING = /^ {0,3}(#{1,6})(?:\s+(.*?))?(?:\s+#+)?\s*$/;
  var RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/, QUOTE = /^ {0,3}> ?(.*)$/;
  var ITEM = /^( *)([-*+]|\d{1,9}[.)])(?:[ \t]+(.*)|$)/, TABLE_RULE = /^ *\|? *:?-+:? *(\| *:?-+:? *)*\|? *$/;

  function indentOf(line) { return /^ */.exec(line)[0].length; }

  function startsBlock(line, next) {
    return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) ||
      ITEM.test(line) || isTable(line, next);
  }

  function isTable(line, next) {
    return line.indexOf("|") !== -1 && next !== undefined && TABLE_RULE.test(next) && next.indexOf("|") !== -1 &&
      next.indexOf("-") !== -1;
  }

  function tableCells(line) {
    var cells = [], cell = "", inCode = false;
    line = line.trim().replace(/^\|/, "");
    if (/[^\\]\|$/.test(line) || line === "|") line = line.slice(0, -1);
    for (var i = 0; i < line.length; i++) {
      var c = line.charAt(i);
      if (c === "\\" && line.charAt(i + 1) === "|") { cell += "|"; i++; continue; }
      if (c === "`") inCode = !inCode;
      if (c === "|" && !inCode) { cells.push(cell.trim()); cell = ""; continue; }
      cell += c;
    }
    cells.push(cell.trim());
    return cells;
  }

  function codeBlock(language, code, parent) {
    var box = el("div", "codeblock"), head = el("div", "head"), copy = el("button", "copy", "Copy");
    copy.type = "button";
    copy.setAttribute("aria-label", "Copy code" + (language ? " (" + language + ")" : ""));
    copy.addEventListener("click", function () { copyText(code, copy); });
    head.appendChild(el("span", null, language || "code"));
    head.appendChild(copy);
    var pre = el("pre"), codeNode = el("code", null, code);
    if (language) codeNode.setAttribute("data-language", language);
    pre.appendChild(codeNode);
    box.appendChild(head);
    box.appendChild(pre);
    parent.appendChild(box);
  }

  function renderList(lines, i, parent) {
    var first = ITEM.exec(lines[i]), indent = first[1].length, ordered = /\d/.test(first[2]);
    var list = el(ordered ? "ol" : "ul"), items = [], loose = false;
    if (ordered && parseInt(first[2], 10) !== 1) list.start = parseInt(first[2], 10);
    while (i < lines.length) {
      var m = ITEM.exec(lines[i]);
      if (!m || m[1].length !== indent || /\d/.test(m[2]) !== ordered || RULE.test(lines[i])) break;
      var contentIndent = indent + m[2].length + 1, body = [m[3] || ""];
      for (i++; i < lines.length; i++) {
        var line = lines[i];
        if (!line.trim()) {
          var j = i;
          while (j < lines.length && !lines[j].trim()) j++;
          if (j < lines.length && indentOf(lines[j]) > indent) { loose = true; for (; i < j; i++) body.push(""); i--; continue; }
          if (j < lines.length && (m = ITEM.exec(lines[j])) && m[1].length === indent && /\d/.test(m[2]) === ordered) { loose = true; i = j; }
          break;
        }
        if (indentOf(line) > indent) { body.push(line.slice(Math.min(indentOf(line), contentIndent))); continue; }
        if (startsBlock(line, lines[i + 1])) break;
        body.push(line.trim());  // a lazy continuation of the item's paragraph
      }
      items.push(body);
    }
    items.forEach(function (body) {
      var li = el("li");
      renderBlocks(body, li, !loose);
      list.appendChild(li);
    });
    parent.appendChild(list);
    return i;
  }

  function renderBlocks(lines, parent, tight) {
    var i = 0, m;
    while (i < lines.length) {
      var line = lines[i];
      if (!line.trim()) { i++; continue; }
      if ((m = FENCE.exec(line))) {
        var fence = m[1], code = [];
        for (i++; i < lines.length; i++) {
          var t = lines[i].trim();
          if (t.length >= fence.length && t.split("").every(function (ch) { return ch === fence.charAt(0); })) { i++; break; }
          code.push(lines[i]);
        }
        codeBlock(m[2], code.join("\n"), parent);
        continue;
      }
      if ((m = HEADING.exec(line))) {
        var heading = el("h" + m[1].length);
        renderInline(m[2] || "", heading);
        parent.appendChild(heading); i++; continue;
      }
      if (RULE.test(line)) { parent.appendChild(el("hr")); i++; continue; }
      if (QUOTE.test(line)) {
        var quoted = [];
        for (; i < lines.length && (m = QUOTE.exec(lines[i])); i++) quoted.push(m[1]);
        var quote = el("blockquote");
        renderBlocks(quoted, quote, false);
        parent.appendChild(quote); continue;
      }
      if (ITEM.test(line)) { i = renderList(lines, i, parent); continue; }
      if (isTable(line, lines[i + 1])) {
        var header = tableCells(line), aligns = tableCells(lines[i + 1]).map(function (cell) {
          return /^:-+:$/.test(cell) ? "center" : /-:$/.test(cell) ? "right" : /^:-/.test(cell) ? "left" : "";
        });
        var table = el("table"), thead = el("thead"), tbody = el("tbody");
        var addRow = function (cells, section, tag) {
          var row = el("tr");
          for (var k = 0; k < header.length; k++) {
            var cell = el(tag, aligns[k] ? "align-" + aligns[k] : null);
            renderInline(cells[k] || "", cell);
            row.appendChild(cell);
          }
          section.appendChild(row);
        };
        addRow(header, thead, "th");
        for (i += 2; i < lines.length && lines[i].trim() && lines[i].indexOf("|") !== -1; i++) addRow(tableCells(lines[i]), tbody, "td");
        table.appendChild(thead);
        if (tbody.firstChild) table.appendChild(tbody);
        parent.appendChild(table); continue;
      }
      var paragraph = [line.trim()];
      for (i++; i < lines.length && lines[i].trim() && !startsBlock(lines[i], lines[i + 1]); i++) paragraph.push(lines[i].trim());
      if (tight) {
        if (parent.lastChild && parent.lastChild.nodeType === 3) parent.appendChild(el("br"));
        renderInline(paragraph.join("\n"), parent);
      } else {
        var p = el("p");
        renderInline(paragraph.join("\n"), p);
        parent.appendChild(p);
      }
    }
  }

  function renderMarkdown(text) {
    var fragment = document.createDocumentFragment();
    renderBlocks(String(text).replace(/\r\n?/g, "\n").replace(/\t/g, "    ").split("\n"), fragment, false);
    return fragment;
  }

  function copyText(text, button) {
    var done = function () {
      button.textContent = "Copied";
      setTimeout(function () { button.textContent = "Copy"; }, 1500);
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, function () { copyBySelection(text) && done(); });
    } else if (copyBySelection(text)) {
      done();
    }
  }

  function copyBySelection(text) {
    // Plain http to a LAN address is not a secure context: no clipboard API there.
    var area = el("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "offscreen";
    document.body.appendChild(area);
    area.select();
    var ok = false;
    try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
    area.remove();
    return ok;
  }

  // --- Storage --------------------------------------------------------------------------

  function readJson(storage, key, fallback) {
    try { var value = JSON.parse(storage.getItem(key)); return value === null ? fallback : value; }
    catch (e) { return fallback; }
  }

  var conversations = readJson(localStorage, CONVERSATIONS, []);
  if (!Array.isArray(conversations)) conversations = [];
  var prefs = readJson(localStorage, PREFS, {});
  var apiKey = sessionStorage.getItem(KEY) || "";
  var current = null, busy = null, attachments = [], health = null, emptyNode = $("empty");

  function save() {
    for (var attempt = 0; attempt < 50; attempt++) {
      try { localStorage.setItem(CONVERSATIONS, JSON.stringify(conversations)); return; }
      catch (e) {
        // Over the browser's quota (images are large): drop the oldest images first.
        if (!dropOldestImage()) { notice("This browser's storage is full; the conversation could not be saved."); return; }
        notice("This browser's storage is full: images of older messages were not kept.");
      }
    }
  }

  function dropOldestImage() {
    for (var c = conversations.length - 1; c >= 0; c--) {
      var messages = conversations[c].messages;
      for (var k = 0; k < messages.length; k++) {
        if (messages[k].images && messages[k].images.length) { messages[k].images = []; messages[k].imagesDropped = true; return true; }
      }
    }
    return false;
  }

  function savePrefs() {
    prefs.model = $("model").value;
    prefs.effort = $("effort").value;
    try { localStorage.setItem(PREFS, JSON.stringify(prefs)); } catch (e) { /* not worth a notice */ }
  }

  // --- Talking to the proxy -------------------------------------------------------------

  function headers(extra) {
    var h = extra || {};
    if (apiKey) h.Authorization = "Bearer " + apiKey;
    return h;
  }

  function ProxyFailure(status, error, retryAfter) {
    this.status = status;
    this.error = error || {};
    this.retryAfter = retryAfter;
  }

  function readFailure(response) {
    return response.text().then(function (text) {
      var error = null;
      try { error = JSON.parse(text).error; } catch (e) { error = null; }
      return new ProxyFailure(response.status, error, response.headers.get("Retry-After"));
    });
  }

  function api(path, options) {
    options = options || {};
    options.headers = headers(options.headers);
    options.cache = "no-store";
    return fetch(path, options).then(function (response) {
      if (response.ok) return response;
      return readFailure(response).then(function (failure) { throw failure; });
    });
  }

  function explain(failure) {
    if (!(failure instanceof ProxyFailure)) return "Cannot reach the proxy. Is it still running?";
    var error = failure.error, code = error.code || error.type || "";
    // After a stream began, an error has no Retry-After header; the proxy's own words say when.
    var wait = failure.retryAfter ? " Try again in " + failure.retryAfter + " s." : error.message ? " (" + error.message + ")" : "";
    switch (code) {
      case "cli_not_logged_in":
        return "The claude CLI on the proxy's machine is not logged in. Run `claude` there and log in, then try again.";
      case "rate_limit_exceeded":
        return "Claude's API is rate limiting this account." + wait;
      case "proxy_busy":
        return "The proxy is busy with other requests." + wait;
      case "overloaded":
        return "Claude is overloaded right now." + wait;
      case "budget_exceeded":
        return "The proxy's spending budget for today is used up." + (failure.retryAfter ? " It resets in about " + Math.ceil(failure.retryAfter / 3600) + " h." : "");
      case "timeout":
        return "Claude did not finish within the proxy's time limit (CLAUDE_TIMEOUT).";
      case "invalid_api_key":
        return "The proxy refused the API key.";
      case "request_too_large":
        return "This conversation is too large for the proxy (images count). Start a new chat or attach smaller images.";
      case "model_not_found":
        return "The proxy or Claude does not know this model. " + (error.message || "");
    }
    if (failure.status === 0) return "The reply was cut off: " + (error.message || "the connection closed early") + ".";
    return error.message ? "The proxy answered: " + error.message : "The proxy answered with HTTP status " + failure.status + ".";
  }

  function toApiMessages(messages) {
    var out = [];
    messages.forEach(function (message) {
      if (message.role === "user") {
        var images = message.images || [];
        out.push({role: "user", content: images.length ? [{type: "text", text: message.text}].concat(images.map(function (url) {
          return {type: "image_url", image_url: {url: url}};
        })) : message.text});
      } else if (message.text) {
        out.push({role: "assistant", content: message.text});
      }
    });
    return out;
  }

  function readStream(response, onDelta) {
    // SSE: `data: {...}` lines; comments (`: keep-alive`) and other fields are skipped.
    var reader = response.body.getReader(), decoder = new TextDecoder(), pending = "", finished = false;
    function handle(line) {
      if (line.slice(0, 5) !== "data:") return;
      var payload = line.slice(5).trim();
      if (payload === "[DONE]") { finished = true; return; }
      var chunk = JSON.parse(payload);
      if (chunk.error) throw new ProxyFailure(200, chunk.error, null);
      (chunk.choices || []).forEach(function (choice) { onDelta(choice.delta || {}, choice.finish_reason); });
    }
    function pump() {
      return reader.read().then(function (step) {
        if (step.done) {
          if (pending) handle(pending);
          if (!finished) throw new ProxyFailure(0, {message: "the connection closed before the answer was complete"});
          return;
        }
        pending += decoder.decode(step.value, {stream: true});
        var lines = pending.split(/\r?\n/);
        pending = lines.pop();
        lines.forEach(handle);
        return pump();
      });
    }
    return pump();
  }

  function runReply(conversation) {
    var reply = {role: "assistant", text: "", reasoning: ""};
    var history = toApiMessages(conversation.messages);
    conversation.messages.push(reply);
    conversation.updated = Date.now();
    var controller = new AbortController();
    busy = {controller: controller, conversation: conversation, reply: reply};
    save();
    renderAll();
    var body = {messages: history, stream: true};
    if ($("model").value) body.model = $("model").value;
    if ($("effort").value) body.reasoning_effort = $("effort").value;
    var lastSave = Date.now();
    return api("v1/chat/completions", {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
      signal: controller.signal
    }).then(function (response) {
      return readStream(response, function (delta, finishReason) {
        if (delta.reasoning_content) reply.reasoning += delta.reasoning_content;
        if (delta.content) reply.text += delta.content;
        if (finishReason === "length") reply.note = "The reply reached its length limit.";
        scheduleRender();
        if (Date.now() - lastSave > 1000) { lastSave = Date.now(); save(); }
      });
    }).catch(function (failure) {
      if (failure && failure.name === "AbortError") { reply.note = "Stopped."; return; }
      if (failure instanceof ProxyFailure && failure.status === 401) { askForKey("The proxy refused the key."); }
      reply.error = explain(failure);
    }).then(function () {
      busy = null;
      conversation.updated = Date.now();
      save();
      renderAll();
      refreshHealth();
    });
  }

  function send() {
    var text = $("input").value.trim();
    if (busy || (!text && !attachments.length)) return;
    if (!current) {
      current = {id: Date.now().toString(36) + Math.random().toString(36).slice(2, 8), title: "", messages: [], updated: Date.now()};
      conversations.unshift(current);
    }
    if (!current.title) current.title = (text || "Image").replace(/\s+/g, " ").slice(0, 80);
    current.messages.push({role: "user", text: text, images: attachments.slice()});
    moveToTop(current);
    $("input").value = "";
    attachments = [];
    renderAttachments();
    notice("");
    fitInput();
    runReply(current);
  }

  function regenerate() {
    if (busy || !current) return;
    while (current.messages.length && current.messages[current.messages.length - 1].role === "assistant") current.messages.pop();
    if (current.messages.length) runReply(current);
  }

  function moveToTop(conversation) {
    conversations = [conversation].concat(conversations.filter(function (c) { return c !== conversation; }));
  }

  // --- Rendering ------------------------------------------------------------------------

  var renderQueued = false;
  function scheduleRender() {
    // While a reply streams, only its own message is rendered again, once a frame at most.
    if (renderQueued) return;
    renderQueued = true;
    requestAnimationFrame(function () {
      renderQueued = false;
      if (!busy || !busy.node || !busy.node.parentNode) return;
      var list = $("messages"), nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
      var node = renderMessage(busy.reply, true), thinking = busy.node.querySelector("details");
      if (thinking && thinking.open && node.querySelector("details")) node.querySelector("details").open = true;
      list.replaceChild(node, busy.node);
      busy.node = node;
      if (nearBottom) list.scrollTop = list.scrollHeight;
    });
  }

  function renderMessage(message, streaming) {
    var box = el("div", "message " + message.role);
    box.appendChild(el("div", "who", message.role === "user" ? "You" : "Claude"));
    if (message.reasoning) {
      var thinking = el("details", "thinking");
      thinking.appendChild(el("summary", null, streaming && !message.text ? "Thinking\u2026" : "Thinking"));
      thinking.appendChild(el("div", null, message.reasoning));
      box.appendChild(thinking);
    }
    var body = el("div", "body");
    if (message.role === "user") body.textContent = message.text;
    else body.appendChild(renderMarkdown(message.text));
    if (streaming) body.classList.add("cursor");
    if (message.text || message.role === "user" || streaming) box.appendChild(body);
    if (message.images && message.images.length) {
      var images = el("div", "images");
      message.images.forEach(function (url, n) {
        var img = el("img");
        img.alt = "Attached image " + (n + 1);
        img.src = url;
        images.appendChild(img);
      });
      box.appendChild(images);
    }
    if (message.imagesDropped) box.appendChild(el("div", "note", "(An image was here; it was not kept, for lack of browser storage.)"));
    if (message.note) box.appendChild(el("div", "note", message.note));
    if (message.error) box.appendChild(el("div", "error", message.error));
    return box;
  }

  function renderMessages() {
    var list = $("messages"), nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
    var nodes = [];
    if (!current || !current.messages.length) nodes.push(emptyNode);
    else current.messages.forEach(function (message) {
      var streaming = busy && busy.reply === message, node = renderMessage(message, streaming);
      if (streaming) busy.node = node;
      nodes.push(node);
    });
    list.replaceChildren.apply(list, nodes);
    if (nearBottom) list.scrollTop = list.scrollHeight;
  }

  function renderSidebar() {
    var list = $("conversations"), items = [];
    conversations.forEach(function (conversation) {
      var li = el("li"), open = el("button", "open"), remove = el("button", "delete", "\u2715");
      if (conversation === current) li.setAttribute("aria-current", "true");
      open.type = remove.type = "button";
      open.appendChild(el("span", "title", conversation.title || "New chat"));
      open.appendChild(el("span", "when", new Date(conversation.updated).toLocaleString()));
      open.addEventListener("click", function () { openConversation(conversation); });
      remove.setAttribute("aria-label", "Delete conversation: " + (conversation.title || "New chat"));
      remove.addEventListener("click", function () { deleteConversation(conversation); });
      li.appendChild(open);
      li.appendChild(remove);
      items.push(li);
    });
    list.replaceChildren.apply(list, items);
  }

  function renderAttachments() {
    var list = $("attachments"), items = [];
    attachments.forEach(function (url, n) {
      var li = el("li"), img = el("img"), remove = el("button", null, "\u2715");
      img.src = url;
      img.alt = "Image to send " + (n + 1);
      remove.type = "button";
      remove.setAttribute("aria-label", "Remove image " + (n + 1));
      remove.addEventListener("click", function () { attachments.splice(n, 1); renderAttachments(); });
      li.appendChild(img);
      li.appendChild(remove);
      items.push(li);
    });
    list.replaceChildren.apply(list, items);
  }

  function renderButtons() {
    $("send").hidden = !!busy;
    $("stop").hidden = !busy;
    $("regenerate").disabled = !!busy || !current || !current.messages.length;
  }

  function renderAll() {
    renderMessages();
    renderSidebar();
    renderButtons();
  }

  function notice(text) { $("notice").textContent = text; }

  function openConversation(conversation) {
    if (busy) busy.controller.abort();
    current = conversation;
    closeSidebar();
    renderAll();
    $("input").focus();
  }

  function deleteConversation(conversation) {
    if (busy && busy.conversation === conversation) busy.controller.abort();
    conversations = conversations.filter(function (c) { return c !== conversation; });
    if (current === conversation) current = null;
    save();
    renderAll();
  }

  function closeSidebar() {
    $("sidebar").classList.remove("open");
    $("open-sidebar").setAttribute("aria-expanded", "false");
  }

  function fitInput() {
    var input = $("input");
    input.style.height = "auto";
    input.style.height = input.scrollHeight + 2 + "px";
  }

  // --- Images ---------------------------------------------------------------------------

  function addImages(files) {
    Array.prototype.forEach.call(files, function (file) {
      if (IMAGE_TYPES.indexOf(file.type) === -1) { notice("Only PNG, JPEG, GIF and WebP images can be sent (" + (file.name || file.type) + " is not one)."); return; }
      var reader = new FileReader();
      reader.onload = function () { attachments.push(reader.result); renderAttachments(); };
      reader.onerror = function () { notice("Could not read " + file.name + "."); };
      reader.readAsDataURL(file);
    });
  }

  // --- Status and settings --------------------------------------------------------------

  function setStatus(kind, text) {
    $("status").className = kind;
    $("status-text").textContent = text;
  }

  // A subscriber's plan (`plan` in /health, null for an API key): each window's use and when
  // it resets, in the reader's time; a warning from 80 % up and at a reached limit.
  var WINDOW_NAMES = {five_hour: "5-hour", seven_day: "weekly", seven_day_opus: "weekly Opus", seven_day_sonnet: "weekly Sonnet"};
  var PLAN_FIELDS = {overage: true, updated_at: true, limit_reached: true, other: true};
  function resetText(iso) {
    var when = new Date(iso);
    if (isNaN(when.getTime())) return "";
    var time = when.toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"});
    return when.getTime() - Date.now() > 20 * 3600 * 1000
      ? when.toLocaleDateString([], {weekday: "short"}) + " " + time : time;
  }
  function planParts(plan) {
    var out = {parts: [], warn: false};
    if (!plan) return out;
    Object.keys(plan).forEach(function (name) {
      var use = plan[name];
      if (PLAN_FIELDS[name] || !use || typeof use.utilization !== "number") return;
      var percent = Math.round(use.utilization * 100), reset = use.resets_at ? resetText(use.resets_at) : "";
      if (use.utilization >= 0.8 || use.status === "rejected") out.warn = true;
      out.parts.push((WINDOW_NAMES[name] || name) + " " + percent + "%" + (reset ? " (resets " + reset + ")" : ""));
    });
    if (plan.limit_reached) {
      out.warn = true;
      out.parts.unshift(plan.limit_reached.kind === "credits" ? "usage credits spent"
        : "plan limit reached" + (plan.limit_reached.resets_at ? " until " + resetText(plan.limit_reached.resets_at) : ""));
    }
    return out;
  }

  function refreshHealth() {
    return api("health", {}).then(function (response) { return response.json(); }, function (failure) {
      if (failure instanceof ProxyFailure && failure.status === 503) return {status: "cli_not_found"};
      throw failure;
    }).then(function (data) {
      health = data || {};
      if (health.status === "cli_not_found") return setStatus("bad", "claude CLI not found on the proxy's machine (set CLAUDE_PATH)");
      if (!health.cli) return setStatus("warn", "connected; details need the API key");
      var parts = ["claude " + String(health.cli.version || "version unknown").replace(/ \(Claude Code\)$/, "")];
      parts.push((health.active_runs || 0) + " running");
      if (health.limits && health.limits.queued) parts.push(health.limits.queued + " waiting");
      if (health.pool) {
        var warm = 0, idle = health.pool.idle || {};
        Object.keys(idle).forEach(function (k) { warm += idle[k]; });
        parts.push(warm + " warm");
      }
      // Spend appears once the proxy accounts for it (a `spend` object in /health).
      if (health.spend && typeof health.spend.today_usd === "number") parts.push("$" + health.spend.today_usd.toFixed(2) + " today");
      var plan = planParts(health.plan);
      setStatus(plan.warn ? "warn" : "ok", parts.concat(plan.parts).join(" \u00b7 "));
    }).catch(function () { setStatus("bad", "cannot reach the proxy"); });
  }

  function loadModels() {
    return api("v1/models", {}).then(function (response) { return response.json(); }).then(function (listing) {
      var select = $("model"), options = [], ids = (listing.data || []).map(function (m) { return m.id; });
      var defaultOption = el("option", null, "default");
      defaultOption.value = "";
      options.push(defaultOption);
      ids.forEach(function (id) { options.push(el("option", null, id)); });
      select.replaceChildren.apply(select, options);
      select.value = prefs.model && ids.indexOf(prefs.model) !== -1 ? prefs.model : "";
      return true;
    }, function (failure) {
      if (failure instanceof ProxyFailure && failure.status === 401) { askForKey(apiKey ? "The proxy refused that key." : ""); return false; }
      notice(explain(failure));
      return false;
    });
  }

  function askForKey(message) {
    $("key-error").textContent = message || "";
    if (!$("key-dialog").open) $("key-dialog").showModal();
    $("key-input").focus();
  }

  function start() {
    loadModels().then(function (ok) { if (ok) refreshHealth(); });
  }

  // --- Wiring ---------------------------------------------------------------------------

  $("composer").addEventListener("submit", function (event) { event.preventDefault(); send(); });
  $("input").addEventListener("keydown", function (event) {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); send(); }
    else if (event.key === "Escape" && busy) busy.controller.abort();
  });
  $("input").addEventListener("input", fitInput);
  $("input").addEventListener("paste", function (event) {
    var files = Array.prototype.filter.call((event.clipboardData || {}).files || [], function (f) { return f.type.indexOf("image/") === 0; });
    if (files.length) { event.preventDefault(); addImages(files); }
  });
  $("attach").addEventListener("click", function () { $("file").click(); });
  $("file").addEventListener("change", function () { addImages($("file").files); $("file").value = ""; });
  $("stop").addEventListener("click", function () { if (busy) busy.controller.abort(); $("input").focus(); });
  $("regenerate").addEventListener("click", regenerate);
  $("new-chat").addEventListener("click", function () {
    if (busy) busy.controller.abort();  // its reply keeps what had arrived, marked as stopped
    current = null;
    closeSidebar();
    renderAll();
    $("input").focus();
  });
  $("open-sidebar").addEventListener("click", function () {
    $("sidebar").classList.add("open");
    $("open-sidebar").setAttribute("aria-expanded", "true");
    $("new-chat").focus();
  });
  $("close-sidebar").addEventListener("click", function () { closeSidebar(); $("open-sidebar").focus(); });
  $("sidebar").addEventListener("keydown", function (event) { if (event.key === "Escape") closeSidebar(); });
  $("model").addEventListener("change", savePrefs);
  $("effort").addEventListener("change", savePrefs);
  $("key-dialog").addEventListener("cancel", function (event) { event.preventDefault(); });
  $("key-form").addEventListener("submit", function (event) {
    event.preventDefault();
    apiKey = $("key-input").value.trim();
    if (!apiKey) { $("key-error").textContent = "Enter a key."; return; }
    sessionStorage.setItem(KEY, apiKey);
    $("key-input").value = "";
    $("key-dialog").close();
    start();
  });
  window.addEventListener("storage", function (event) {
    // Another tab changed the conversations: show its list (the open one stays as it is).
    if (event.key !== CONVERSATIONS || busy) return;
    var id = current && current.id;
    conversations = readJson(localStorage, CONVERSATIONS, []);
    current = conversations.filter(function (c) { return c.id === id; })[0] || null;
    renderAll();
  });

  $("effort").value = prefs.effort || "";
  renderAll();
  start();
  setInterval(function () { if (!document.hidden && !$("key-dialog").open) refreshHealth(); }, 5000);
  window.claudeProxyPage = Object.freeze({renderMarkdown: renderMarkdown});
})();
"""


def csp_source_hash(text):
    """The CSP source expression that allows exactly this inline script or style."""
    return "'sha256-%s'" % base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


WEB_PAGE = (WEB_PAGE_HTML.replace("/*STYLE*/", WEB_PAGE_STYLE, 1)
            .replace("//SCRIPT", WEB_PAGE_SCRIPT, 1).encode("utf-8"))
WEB_PAGE_HEADERS = {
    # Only the page's own script and style run; it may fetch and show images from this origin
    # and from data: URLs (attached images), and nothing else; no page may frame it.
    "Content-Security-Policy": "; ".join((
        "default-src 'self'", "script-src %s" % csp_source_hash(WEB_PAGE_SCRIPT),
        "style-src %s" % csp_source_hash(WEB_PAGE_STYLE), "img-src 'self' data:",
        "connect-src 'self'", "object-src 'none'", "base-uri 'none'", "form-action 'none'",
        "frame-ancestors 'none'", "require-trusted-types-for 'script'", "trusted-types 'none'")),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",  # frame-ancestors, for browsers that predate it
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-cache",  # a new version of the proxy serves its new page at once
}


if __name__ == "__main__":
    sys.exit(main())
