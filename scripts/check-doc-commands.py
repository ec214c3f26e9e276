#!/usr/bin/env python3
"""Every command the README and docs/ show a user is run here, or checked against what
runs it, so a documented command cannot rot unnoticed.

- `cargo run --example X`: the features the line names must be enough for X, and X is run
  (the binary the tests built, so nothing is compiled twice): examples that finish by
  themselves must exit 0; the two that serve until ctrl-c run as the docs tell a user to
  (the RabbitMQ worker with its publisher and `steadfast dlq list`, the console example
  fetched with its token), then stop on SIGINT with exit 0.
- `steadfast ...`: parsed by the real binary (every flag and value must be accepted), and
  every subcommand and flag it uses must be exercised by the CLI tests (tests/cli).
- `cargo add` / `cargo install`: the crates' features exist (the CLI's binary is built by
  the test build; `cargo install` would be a second release build).
- `scripts/...`, `cargo deny ...`, `rabbitmqctl ...`, `docker ...`: the CI step or test that
  runs it must contain it (below, `CHECKS`), or its arguments must be ones the script
  accepts.

Needs the brokers and databases of scripts/test.sh, and the test build (`cargo nextest run
--workspace --all-features --no-run`). Prints one line per command with how it is covered.
"""
import glob
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import http.client

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.chdir(ROOT)
DOCS = ["README.md"] + sorted(glob.glob("docs/*.md"))
SHELL_FENCES = {"sh", "bash", "shell", "console"}
INLINE_PROGRAMS = ("cargo run ", "cargo install ", "cargo add ", "steadfast ", "scripts/")
# The README's third line beside the two example terminals, run as it is written.
README_DLQ_LIST = next(l for l in open("README.md", encoding="utf-8").read().split("\n")
                       if l.startswith("steadfast dlq list billing") and "example-amqp" in l)
# Commands named in prose as ones that do not exist.
NOT_COMMANDS = {("docs/asyncapi.md", "steadfast asyncapi")}
SAMPLE_ID = "0193c1e2-7c1a-7d3e-9a50-2b6a1f0c9d11"

failures = []
report = []


def fail(where, cmd, why):
    failures.append(f"{where}: `{cmd}`: {why}")


def ok(where, cmd, how):
    report.append(f"{how:<12} {where}: {cmd}")


def commands():
    """(where, text, inline) for every shell line of a fenced block and every complete
    inline command."""
    out = []
    for path in DOCS:
        lines = open(path, encoding="utf-8").read().split("\n")
        fence = None
        pending = ""
        for i, line in enumerate(lines, 1):
            if line.startswith("```"):
                fence = line[3:].strip() if fence is None else None
                continue
            if fence in SHELL_FENCES:
                text = pending + line.strip()
                if text.endswith("\\"):
                    pending = text[:-1] + " "
                    continue
                pending = ""
                if text and not text.startswith("#"):
                    out.append((f"{path}:{i}", text, False))
            elif fence is None:
                for span in re.findall(r"`([^`]+)`", line):
                    if (path, span) in NOT_COMMANDS:
                        continue
                    # Templates (`<group>`, `{queue}`, `a|b`, `show/replay`) are not commands.
                    if span.startswith(INLINE_PROGRAMS) and not re.search(r"[<{}]|\.\.\.|[a-z]/[a-z]+ --|\w\|\w", span):
                        if span.split()[-1].startswith("--") and span.startswith("steadfast"):
                            continue  # a flag named in prose, not a command
                        out.append((f"{path}:{i}", span, True))
    return out


def words(text):
    """The command's words without comments, leading VAR=value assignments, and cut at a
    pipe or redirection."""
    w = shlex.split(text, comments=True)
    while w and re.match(r"^[A-Z_][A-Z0-9_]*=", w[0]):
        w = w[1:]
    for i, t in enumerate(w):
        if t in ("|", ">", ">>", "<", "&&", ";"):
            return w[:i]
    return w


