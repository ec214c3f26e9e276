#!/usr/bin/env python3
"""Replays the build stage of a Dockerfile in a scratch directory, offline.

CI cannot run Docker, so this does what `docker build` would do with the files and
commands of the build stage: it copies what each COPY names from the build context
(honouring .dockerignore) and runs each RUN with the build arguments set. A `cargo` on
PATH turns `cargo build --release` into a feature check and `cargo check --offline`
(same manifests, lock file and targets; no code generation) and leaves an empty file
where each requested binary would be, so the stage's later commands and the runtime stage's
`COPY --from=<build stage>` can be checked too. A file the Dockerfile forgets to copy,
a workspace member without its manifest, or FEATURES that do not cover the target's
`required-features` fail here as they would in `docker build`.

Usage: scripts/check-docker-context.py [--dockerfile PATH] [--build-arg K=V]...
"""

import argparse
import fnmatch
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def as_cargo(argv):
    """`cargo` as the replay runs it (see the module doc). `cargo build --release` with
    `--features F` becomes: a check that every feature in F exists and covers the
    `required-features` of each `--bin`/`--example` asked for (what cargo itself refuses
    with), then `cargo check --offline --all-features` of those targets, the feature set
    the rest of CI builds, so no dependency is compiled twice for this check."""
    real = os.environ["REAL_CARGO"]
    if not argv or argv[0] != "build":
        sys.exit(subprocess.run([real] + argv).returncode)
    features, targets, rest, i = [], [], [], 1
    while i < len(argv):
        a = argv[i]
        if a == "--release":
            pass
        elif a == "--features":
            i += 1
            features += [f for f in argv[i].replace(",", " ").split() if f]
        elif a in ("--bin", "--example"):
            i += 1
            targets.append((a[2:], argv[i]))
            rest += [a, argv[i]]
        else:
            rest.append(a)
        i += 1
    meta = subprocess.run([real, "metadata", "--no-deps", "--offline", "--format-version", "1"],
                          capture_output=True, text=True)
    if meta.returncode != 0:
        sys.stderr.write(meta.stderr)
        sys.exit(meta.returncode)
    pkg = [p for p in json.loads(meta.stdout)["packages"]
           if os.path.dirname(p["manifest_path"]) == os.getcwd()][0]
    unknown = [f for f in features if f not in pkg["features"]]
    if unknown:
        sys.exit(f"error: {pkg['name']} has no feature {', '.join(unknown)}")
    enabled, todo = set(), list(features)
    while todo:
        f = todo.pop()
        if f in enabled or f not in pkg["features"]:
            continue
        enabled.add(f)
        todo += [d for d in pkg["features"][f] if ":" not in d and "/" not in d]
    for kind, name in targets:
        found = [t for t in pkg["targets"] if t["name"] == name and kind in t["kind"]]
        if not found:
            sys.exit(f"error: no {kind} target named `{name}`")
        missing = [f for f in found[0].get("required-features", []) if f not in enabled]
        if missing:
            sys.exit(f"error: target `{name}` requires the features: {', '.join(missing)} "
                     f"(FEATURES={','.join(features)})")
    r = subprocess.run([real, "check", "--quiet", "--offline", "--all-features"] + rest)
    if r.returncode != 0:
        sys.exit(r.returncode)
    for kind, name in targets:
        out = os.path.join("target", "release", "examples" if kind == "example" else "", name)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        open(out, "w").close()




def instructions(path):
    """(keyword, argument text) for each instruction, continuation lines joined."""
    out, cur = [], ""
    with open(path) as f:
        for line in f:
            s = line.rstrip("\n")
            if not cur and (not s.strip() or s.lstrip().startswith("#")):
                continue
            if s.lstrip().startswith("#"):
                continue
            if s.endswith("\\"):
                cur += s[:-1] + " "
                continue
            cur += s
            kw, _, rest = cur.strip().partition(" ")
            out.append((kw.upper(), rest.strip()))
            cur = ""
    return out


def ignored_patterns():
    p = os.path.join(ROOT, ".dockerignore")
    if not os.path.exists(p):
        return []
    with open(p) as f:
        return [l.strip().rstrip("/") for l in f if l.strip() and not l.startswith("#")]


def is_ignored(rel, patterns):
    for pat in patterns:
        if fnmatch.fnmatch(rel, pat) or (pat.startswith("**/") and fnmatch.fnmatch(
                os.path.basename(rel), pat[3:])):
            return True
    return False


