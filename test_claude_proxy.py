"""Tests for claude_proxy.py: `python3 -m unittest -v`. Standard library only.

Three layers: tables for the pure translation functions; exact wire checks; and end to end
through a real server on port 0 with a stub `claude` CLI that these tests write to a temp dir.
The stub behaves like the real CLI (the repository's shared CLI-FACTS notes): same flags, same
stream-json events and error results, chosen by words in the prompt; it records the argv, stdin,
working directory and environment it got, so tests can assert on what the proxy sent.
"""

import http.client
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import unittest

import claude_proxy as cp

STUB_CLI = r'''#!%(python)s
"""A stand-in for `claude -p` with stream-json in and out. Words in the last user text choose
the behaviour:
  SAY[text]   reply exactly `text`          THINK      a thinking block first
  SLOW        20 deltas, 0.2 s apart         MAXTOKENS  stop_reason max_tokens
  RATE429 / OVERLOAD / AUTH401   api_retry notices (CLAUDE_CODE_MAX_RETRIES of them), then an
              error result with api_error_status 429 / 529 / 401, exit 1
  BADREQ400   an error result with api_error_status 400 at once, exit 1
  NOTLOGGEDIN the not-logged-in error result      CRASH   stderr text, exit 3, no result
  GARBAGE     lines that are not JSON, exit 0     HANG    init, then sleep (with a child process)
  (none)      "Echo: <last 200 chars of the last user text> [images: N]"
"""
import json, os, re, subprocess, sys, time, uuid

RECORD_DIR = %(record_dir)r
VALUE_FLAGS = {"--input-format", "--output-format", "--tools", "--mcp-config", "--max-turns",
               "--json-schema", "--system-prompt", "--system-prompt-file", "--append-system-prompt",
               "--model", "--effort", "--setting-sources", "--permission-mode", "--allowedTools",
               "--disallowedTools"}
BARE_FLAGS = {"-p", "--print", "--verbose", "--include-partial-messages", "--no-session-persistence",
              "--strict-mcp-config"}
ALIASES = {"sonnet": "claude-sonnet-5", "opus": "claude-opus-5", "haiku": "claude-haiku-5"}

argv = sys.argv[1:]
if argv == ["--version"]:
    print("2.1.197 (Claude Code)")
    sys.exit(0)
flags, i = {}, 0
while i < len(argv):
    a = argv[i]
    if a in VALUE_FLAGS and i + 1 < len(argv):
        flags[a] = argv[i + 1]; i += 2
    elif a in BARE_FLAGS:
        flags[a] = True; i += 1
    else:
        sys.stderr.write("error: unknown option '%%s'\n" %% a); sys.exit(1)
if flags.get("--output-format") == "stream-json" and not flags.get("--verbose"):
    sys.stderr.write("Error: When using --print, --output-format=stream-json requires --verbose\n")
    sys.exit(1)
if flags.get("--input-format") == "stream-json" and flags.get("--output-format") != "stream-json":
    sys.stderr.write("Error: --input-format=stream-json requires output-format=stream-json.\n")
    sys.exit(1)
effort = flags.get("--effort")
if effort and effort not in ("low", "medium", "high", "xhigh", "max"):
    sys.stderr.write("Warning: Unknown --effort value '%%s' \u2014 ignoring it and using the default effort. "
                     "Valid values: low, medium, high, xhigh, max.\n" %% effort)

record = {"pid": os.getpid(), "argv": sys.argv, "cwd": os.getcwd(), "cwd_entries": sorted(os.listdir(".")),
          "env": {k: os.environ.get(k) for k in ("CLAUDECODE", "CLAUDE_CODE_ENTRYPOINT",
                  "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "CLAUDE_CODE_MAX_OUTPUT_TOKENS",
                  "CLAUDE_CODE_MAX_RETRIES")}}
if flags.get("--system-prompt-file"):
    with open(flags["--system-prompt-file"]) as f:
        record["system_prompt"] = f.read()
path = os.path.join(RECORD_DIR, "%%d.json" %% os.getpid())
def save():
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)
save()

session = str(uuid.uuid4())
model = ALIASES.get(flags.get("--model"), flags.get("--model") or "claude-sonnet-5")
def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n"); sys.stdout.flush()
def stream(event):
    emit({"type": "stream_event", "event": event, "session_id": session, "parent_tool_use_id": None,
          "uuid": str(uuid.uuid4())})
def result(text, is_error=False, status=None, subtype="success", stop_reason="end_turn", usage=None):
    emit({"type": "result", "subtype": subtype, "is_error": is_error, "api_error_status": status,
          "duration_ms": 250, "duration_api_ms": 200, "num_turns": 1, "result": text,
          "stop_reason": stop_reason, "session_id": session, "total_cost_usd": 0.00046,
          "usage": usage or {"input_tokens": 0, "cache_creation_input_tokens": 0,
                             "cache_read_input_tokens": 0, "output_tokens": 0},
          "modelUsage": {}, "permission_denials": [], "uuid": str(uuid.uuid4())})

# Like the real CLI, nothing is printed (not even init) until the first message arrives.
line = sys.stdin.readline()
record["stdin"] = line
save()
if not line:
    sys.exit(0)
emit({"type": "system", "subtype": "init", "cwd": os.getcwd(), "session_id": session,
      "tools": [], "mcp_servers": [], "model": model, "permissionMode": "default",
      "apiKeySource": "none", "claude_code_version": "2.1.197", "output_style": "default",
      "uuid": str(uuid.uuid4())})

message = json.loads(line)["message"]
texts = [b["text"] for b in message["content"] if b.get("type") == "text"]
images = sum(1 for b in message["content"] if b.get("type") == "image")
text = texts[-1] if texts else ""

def api_error(status, kind, message, retried=True):
    retries = int(os.environ.get("CLAUDE_CODE_MAX_RETRIES", "10")) if retried else 0
    for attempt in range(1, retries + 1):
        emit({"type": "system", "subtype": "api_retry", "attempt": attempt, "max_retries": retries,
              "retry_delay_ms": 1000 * attempt, "error_status": status, "error": kind,
              "session_id": session, "uuid": str(uuid.uuid4())})
        time.sleep(attempt)
    error_text = "API Error: %%d %%s" %% (status, message)
    emit({"type": "assistant", "message": {"id": str(uuid.uuid4()), "type": "message", "role": "assistant",
          "model": "<synthetic>", "content": [{"type": "text", "text": error_text}], "stop_reason": "stop_sequence"},
          "parent_tool_use_id": None, "session_id": session, "uuid": str(uuid.uuid4()), "error": kind})
    result(error_text, True, status)
    sys.exit(1)

if "HANG" in text:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    record["child_pid"] = child.pid
    save()
    time.sleep(600)
if "CRASH" in text:
    sys.stderr.write("TypeError: something broke inside the CLI\n"); sys.exit(3)
if "GARBAGE" in text:
    print("this is not json"); print("{neither is this"); sys.exit(0)
if "NOTLOGGEDIN" in text:
    result("Not logged in \u00b7 Please run /login", True, None); sys.exit(1)
if "RATE429" in text:
    api_error(429, "rate_limit", '{"type":"error","error":{"type":"rate_limit_error"}}')
if "OVERLOAD" in text:
    api_error(529, "overloaded", '{"type":"error","error":{"type":"overloaded_error"}}')
if "AUTH401" in text:
    api_error(401, "authentication_failed", '{"type":"error","error":{"type":"authentication_error"}}')
if "BADREQ400" in text:  # not retried by the CLI
    api_error(400, "unknown", '{"type":"error","error":{"type":"invalid_request_error","message":"messages: text content blocks must be non-empty"}}', False)

said = re.search(r"SAY\[(.*?)\]", text, re.S)
reply = said.group(1) if said else "Echo: %%s [images: %%d]" %% (text[-200:], images)
emit({"type": "system", "subtype": "status", "status": "requesting", "session_id": session,
      "uuid": str(uuid.uuid4())})
usage = {"input_tokens": 11, "cache_creation_input_tokens": 3, "cache_read_input_tokens": 5,
         "output_tokens": 1}
stream({"type": "message_start", "message": {"id": "msg_stub", "type": "message", "role": "assistant",
        "model": model, "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage}})
content, index = [], 0
if "THINK" in text:
    stream({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": "", "signature": ""}})
    emit({"type": "system", "subtype": "thinking_tokens", "estimated_tokens": 6, "estimated_tokens_delta": 6,
          "session_id": session, "uuid": str(uuid.uuid4())})
    stream({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Let me think"}})
    stream({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": " about this."}})
    stream({"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "c2ln"}})
    block = {"type": "thinking", "thinking": "Let me think about this.", "signature": "c2ln"}
    emit({"type": "assistant", "message": {"id": "msg_stub", "type": "message", "role": "assistant",
          "model": model, "content": [block], "stop_reason": None, "usage": usage},
          "parent_tool_use_id": None, "session_id": session, "uuid": str(uuid.uuid4())})
    stream({"type": "content_block_stop", "index": 0})
    index = 1
slow = "SLOW" in text
pieces = 20 if slow else 3
size = max(1, -(-len(reply) // pieces))
stream({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}})
for start in range(0, len(reply), size):
    if slow:
        time.sleep(0.2)
    stream({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": reply[start:start + size]}})
emit({"type": "assistant", "message": {"id": "msg_stub", "type": "message", "role": "assistant",
      "model": model, "content": [{"type": "text", "text": reply}], "stop_reason": None, "usage": usage},
      "parent_tool_use_id": None, "session_id": session, "uuid": str(uuid.uuid4())})
stream({"type": "content_block_stop", "index": index})
stop_reason = "max_tokens" if "MAXTOKENS" in text else "end_turn"
stream({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": None},
        "usage": {"output_tokens": 7}})
stream({"type": "message_stop"})
usage["output_tokens"] = 7
result(reply, stop_reason=stop_reason, usage=usage)
sys.stdin.read()  # like the real CLI: after the result, wait for more input until stdin closes
'''

