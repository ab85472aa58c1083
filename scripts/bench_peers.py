#!/usr/bin/env python3
"""The peers of `scripts/bench`: the bench's jobs done with the tools a user would run instead of
kvfs, against the same server. Readable on its own; `scripts/bench` runs it once per job and reads
the server's request counters around it.

    KVFS_BASE_URL=http://127.0.0.1:8787/client/v4 KVFS_TOKEN=T KVFS_ACCOUNT=A \\
        scripts/bench_peers.py sdk restore --namespace NSID --src DIR

Tools and jobs:
- `sdk` (the official Python SDK, `cloudflare` on PyPI):
  - `restore --src DIR`: read the tree, one `bulk_update` per 10,000 keys (key = relative path);
  - `backup --out DIR`: list the keys (1,000 a page), then `bulk_get` by 100, one after another,
    writing each value under DIR;
  - `put --src DIR`: one PUT per file, raw body (the large-file job);
  - `get --src DIR`: one GET per file under DIR (names known, as `cat` is given them), bytes
    counted and dropped, as `cat > /dev/null` would.
- `wrangler` (tests/clients/node_modules/.bin/wrangler, pinned in tests/clients/package.json):
  - `restore --src DIR`: build the bulk JSON file, then `wrangler kv bulk put --remote`
    (wrangler sends it 1,000 pairs a request);
  - `backup --out DIR`: `wrangler kv key list --remote`, then `wrangler kv bulk get --remote` on
    files of 100 keys (the API's limit for a bulk get, which wrangler does not split), one process
    after another, writing each value under DIR.

Values are text (the bench's small files); `bulk_update` and `bulk put` take strings. Prints one
JSON line: tool, job, keys, bytes and wall time in seconds, measured from the first byte read to
the last written (for the SDK: after `import`, which a long-lived script pays once; for wrangler:
including each process's start, which is how the CLI is used). The token is read from the
environment only, never put in argv.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WRANGLER = os.path.join(ROOT, "tests", "clients", "node_modules", ".bin", "wrangler")
BULK_WRITE_MAX = 10_000  # pairs per bulk write (API limit)
BULK_GET_MAX = 100  # keys per bulk get (API limit)
LIST_LIMIT = 1000  # keys per listing page (API maximum)


def walk(src):
    """Relative paths of the files under SRC, sorted, '/'-separated (the key names)."""
    out = []
    for dirpath, dirs, files in os.walk(src):
        dirs.sort()
        for f in sorted(files):
            out.append(os.path.relpath(os.path.join(dirpath, f), src))
    return sorted(out)


def read_text(src, rel):
    with open(os.path.join(src, rel), encoding="utf-8") as f:
        return f.read()


def write_out(out, key, data):
    path = os.path.join(out, key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())
    return len(data)


def chunks(seq, n):
    return [seq[i:i + n] for i in range(0, len(seq), n)]


# ---------------------------------------------------------------- the Python SDK


class Sdk:
    def __init__(self, env, ns):
        from cloudflare import Cloudflare  # imported here: the wrangler jobs don't need it

        # max_retries=0: a failure must show, not be hidden in a retry that the counts include.
        self.client = Cloudflare(api_token=env["token"], base_url=env["base"], max_retries=0,
                                 timeout=600)
        self.ns_api = self.client.kv.namespaces
        self.account, self.ns = env["account"], ns

    def restore(self, args):
        rels = walk(args.src)
        nbytes = 0
        body = []
        for rel in rels:
            value = read_text(args.src, rel)
            nbytes += len(value)
            body.append({"key": rel, "value": value})
        for part in chunks(body, BULK_WRITE_MAX):
            res = self.ns_api.bulk_update(namespace_id=self.ns, account_id=self.account,
                                          body=part)
            if res.unsuccessful_keys:
                raise SystemExit(f"bulk_update: {len(res.unsuccessful_keys)} keys failed")
        return len(rels), nbytes

    def list_keys(self):
        # The SDK's pager follows the cursor on its own.
        return [k.name for k in self.ns_api.keys.list(namespace_id=self.ns,
                                                      account_id=self.account,
                                                      limit=LIST_LIMIT)]

    def backup(self, args):
        keys = self.list_keys()
        nbytes = 0
        for part in chunks(keys, BULK_GET_MAX):
            res = self.ns_api.bulk_get(namespace_id=self.ns, account_id=self.account, keys=part)
            values = res.values or {}
            if len(values) != len(part):
                raise SystemExit(f"bulk_get returned {len(values)} of {len(part)} keys")
            for key in part:
                nbytes += write_out(args.out, key, values[key])
        return len(keys), nbytes

    def put(self, args):
        rels, nbytes = walk(args.src), 0
        for rel in rels:
            with open(os.path.join(args.src, rel), "rb") as f:
                data = f.read()
            # A raw-body PUT through the SDK's own client: `values.update` sends multipart,
            # which `kvfs serve` refuses above axum's 2 MB default multipart limit (a server
            # bug, reported; the API takes 25 MiB values either way).
            path = (f"/accounts/{self.account}/storage/kv/namespaces/{self.ns}/values/"
                    + urllib.parse.quote(rel, safe=""))
            self.client.put(path, cast_to=object, content=data,
                            options={"headers": {"Content-Type": "application/octet-stream"}})
            nbytes += len(data)
        return len(rels), nbytes

    def get(self, args):
        rels, nbytes = walk(args.src), 0
        for rel in rels:
            resp = self.ns_api.values.get(rel, account_id=self.account, namespace_id=self.ns)
            for chunk in resp.iter_bytes(1 << 20):
                nbytes += len(chunk)
        return len(rels), nbytes


# ---------------------------------------------------------------- wrangler


class Wrangler:
    def __init__(self, env, ns):
        if not os.access(WRANGLER, os.X_OK):
            raise SystemExit(f"wrangler is missing at {WRANGLER}: run scripts/setup")
        self.home = tempfile.mkdtemp(prefix="kvfs-bench-wrangler-")
        self.ns = ns
        # A clean HOME (no login state, no config); no telemetry, prompts or update check.
        self.env = dict(os.environ, HOME=self.home,
                        XDG_CONFIG_HOME=os.path.join(self.home, ".config"),
                        CLOUDFLARE_API_BASE_URL=env["base"], CLOUDFLARE_API_TOKEN=env["token"],
                        CLOUDFLARE_ACCOUNT_ID=env["account"], WRANGLER_SEND_METRICS="false",
                        CI="true", NO_COLOR="1")
        for var in ("CLOUDFLARE_API_KEY", "CLOUDFLARE_EMAIL"):
            self.env.pop(var, None)

    def close(self):
        shutil.rmtree(self.home, ignore_errors=True)

    def run(self, *args):
        cmd = [WRANGLER, "kv", *args, "--remote", "--namespace-id", self.ns]
        res = subprocess.run(cmd, cwd=self.home, env=self.env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        if res.returncode != 0:
            raise SystemExit(f"wrangler kv {' '.join(args)} failed ({res.returncode}):\n"
                             f"{res.stderr.strip()[-2000:]}")
        return res.stdout

    def file(self, name, obj):
        path = os.path.join(self.home, name)
        with open(path, "w") as f:
            json.dump(obj, f)
        return path

    @staticmethod
    def json_out(out):
        """wrangler prints the JSON, then a blank line and "Success!" on some commands."""
        return json.JSONDecoder().raw_decode(out.lstrip())[0]

    def restore(self, args):
        rels = walk(args.src)
        pairs = [{"key": rel, "value": read_text(args.src, rel)} for rel in rels]
        self.run("bulk", "put", self.file("bulk.json", pairs))
        return len(rels), sum(len(p["value"]) for p in pairs)

    def backup(self, args):
        keys = [k["name"] for k in self.json_out(self.run("key", "list"))]
        nbytes = 0
        for i, part in enumerate(chunks(keys, BULK_GET_MAX)):
            values = self.json_out(self.run("bulk", "get", self.file(f"get{i}.json", part)))
            if len(values) != len(part):
                raise SystemExit(f"wrangler bulk get returned {len(values)} of {len(part)} keys")
            for key in part:
                value = values[key]
                # Plain {key: value}; with metadata asked for it would be {key: {value: ...}}.
                if isinstance(value, dict):
                    value = value["value"]
                nbytes += write_out(args.out, key, value)
        return len(keys), nbytes


TOOLS = {"sdk": (Sdk, ("restore", "backup", "put", "get")),
         "wrangler": (Wrangler, ("restore", "backup"))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("tool", choices=sorted(TOOLS))
    ap.add_argument("job", choices=("restore", "backup", "put", "get"))
    ap.add_argument("--namespace", required=True, help="namespace id to work in")
    ap.add_argument("--src", help="source tree (restore, put, get)")
    ap.add_argument("--out", help="output directory (backup)")
    args = ap.parse_args()
    cls, jobs = TOOLS[args.tool]
    if args.job not in jobs:
        ap.error(f"{args.tool} has no {args.job} job (it has: {', '.join(jobs)})")
    if args.job == "backup" and not args.out:
        ap.error("backup needs --out")
    if args.job != "backup" and not args.src:
        ap.error(f"{args.job} needs --src")
    try:
        env = {"base": os.environ["KVFS_BASE_URL"], "token": os.environ["KVFS_TOKEN"],
               "account": os.environ["KVFS_ACCOUNT"]}
    except KeyError as e:
        sys.exit(f"bench_peers: set {e.args[0]}")
    tool = cls(env, args.namespace)
    try:
        t0 = time.monotonic()
        keys, nbytes = getattr(tool, args.job)(args)
        wall = time.monotonic() - t0
    finally:
        getattr(tool, "close", lambda: None)()
    print(json.dumps({"tool": args.tool, "job": args.job, "keys": keys, "bytes": nbytes,
                      "wall_s": wall}))


if __name__ == "__main__":
    main()
