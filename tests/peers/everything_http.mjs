#!/usr/bin/env node
// Starts @modelcontextprotocol/server-everything (installed by `cargo xtask setup`, see README.md)
// over HTTP, bound to ONE address, and prints `READY <url>` on stdout once it listens.
//
//   node everything_http.mjs [--host 127.0.0.3] [--port 0] [--transport streamableHttp|sse]
//                            [--json-response] [--node-modules DIR]
//
// The package itself only reads PORT (default 3001) and listens on every address
// (`app.listen(PORT)`), has no host option and always answers POSTs with text/event-stream. This
// wrapper runs the package's own transports/streamableHttp.js (or sse.js) unchanged, but
//   - passes --host to that listen() call (so it binds only there; --port 0 = any free port),
//   - with --json-response, makes the SDK's transport answer application/json (enableJsonResponse),
//   - sends the package's console.log chatter to stderr, so stdout carries only the READY line.
// node_modules is found with --node-modules, else in $GUARD_TEST_PEERS/node, /opt/guard-test-peers/node,
// ~/.cache/guard/test-peers/node (the first that has the package).
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { pathToFileURL } from "node:url";

function usage(msg) {
  process.stderr.write(`everything_http: ${msg}\n`);
  process.exit(64);
}

const opts = { host: "127.0.0.1", port: "0", transport: "streamableHttp", json: false, modules: null };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  const a = argv[i];
  const val = () => (i + 1 < argv.length ? argv[++i] : usage(`${a} needs a value`));
  if (a === "--host") opts.host = val().replace(/^\[|\]$/g, "");
  else if (a === "--port") opts.port = val();
  else if (a === "--transport") opts.transport = val();
  else if (a === "--json-response") opts.json = true;
  else if (a === "--node-modules") opts.modules = val();
  else usage(`unknown argument ${a}`);
}
if (!/^\d+$/.test(opts.port)) usage(`bad --port ${opts.port}`);
if (!["streamableHttp", "sse"].includes(opts.transport)) usage(`bad --transport ${opts.transport}`);

const PKG = "@modelcontextprotocol/server-everything";
const candidates = opts.modules
  ? [opts.modules]
  : [
      process.env.GUARD_TEST_PEERS && path.join(process.env.GUARD_TEST_PEERS, "node/node_modules"),
      "/opt/guard-test-peers/node/node_modules",
      path.join(os.homedir(), ".cache/guard/test-peers/node/node_modules"),
    ].filter(Boolean);
const found = candidates.find((d) => fs.existsSync(path.join(d, PKG, "package.json")));
if (!found) usage(`no ${PKG} in ${candidates.join(", ")}: run \`cargo xtask setup\``);
// The real path, so this file and the package load the very same SDK module instances.
const modules = fs.realpathSync(found);
const load = (rel) => import(pathToFileURL(path.join(modules, rel)).href);

console.log = console.error;
console.info = console.error;

if (opts.json) {
  const sdk = await load("@modelcontextprotocol/sdk/dist/esm/server/webStandardStreamableHttp.js");
  const proto = sdk.WebStandardStreamableHTTPServerTransport.prototype;
  const handle = proto.handleRequest;
  proto.handleRequest = function (...args) {
    this._enableJsonResponse = true;
    return handle.apply(this, args);
  };
}

const listen = net.Server.prototype.listen;
let bound = false;
net.Server.prototype.listen = function (...args) {
  const port = args[0];
  if (bound || !(typeof port === "number" || (typeof port === "string" && /^\d+$/.test(port)))) {
    return listen.apply(this, args);
  }
  bound = true;
  const cb = typeof args[args.length - 1] === "function" ? args[args.length - 1] : undefined;
  this.once("listening", () => {
    const addr = this.address();
    const host = addr.family === "IPv6" || addr.family === 6 ? `[${addr.address}]` : addr.address;
    const endpoint = opts.transport === "sse" ? "/sse" : "/mcp";
    process.stdout.write(`READY http://${host}:${addr.port}${endpoint}\n`);
  });
  return listen.call(this, { port: Number(opts.port), host: opts.host, ipv6Only: true }, cb);
};

process.env.PORT = opts.port;
await load(`${PKG}/dist/transports/${opts.transport}.js`);
