#!/usr/bin/env python3
"""bench_claude_proxy.py: how fast the first token comes, side by side, in one run.

    python3 bench_claude_proxy.py                       # against the test suite's stub CLI
    python3 bench_claude_proxy.py --claude "$(which claude)" --rounds 20

Each round makes one streamed request three ways, in rotating order: a cold `claude -p` run
started directly (the same flags the proxy uses), the proxy with its warm pool on, and the
proxy with the pool off. It prints medians of the time to the first content token and to the
end, and each one's ratio to the direct cold run. With the stub it also measures the latency
the proxy adds to each streamed chunk (the stub writes its clock into each delta), and it
reports the proxy's memory and the warm pool's. Standard library only; loopback only.

The stub imitates the real CLI's start-up with a sleep (--stub-delay) before it reads stdin.
Machines are noisy: compare figures from the same run, not across runs.

    python3 bench_claude_proxy.py --claude NEW/claude --claude OLD/claude --fake-api ../shared/fake_anthropic_api.py

Several --claude: the same three ways for each CLI release, their rounds interleaved so that the
machine's noise falls on all of them, then a side-by-side table of the first tokens and of each
release's warm / cold ratio. With --fake-api the CLIs answer from the fake Anthropic API (an API
key login, a home folder of the run's own), so real binaries need no wrapper.

    python3 bench_claude_proxy.py --conversation --claude PATH --fake-api ../shared/fake_anthropic_api.py
    python3 bench_claude_proxy.py --cache-ttl-bench --claude PATH --fake-api ../shared/fake_anthropic_api.py

The conversation benchmark: one long conversation (--turns, default 12: a ~600-token system
prompt, ~1,500-token user turns, ~200-token replies) and a tool loop (--tool-rounds, default 4)
through the real CLI against the fake Anthropic API, three ways in one run: real turns with the
conversation's process kept between turns (the default), real turns resumed cold from a session
file every turn (--pool-size 0), and the transcript (--history transcript). What each way would
be billed comes from the fake API's own usage log (in units of uncached input: writes 1.25,
reads 0.1), not from the proxy; the time to the first token of the last turns is set beside a
cold `claude -p` started directly.

The cache lifetime benchmark (--cache-ttl-bench) runs that conversation logged in as a
subscriber, for --cache-ttl 1h, 5m and auto, with turns back to back (an agent) and with a pause
between turns longer than a 5-minute cache entry lives (a person; the fake's FAKE_CACHE_TTL
shortens those entries to --entry-seconds so that the run takes a minute, not an hour), and
reports each one's bill from the fake's own usage log (1-hour writes at 2x, 5-minute at 1.25x).

    python3 bench_claude_proxy.py --pipeline --claude PATH --fake-api ../shared/fake_anthropic_api.py

The pipeline benchmark: --requests one-shot requests (default 48, one system prompt, each a
short text of its own) at --concurrency (default 8), three ways in one run, each way's batch
repeated --rounds times in rotating order: `claude -p` started directly for each request, the
proxy with --reuse on, the proxy with --reuse off (both with their default warm pool and
--max-concurrency). It prints requests/s and CPU seconds per request (the CLI processes' and, for
the proxy, its own), and the fake API's bill per request. It checks that every reply echoes its
own request's text and that no model request the fake logged holds another request's text. Then
the proxy with reuse serves --more requests (default 150) at the same concurrency and reports
its memory and that of its CLI processes (resident, and proportional: shared pages split).
"""

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import claude_proxy as cp  # noqa: E402


def start_proxy(claude, pool_size, env, *extra):
    """A proxy subprocess on a free loopback port; returns (process, port)."""
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "claude_proxy.py"), "--port", "0",
                             "--claude-path", claude, "--pool-size", str(pool_size)] + list(extra),
                            stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stderr:
        match = re.search(r"serving .* on http://127\.0\.0\.1:(\d+)/v1", line)
        if match:
            # Keep draining its log so the proxy never blocks on a full pipe.
            import threading
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, int(match.group(1))
    raise SystemExit("the proxy did not start: exit %s" % proc.wait())


