"""Drives `kvfs serve` with the official Cloudflare Python SDK, unchanged.

Run by tests/official_clients.rs with KVFS_BASE_URL (http://ADDR/client/v4), KVFS_TOKEN and
KVFS_ACCOUNT set. Exits non-zero on the first failed check. Checks call `check`, not `assert`,
which `python -O` (PYTHONOPTIMIZE) would strip.
"""

import os
import time

import cloudflare
from cloudflare import Cloudflare


def check(ok, detail=""):
    """Fails the run unless `ok`; unlike `assert`, never optimized away."""
    if not ok:
        raise AssertionError(detail)


base_url = os.environ["KVFS_BASE_URL"]
account = os.environ["KVFS_ACCOUNT"]
client = Cloudflare(api_token=os.environ["KVFS_TOKEN"], base_url=base_url, max_retries=0)
ns_api = client.kv.namespaces

# Namespaces: create, get, update (rename), list across pages.
created = [ns_api.create(account_id=account, title=f"py-{i:02d}") for i in range(25)]
ns = created[0]
check(len(ns.id) == 32 and ns.title == "py-00", ns)
check(ns_api.get(namespace_id=ns.id, account_id=account).title == "py-00")
renamed = ns_api.update(namespace_id=ns.id, account_id=account, title="py-main")
check(renamed.title == "py-main", renamed)
# The SDK pages on its own (default 20 per page) until an empty page.
titles = sorted(n.title for n in ns_api.list(account_id=account))
check(len(titles) == 25 and "py-main" in titles, titles)
page = ns_api.list(account_id=account, per_page=10, order="title", direction="desc")
check([n.title for n in page.result][:2] == ["py-main", "py-24"], page.result)
for extra in created[1:]:
    check(ns_api.delete(namespace_id=extra.id, account_id=account) is None)
check([n.id for n in ns_api.list(account_id=account)] == [ns.id])

values = ns_api.values
# values.update (5.x takes bytes or files, not str): plain, with metadata, with expiration_ttl, binary, and a key with a slash.
values.update("plain", account_id=account, namespace_id=ns.id, value=b"hello")
values.update(
    "with-meta", account_id=account, namespace_id=ns.id, value=b"v2", metadata={"owner": "py", "n": 2}
)
before = int(time.time())
values.update("ttl", account_id=account, namespace_id=ns.id, value=b"short", expiration_ttl=300)
values.update("dir/file.bin", account_id=account, namespace_id=ns.id, value=bytes(range(256)))

got = values.get("plain", account_id=account, namespace_id=ns.id)
check(got.read() == b"hello")
check(values.get("dir/file.bin", account_id=account, namespace_id=ns.id).read() == bytes(range(256)))
ttl = values.get("ttl", account_id=account, namespace_id=ns.id)
check(before + 300 <= int(ttl.headers["expiration"]) <= int(time.time()) + 300, ttl.headers)

meta = ns_api.metadata
check(meta.get("with-meta", account_id=account, namespace_id=ns.id) == {"owner": "py", "n": 2})
check(meta.get("plain", account_id=account, namespace_id=ns.id) is None)

# Errors surface as the SDK's typed exceptions.
try:
    values.get("missing", account_id=account, namespace_id=ns.id)
    raise AssertionError("missing key was found")
except cloudflare.NotFoundError as e:
    check(e.status_code == 404)
    check("key not found" in str(e), e)
try:
    ns_api.create(account_id=account, title="py-main")
    raise AssertionError("duplicate title accepted")
except cloudflare.BadRequestError as e:
    check("already exists" in str(e), e)
try:
    Cloudflare(api_token="wrong", base_url=base_url, max_retries=0).kv.namespaces.list(account_id=account).result
    raise AssertionError("wrong token accepted")
except cloudflare.PermissionDeniedError as e:
    check(e.status_code == 403)

# Bulk write, then list keys across pages (limit 10 → 3 pages for 25 keys).
bulk = ns_api.bulk_update(
    namespace_id=ns.id,
    account_id=account,
    body=[{"key": f"bulk/{i:02d}", "value": str(i)} for i in range(24)]
    + [{"key": "bulk/json", "value": '{"x": 1}', "metadata": {"kind": "json"}}],
)
check(bulk.successful_key_count == 25 and bulk.unsuccessful_keys == [], bulk)
keys = ns_api.keys.list(namespace_id=ns.id, account_id=account, prefix="bulk/", limit=10)
check(len(keys.result) == 10 and keys.result_info.cursor, keys.result_info)
names = [k.name for k in ns_api.keys.list(namespace_id=ns.id, account_id=account, prefix="bulk/", limit=10)]
check(names == [f"bulk/{i:02d}" for i in range(24)] + ["bulk/json"], names)
listed = {k.name: k for k in ns_api.keys.list(namespace_id=ns.id, account_id=account)}
check(listed["with-meta"].metadata == {"owner": "py", "n": 2})
check(listed["ttl"].expiration is not None and listed["plain"].expiration is None)

# Bulk get: text, json, with metadata.
res = ns_api.bulk_get(namespace_id=ns.id, account_id=account, keys=["plain", "bulk/01", "missing"])
check(res.values == {"plain": "hello", "bulk/01": "1", "missing": None}, res)
res = ns_api.bulk_get(namespace_id=ns.id, account_id=account, keys=["bulk/json"], type="json")
check(res.values == {"bulk/json": {"x": 1}}, res)
res = ns_api.bulk_get(namespace_id=ns.id, account_id=account, keys=["bulk/json", "plain"], with_metadata=True)
entry = res.values["bulk/json"]
entry = entry if isinstance(entry, dict) else entry.model_dump()
check(entry["value"] == '{"x": 1}' and entry["metadata"] == {"kind": "json"}, res)

# Deletes: one value, bulk, then the namespace.
check(values.delete("plain", account_id=account, namespace_id=ns.id) is None)
try:
    values.get("plain", account_id=account, namespace_id=ns.id)
    raise AssertionError("deleted key was found")
except cloudflare.NotFoundError:
    pass
deleted = ns_api.bulk_delete(namespace_id=ns.id, account_id=account, body=[f"bulk/{i:02d}" for i in range(24)])
check(deleted.successful_key_count == 24, deleted)
left = sorted(k.name for k in ns_api.keys.list(namespace_id=ns.id, account_id=account))
check(left == ["bulk/json", "dir/file.bin", "ttl", "with-meta"], left)
check(ns_api.delete(namespace_id=ns.id, account_id=account) is None)
check(list(ns_api.list(account_id=account)) == [])
print("python sdk: all checks passed")
