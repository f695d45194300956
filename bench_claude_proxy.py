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


def start_proxy(claude, pool_size, env):
    """A proxy subprocess on a free loopback port; returns (process, port)."""
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "claude_proxy.py"), "--port", "0",
                             "--claude-path", claude, "--pool-size", str(pool_size)],
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


def via_proxy(port, text):
    """(seconds to the first content delta, seconds to the end, content) of one streamed request."""
    body = json.dumps({"stream": True, "messages": [{"role": "user", "content": text}]})
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
    plan = {"content": [{"type": "text", "text": text}]}
    start = time.perf_counter()
    proc = subprocess.Popen(cp.cli_argv(claude, plan, prompt), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=workdir,
                            env=cp.cli_env(env, plan))
    proc.stdin.write(cp.cli_stdin(plan))
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
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--claude", help="Default: the test suite's stub CLI. A real CLI (or a "
                        "wrapper script that sets its environment) to measure instead.")
    parser.add_argument("--rounds", type=int, default=15, help="Default: 15. Requests per way.")
    parser.add_argument("--gap", type=float, default=1.0,
                        help="Default: 1.0. Seconds between rounds (the pool refills meanwhile).")
    parser.add_argument("--stub-delay", type=float, default=0.5,
                        help="Default: 0.5. The stub's start-up time in seconds (the real CLI "
                        "2.1.197 measured 0.5 s here; CLI-FACTS saw 1.1-1.4 s).")
    args = parser.parse_args(argv)

    tmp = tempfile.mkdtemp(prefix="bench-claude-proxy-")
    env = dict(os.environ)
    if args.claude:
        claude, what, text = args.claude, "CLI %s" % args.claude, "Say hello."
    else:
        from test_claude_proxy import write_stub
        claude, _ = write_stub(tmp)
        env["STUB_START_DELAY"] = str(args.stub_delay)
        what, text = "stub CLI, start-up delay %.2f s" % args.stub_delay, "STAMP"
    pooled, pooled_port = start_proxy(claude, 2, env)
    plain, plain_port = start_proxy(claude, 0, env)
    ways = {
        "direct cold claude -p": lambda: direct(claude, text, env),
        "proxy, warm pool on": lambda: via_proxy(pooled_port, text),
        "proxy, pool off": lambda: via_proxy(plain_port, text),
    }
    results = {name: [] for name in ways}
    try:
        via_proxy(pooled_port, text)  # the pool learns the shape; not counted
        time.sleep(args.gap)
        names = list(ways)
        for round_ in range(args.rounds):
            for name in names[round_ % 3:] + names[:round_ % 3]:
                results[name].append(ways[name]())
            time.sleep(args.gap)
        proxy_mb = rss_mb(pooled.pid)
        pool_mb = [rss_mb(p) for p in descendants(pooled.pid)]
    finally:
        stop_proxy(pooled)
        stop_proxy(plain)
        shutil.rmtree(tmp, ignore_errors=True)

    base = median([r[0] for r in results["direct cold claude -p"]])
    print("claude_proxy.py %s benchmark: %s; %d rounds, %.1f s apart, medians"
          % (cp.__version__, what, args.rounds, args.gap))
    print("%-24s %14s %12s %22s" % ("", "first token", "total", "first token / direct"))
    for name, runs in results.items():
        first = median([r[0] for r in runs])
        print("%-24s %12.3f s %10.3f s %22.2f" % (name, first, median([r[1] for r in runs]), first / base))
    if not args.claude:
        direct_delay = median(chunk_delays([a for r in results["direct cold claude -p"] for a in r[2]]))
        proxy_delay = median(chunk_delays([a for r in results["proxy, warm pool on"] for a in r[2]]))
        print("per streamed chunk, CLI write -> client read: direct %.2f ms, through the proxy %.2f ms "
              "(added %.2f ms)" % (direct_delay * 1000, proxy_delay * 1000, (proxy_delay - direct_delay) * 1000))
    known = [m for m in pool_mb if m is not None]
    if proxy_mb is not None:
        print("memory: proxy %.0f MB RSS; its CLI processes (warm pool, MCP servers) %d, %.0f MB RSS in all"
              % (proxy_mb, len(known), sum(known)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
