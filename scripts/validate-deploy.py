"""The checks of scripts/validate-deploy.sh, run inside its virtualenv."""

import glob
import json
import re
import subprocess
import sys
import os

import jsonschema
import yaml

VENV_BIN = os.path.dirname(sys.executable)
K8S = "deploy/kubernetes"
failed = []


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    out = (r.stdout + r.stderr).strip()
    if r.returncode != 0 or "WARN" in out or "ERROR" in out:
        failed.append(f"{' '.join(cmd[:2])}: {out}")
    return out


docs = {}
for path in sorted(glob.glob(f"{K8S}/*.yaml")):
    with open(path) as f:
        docs[path] = [d for d in yaml.safe_load_all(f) if d]

# Core Kubernetes kinds: the bundled OpenAPI schemas, strict.
with open(f"{K8S}/schemas/keda.schema.json") as f:
    keda_schema = json.load(f)
for path, objs in docs.items():
    if any(not o["apiVersion"].startswith("keda.sh/") for o in objs):
        run([f"{VENV_BIN}/kubernetes-validate", "--strict", "--quiet", path])
    for o in objs:
        if o["apiVersion"].startswith("keda.sh/"):
            for e in jsonschema.Draft202012Validator(keda_schema).iter_errors(o):
                failed.append(f"{path}: {o['kind']}/{o['metadata']['name']}: "
                              f"{'/'.join(map(str, e.absolute_path))}: {e.message}")

# Compose: the Compose specification bundled with check-jsonschema.
run([f"{VENV_BIN}/check-jsonschema", "--builtin-schema", "vendor.compose-spec",
     "docker-compose.yml"])

# Secret keys: every key a manifest reads is created by a documented command.
created = {}
texts = [open(p).read() for p in list(docs) + ["docs/operations.md"]]
for text in texts:
    text = text.replace("\\\n#", " ").replace("\\\n", " ")
    for m in re.finditer(r"kubectl create secret generic (\S+)([^\n]*)", text):
        keys = re.findall(r"--from-(?:literal|file)=([\w.-]+)=", m.group(2))
        created.setdefault(m.group(1), set()).update(keys)


def secret_reads(node, path):
    if isinstance(node, dict):
        if "secret" in node and isinstance(node["secret"], dict):
            s = node["secret"]
            for item in s.get("items", []):
                yield s["secretName"], item["key"], path
        if "secretKeyRef" in node:
            yield node["secretKeyRef"]["name"], node["secretKeyRef"]["key"], path
        if "secretTargetRef" in node:
            for r in node["secretTargetRef"]:
                yield r["name"], r["key"], path
        for v in node.values():
            yield from secret_reads(v, path)
    elif isinstance(node, list):
        for v in node:
            yield from secret_reads(v, path)


reads = 0
for path, objs in docs.items():
    for name, key, p in secret_reads(objs, path):
        reads += 1
        if key not in created.get(name, set()):
            failed.append(f"{p}: reads key {key!r} of Secret {name!r}, which no documented "
                          f"`kubectl create secret generic {name}` command creates")

# Grafana dashboards: valid JSON with panels that query something, and every metric a
# query names is in the /metrics sample of docs/operations.md (taken from a real run).
ops = open("docs/operations.md").read()
sample = re.search(r"<!-- metrics-sample -->\n```text\n(.*?)```", ops, re.S)
if not sample:
    failed.append("docs/operations.md: no /metrics sample (<!-- metrics-sample -->)")
scraped = {l.split("{")[0].split(" ")[0] for l in (sample.group(1) if sample else "").splitlines()
           if l and not l.startswith("#")}
labels = {kv.split("=")[0] for l in (sample.group(1) if sample else "").splitlines()
          if "{" in l for kv in l.split("{", 1)[1].split("}")[0].split(",") if "=" in kv}
panels = 0
for path in glob.glob("deploy/grafana/*.json"):
    with open(path) as f:
        dash = json.load(f)
    targets = [t for p in dash.get("panels", []) for t in p.get("targets", [])]
    panels += sum(1 for p in dash.get("panels", []) if p.get("targets"))
    if not targets or any(not t.get("expr") for t in targets):
        failed.append(f"{path}: a panel without a query")
    for t in targets:
        for name in re.findall(r"\b(?:steadfast|messaging)_[a-z_]+", t.get("expr", "")):
            if name not in scraped and name not in labels:
                failed.append(f"{path}: {name} (in `{t['expr']}`) is not in the /metrics "
                              f"sample of docs/operations.md")

if failed:
    print("deploy files: " + str(len(failed)) + " problem(s)", file=sys.stderr)
    for f in failed:
        print("  " + f, file=sys.stderr)
    sys.exit(1)
print(f"deploy files valid: {sum(map(len, docs.values()))} Kubernetes objects, compose file, "
      f"{reads} Secret keys read, each created by a documented command, {panels} dashboard "
      f"panels over metrics of the /metrics sample")
