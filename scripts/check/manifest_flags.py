"""Every flag and environment variable that the deployment files pass to a program exists in
that program's --help: the Kubernetes manifests (rendered) and the compose file, for `tandem
SUBCOMMAND` and for etcd. A flag renamed in the code but not in a manifest fails here, not in
a cluster.

usage: manifest_flags.py TANDEM_BIN ETCD_BIN FILE...   (YAML files, multi-document allowed)
"""
import re
import subprocess
import sys

import yaml

tandem, etcd, files = sys.argv[1], sys.argv[2], sys.argv[3:]
helps = {}


def help_text(program, sub):
    key = (program, sub)
    if key not in helps:
        cmd = [tandem, sub, "--help"] if program == "tandem" else [etcd, "--help"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
        helps[key] = r.stdout + r.stderr
    return helps[key]


def containers(doc):
    """(where, image, args, env names) of every container in a Kubernetes object or a compose file."""
    if not isinstance(doc, dict):
        return
    if "services" in doc:  # compose
        for name, svc in doc["services"].items():
            env = svc.get("environment") or {}
            names = list(env) if isinstance(env, dict) else [e.split("=")[0] for e in env]
            yield f"compose service {name}", svc.get("image", ""), svc.get("command") or [], names
        return
    spec = (doc.get("spec") or {}).get("template", {}).get("spec") or {}
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        names = [e["name"] for e in c.get("env", [])]
        yield f"{doc['kind']}/{doc['metadata']['name']} container {c['name']}", c.get("image", ""), c.get("args") or [], names


bad, checked = [], 0
for f in files:
    with open(f) as fh:
        docs = list(yaml.safe_load_all(fh))
    for doc in docs:
        for where, image, args, env in containers(doc):
            if "etcd" in image:
                program, sub, flags = "etcd", None, args
            elif "tandem" in image:
                if not args:
                    continue  # the image's default command
                program, sub, flags = "tandem", str(args[0]), args[1:]
            else:
                continue
            text = help_text(program, sub)
            for a in flags:
                a = str(a)
                if not a.startswith("--"):
                    continue
                flag = a.split("=", 1)[0]
                checked += 1
                if not re.search(re.escape(flag) + r"(?![\w-])", text):
                    bad.append(f"{f}: {where}: {flag} is not a flag of {program} {sub or ''}")
            if program == "tandem":
                for name in env:
                    if not (name.startswith("TANDEM_") or name.startswith("OTEL_")):
                        continue
                    checked += 1
                    if f"env: {name}" not in text and f"env: {name}=" not in text:
                        bad.append(f"{f}: {where}: {name} is not read by tandem {sub}")
if bad:
    print("\n".join(bad))
    sys.exit(f"{len(bad)} of {checked} flags and variables are unknown to the programs given them")
if checked == 0:
    sys.exit("no flags found: the files hold no Tandem or etcd containers")
print(f"{checked} flags and environment variables in {len(files)} files: each in its program's --help")
