// Drives `kvfs serve` with the official Cloudflare TypeScript SDK (npm `cloudflare`, pinned in
// package.json), unchanged, through every `client.kv.namespaces` call.
//
// Run by tests/official_clients.rs with KVFS_BASE_URL (http://ADDR/client/v4), KVFS_TOKEN and
// KVFS_ACCOUNT set, against a server started with --test-aids (for the request counters).
// Exits non-zero on the first failed check.

import assert from "node:assert/strict";
import Cloudflare, { toFile } from "cloudflare";

const baseURL = process.env.KVFS_BASE_URL;
const account_id = process.env.KVFS_ACCOUNT;
const token = process.env.KVFS_TOKEN;
// Default retries, as users have them: an answer a client cannot read would show up as a
// repeated upload in the server's counters.
const client = new Cloudflare({ apiToken: token, baseURL });
const kv = client.kv.namespaces;
let checks = 0;
const check = (cond, what) => {
  assert.ok(cond, what);
  checks++;
};

const origin = baseURL.replace(/\/client\/v4$/, "");
async function stats() {
  const r = await fetch(`${origin}/__kvfs/stats`, { headers: { Authorization: `Bearer ${token}` } });
  assert.equal(r.status, 200);
  return r.json();
}

async function expectError(promise, cls, status, code) {
  try {
    await promise;
  } catch (e) {
    check(e instanceof cls, `expected ${cls.name}, got ${e?.constructor?.name}: ${e}`);
    check(e.status === status, `status ${e.status}, expected ${status}`);
    check(e.errors?.[0]?.code === code, `code ${JSON.stringify(e.errors)}, expected ${code}`);
    return e;
  }
  assert.fail(`expected ${cls.name} (${status}/${code}), the call succeeded`);
}

// Namespaces: create, get, update (rename), list across pages, delete.
const created = [];
for (let i = 0; i < 25; i++) {
  created.push(await kv.create({ account_id, title: `ts-${String(i).padStart(2, "0")}` }));
}
const ns = created[0];
check(ns.id.length === 32 && ns.title === "ts-00", JSON.stringify(ns));
check((await kv.get(ns.id, { account_id })).title === "ts-00", "get");
check((await kv.update(ns.id, { account_id, title: "ts-main" })).title === "ts-main", "update");
const titles = [];
for await (const n of kv.list({ account_id })) titles.push(n.title);
check(titles.length === 25 && titles.includes("ts-main"), `auto-paged list: ${titles}`);
const page = await kv.list({ account_id, per_page: 10, order: "title", direction: "desc" });
check(
  JSON.stringify(page.result.slice(0, 2).map((n) => n.title)) === '["ts-main","ts-24"]',
  "ordered page",
);
for (const extra of created.slice(1)) {
  check((await kv.delete(extra.id, { account_id })) === null, "delete namespace");
}
const left = [];
for await (const n of kv.list({ account_id })) left.push(n.id);
check(JSON.stringify(left) === JSON.stringify([ns.id]), `after deletes: ${left}`);

const namespace_id = ns.id;
const at = { account_id, namespace_id };

// values.update: a string, a string with metadata and a TTL, binary bytes, a key with a slash.
const binary = new Uint8Array(256).map((_, i) => i);
check((await kv.values.update("plain", { ...at, value: "hello ünïcode" })) === null, "put text");
const before = Math.floor(Date.now() / 1000);
await kv.values.update("meta", {
  ...at,
  value: "with metadata",
  // A JSON string: given an object, the SDK flattens it into `metadata[owner]`-style form
  // parts, which are not the API's `metadata` part (the server ignores them, see SERVER.md).
  metadata: JSON.stringify({ owner: "ts", n: 2 }),
  expiration_ttl: 300,
});
await kv.values.update("dir/file.bin", { ...at, value: await toFile(Buffer.from(binary), "v.bin") });
const abs = before + 3600;
await kv.values.update("abs", { ...at, value: "absolute", expiration: abs });

// values.get returns the raw response: bytes compared one for one.
const text = await kv.values.get("plain", at);
check((await text.text()) === "hello ünïcode", "text value");
const bin = new Uint8Array(await (await kv.values.get("dir/file.bin", at)).arrayBuffer());
check(bin.length === 256 && bin.every((b, i) => b === i), "binary value byte for byte");
const ttl = await kv.values.get("meta", at);
const exp = Number(ttl.headers.get("expiration"));
check(exp >= before + 300 && exp <= Math.floor(Date.now() / 1000) + 300, `expiration header ${exp}`);
check(Number((await kv.values.get("abs", at)).headers.get("expiration")) === abs, "absolute expiration");

// metadata.get
const metaGot = await kv.metadata.get("meta", at);
check(JSON.stringify(metaGot) === '{"n":2,"owner":"ts"}', `metadata: ${JSON.stringify(metaGot)}`);
check((await kv.metadata.get("plain", at)) == null, "no metadata");