def metadata():
    out = subprocess.run(["cargo", "metadata", "--format-version", "1", "--locked"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def built_targets():
    """The executables of the test build: every example and the CLI."""
    out = subprocess.run(
        ["cargo", "build", "--quiet", "--workspace", "--all-features", "--profile", "test",
         "--examples", "--bin", "steadfast", "--message-format=json"],
        check=True, capture_output=True, text=True).stdout
    exes = {}
    for line in out.splitlines():
        v = json.loads(line)
        if v.get("reason") == "compiler-artifact" and v.get("executable"):
            exes[v["target"]["name"]] = v["executable"]
    return exes


def features_of(meta, name):
    pkg = next(p for p in meta["packages"] if p["name"] == name)
    return pkg


def check_features(where, cmd, meta, crate, wanted):
    pkg = features_of(meta, crate)
    unknown = [f for f in wanted if f not in pkg["features"] and f not in
               [d["name"] for d in pkg["dependencies"] if d.get("optional")]]
    if unknown:
        fail(where, cmd, f"{crate} {pkg['version']} has no feature {', '.join(unknown)}")
        return False
    return True


def required_features(meta, kind, name):
    pkg = features_of(meta, "steadfast")
    t = next((t for t in pkg["targets"] if kind in t["kind"] and t["name"] == name), None)
    return None if t is None else t.get("required-features", [])


def flag_values(w, flag):
    vals = []
    for i, t in enumerate(w):
        if t == flag and i + 1 < len(w):
            vals += w[i + 1].split(",")
        elif t.startswith(flag + "="):
            vals += t.split("=", 1)[1].split(",")
    return vals


def run_example(exe, name, timeout=120):
    p = subprocess.run([exe], capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


class Background:
    """A process that serves until SIGINT; its output goes to a file."""

    def __init__(self, argv, env=None):
        self.log = tempfile.NamedTemporaryFile("w+", delete=False)
        self.p = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, text=True,
                                  env={**os.environ, **(env or {})})

    def output(self):
        return open(self.log.name, encoding="utf-8", errors="replace").read()

    def wait_for(self, pattern, secs):
        end = time.time() + secs
        while time.time() < end:
            m = re.search(pattern, self.output())
            if m:
                return m
            if self.p.poll() is not None:
                return None
            time.sleep(0.2)
        return None

    def interrupt(self, secs=30):
        """SIGINT as ctrl-c sends it; the exit code, or None if it did not stop."""
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGINT)
        try:
            return self.p.wait(secs)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
            return None


def amqp_worker_session(exes, where):
    """README: the worker in one terminal, the publisher in another, then its dead letters."""
    worker = Background([exes["amqp_worker"]])
    try:
        if not worker.wait_for(r"connected: ", 60):
            return f"the worker did not connect:\n{worker.output()[-2000:]}"
        rc, out = run_example(exes["amqp_publish"], "amqp_publish")
        if rc != 0:
            return f"amqp_publish exited {rc}:\n{out[-2000:]}"
        # The publisher's payments that end in 7 succeed on their third attempt, after two
        # broker-held delays of 0.5 s and 1 s.
        if not worker.wait_for(r"attempt 3", 60):
            return f"no payment reached its third attempt:\n{worker.output()[-2000:]}"
        dlq = subprocess.run([exes["steadfast"], *words(README_DLQ_LIST)[1:]],
                             capture_output=True, text=True, timeout=60)
        if dlq.returncode != 0 or "has no items" not in dlq.stdout:
            return f"`steadfast dlq list` does not show the refused order:\n{dlq.stdout}{dlq.stderr}"
    finally:
        rc = worker.interrupt()
    if rc != 0:
        return f"the worker did not exit 0 on ctrl-c (exit {rc}):\n{worker.output()[-2000:]}"
    return None


def get(path, headers):
    """One GET on the console's default address; redirects are not followed."""
    c = http.client.HTTPConnection("127.0.0.1", 8089, timeout=10)
    try:
        c.request("GET", path, headers=headers)
        r = c.getresponse()
        return r.status, r.read().decode(errors="replace")
    finally:
        c.close()


def console_session(exes, where):
    """The console example: 25 dead letters, served with the token it prints."""
    console = Background([exes["console"]])
    try:
        m = console.wait_for(r"(\d+) dead letters in group billing; log in with the token (\S+)", 120)
        if not m:
            return f"the example printed no token:\n{console.output()[-2000:]}"
        token = m.group(2)
        status, page = None, ""
        end = time.time() + 30
        while time.time() < end and status is None:
            try:
                status, page = get("/", {"Authorization": f"Bearer {token}"})
            except OSError:
                time.sleep(0.3)
        if status != 200 or "billing" not in page:
            return f"with the token the console's first page answered {status}: {page[:300]!r}"
        status, _ = get("/", {})
        if status == 200:
            return "the console answered without the token"
    finally:
        rc = console.interrupt()
    if rc != 0:
        return f"the console did not exit 0 on ctrl-c (exit {rc})"
    return None


def cli_tests_text():
    return "\n".join(open(p, encoding="utf-8").read() for p in sorted(glob.glob("tests/cli/*.rs")))


class Run:
    """What the checks share: cargo's metadata, the built binaries, the CLI tests' text and
    the examples already run (each runs once, however many lines show it)."""

    def __init__(self):
        self.meta = metadata()
        self.exes = built_targets()
        self.tests = cli_tests_text()
        self.examples_run = {}
        self.sessions = {"amqp_worker": amqp_worker_session, "console": console_session}


def check_export(run, where, text, w):
    name = w[1].split("=", 1)[0]
    if subprocess.run(["grep", "-rqF", name, "src"]).returncode != 0:
        fail(where, text, f"{name} is read nowhere in src/")
    else:
        ok(where, text, "read by src")


def check_docker(run, where, text, w):
    compose = open("docker-compose.yml").read()
    prof = flag_values(w, "--profile")
    if prof and not all(f"- {p}" in compose or f"[{p}]" in compose for p in prof):
        fail(where, text, f"docker-compose.yml has no profile {prof}")
    else:
        ok(where, text, "validated")  # compose/Dockerfile checked offline in CI


def not_checked(run, where, text, w):
    """kubectl and docker-compose lines: they need a cluster or Docker (not in CI)."""


def check_example(run, where, text, w):
    name = flag_values(w, "--example")
    feats = set(flag_values(w, "--features"))
    if not name:
        fail(where, text, "not an example")
        return
    name = name[0]
    need = required_features(run.meta, "example", name)
    if need is None:
        fail(where, text, f"there is no example {name}")
        return
    missing = [f for f in need if f not in feats]
    if missing:
        fail(where, text, f"example {name} needs --features {','.join(need)}")
        return
    if name not in run.examples_run:
        if name in run.sessions:
            run.examples_run[name] = run.sessions[name](run.exes, where)
        elif name == "container_worker":
            run.examples_run[name] = None  # tests/ops run it under every setting
        else:
            rc, out = run_example(run.exes[name], name)
            run.examples_run[name] = None if rc == 0 else f"exited {rc}:\n{out[-2000:]}"
    if run.examples_run[name]:
        fail(where, text, run.examples_run[name])
    else:
        ok(where, text, "run")


def check_cargo_add(run, where, text, w):
    if check_features(where, text, run.meta, w[2], flag_values(w, "--features")):
        ok(where, text, "features")


def check_cargo_install(run, where, text, w):
    feats = flag_values(w, "--features")
    if "--path" not in w and w[2] == "steadfast":
        fail(where, text, "steadfast is not on crates.io yet: `cargo install --path . --features ...` from a clone")
        return
    need = required_features(run.meta, "bin", "steadfast")
    implied = set(feats)
    for f in feats:
        implied |= set(features_of(run.meta, "steadfast")["features"].get(f, []))
    if check_features(where, text, run.meta, "steadfast", feats) and not set(need) - implied:
        ok(where, text, "features")
    elif set(need) - implied:
        fail(where, text, f"the binary needs --features {','.join(need)}")


def check_cli(run, where, text, w):
    args = [SAMPLE_ID if re.match(r"^[0-9a-f]{4,8}(-\.\.\.|\.\.\.)$", a) else a for a in w[1:]]
    p = subprocess.run([run.exes["steadfast"], *args, "--help"], capture_output=True,
                       text=True, timeout=30)
    if p.returncode != 0:
        fail(where, text, f"the CLI refuses it: {p.stderr.strip().splitlines()[0] if p.stderr.strip() else p.returncode}")
        return
    subs = [a for a in args if not a.startswith("-")][:2]
    flags = [a.split("=", 1)[0] for a in args if a.startswith("--")]
    untested = [t for t in subs[:1] + flags if f'"{t}"' not in run.tests and f'"{t}=' not in run.tests]
    if untested:
        fail(where, text, f"no CLI test uses {', '.join(untested)}")
    else:
        ok(where, text, "parsed+test")


def check_script_args(run, where, text, w):
    usage = re.search(r"usage: \$0 (.*)\"", open(w[0]).read()).group(1)
    accepted = set(re.findall(r"--?[a-z]+|[a-z]+", usage))
    bad = [a for a in w[1:] if a not in accepted]
    if bad:
        fail(where, text, f"{w[0]} does not take {bad}")
    else:
        ok(where, text, "arguments")  # benchmarks run for minutes: not in CI


def run_by(path, needle):
    """A command another CI step or test runs: `path` must still contain `needle`."""
    def check(run, where, text, w):
        if needle in open(path, encoding="utf-8").read():
            ok(where, text, f"CI:{os.path.basename(path)}")
        else:
            fail(where, text, f"{path} no longer contains {needle!r}")
    return check


# Every kind of documented command and how it is checked: the first pattern that matches
# the command (its words joined by single spaces) decides.
CHECKS = [
    (r"^export ", check_export),
    (r"^docker ", check_docker),
    (r"^(kubectl|docker-compose)( |$)", not_checked),
    (r"^cargo run( |$)", check_example),
    (r"^cargo add ", check_cargo_add),
    (r"^cargo install (?!.*cargo-deny)", check_cargo_install),
    (r"^steadfast( |$)", check_cli),
    (r"^scripts/bench\.sh( |$)", check_script_args),
    (r"^scripts/test\.sh$", run_by(".ci/run", "scripts/test.sh")),
    (r"^cargo deny check licenses bans sources$", run_by(".ci/run", "cargo deny check licenses bans sources")),
    (r"^cargo deny check$", run_by(".ci/run", "cargo deny check advisories")),
    (r"^cargo install --locked cargo-deny", run_by(".ci/run", "cargo install --locked cargo-deny")),
    (r"^scripts/brokers\.sh ", run_by("scripts/test.sh", "scripts/brokers.sh")),
    (r"^scripts/install-chromium\.sh$", run_by("scripts/test.sh", "scripts/install-chromium.sh")),
    (r"^scripts/check-docker-context\.py$", run_by("scripts/test.sh", "scripts/check-docker-context.py")),
    (r"^scripts/validate-deploy\.sh$", run_by("scripts/test.sh", "scripts/validate-deploy.sh")),
    (r"^scripts/check-doc-commands\.py$", run_by("scripts/test.sh", "scripts/check-doc-commands.py")),
    (r"^rabbitmqctl add_user ", run_by("tests/ops/process.rs", "add_user")),
    (r"^rabbitmqctl set_permissions ", run_by("tests/ops/process.rs", "set_permissions")),
    (r"^cargo nextest run --features nats --test nats_faults", run_by("scripts/test.sh", "binary(/_faults$/)")),
]


def main():
    run = Run()
    for where, text, inline in commands():
        try:
            w = words(text)
        except ValueError as e:
            fail(where, text, f"cannot be split as a shell line: {e}")
            continue
        if not w:
            continue
        cmd = " ".join(w)
        check = next((c for pattern, c in CHECKS if re.search(pattern, cmd)), None)
        if check is None:
            fail(where, text, "no test or CI step is known to run it (add it to CHECKS)")
        else:
            check(run, where, text, w)

    for line in report:
        print(line)
    print(f"check-doc-commands: {len(report)} documented commands covered, "
          f"{len(run.examples_run)} examples run, {len(failures)} problem(s)")
    for f in failures:
        print(f"PROBLEM {f}", file=sys.stderr)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