def copy_from_context(src, dst, patterns):
    """COPY src dst from the build context; returns an error text or None."""
    src_abs = os.path.normpath(os.path.join(ROOT, src))
    if not os.path.exists(src_abs) or is_ignored(os.path.relpath(src_abs, ROOT), patterns):
        return f"COPY {src}: not in the build context"
    if os.path.isfile(src_abs):
        if dst.endswith("/") or os.path.isdir(dst):
            dst = os.path.join(dst, os.path.basename(src_abs))
        os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
        shutil.copy2(src_abs, dst)
        return None
    for dirpath, dirnames, filenames in os.walk(src_abs):
        rel_dir = os.path.relpath(dirpath, ROOT)
        dirnames[:] = [d for d in dirnames
                       if not is_ignored(os.path.normpath(os.path.join(rel_dir, d)), patterns)]
        for name in filenames:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if is_ignored(rel, patterns):
                continue
            target = os.path.join(dst, os.path.relpath(os.path.join(dirpath, name), src_abs))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy2(os.path.join(dirpath, name), target)
    return None


def main():
    if sys.argv[1:2] == ["--as-cargo"]:
        return as_cargo(sys.argv[2:])
    ap = argparse.ArgumentParser()
    ap.add_argument("--dockerfile", default=os.path.join(ROOT, "Dockerfile"))
    ap.add_argument("--build-arg", action="append", default=[])
    opts = ap.parse_args()
    overrides = dict(a.split("=", 1) for a in opts.build_arg)
    patterns = ignored_patterns()

    target_dir = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
    # One fixed directory, so cargo's incremental state for it is reused between runs.
    work = os.path.join(target_dir, "docker-context")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    shim_dir = tempfile.mkdtemp(prefix="docker-shim-")
    try:
        with open(os.path.join(shim_dir, "cargo"), "w") as f:
            f.write(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} "
                    f"{shlex.quote(os.path.abspath(__file__))} --as-cargo \"$@\"\n")
        os.chmod(os.path.join(shim_dir, "cargo"), 0o755)
        env = dict(os.environ)
        env["REAL_CARGO"] = shutil.which("cargo")
        env["PATH"] = shim_dir + os.pathsep + env["PATH"]
        env["CARGO_TARGET_DIR"] = target_dir

        steps = instructions(opts.dockerfile)
        # The stages to replay: those a later stage copies from (the build stages).
        replayed = {w[7:] for kw, rest in steps if kw == "COPY"
                    for w in shlex.split(rest) if w.startswith("--from=")}
        args, stage, workdir, roots = {}, None, "/", {}
        for kw, rest in steps:
            words = shlex.split(rest)
            if kw == "ARG":
                k, _, v = words[0].partition("=")
                args[k] = overrides.get(k, v or args.get(k, ""))
            elif kw == "FROM":
                stage = words[-1] if len(words) >= 3 and words[-2].upper() == "AS" else None
                workdir = "/"
            elif kw == "WORKDIR":
                workdir = words[0]
                roots[stage] = workdir
            elif stage in replayed and kw == "COPY":
                if any(w.startswith("--from") for w in words):
                    continue
                *srcs, dst = [w for w in words if not w.startswith("--")]
                dst_abs = os.path.join(work, dst) if not dst.startswith("/") else (
                    os.path.join(work, os.path.relpath(dst, workdir)))
                for s in srcs:
                    err = copy_from_context(s, dst_abs if dst not in (".", "./") else work,
                                            patterns)
                    if err:
                        sys.exit(f"error: {err} (Dockerfile stage {stage})")
            elif stage in replayed and kw == "RUN":
                print(f"RUN {rest}", flush=True)
                env_run = dict(env, **args)
                r = subprocess.run(["sh", "-ec", rest], cwd=work, env=env_run)
                if r.returncode != 0:
                    sys.exit(f"error: RUN failed (exit {r.returncode}): {rest}")
            elif kw == "COPY" and any(w.startswith("--from=") for w in words):
                src_stage = [w for w in words if w.startswith("--from=")][0][7:]
                root = roots.get(src_stage)
                *srcs, _dst = [w for w in words if not w.startswith("--")]
                for s in srcs:
                    if root is None:
                        continue
                    p = os.path.join(work, os.path.relpath(s, root))
                    if not os.path.exists(p):
                        sys.exit(f"error: COPY --from={src_stage} {s}: the build stage "
                                 "does not produce it")
        print("Dockerfile build context: every COPY found, every build step passed offline")
    finally:
        shutil.rmtree(shim_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