// bulkUpdate (namespaces and the deprecated keys route), text and base64 values.
const pairs = Array.from({ length: 1200 }, (_, i) => ({
  key: `bulk/${String(i).padStart(4, "0")}`,
  value: `v${i}`,
}));
pairs.push({ key: "b64", value: Buffer.from(binary).toString("base64"), base64: true });
pairs.push({ key: "json", value: '{"a":[1,2]}', metadata: { kind: "json" }, expiration_ttl: 600 });
const put = await kv.bulkUpdate(namespace_id, { account_id, body: pairs });
check(put.successful_key_count === pairs.length, `bulkUpdate ${JSON.stringify(put)}`);
const put2 = await kv.keys.bulkUpdate(namespace_id, { account_id, body: [{ key: "k2", value: "two" }] });
check(put2.successful_key_count === 1, "keys.bulkUpdate");
const b64 = new Uint8Array(await (await kv.values.get("b64", at)).arrayBuffer());
check(b64.length === 256 && b64.every((b, i) => b === i), "base64 bulk value byte for byte");

// keys.list: auto-paging across cursor pages, a prefix, metadata and expiration in entries.
const names = [];
for await (const k of kv.keys.list(namespace_id, { account_id })) names.push(k.name);
check(names.length === 1207, `keys listed: ${names.length}`);
const sorted = [...names].sort((a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b)));
check(JSON.stringify(names) === JSON.stringify(sorted), "byte order");
const dir = await kv.keys.list(namespace_id, { account_id, prefix: "dir/" });
check(JSON.stringify(dir.result.map((k) => k.name)) === '["dir/file.bin"]', "prefix");
const firstPage = await kv.keys.list(namespace_id, { account_id, limit: 10 });
check(firstPage.result.length === 10 && firstPage.hasNextPage(), "limit and a next page");
const jsonKey = (await kv.keys.list(namespace_id, { account_id, prefix: "json" })).result[0];
check(jsonKey.metadata?.kind === "json" && jsonKey.expiration > before, JSON.stringify(jsonKey));

// bulkGet (both routes): text, json, withMetadata; a missing key is null.
const g = await kv.bulkGet(namespace_id, { account_id, keys: ["plain", "missing"] });
check(g.values.plain === "hello ünïcode" && g.values.missing === null, JSON.stringify(g));
const gj = await kv.keys.bulkGet(namespace_id, { account_id, keys: ["json"], type: "json" });
check(JSON.stringify(gj.values.json) === '{"a":[1,2]}', JSON.stringify(gj));
const gm = await kv.bulkGet(namespace_id, { account_id, keys: ["meta"], withMetadata: true });
check(
  gm.values.meta.value === "with metadata" && gm.values.meta.metadata.owner === "ts",
  JSON.stringify(gm),
);

// values.delete, bulkDelete (both routes).
check((await kv.values.delete("plain", at)) === null, "delete value");
const del = await kv.bulkDelete(namespace_id, { account_id, body: pairs.slice(0, 600).map((p) => p.key) });
check(del.successful_key_count === 600, JSON.stringify(del));
const del2 = await kv.keys.bulkDelete(namespace_id, { account_id, body: ["k2"] });
check(del2.successful_key_count === 1, JSON.stringify(del2));
let count = 0;
for await (const _ of kv.keys.list(namespace_id, { account_id })) count++;
check(count === 1207 - 1 - 600 - 1, `left after deletes: ${count}`);

// Typed errors: NotFoundError with 10009 (missing key) and 10013 (missing namespace),
// PermissionDeniedError with 10000, BadRequestError for a bad value.
await expectError(kv.values.get("plain", at), Cloudflare.NotFoundError, 404, 10009);
await expectError(kv.metadata.get("plain", at), Cloudflare.NotFoundError, 404, 10009);
await expectError(kv.get("f".repeat(32), { account_id }), Cloudflare.NotFoundError, 404, 10013);
const wrong = new Cloudflare({ apiToken: "wrong-token", baseURL, maxRetries: 0 });
await expectError(wrong.kv.namespaces.list({ account_id }), Cloudflare.PermissionDeniedError, 403, 10000);
await expectError(kv.create({ account_id, title: "ts-main" }), Cloudflare.BadRequestError, 400, 10014);

// Early rejections with an 8 MiB multipart value: the SDK reads the 4xx (no connection error)
// and, the answer being final, does not upload again.
const big = await toFile(Buffer.alloc(8 << 20, 0x61), "big.bin");
const rejected = [
  [() => kv.values.update("big", { ...at, value: big, expiration_ttl: 30 }), Cloudflare.BadRequestError, 400, 10024],
  [() => kv.values.update("k".repeat(513), { ...at, value: big }), Cloudflare.APIError, 414, 10021],
  [() => wrong.kv.namespaces.values.update("big", { ...at, value: big }), Cloudflare.PermissionDeniedError, 403, 10000],
];
for (const [call, cls, status, code] of rejected) {
  const n = (await stats()).put_value;
  await expectError(call(), cls, status, code);
  check((await stats()).put_value === n + 1, "the rejected upload was sent once");
}

check((await kv.delete(namespace_id, { account_id })) === null, "delete last namespace");
await expectError(kv.keys.list(namespace_id, { account_id }), Cloudflare.NotFoundError, 404, 10013);

console.log(`typescript sdk: all ${checks} checks passed`);