def stop_proxy(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def via_proxy(port, text, messages=None, tools=None):
    """(seconds to the first content delta, seconds to the end, content arrivals) of one streamed
    request; with `messages`, that conversation (and `text` is not used)."""
    body = {"stream": True, "messages": messages or [{"role": "user", "content": text}]}
    if tools:
        body["tools"] = tools
    body = json.dumps(body)
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise SystemExit("proxy answered %s: %s" % (response.status, response.read()[:300]))
    first, content, buffer, arrivals = None, "", b"", []
    while True:
        data = response.read1(65536)
        if not data:
            break
        buffer += data
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            payload = event[len(b"data: "):]
            if payload == b"[DONE]":
                continue
            chunk = json.loads(payload)
            delta = chunk["choices"][0]["delta"] if chunk.get("choices") else {}
            for call in delta.get("tool_calls") or ():
                first = first if first is not None else time.perf_counter() - start
                arrivals.append((time.time(), call))
            if delta.get("content"):
                now = time.perf_counter()
                first = first if first is not None else now - start
                content += delta["content"]
                arrivals.append((time.time(), delta["content"]))
    conn.close()
    return first, time.perf_counter() - start, arrivals


def direct(claude, text, env):
    """The same, for a cold `claude -p` run started directly with the proxy's own flags."""
    workdir = tempfile.mkdtemp(prefix="bench-direct-")
    prompt = os.path.join(workdir, "system-prompt.txt")
    with open(prompt, "w") as f:
        f.write(cp.DEFAULT_SYSTEM_PROMPT)
    plan = cp.Plan({"system": None, "turns": []})
    start = time.perf_counter()
    proc = subprocess.Popen(cp.cli_argv(claude, plan, prompt), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=workdir,
                            env=cp.cli_env(env, plan))
    proc.stdin.write(cp.cli_stdin([{"type": "text", "text": text}]))
    proc.stdin.close()
    first, arrivals = None, []
    for line in proc.stdout:
        event = json.loads(line)
        delta = (event.get("event") or {}).get("delta") or {}
        if event.get("type") == "stream_event" and delta.get("type") == "text_delta":
            first = first if first is not None else time.perf_counter() - start
            arrivals.append((time.time(), delta["text"]))
        if event.get("type") == "result":
            break
    total = time.perf_counter() - start
    proc.wait()
    shutil.rmtree(workdir, ignore_errors=True)
    return first, total, arrivals


def chunk_delays(arrivals):
    """Seconds from each STAMP delta being written by the stub to it being read."""
    return [t - float(m) for t, piece in arrivals for m in re.findall(r"<t=([\d.]+)>", piece)]


def rss_mb(pid):
    """Resident memory of a process in MB (Linux /proc), or None."""
    return proc_mb(pid, "status", "VmRSS:")


def proc_mb(pid, name, field):
    """One kB figure of /proc/<pid>/<name> in MB, or None (not Linux, or the process is gone)."""
    try:
        with open("/proc/%d/%s" % (pid, name)) as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def descendants(pid):
    """Every process below pid (Linux /proc), for the warm pool's memory."""
    children = {}
    for name in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if name.isdigit():
            try:
                with open("/proc/%s/stat" % name) as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def start_fake_api(path, log, env):
    """The shared fake Anthropic API on a free port; returns (process, port)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, path, str(port)], env=dict(env, FAKE_LOG=log),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    raise SystemExit("the fake API did not start")


def log_lines(log):
    try:
        with open(log) as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def billed(log, start, end):
    """(billed, uncached) input tokens of the fake API's answered requests logged in lines
    [start, end), from its own usage log: I + 1.25 W5 + 2 W1 + 0.1 R, and I + W + R."""
    bill = uncached = 0.0
    reads = []
    with open(log) as f:
        for number, line in enumerate(f):
            entry = json.loads(line)
            if entry.get("event") != "usage" or not start <= number < end:
                continue
            split = entry.get("cache_creation") or {}
            bill += (entry["input_tokens"] + 1.25 * split.get("ephemeral_5m_input_tokens", 0)
                     + 2 * split.get("ephemeral_1h_input_tokens", 0) + 0.1 * entry["cache_read_input_tokens"])
            uncached += entry["total_input_tokens"]
            reads.append(entry["cache_read_input_tokens"])
    return bill, uncached, reads


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def conversation_benchmark(args):
    if not args.claude or not args.fake_api:
        raise SystemExit("--conversation needs --claude (the real CLI) and --fake-api (the shared "
                         "fake Anthropic API, which bills and simulates the prompt cache)")
    tmp = tempfile.mkdtemp(prefix="bench-claude-proxy-")
    log = os.path.join(tmp, "fake.log")
    env = dict(os.environ, FAKE_REPLY="R" * 800)  # ~200-token replies
    fake, fake_port = start_fake_api(args.fake_api, log, env)
    # The CLI talks to the fake, and keeps its sessions in a home of its own.
    env.update(ANTHROPIC_BASE_URL="http://127.0.0.1:%d" % fake_port, ANTHROPIC_API_KEY="sk-fake",
               HOME=os.path.join(tmp, "home"))
    env.pop("CLAUDE_CONFIG_DIR", None)
    os.makedirs(env["HOME"])
    ways = [("real turns, process kept", 2, ()), ("real turns, resumed cold", 0, ()),
            ("transcript", 2, ("--history", "transcript"))]
    results = {}
    try:
        cold = [direct(args.claude, "Say hello.", env)[0] for _ in range(3)]
        for number, (name, pool, extra) in enumerate(ways):
            proc, port = start_proxy(args.claude, pool, env, *extra)
            try:
                tag = "way%d" % number
                system = "[%s] You are a careful assistant. " % tag + "S" * 2400  # ~600 tokens
                messages, firsts = [{"role": "system", "content": system}], []
                text_start = log_lines(log)
                for turn in range(args.turns):
                    messages.append({"role": "user", "content": "[%s turn %d] " % (tag, turn) + "U" * 6000})
                    first, _, arrivals = via_proxy(port, None, messages)
                    firsts.append(first)
                    messages.append({"role": "assistant", "content": "".join(a[1] for a in arrivals)})
                # The tool loop: each round a call, its result, then the answer.
                tag_tools = "tools%d" % number
                messages = [{"role": "system", "content": system}]
                tools_start = log_lines(log)
                for round_ in range(args.tool_rounds):
                    messages.append({"role": "user", "content": "[%s round %d] CALLTOOL " % (tag_tools, round_) + "U" * 2000})
                    _, _, arrivals = via_proxy(port, None, messages, [WEATHER_TOOL])
                    calls = {}
                    for _, piece in arrivals:
                        if isinstance(piece, dict):
                            calls.setdefault(piece["index"], {"id": None, "function": {"name": None, "arguments": ""}})
                            call = calls[piece["index"]]
                            call["id"] = piece.get("id") or call["id"]
                            call["function"]["name"] = (piece.get("function") or {}).get("name") or call["function"]["name"]
                            call["function"]["arguments"] += (piece.get("function") or {}).get("arguments", "")
                    calls = [dict(c, type="function") for _, c in sorted(calls.items())]
                    said = "".join(a[1] for a in arrivals if isinstance(a[1], str))
                    messages.append({"role": "assistant", "content": said or None, "tool_calls": calls})
                    for call in calls:
                        messages.append({"role": "tool", "tool_call_id": call["id"], "content": "sunny " + "W" * 1000})
                    _, _, arrivals = via_proxy(port, None, messages, [WEATHER_TOOL])
                    messages.append({"role": "assistant", "content": "".join(a[1] for a in arrivals if isinstance(a[1], str))})
                time.sleep(0.5)  # the fake's last log lines
                results[name] = (firsts, (text_start, tools_start), (tools_start, log_lines(log)))
            finally:
                stop_proxy(proc)
        leftovers = [f for _, _, files in os.walk(os.path.join(env["HOME"], ".claude", "projects")) for f in files]
        print("claude_proxy.py %s conversation benchmark: CLI %s against the fake Anthropic API"
              % (cp.__version__, args.claude))
        print("%d turns (system ~600 tokens, user turns ~1,500, replies ~200); tool loop of %d rounds"
              % (args.turns, args.tool_rounds))
        print("%-26s %16s %22s %24s %18s" % ("", "billed/uncached", "first token, last 4", "/ cold claude -p",
                                             "tool loop billed"))
        base = median(cold)
        for name, (firsts, text_lines, tool_lines) in results.items():
            bill, uncached, _ = billed(log, *text_lines)
            tool_bill, tool_uncached, reads = billed(log, *tool_lines)
            last = median(firsts[-4:])
            print("%-26s %16.2f %20.3f s %24.2f %18.2f" % (name, bill / uncached, last, last / base,
                                                          tool_bill / tool_uncached))
            print("%-26s tool loop, cache read per request: %s" % ("", " ".join(map(str, reads))))
        print("cold claude -p started directly: first token %.3f s (median of %d)" % (base, len(cold)))
        print("session files left behind: %d" % len(leftovers))
    finally:
        fake.terminate()
        fake.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def cache_ttl_benchmark(args):
    """The same conversation as --conversation, logged in as a subscriber (an OAuth token: the
    CLI then writes 1-hour cache entries unless told otherwise), for each --cache-ttl, in two
    rhythms: an agent's (turns back to back) and a person's (a pause longer than a 5-minute
    entry lives between turns: the fake's FAKE_CACHE_TTL shortens those entries to
    --entry-seconds, and the proxy's --cache-gap is scaled to match)."""
    if not args.claude or not args.fake_api:
        raise SystemExit("--cache-ttl-bench needs --claude (the real CLI) and --fake-api")
    tmp = tempfile.mkdtemp(prefix="bench-claude-proxy-")
    rows = []
    fakes = []
    try:
        for rhythm, pause in (("agent", 0.0), ("person", args.entry_seconds + 1.5)):
            log = os.path.join(tmp, "fake-%s.log" % rhythm)
            env = dict(os.environ, FAKE_REPLY="R" * 800, FAKE_CACHE_TTL="%g" % args.entry_seconds)
            fake, fake_port = start_fake_api(args.fake_api, log, env)
            fakes.append(fake)
            env.update(ANTHROPIC_BASE_URL="http://127.0.0.1:%d" % fake_port, HOME=os.path.join(tmp, "home-" + rhythm),
                       CLAUDE_CODE_OAUTH_TOKEN="sk-ant-oat01-bench")
            for name in ("ANTHROPIC_API_KEY", "CLAUDE_CONFIG_DIR"):
                env.pop(name, None)
            os.makedirs(env["HOME"])
            for ttl in ("1h", "5m", "auto"):
                proc, port = start_proxy(args.claude, 2, env, "--cache-ttl", ttl,
                                         "--cache-gap", "%g" % (args.entry_seconds * 0.8))
                try:
                    tag = "%s-%s" % (rhythm, ttl)
                    system = "[%s] You are a careful assistant. " % tag + "S" * 2400
                    messages = [{"role": "system", "content": system}]
                    start = log_lines(log)
                    for turn in range(args.turns):
                        if turn and pause:
                            time.sleep(pause)
                        messages.append({"role": "user", "content": "[%s turn %d] " % (tag, turn) + "U" * 6000})
                        _, _, arrivals = via_proxy(port, None, messages)
                        messages.append({"role": "assistant", "content": "".join(a[1] for a in arrivals)})
                    time.sleep(0.5)
                    bill, uncached, reads = billed(log, start, log_lines(log))
                    rows.append((rhythm, ttl, bill / uncached, reads))
                finally:
                    stop_proxy(proc)
        print("claude_proxy.py %s cache lifetime benchmark: CLI %s as a subscriber, against the fake API"
              % (cp.__version__, args.claude))
        print("%d turns (system ~600 tokens, user turns ~1,500, replies ~200); a person's pause: "
              "%.1f s, with 5-minute entries living %g s" % (args.turns, args.entry_seconds + 1.5, args.entry_seconds))
        print("%-8s %-12s %16s   %s" % ("rhythm", "--cache-ttl", "billed/uncached", "cache read per turn"))
        for rhythm, ttl, ratio, reads in rows:
            print("%-8s %-12s %16.3f   %s" % (rhythm, ttl, ratio, " ".join(map(str, reads))))
        print("(1h is what the CLI writes for a subscriber when the proxy does not choose, as 0.2.0 did)")
    finally:
        for fake in fakes:
            fake.terminate()
            fake.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


PIPELINE_SYSTEM = ("Extract the relations between the people a sentence names, as "
                   "subject / relation / object lines. Say nothing else.")
PIPELINE_MARK = re.compile(r"pl(\d+)x(\d+)x")  # each request's own text: pl<way>x<number>x


def pipeline_request(number, way):
    return "pl%dx%dx Ann met Bob at the station." % (way, number)


def proxy_pipeline_call(port, text):
    """One non-streamed one-shot chat completion; returns its reply text."""
    body = json.dumps({"model": "sonnet", "messages": [{"role": "system", "content": PIPELINE_SYSTEM},
                                                       {"role": "user", "content": text}]})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError("proxy answered %s: %s" % (response.status, data[:300]))
        return json.loads(data)["choices"][0]["message"]["content"]
    finally:
        conn.close()


def direct_pipeline_call(claude, text, env, folder):
    """One `claude -p` run started directly, as a pipeline script would (the proxy's flags,
    the system prompt from a file, the text on stdin); returns its reply text."""
    plan = cp.Plan({"system": None, "turns": []}, model="sonnet")
    workdir = tempfile.mkdtemp(prefix="direct-", dir=folder)
    try:
        prompt = os.path.join(workdir, "system-prompt.txt")
        with open(prompt, "w") as f:
            f.write(PIPELINE_SYSTEM)
        proc = subprocess.Popen(cp.cli_argv(claude, plan, prompt), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=workdir,
                                env=cp.cli_env(env, plan))
        out, _ = proc.communicate(cp.cli_stdin([{"type": "text", "text": text}]), timeout=300)
        for line in out.splitlines():
            event = json.loads(line)
            if event.get("type") == "result":
                return event.get("result") or ""
        raise RuntimeError("claude -p printed no result")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def cpu_seconds(pid):
    """CPU seconds a process and its reaped children used (Linux /proc), or 0."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def tree_cpu(pid):
    """CPU seconds of a process, its live descendants and everything they reaped."""
    return cpu_seconds(pid) + sum(cpu_seconds(child) for child in descendants(pid))


def pss_mb(pid):
    """Proportional memory of a process in MB (shared pages split among their users), or None."""
    return proc_mb(pid, "smaps_rollup", "Pss:")


def streamed_conversation(port, tag, turns=3):
    """A conversation's turns, streamed one after another: the first token of each."""
    messages, firsts = [{"role": "system", "content": "You chat. [%s]" % tag}], []
    for turn in range(turns):
        messages.append({"role": "user", "content": "turn %d of the %s chat" % (turn, tag)})
        first, _, arrivals = via_proxy(port, None, messages)
        firsts.append(first)
        messages.append({"role": "assistant", "content": "".join(a[1] for a in arrivals)})
    return firsts


def batch(call, count, concurrency, way):
    """`count` calls at `concurrency`: (seconds, [(request text, reply)])."""
    from concurrent.futures import ThreadPoolExecutor
    texts = [pipeline_request(n, way) for n in range(count)]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as workers:
        replies = list(workers.map(call, texts))
    return time.perf_counter() - start, list(zip(texts, replies))


def mixed_requests(log, start, end):
    """Model requests (fake log lines [start, end)) whose messages hold more than one request's
    own text, and how many requests were checked."""
    mixed = checked = 0
    with open(log) as f:
        for number, line in enumerate(f):
            if not start <= number < end:
                continue
            entry = json.loads(line)
            if "body" not in entry:
                continue
            checked += 1
            marks = set(PIPELINE_MARK.findall(json.dumps(entry["body"].get("messages"))))
            mixed += len(marks) > 1
    return mixed, checked


def pipeline_benchmark(args):
    if not args.claude or not args.fake_api:
        raise SystemExit("--pipeline needs --claude (the real CLI) and --fake-api")
    tmp = tempfile.mkdtemp(prefix="bench-claude-proxy-")
    log = os.path.join(tmp, "fake.log")
    env = dict(os.environ)
    fake, fake_port = start_fake_api(args.fake_api, log, env)
    env.update(ANTHROPIC_BASE_URL="http://127.0.0.1:%d" % fake_port, ANTHROPIC_API_KEY="sk-fake",
               HOME=os.path.join(tmp, "home"), TMPDIR=tmp)
    env.pop("CLAUDE_CONFIG_DIR", None)
    os.makedirs(env["HOME"])
    names = ["claude -p directly", "proxy, --reuse on", "proxy, --reuse off"]
    results = {name: [] for name in names}  # [(seconds, cpu seconds, bill, wrong replies)]
    mixed = checked = 0
    proxies = {}
    try:
        proxies[names[1]] = start_proxy(args.claude, 2, env, "--reuse", "on")
        proxies[names[2]] = start_proxy(args.claude, 2, env, "--reuse", "off")
        for name in names[1:]:  # the pool learns the shape; not counted
            proxy_pipeline_call(proxies[name][1], "warm up")
        time.sleep(2)
        memory_before = rss_mb(proxies[names[1]][0].pid)
        for round_ in range(args.rounds):
            for offset in range(3):
                way = (round_ + offset) % 3
                name = names[way]
                if way == 0:
                    call = lambda text: direct_pipeline_call(args.claude, text, env, tmp)
                    cpu = lambda: sum(os.times()[2:4])  # the reaped `claude -p` runs
                else:
                    proc, port = proxies[name]
                    call = lambda text, port=port: proxy_pipeline_call(port, text)
                    cpu = lambda pid=proc.pid: tree_cpu(pid)
                first_line, cpu_before = log_lines(log), cpu()
                seconds, replies = batch(call, args.requests, args.concurrency, way * 100 + round_)
                time.sleep(0.5)  # the fake's last log lines
                cpu_used, last_line = cpu() - cpu_before, log_lines(log)
                wrong = sum(1 for text, reply in replies if text not in reply)
                bill, _, _ = billed(log, first_line, last_line)
                found, seen = mixed_requests(log, first_line, last_line)
                mixed, checked = mixed + found, checked + seen
                results[name].append((seconds, cpu_used, bill, wrong))
                time.sleep(1)
        proc, port = proxies[names[1]]
        first_line = log_lines(log)
        # Alongside the batch, a streamed conversation of another shape goes on turn by turn:
        # its first tokens, set beside the same conversation's alone afterwards.
        import threading
        alongside = []
        chat = threading.Thread(target=lambda: alongside.extend(streamed_conversation(port, "busy")))
        chat.start()
        seconds, replies = batch(lambda text: proxy_pipeline_call(port, text), args.more,
                                 args.concurrency, 999)
        chat.join()
        alone = streamed_conversation(port, "idle")
        time.sleep(0.5)
        found, seen = mixed_requests(log, first_line, log_lines(log))
        mixed, checked = mixed + found, checked + seen
        more_wrong = sum(1 for text, reply in replies if text not in reply)
        children = descendants(proc.pid)
        memory = (rss_mb(proc.pid), pss_mb(proc.pid), [rss_mb(p) for p in children],
                  [pss_mb(p) for p in children])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/health")
        health = json.loads(conn.getresponse().read())
        conn.close()
    finally:
        for proc, _ in proxies.values():
            stop_proxy(proc)
        fake.terminate()
        fake.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    print("claude_proxy.py %s pipeline benchmark: CLI %s against the fake Anthropic API"
          % (cp.__version__, args.claude))
    print("%d one-shot requests at concurrency %d, %d rounds per way (medians; all rounds in brackets)"
          % (args.requests, args.concurrency, args.rounds))
    print("%-22s %12s %10s %14s %16s %8s" % ("", "requests/s", "/ direct", "CPU s/request",
                                             "billed/request", "wrong"))
    rate = lambda runs: median([args.requests / r[0] for r in runs])
    for name, runs in results.items():
        print("%-22s %12.2f %10.2f %14.3f %16.1f %8d   [%s]" % (
            name, rate(runs), rate(runs) / rate(results[names[0]]),
            median([r[1] / args.requests for r in runs]), median([r[2] / args.requests for r in runs]),
            sum(r[3] for r in runs), " ".join("%.2f/s" % (args.requests / r[0]) for r in runs)))
    print("model requests checked: %d; holding another request's text: %d" % (checked, mixed))
    proxy_rss, proxy_pss, rss, pss = memory
    print("after %d more requests with --reuse on (%.2f/s, %d wrong replies): proxy %.0f MB RSS "
          "(%.0f MB after warm-up, grew %.0f MB); proxy and its %d CLI processes %.0f MB RSS, "
          "%.0f MB PSS in all" % (args.more, args.more / seconds, more_wrong, proxy_rss, memory_before,
                                   proxy_rss - memory_before, len(rss),
                                   proxy_rss + sum(m for m in rss if m), (proxy_pss or 0) + sum(m for m in pss if m)))
    print("a streamed 3-turn conversation alongside those requests: first token of each turn %s; "
          "alone afterwards: %s" % (" ".join("%.3f s" % t for t in alongside),
                                    " ".join("%.3f s" % t for t in alone)))
    print("reuse: %s" % json.dumps(health.get("reuse")))
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--claude", action="append",
                        help="Default: the test suite's stub CLI. A real CLI (or a wrapper script "
                        "that sets its environment) to measure instead. Repeat it to set CLI "
                        "releases side by side in one run: the rounds interleave them.")
    parser.add_argument("--rounds", type=int, default=15, help="Default: 15. Requests per way.")
    parser.add_argument("--gap", type=float, default=1.0,
                        help="Default: 1.0. Seconds between requests (the pool refills meanwhile).")
    parser.add_argument("--stub-delay", type=float, default=0.5,
                        help="Default: 0.5. The stub's start-up time in seconds (the real CLI "
                        "2.1.197 measured 0.5 s here; CLI-FACTS saw 1.1-1.4 s).")
    parser.add_argument("--conversation", action="store_true",
                        help="Run the conversation benchmark instead (needs --claude and --fake-api).")
    parser.add_argument("--fake-api", help="The shared fake_anthropic_api.py: for --conversation, and "
                        "for the first-token benchmark the real CLIs talk to it (with an API key).")
    parser.add_argument("--turns", type=int, default=12, help="Default: 12. Turns of the conversation.")
    parser.add_argument("--tool-rounds", type=int, default=4, help="Default: 4. Rounds of the tool loop.")
    parser.add_argument("--cache-ttl-bench", action="store_true",
                        help="Run the cache lifetime benchmark instead (needs --claude and --fake-api).")
    parser.add_argument("--entry-seconds", type=float, default=4.0,
                        help="Default: 4. With --cache-ttl-bench: how long the fake keeps a "
                        "5-minute cache entry (a person's pause is 1.5 s longer).")
    parser.add_argument("--pipeline", action="store_true",
                        help="Run the pipeline benchmark instead (needs --claude and --fake-api).")
    parser.add_argument("--requests", type=int, default=48,
                        help="Default: 48. With --pipeline: one-shot requests per batch.")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="Default: 8. With --pipeline: requests at once.")
    parser.add_argument("--more", type=int, default=150,
                        help="Default: 150. With --pipeline: requests after the batches, then memory.")
    args = parser.parse_args(argv)
    if args.pipeline:
        if args.claude and len(args.claude) > 1:
            raise SystemExit("--pipeline measures one CLI: give --claude once")
        args.claude = args.claude[0] if args.claude else None
        if "--rounds" not in (argv if argv is not None else sys.argv):
            args.rounds = 2
        return pipeline_benchmark(args)
    if args.conversation or args.cache_ttl_bench:
        if args.claude and len(args.claude) > 1:
            raise SystemExit("--conversation and --cache-ttl-bench measure one CLI: give --claude once")
        args.claude = args.claude[0] if args.claude else None
        return (conversation_benchmark if args.conversation else cache_ttl_benchmark)(args)

    tmp = tempfile.mkdtemp(prefix="bench-claude-proxy-")
    env, fake = dict(os.environ), None
    if args.claude:
        clis, what, text = args.claude, "CLI", "Say hello."
        if args.fake_api:
            fake, fake_port = start_fake_api(args.fake_api, os.path.join(tmp, "fake.log"), env)
            env.update(ANTHROPIC_BASE_URL="http://127.0.0.1:%d" % fake_port, ANTHROPIC_API_KEY="sk-fake",
                       HOME=os.path.join(tmp, "home"))
            env.pop("CLAUDE_CONFIG_DIR", None)
            os.makedirs(env["HOME"])
            what = "CLI against the fake Anthropic API"
    else:
        from test_claude_proxy import write_stub
        claude, _ = write_stub(tmp)
        clis = [claude]
        env["STUB_START_DELAY"] = str(args.stub_delay)
        what, text = "stub CLI, start-up delay %.2f s" % args.stub_delay, "STAMP"
    names = ["direct cold claude -p", "proxy, warm pool on", "proxy, pool off"]
    subjects, proxies = [], []  # subjects: (label, claude, pooled proxy, {way: runs})
    try:
        for claude in clis:
            label = (cp.cli_version(claude) or "version unknown").replace(" (Claude Code)", "")
            pooled, pooled_port = start_proxy(claude, 2, env)
            proxies.append(pooled)
            plain, plain_port = start_proxy(claude, 0, env)
            proxies.append(plain)
            ways = {names[0]: lambda c=claude: direct(c, text, env),
                    names[1]: lambda p=pooled_port: via_proxy(p, text),
                    names[2]: lambda p=plain_port: via_proxy(p, text)}
            subjects.append((label, claude, pooled, ways, {name: [] for name in names}))
            via_proxy(pooled_port, text)  # the pool learns the shape; not counted
        time.sleep(args.gap)
        for round_ in range(args.rounds):
            for label, claude, pooled, ways, results in subjects:
                for name in names[round_ % 3:] + names[:round_ % 3]:
                    results[name].append(ways[name]())
                    # A warm process taken is replaced in the background: its start-up must
                    # not fall on the next measurement.
                    time.sleep(args.gap)
        memory = [(rss_mb(pooled.pid), [rss_mb(p) for p in descendants(pooled.pid)])
                  for _, _, pooled, _, _ in subjects]
    finally:
        for proc in proxies:
            stop_proxy(proc)
        if fake:
            fake.terminate()
            fake.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    print("claude_proxy.py %s benchmark: %s; %d rounds, requests %.1f s apart, medians"
          % (cp.__version__, what, args.rounds, args.gap))
    for (label, claude, _, _, results), (proxy_mb, pool_mb) in zip(subjects, memory):
        if args.claude:
            print("CLI %s: %s" % (label, claude))
        base = median([r[0] for r in results[names[0]]])
        print("%-24s %14s %12s %22s" % ("", "first token", "total", "first token / direct"))
        for name, runs in results.items():
            first = median([r[0] for r in runs])
            print("%-24s %12.3f s %10.3f s %22.2f" % (name, first, median([r[1] for r in runs]), first / base))
        if not args.claude:
            direct_delay = median(chunk_delays([a for r in results[names[0]] for a in r[2]]))
            proxy_delay = median(chunk_delays([a for r in results[names[1]] for a in r[2]]))
            print("per streamed chunk, CLI write -> client read: direct %.2f ms, through the proxy %.2f ms "
                  "(added %.2f ms)" % (direct_delay * 1000, proxy_delay * 1000, (proxy_delay - direct_delay) * 1000))
        known = [m for m in pool_mb if m is not None]
        if proxy_mb is not None:
            print("memory: proxy %.0f MB RSS; its CLI processes (warm pool, MCP servers) %d, %.0f MB RSS in all"
                  % (proxy_mb, len(known), sum(known)))
    if len(subjects) > 1:
        print("side by side, first token (median of %d):" % args.rounds)
        print("%-24s" % "" + "".join(" %15s" % label[:15] for label, _, _, _, _ in subjects))
        for name in names:
            print("%-24s" % name + "".join("%14.3f s" % median([r[0] for r in results[name]])
                                           for _, _, _, _, results in subjects))
        print("%-24s" % "warm / cold" + "".join(
            "%16.2f" % (median([r[0] for r in results[names[1]]]) / median([r[0] for r in results[names[0]]]))
            for _, _, _, _, results in subjects))
    return 0


if __name__ == "__main__":
    sys.exit(main())