PNG_1PX = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


def write_stub(directory):
    """The stub CLI as an executable script; returns (its path, the folder it records into)."""
    record_dir = os.path.join(directory, "records")
    os.makedirs(record_dir, exist_ok=True)
    path = os.path.join(directory, "claude")
    with open(path, "w") as f:
        f.write(STUB_CLI % {"python": sys.executable, "record_dir": record_dir})
    os.chmod(path, 0o755)
    return path, record_dir


def pid_alive(pid):
    """True while a process exists and is not a zombie waiting to be reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def wait_until(condition, seconds=10.0):
    """Poll until condition() is true; bounded, so a failure cannot hang the suite."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def sse_payloads(raw):
    """The data payloads of an SSE body, asserting the exact framing clients need."""
    assert raw.endswith(b"data: [DONE]\n\n"), raw[-200:]
    events = raw.split(b"\n\n")
    assert events[-1] == b"", "the body must end right after an event"
    out = []
    for event in events[:-1]:
        assert event.startswith(b"data: ") and b"\n" not in event, event
        payload = event[len(b"data: "):]
        out.append(payload.decode() if payload == b"[DONE]" else json.loads(payload))
    return out


LOG_LINES = []  # what the proxy logged during the tests (kept off the test output)
_real_log = cp.log


def setUpModule():
    cp.log = LOG_LINES.append


def tearDownModule():
    cp.log = _real_log


# Pure translation: tables ###################################################################


class MessagesToPromptTest(unittest.TestCase):
    def test_rendering(self):
        img = "data:image/png;base64," + PNG_1PX
        cases = [
            ("lone user string",
             [{"role": "user", "content": "hi"}],
             None, [{"type": "text", "text": "hi"}]),
            ("system and developer joined",
             [{"role": "system", "content": "A"}, {"role": "developer", "content": [{"type": "text", "text": "B"}]},
              {"role": "user", "content": "hi"}],
             "A\n\nB", [{"type": "text", "text": "hi"}]),
            ("parts and image",
             [{"role": "user", "content": [{"type": "text", "text": "see"},
                                            {"type": "image_url", "image_url": {"url": img, "detail": "low"}}]}],
             None, [{"type": "text", "text": "see"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_1PX}}]),
        ]
        for name, messages, system, content in cases:
            with self.subTest(name):
                self.assertEqual(cp.messages_to_prompt(messages), (system, content))

    def test_history_is_a_transcript_with_the_last_user_turn_last(self):
        system, content = cp.messages_to_prompt([
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And times 3?"}])
        self.assertIsNone(system)
        self.assertEqual(len(content), 2)
        transcript, last = content[0]["text"], content[1]
        self.assertEqual(last, {"type": "text", "text": "And times 3?"})
        self.assertIn("<user>\nWhat is 2+2?\n</user>\n<assistant>\n4\n</assistant>", transcript)
        self.assertLess(transcript.index("What is 2+2?"), transcript.index("<assistant>"))

    def test_tool_turns_keep_ids_names_and_arguments(self):
        _, content = cp.messages_to_prompt([
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "RESULT-sunny"}])
        text = content[0]["text"]
        self.assertIn('<tool_call id="call_1" name="get_weather">{"city":"Paris"}</tool_call>', text)
        self.assertIn('<tool tool_call_id="call_1">\nRESULT-sunny\n</tool>', text)
        self.assertTrue(text.endswith("using the tool results."))

    def test_images_in_history_stay_in_place(self):
        img = "data:image/png;base64," + PNG_1PX
        _, content = cp.messages_to_prompt([
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": img}}]},
            {"role": "assistant", "content": "a dot"},
            {"role": "user", "content": "again?"}])
        self.assertEqual([b["type"] for b in content], ["text", "image", "text", "text"])

    def test_bad_messages_name_the_param(self):
        cases = [
            ("empty", [], "messages"),
            ("not a list", "hi", "messages"),
            ("not an object", ["hi"], "messages[0]"),
            ("unknown role", [{"role": "wizard", "content": "x"}], "messages[0].role"),
            ("missing role", [{"content": "x"}], "messages[0].role"),
            ("only system", [{"role": "system", "content": "x"}], "messages"),
            ("tool without id", [{"role": "user", "content": "x"}, {"role": "tool", "content": "r"}],
             "messages[1].tool_call_id"),
            ("audio part", [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}],
             "messages[0].content[0].type"),
            ("file part", [{"role": "user", "content": [{"type": "file", "file": {"file_id": "f"}}]}],
             "messages[0].content[0].type"),
            ("unknown part", [{"role": "user", "content": [{"type": "hologram"}]}], "messages[0].content[0].type"),
            ("http image", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://169.254.169.254/x.png"}}]}],
             "messages[0].content[0].image_url.url"),
            ("bad base64", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}],
             "messages[0].content[0].image_url.url"),
            ("not an image", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:text/html;base64,PGI+"}}]}],
             "messages[0].content[0].image_url.url"),
            ("content number", [{"role": "user", "content": 42}], "messages[0].content"),
            ("empty user", [{"role": "user", "content": ""}], "messages[0].content"),
            ("user null", [{"role": "user", "content": None}], "messages[0].content"),
            ("text part without text", [{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text"),
        ]
        for name, messages, param in cases:
            with self.subTest(name):
                with self.assertRaises(cp.ProxyError) as caught:
                    cp.messages_to_prompt(messages)
                self.assertEqual(caught.exception.status, 400)
                self.assertEqual(caught.exception.param, param)


class ParseChatRequestTest(unittest.TestCase):
    base = {"messages": [{"role": "user", "content": "hi"}]}

    def parse(self, **fields):
        return cp.parse_chat_request(dict(self.base, **fields))

    def test_fields(self):
        cases = [
            ({}, {"model": None, "effort": None, "stream": False, "include_usage": False,
                  "max_tokens": None, "stop": []}),
            ({"model": "opus", "reasoning_effort": "minimal"}, {"model": "opus", "effort": "low"}),
            ({"reasoning_effort": "xhigh"}, {"effort": "xhigh"}),
            ({"stream": True, "stream_options": {"include_usage": True}}, {"stream": True, "include_usage": True}),
            ({"stream": False, "stream_options": {"include_usage": True}}, {"include_usage": False}),
            ({"max_tokens": 100, "max_completion_tokens": 50}, {"max_tokens": 50}),
            ({"max_tokens": 100}, {"max_tokens": 100}),
            ({"stop": "END"}, {"stop": ["END"]}),
            ({"stop": ["a", "", "b"]}, {"stop": ["a", "b"]}),
            ({"temperature": 0.2, "top_p": 1, "seed": 3, "user": "u", "metadata": {}, "store": False,
              "service_tier": "auto", "prompt_cache_key": "k", "prediction": {}, "n": 1,
              "parallel_tool_calls": True, "response_format": {"type": "text"}}, {}),
        ]
        for fields, want in cases:
            with self.subTest(fields):
                plan = self.parse(**fields)
                for key, value in want.items():
                    self.assertEqual(plan[key], value, key)

    def test_defaults_apply_when_the_request_is_silent(self):
        plan = cp.parse_chat_request(self.base, default_model="haiku", default_effort="high")
        self.assertEqual((plan["model"], plan["effort"]), ("haiku", "high"))

    def test_rejections(self):
        cases = [
            ({"model": "--dangerously-skip-permissions"}, "model"),
            ({"model": "a b"}, "model"),
            ({"model": "x&calc"}, "model"),
            ({"model": 5}, "model"),
            ({"n": 2}, "n"),
            ({"n": "1"}, "n"),
            ({"stream": "yes"}, "stream"),
            ({"logprobs": True}, "logprobs"),
            ({"modalities": ["text", "audio"]}, "modalities"),
            ({"reasoning_effort": "extreme"}, "reasoning_effort"),
            ({"max_tokens": 0}, "max_tokens"),
            ({"max_completion_tokens": "5"}, "max_completion_tokens"),
            ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
            ({"stop": 5}, "stop"),
            ({"temperature": "hot"}, "temperature"),
            ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format"),
        ]
        for fields, param in cases:
            with self.subTest(fields):
                with self.assertRaises(cp.ProxyError) as caught:
                    self.parse(**fields)
                self.assertEqual((caught.exception.status, caught.exception.param), (400, param))

    def test_other_apis_bodies_say_so(self):
        for body, param in (({"input": "hi", "model": "sonnet"}, "input"), ({"prompt": "hi"}, "prompt"),
                            ({"model": "sonnet"}, "messages")):
            with self.subTest(body):
                with self.assertRaises(cp.ProxyError) as caught:
                    cp.parse_chat_request(body)
                self.assertEqual(caught.exception.param, param)


class CliCommandTest(unittest.TestCase):
    def test_argv(self):
        plan = cp.parse_chat_request({"model": "opus", "reasoning_effort": "high",
                                      "messages": [{"role": "system", "content": "SECRET SYSTEM"},
                                                   {"role": "user", "content": "SECRET USER"}]})
        argv = cp.cli_argv("claude", plan, "/tmp/x/system-prompt.txt")
        self.assertEqual(argv[:2], ["claude", "-p"])
        for pair in (["--input-format", "stream-json"], ["--output-format", "stream-json"],
                     ["--tools", ""], ["--model", "opus"], ["--effort", "high"],
                     ["--system-prompt-file", "/tmp/x/system-prompt.txt"]):
            i = argv.index(pair[0])
            self.assertEqual(argv[i:i + 2], pair)
        for flag in ("--verbose", "--include-partial-messages", "--no-session-persistence", "--strict-mcp-config"):
            self.assertIn(flag, argv)
        self.assertNotIn("SECRET", " ".join(argv))

    def test_argv_without_model_or_effort_leaves_them_to_the_cli(self):
        argv = cp.cli_argv("claude", cp.parse_chat_request(ParseChatRequestTest.base), "p")
        self.assertNotIn("--model", argv)
        self.assertNotIn("--effort", argv)

    def test_env(self):
        base = {"PATH": "/bin", "CLAUDECODE": "1", "CLAUDE_CODE_ENTRYPOINT": "cli"}
        env = cp.cli_env(base, {"max_tokens": 64})
        self.assertNotIn("CLAUDECODE", env)
        self.assertNotIn("CLAUDE_CODE_ENTRYPOINT", env)
        self.assertEqual(env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"], "1")
        self.assertEqual(env["CLAUDE_CODE_MAX_OUTPUT_TOKENS"], "64")
        self.assertEqual(env["CLAUDE_CODE_MAX_RETRIES"], cp.DEFAULT_CLI_MAX_RETRIES)
        self.assertEqual(cp.cli_env(dict(base, CLAUDE_CODE_MAX_RETRIES="7"), {})["CLAUDE_CODE_MAX_RETRIES"], "7")
        self.assertNotIn("CLAUDE_CODE_MAX_OUTPUT_TOKENS", cp.cli_env(base, {}))
        self.assertEqual(base["CLAUDECODE"], "1", "the proxy's own environment is left alone")

    def test_stdin_is_one_stream_json_line(self):
        plan = {"content": [{"type": "text", "text": "héllo\nworld"}]}
        data = cp.cli_stdin(plan)
        self.assertTrue(data.endswith(b"\n"))
        self.assertEqual(data.count(b"\n"), 1)
        self.assertEqual(json.loads(data), {"type": "user", "message": {"role": "user", "content": plan["content"]}})


class ErrorMappingTest(unittest.TestCase):
    def test_retry_notices(self):
        cases = [
            ({"error_status": 429, "retry_delay_ms": 1500}, 429, {"Retry-After": "2"}),
            ({"error_status": 529, "retry_delay_ms": 1000}, 503, {"Retry-After": "1"}),
            ({"error_status": 401}, 503, {"x-should-retry": "false"}),
            ({"error_status": 500}, None, None),
            ({"error_status": None}, None, None),
        ]
        for event, status, headers in cases:
            with self.subTest(event):
                error = cp.retry_error(dict(event, type="system", subtype="api_retry"))
                if status is None:
                    self.assertIsNone(error)
                    continue
                self.assertEqual(error.status, status)
                for name, value in headers.items():
                    self.assertEqual(error.headers[name], value)

    def test_results(self):
        cases = [
            ({"subtype": "success", "is_error": False, "result": "ok"}, None, None),
            ({"subtype": "success", "is_error": True, "api_error_status": 429, "result": "x"}, 429, "rate_limit_exceeded"),
            ({"subtype": "success", "is_error": True, "api_error_status": 529, "result": "x"}, 503, "overloaded"),
            ({"subtype": "success", "is_error": True, "api_error_status": 401, "result": "x"}, 503, "cli_not_logged_in"),
            ({"subtype": "success", "is_error": True, "api_error_status": None,
              "result": "Not logged in \u00b7 Please run /login"}, 503, "cli_not_logged_in"),
            ({"subtype": "success", "is_error": True, "api_error_status": 400, "result": "bad"}, 400, "upstream_rejected"),
            ({"subtype": "success", "is_error": True, "api_error_status": 404, "result": "no model"}, 404, "model_not_found"),
            ({"subtype": "success", "is_error": True, "api_error_status": 500, "result": "boom"}, 502, "upstream_error"),
            ({"subtype": "error_during_execution", "is_error": True}, 502, "cli_error"),
        ]
        for result, status, code in cases:
            with self.subTest(result):
                error = cp.result_error(dict(result, type="result"))
                if status is None:
                    self.assertIsNone(error)
                else:
                    self.assertEqual((error.status, error.code), (status, code))
                    self.assertIn("Retry-After", error.headers) if status in (429, 503) and code != "cli_not_logged_in" else None

    def test_envelope(self):
        error = cp.invalid("nope", "messages[0].role")
        self.assertEqual(error.body(), {"error": {"message": "nope", "type": "invalid_request_error",
                                                  "param": "messages[0].role", "code": None}})


def stream_event(event):
    return {"type": "stream_event", "event": event}


def text_events(*pieces, stop_reason="end_turn"):
    events = [{"type": "system", "subtype": "init", "model": "claude-sonnet-5"},
              stream_event({"type": "message_start", "message": {"usage": {"input_tokens": 4, "cache_read_input_tokens": 2}}}),
              stream_event({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})]
    events += [stream_event({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}})
               for p in pieces]
    events += [{"type": "assistant", "message": {"content": [{"type": "text", "text": "".join(pieces)}]}},
               stream_event({"type": "content_block_stop", "index": 0}),
               stream_event({"type": "message_delta", "delta": {"stop_reason": stop_reason}, "usage": {"output_tokens": 3}}),
               {"type": "result", "subtype": "success", "is_error": False, "result": "".join(pieces),
                "stop_reason": stop_reason,
                "usage": {"input_tokens": 4, "cache_creation_input_tokens": 1, "cache_read_input_tokens": 2, "output_tokens": 3}}]
    return events


def translate(events, stop=()):
    translator = cp.ReplyTranslator(stop)
    deltas = []
    for event in events:
        deltas += translator.feed(event)
        if translator.done:
            break
    return translator, deltas


class ReplyTranslatorTest(unittest.TestCase):
    def test_text_reply(self):
        translator, deltas = translate(text_events("Hel", "lo"))
        self.assertEqual(deltas, [{"content": "Hel"}, {"content": "lo"}])
        self.assertEqual(translator.finish_reason, "stop")
        self.assertEqual(translator.model, "claude-sonnet-5")
        self.assertEqual(translator.usage, {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10,
                                            "prompt_tokens_details": {"cached_tokens": 2}})

    def test_thinking_becomes_reasoning_content(self):
        events = text_events("Hi")
        events[2:2] = [stream_event({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking"}}),
                       stream_event({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "hmm"}}),
                       stream_event({"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "x"}}),
                       stream_event({"type": "content_block_stop", "index": 0})]
        _, deltas = translate(events)
        self.assertEqual(deltas, [{"reasoning_content": "hmm"}, {"content": "Hi"}])

    def test_stop_sequences(self):
        cases = [
            (("Hello END there",), ["END"], "Hello ", "stop", True),
            (("Hello E", "ND there"), ["END"], "Hello ", "stop", True),
            (("Hello E", "N", "D"), ["END"], "Hello ", "stop", True),
            (("Hello E", "nd"), ["END"], "Hello End", "stop", False),
            (("abc",), ["x", "bc"], "a", "stop", True),
            (("Hello",), ["lo!"], "Hello", "stop", False),
        ]
        for pieces, stop, text, finish, hit in cases:
            with self.subTest(pieces=pieces, stop=stop):
                translator, deltas = translate(text_events(*pieces), stop)
                self.assertEqual("".join(d["content"] for d in deltas), text)
                self.assertEqual((translator.finish_reason, translator.stop_hit), (finish, hit))
                self.assertTrue(all(d["content"] for d in deltas), "no empty deltas")

    def test_max_tokens_is_length(self):
        translator, _ = translate(text_events("Hi", stop_reason="max_tokens"))
        self.assertEqual(translator.finish_reason, "length")
        self.assertIsNone(translator.error)

    def test_rate_limit_notice_ends_the_run_at_once(self):
        translator, deltas = translate([{"type": "system", "subtype": "init"},
                                        {"type": "system", "subtype": "api_retry", "attempt": 1,
                                         "retry_delay_ms": 2000, "error_status": 429, "error": "rate_limit"}])
        self.assertTrue(translator.done)
        self.assertEqual((translator.error.status, translator.error.headers["Retry-After"]), (429, "2"))

    def test_result_text_when_no_partial_events(self):
        events = [e for e in text_events("Hi there") if e["type"] != "stream_event"]
        _, deltas = translate(events)
        self.assertEqual(deltas, [{"content": "Hi there"}])


class WireFormatTest(unittest.TestCase):
    def test_sse_event_is_one_data_line(self):
        self.assertEqual(cp.sse_event({"a": "x\ny", "b": "é"}), 'data: {"a":"x\\ny","b":"é"}\n\n'.encode())

    def test_chunk_shapes(self):
        chunk = cp.completion_chunk("chatcmpl-1", 5, "m", {"content": "x"})
        self.assertEqual(chunk, {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 5,
                                 "model": "m", "system_fingerprint": None,
                                 "choices": [{"index": 0, "delta": {"content": "x"}, "logprobs": None,
                                              "finish_reason": None}]})
        self.assertIsNone(cp.completion_chunk("c", 5, "m", {}, "stop", None)["usage"])
        self.assertEqual(cp.usage_chunk("c", 5, "m", {"total_tokens": 1})["choices"], [])


# End to end through a real server and the stub CLI ##########################################


class ServerTestCase(unittest.TestCase):
    """A real proxy on port 0 in a thread, over a stub CLI in a temp dir."""

    timeout = 30.0

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="claude-proxy-test-")
        cls.stub, cls.record_dir = write_stub(cls.tmp)
        cls.server = cls.make_server()
        cls.thread = threading.Thread(target=cls.server.serve_forever, daemon=True)
        cls.thread.start()
        cls.port = cls.server.server_address[1]

    @classmethod
    def make_server(cls, **config):
        config.setdefault("timeout", cls.timeout)
        return cp.ProxyServer(("127.0.0.1", 0), cp.Config(cls.stub, claude_version="2.1.197 (Claude Code)", **config))

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        cls.thread.join(10)
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def setUp(self):
        for name in os.listdir(self.record_dir):
            os.remove(os.path.join(self.record_dir, name))

    def request(self, method, path, body=None, headers=None, port=None):
        """(status, headers dict with lower-case names, raw body bytes)."""
        conn = http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=30)
        try:
            if isinstance(body, (dict, list)):
                body = json.dumps(body)
            all_headers = {"Content-Type": "application/json"} if body is not None else {}
            all_headers.update(headers or {})
            conn.request(method, path, body=body, headers=all_headers)
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def chat(self, body, **kwargs):
        status, headers, raw = self.request("POST", "/v1/chat/completions", body, **kwargs)
        return status, headers, raw

    def records(self):
        out = []
        for name in sorted(os.listdir(self.record_dir)):
            if name.endswith(".json"):
                with open(os.path.join(self.record_dir, name)) as f:
                    out.append(json.load(f))
        return out

    def assert_error(self, status_and_body, status, param=None, code=None):
        got_status, headers, raw = status_and_body
        self.assertEqual(got_status, status, raw)
        self.assertTrue(headers["content-type"].startswith("application/json"))
        error = json.loads(raw)["error"]
        self.assertEqual(set(error), {"message", "type", "param", "code"})
        self.assertTrue(error["message"])
        if param is not None:
            self.assertEqual(error["param"], param)
        if code is not None:
            self.assertEqual(error["code"], code)
        return headers, error


def user(text):
    return {"messages": [{"role": "user", "content": text}]}


class EndpointsTest(ServerTestCase):
    def test_health(self):
        status, headers, raw = self.request("GET", "/health")
        self.assertEqual(status, 200)
        health = json.loads(raw)
        self.assertEqual(health["status"], "ok")
        self.assertEqual(health["version"], cp.__version__)
        self.assertEqual(health["cli"], {"path": self.stub, "found": True, "version": "2.1.197 (Claude Code)"})

    def test_models(self):
        for path in ("/v1/models", "/models", "/v1/models/"):
            with self.subTest(path):
                status, headers, raw = self.request("GET", path)
                self.assertEqual(status, 200)
                self.assertEqual(headers["content-type"], "application/json")
                listing = json.loads(raw)
                self.assertEqual(listing["object"], "list")
                self.assertEqual([m["id"] for m in listing["data"]], list(cp.DEFAULT_MODELS))
                for model in listing["data"]:
                    self.assertEqual(set(model), {"id", "object", "created", "owned_by"})
                    self.assertIsInstance(model["created"], int)
        status, _, raw = self.request("GET", "/v1/models/sonnet")
        self.assertEqual((status, json.loads(raw)["id"]), (200, "sonnet"))
        self.assert_error(self.request("GET", "/v1/models/gpt-99"), 404, "model", "model_not_found")

    def test_unknown_paths_and_methods(self):
        self.assert_error(self.request("GET", "/v2/nothing"), 404)
        self.assert_error(self.request("POST", "/v1/completions", {}), 404)
        headers, _ = self.assert_error(self.request("GET", "/v1/chat/completions"), 405)
        self.assertEqual(headers["allow"], "POST")
        self.assert_error(self.request("DELETE", "/v1/models"), 405)

    def test_stdlib_errors_are_json_too(self):
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(b"BREW /pot HTTP/1.1\r\n\r\n")
            raw = b"".join(iter(lambda: sock.recv(65536), b""))
        head, _, body = raw.partition(b"\r\n\r\n")
        self.assertIn(b"501", head.split(b"\r\n")[0])
        self.assertIn(b"application/json", head)
        self.assertIn("error", json.loads(body))
        self.assertEqual(self.records(), [])


class ChatTest(ServerTestCase):
    def test_plain_reply(self):
        status, headers, raw = self.chat(dict(user("hello"), model="sonnet"))
        self.assertEqual(status, 200, raw)
        self.assertEqual(headers["content-type"], "application/json")
        reply = json.loads(raw)
        self.assertTrue(reply["id"].startswith("chatcmpl-"))
        self.assertEqual(reply["object"], "chat.completion")
        self.assertIsInstance(reply["created"], int)
        self.assertEqual(reply["model"], "sonnet")
        self.assertEqual(reply["choices"], [{"index": 0, "message": {"role": "assistant", "content": "Echo: hello [images: 0]"},
                                             "logprobs": None, "finish_reason": "stop"}])
        self.assertEqual(reply["usage"], {"prompt_tokens": 19, "completion_tokens": 7, "total_tokens": 26,
                                          "prompt_tokens_details": {"cached_tokens": 5}})

    def test_model_defaults_to_what_the_cli_runs(self):
        status, _, raw = self.chat(user("hello"))
        self.assertEqual(json.loads(raw)["model"], "claude-sonnet-5")

    def test_what_the_cli_is_given(self):
        secret = "TOP-SECRET-PROMPT"
        status, _, raw = self.chat({"model": "opus", "reasoning_effort": "high", "max_tokens": 99,
                                    "messages": [{"role": "system", "content": "SYSTEM " + secret},
                                                 {"role": "user", "content": "USER " + secret}]})
        self.assertEqual(status, 200, raw)
        [record] = self.records()
        argv = record["argv"][1:]
        self.assertNotIn(secret, " ".join(argv), "no part of a prompt in argv")
        self.assertEqual(argv[argv.index("--tools") + 1], "", "no built-in tools offered")
        self.assertEqual(argv[argv.index("--model") + 1], "opus")
        self.assertEqual(argv[argv.index("--effort") + 1], "high")
        self.assertEqual(record["system_prompt"], "SYSTEM " + secret)
        self.assertEqual(json.loads(record["stdin"])["message"]["content"],
                         [{"type": "text", "text": "USER " + secret}])
        self.assertEqual(record["cwd_entries"], ["system-prompt.txt"], "an empty private working dir")
        self.assertEqual(record["env"]["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"], "1")
        self.assertEqual(record["env"]["CLAUDE_CODE_MAX_OUTPUT_TOKENS"], "99")
        self.assertIsNone(record["env"]["CLAUDECODE"])
        self.assertFalse(os.path.exists(record["cwd"]), "the private dir and prompt file are removed")
        self.assertFalse(pid_alive(record["pid"]))

    def test_default_system_prompt(self):
        self.chat(user("hello"))
        self.assertEqual(self.records()[0]["system_prompt"], cp.DEFAULT_SYSTEM_PROMPT)

    def test_history_reaches_the_cli(self):
        status, _, raw = self.chat({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "My name is Ada."},
            {"role": "assistant", "content": "Hello Ada."},
            {"role": "user", "content": "What is my name?"}]})
        self.assertEqual(status, 200, raw)
        content = json.loads(self.records()[0]["stdin"])["message"]["content"]
        self.assertIn("My name is Ada.", content[0]["text"])
        self.assertIn("Hello Ada.", content[0]["text"])
        self.assertEqual(content[-1], {"type": "text", "text": "What is my name?"})
        self.assertEqual(json.loads(raw)["choices"][0]["message"]["content"], "Echo: What is my name? [images: 0]")

    def test_image(self):
        status, _, raw = self.chat({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG_1PX, "detail": "high"}}]}]})
        self.assertEqual(status, 200, raw)
        self.assertEqual(json.loads(raw)["choices"][0]["message"]["content"], "Echo: what is this [images: 1]")
        blocks = json.loads(self.records()[0]["stdin"])["message"]["content"]
        self.assertEqual(blocks[1]["source"], {"type": "base64", "media_type": "image/png", "data": PNG_1PX})

    def test_thinking_is_reasoning_content(self):
        status, _, raw = self.chat(user("THINK hard"))
        message = json.loads(raw)["choices"][0]["message"]
        self.assertEqual(message["reasoning_content"], "Let me think about this.")
        self.assertEqual(message["content"], "Echo: THINK hard [images: 0]")

    def test_stop_sequence_cuts_and_ends_the_run(self):
        status, _, raw = self.chat(dict(user("SAY[one two THREE four]"), stop=["THREE"]))
        reply = json.loads(raw)
        self.assertEqual(reply["choices"][0]["message"]["content"], "one two ")
        self.assertEqual(reply["choices"][0]["finish_reason"], "stop")
        self.assertFalse(pid_alive(self.records()[0]["pid"]))

    def test_max_tokens_finish_is_length(self):
        status, _, raw = self.chat(dict(user("MAXTOKENS"), max_tokens=5))
        self.assertEqual(json.loads(raw)["choices"][0]["finish_reason"], "length")

    def test_chat_completions_without_v1(self):
        status, _, raw = self.request("POST", "/chat/completions", user("hi"))
        self.assertEqual(status, 200, raw)


class StreamTest(ServerTestCase):
    def stream(self, body):
        status, headers, raw = self.chat(dict(body, stream=True))
        self.assertEqual(status, 200, raw)
        self.assertEqual(headers["content-type"], "text/event-stream; charset=utf-8")
        self.assertEqual(headers["cache-control"], "no-cache")
        self.assertEqual(headers["x-accel-buffering"], "no")
        return sse_payloads(raw)

    def test_stream_format(self):
        payloads = self.stream(user("SAY[Hello there, friend]"))
        self.assertEqual(payloads[-1], "[DONE]")
        chunks = payloads[:-1]
        self.assertEqual(len({(c["id"], c["created"], c["model"]) for c in chunks}), 1)
        for chunk in chunks:
            self.assertEqual(chunk["object"], "chat.completion.chunk")
            self.assertEqual(chunk["choices"][0]["index"], 0)
            self.assertNotIn("usage", chunk)
        self.assertEqual(chunks[0]["choices"][0]["delta"], {"role": "assistant", "content": ""})
        self.assertEqual(sum("role" in c["choices"][0]["delta"] for c in chunks), 1)
        middle = chunks[1:-1]
        self.assertEqual(len(middle), 3, "token deltas pass through as the CLI emits them")
        self.assertEqual("".join(c["choices"][0]["delta"]["content"] for c in middle), "Hello there, friend")
        self.assertTrue(all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1]))
        self.assertEqual(chunks[-1]["choices"][0], {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"})

    def test_include_usage(self):
        payloads = self.stream(dict(user("hi"), stream_options={"include_usage": True}))
        chunks = payloads[:-1]
        self.assertTrue(all(c["usage"] is None for c in chunks[:-1]))
        self.assertEqual(chunks[-1]["choices"], [])
        self.assertEqual(chunks[-1]["usage"]["total_tokens"], 26)
        self.assertEqual(chunks[-2]["choices"][0]["finish_reason"], "stop")

    def test_reasoning_deltas(self):
        chunks = self.stream(user("THINK"))[:-1]
        deltas = [c["choices"][0]["delta"] for c in chunks]
        self.assertEqual(deltas[1:3], [{"reasoning_content": "Let me think"}, {"reasoning_content": " about this."}])

    def test_stop_sequence_in_stream(self):
        chunks = self.stream(dict(user("SAY[abcdefghi]"), stop="def"))[:-1]
        self.assertEqual("".join(c["choices"][0]["delta"].get("content", "") for c in chunks), "abc")
        self.assertEqual(chunks[-1]["choices"][0]["finish_reason"], "stop")

    def test_tokens_arrive_before_the_reply_ends(self):
        """A slow reply's first content arrives while the CLI is still writing the rest."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request("POST", "/v1/chat/completions", json.dumps(dict(user("SLOW"), stream=True)),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        self.assertEqual(response.status, 200)
        seen = b""
        while b'"content":"E' not in seen:
            seen += response.read1(65536)
        pid = self.records()[0]["pid"]
        self.assertTrue(pid_alive(pid), "the CLI is still running when the first token is out")
        rest = response.read()
        conn.close()
        self.assertTrue(rest.endswith(b"data: [DONE]\n\n"))


class ErrorTest(ServerTestCase):
    def test_malformed_requests_are_400_and_start_nothing(self):
        cases = [
            ("not json", b"{nope", None),
            ("empty body", b"", None),
            ("array", b"[]", None),
            ("deep", b"[" * 100000 + b"]" * 100000, None),
            ("bad utf-8", b'{"messages": "\xff\xfe"}', None),
            ("no messages", json.dumps({"model": "sonnet"}), "messages"),
            ("empty messages", json.dumps({"messages": []}), "messages"),
            ("unknown role", json.dumps({"messages": [{"role": "bot", "content": "x"}]}), "messages[0].role"),
            ("n=2", json.dumps(dict(user("x"), n=2)), "n"),
            ("audio", json.dumps({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]}),
             "messages[0].content[0].type"),
            ("tool without id", json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}]}),
             "messages[1].tool_call_id"),
            ("responses api", json.dumps({"model": "sonnet", "input": "hi"}), "input"),
            ("flag as model", json.dumps(dict(user("x"), model="--dangerously-skip-permissions")), "model"),
            ("http image", json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}),
             "messages[0].content[0].image_url.url"),
        ]
        for name, body, param in cases:
            with self.subTest(name):
                headers, error = self.assert_error(self.chat(body), 400, param)
                self.assertEqual(error["type"], "invalid_request_error")
                self.assertEqual(headers.get("x-should-retry"), "false")
        self.assertEqual(self.records(), [], "no CLI run for a bad request")

    def test_body_too_large(self):
        server = self.make_server(max_body=1000)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            self.assert_error(self.chat(user("x" * 2000), port=server.server_address[1]), 413,
                              code="request_too_large")
        finally:
            server.stop()
            thread.join(10)

    def test_upstream_errors(self):
        cases = [
            ("RATE429", 429, "rate_limit_exceeded", "1"),
            ("OVERLOAD", 503, "overloaded", "1"),
            ("AUTH401", 503, "cli_not_logged_in", None),
            ("NOTLOGGEDIN", 503, "cli_not_logged_in", None),
            ("BADREQ400", 400, "upstream_rejected", None),
            ("CRASH", 502, "cli_crashed", None),
            ("GARBAGE", 502, "cli_bad_output", None),
        ]
        for word, status, code, retry_after in cases:
            for stream in (False, True):
                with self.subTest(word=word, stream=stream):
                    headers, error = self.assert_error(self.chat(dict(user(word), stream=stream)), status, code=code)
                    self.assertEqual(headers.get("retry-after"), retry_after)
                    if code == "cli_not_logged_in":
                        self.assertEqual(headers["x-should-retry"], "false")
                        self.assertIn("log in", error["message"])
        for record in self.records():
            self.assertFalse(pid_alive(record["pid"]))

    def test_cli_missing_is_502(self):
        server = cp.ProxyServer(("127.0.0.1", 0), cp.Config(os.path.join(self.tmp, "no-such-claude")))
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            self.assert_error(self.chat(user("hi"), port=server.server_address[1]), 502, code="cli_not_found")
            status, _, raw = self.request("GET", "/health", port=server.server_address[1])
            self.assertEqual(status, 200)
        finally:
            server.stop()
            thread.join(10)
        no_cli = cp.ProxyServer(("127.0.0.1", 0), cp.Config(None))
        thread = threading.Thread(target=no_cli.serve_forever, daemon=True)
        thread.start()
        try:
            port = no_cli.server_address[1]
            self.assert_error(self.chat(user("hi"), port=port), 502, code="cli_not_found")
            status, _, raw = self.request("GET", "/health", port=port)
            self.assertEqual((status, json.loads(raw)["cli"]["found"]), (503, False))
        finally:
            no_cli.stop()
            thread.join(10)

    def test_error_after_stream_began(self):
        """Once 200 and some chunks are out, an error is a data: {"error"} event, then the end."""
        translator = cp.ReplyTranslator()
        self.assertIsNone(translator.error)
        # A CLI that crashes mid-reply: the stub says its first words, then dies.
        stub = os.path.join(self.tmp, "claude-dies")
        with open(stub, "w") as f:
            f.write("#!%s\nimport json,sys\nsys.stdin.readline()\n" % sys.executable
                    + "print(json.dumps({'type':'stream_event','event':{'type':'content_block_delta','index':0,'delta':{'type':'text_delta','text':'Hel'}}}), flush=True)\n"
                    + "sys.stderr.write('segfault'); sys.exit(139)\n")
        os.chmod(stub, 0o755)
        server = cp.ProxyServer(("127.0.0.1", 0), cp.Config(stub))
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            status, _, raw = self.chat(dict(user("hi"), stream=True), port=server.server_address[1])
            self.assertEqual(status, 200)
            events = raw.split(b"\n\n")
            self.assertEqual(events[-1], b"")
            last = json.loads(events[-2][len(b"data: "):])
            self.assertEqual(last["error"]["code"], "cli_crashed")
            self.assertNotIn(b"[DONE]", raw)
        finally:
            server.stop()
            thread.join(10)


class LifecycleTest(ServerTestCase):
    def start_hanging_request(self, stream):
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        body = json.dumps(dict(user("HANG"), stream=stream)).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        self.assertTrue(wait_until(lambda: any("child_pid" in r for r in self.records())), "the stub started")
        return sock, self.records()[0]

    def test_client_disconnect_stops_the_cli(self):
        for stream in (False, True):
            with self.subTest(stream=stream):
                self.setUp()
                sock, record = self.start_hanging_request(stream)
                self.assertTrue(pid_alive(record["pid"]) and pid_alive(record["child_pid"]))
                sock.close()
                self.assertTrue(wait_until(lambda: not pid_alive(record["pid"])), "the CLI stopped")
                self.assertTrue(wait_until(lambda: not pid_alive(record["child_pid"])), "its whole group stopped")
                self.assertTrue(wait_until(lambda: self.server.runner.active() == 0))

    def test_timeout_is_504_and_stops_the_cli(self):
        server = self.make_server(timeout=0.5)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            for stream in (False, True):
                with self.subTest(stream=stream):
                    self.setUp()
                    self.assert_error(self.chat(dict(user("HANG"), stream=stream), port=server.server_address[1]),
                                      504, code="timeout")
                    [record] = self.records()
                    self.assertTrue(wait_until(lambda: not pid_alive(record["pid"])))
                    self.assertTrue(wait_until(lambda: not pid_alive(record["child_pid"])))
        finally:
            server.stop()
            thread.join(10)

    def test_shutdown_stops_every_run(self):
        server = self.make_server()
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        port = server.server_address[1]
        results = []
        client = threading.Thread(target=lambda: results.append(self.chat(user("HANG"), port=port)))
        client.start()
        self.assertTrue(wait_until(lambda: any("child_pid" in r for r in self.records())))
        record = self.records()[0]
        server.stop()
        thread.join(10)
        self.assertTrue(wait_until(lambda: not pid_alive(record["pid"])))
        self.assertTrue(wait_until(lambda: not pid_alive(record["child_pid"])))
        client.join(10)
        self.assertEqual(results[0][0], 503)


class MainTest(unittest.TestCase):
    def test_help_lists_every_option_with_its_default(self):
        import subprocess
        out = subprocess.run([sys.executable, "-I", "-S", cp.__file__, "--help"], capture_output=True,
                             text=True, timeout=30)
        self.assertEqual(out.returncode, 0, out.stderr)
        for word in ("--host", "--port", "--claude-path", "--model", "--effort", "--timeout", "--models",
                     "--max-body", "--log-prompts", "CLAUDE_PATH", "CLAUDE_TIMEOUT", "8082", "127.0.0.1"):
            self.assertIn(word, out.stdout)

    def test_runs_as_a_program_and_stops_on_sigterm(self):
        import subprocess
        tmp = tempfile.mkdtemp(prefix="claude-proxy-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        stub, _ = write_stub(tmp)
        proc = subprocess.Popen([sys.executable, cp.__file__, "--port", "0", "--claude-path", stub],
                                stderr=subprocess.PIPE, text=True)
        try:
            lines = []
            while not any("serving" in line for line in lines):
                lines.append(proc.stderr.readline())
                self.assertTrue(lines[-1], "the proxy exited early: %s" % "".join(lines))
            self.assertIn("2.1.197 (Claude Code)", "".join(lines))
            url = [line for line in lines if "serving" in line][0].split(" on ")[1].split()[0]
            port = int(url.rsplit(":", 1)[1].split("/")[0])
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("POST", "/v1/chat/completions", json.dumps(user("hi")), {"Content-Type": "application/json"})
            self.assertEqual(conn.getresponse().status, 200)
            conn.close()
            proc.send_signal(signal.SIGTERM)
            self.assertEqual(proc.wait(15), 0)
            log = proc.stderr.read()
            self.assertIn("POST /v1/chat/completions 200", log)
            self.assertNotIn("hi", log.split("POST")[1].split("\n")[0], "no prompt in the access log")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()


if __name__ == "__main__":
    unittest.main()
