#!/usr/bin/env node
// A real MCP client (TypeScript SDK: Client + StreamableHTTPClientTransport / SSEClientTransport)
// for guard's integration tests; the Node twin of mcp_client.py, with the same command line and the
// same stdout lines.
//
//   node mcp_client.mjs URL [--transport streamable-http|sse] [--list] [--call TOOL JSON_ARGS]...
//                       [--timeout SECONDS] [--header 'Name: value']... [--print-init]
//                       [--skip-output-validation] [--node-modules DIR]
//
// Self-contained: needs only the node_modules that `cargo xtask setup` installs (see README.md beside
// this file). Initializes, then runs the steps in the order given on the command line, printing one
// JSON line to stdout per step:
//
//   --list             {"tools": [names, over every page], "pages": N, "descriptions": {name: text}}
//                      or, on a JSON-RPC error: {"tools": null, "error": {"code", "message", "data"}}
//   --call TOOL ARGS   {"call": TOOL, "result": <CallToolResult>}
//                      or, on a JSON-RPC error: {"call": TOOL, "error": {"code", "message", "data"}}
//   --print-init       (first) {"initialize": {"protocolVersion", "serverInfo", "sessionId"}}
//
// Exit status: 0 when every step ran (JSON-RPC errors from the peer are data), 2 on a connection or
// protocol failure, HTTP error status or time-out (the reason on stderr as `mcp_client: ...` lines;
// lines already printed stay printed), 64 on bad usage.
// TLS: only Node's defaults (no TLS option of its own): NODE_EXTRA_CA_CERTS=ca.pem trusts one more CA.
// node_modules is found with --node-modules, else in $GUARD_TEST_PEERS/node, /opt/guard-test-peers/node,
// ~/.cache/guard/test-peers/node (the first that has @modelcontextprotocol/sdk).
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { pathToFileURL } from "node:url";

const USAGE =
  "usage: mcp_client.mjs URL [--transport streamable-http|sse] [--list] [--call TOOL JSON_ARGS]...\n" +
  "                      [--timeout SECONDS] [--header 'Name: value']... [--print-init]\n" +
  "                      [--skip-output-validation] [--node-modules DIR]\n";

function usage(msg) {
  process.stderr.write(USAGE + `mcp_client.mjs: error: ${msg}\n`);
  process.exit(64);
}

// ---------------------------------------------------------------- command line (argparse-like)
const opts = {
  url: null,
  transport: "streamable-http",
  steps: [],
  timeout: 30,
  headers: {},
  printInit: false,
  skipOutputValidation: false,
  modules: null,
  // URL `stdio`: the server's argv (JSON array) and extra environment.
  stdioCommand: null,
  stdioEnv: {},
};
{
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i++) {
    let a = argv[i];
    let inline;
    if (a.startsWith("--") && a.includes("=")) {
      inline = a.slice(a.indexOf("=") + 1);
      a = a.slice(0, a.indexOf("="));
    }
    const val = () => {
      if (inline !== undefined) return inline;
      if (i + 1 < argv.length) return argv[++i];
      return usage(`argument ${a}: expected one argument`);
    };
    if (a === "-h" || a === "--help") {
      process.stdout.write(USAGE);
      process.exit(0);
    } else if (a === "--transport") {
      opts.transport = val();
      if (!["streamable-http", "sse"].includes(opts.transport)) {
        usage(`argument --transport: invalid choice: '${opts.transport}'`);
      }
    } else if (a === "--list") {
      if (inline !== undefined) usage("argument --list: ignored explicit argument");
      opts.steps.push({ kind: "list" });
    } else if (a === "--call") {
      if (inline !== undefined || i + 2 >= argv.length) usage("argument --call: expected 2 arguments");
      const tool = argv[++i];
      const raw = argv[++i];
      let args;
      try {
        args = JSON.parse(raw);
      } catch (e) {
        usage(`--call ${tool}: arguments are not JSON: ${e.message}`);
      }
      if (args === null || typeof args !== "object" || Array.isArray(args)) {
        usage(`--call ${tool}: arguments must be a JSON object`);
      }
      opts.steps.push({ kind: "call", tool, args });
    } else if (a === "--timeout") {
      const v = val();
      opts.timeout = Number(v);
      if (v.trim() === "" || !Number.isFinite(opts.timeout) || opts.timeout <= 0) {
        usage(`argument --timeout: invalid value: '${v}'`);
      }
    } else if (a === "--header") {
      const h = val();
      const colon = h.indexOf(":");
      if (colon < 0) usage("--header wants 'Name: value'");
      opts.headers[h.slice(0, colon).trim()] = h.slice(colon + 1).trim();
    } else if (a === "--print-init") {
      opts.printInit = true;
    } else if (a === "--skip-output-validation") {
      opts.skipOutputValidation = true;
    } else if (a === "--node-modules") {
      opts.modules = val();
    } else if (a === "--stdio-command") {
      opts.stdioCommand = JSON.parse(val());
    } else if (a === "--stdio-env") {
      const kv = val();
      const eq = kv.indexOf("=");
      if (eq < 0) usage("--stdio-env wants K=V");
      opts.stdioEnv[kv.slice(0, eq)] = kv.slice(eq + 1);
    } else if (a.startsWith("-") && a !== "-") {
      usage(`unrecognized arguments: ${a}`);
    } else if (opts.url === null) {
      opts.url = a;
    } else {
      usage(`unrecognized arguments: ${a}`);
    }
  }
  if (opts.url === null) usage("the following arguments are required: url");
}

// ---------------------------------------------------------------- output
// Like Python's json.dumps(obj, separators=(",", ":")) (ensure_ascii), so both clients print the
// same bytes for the same data (floats aside: Python writes 5.0 where JavaScript writes 5).
function emit(obj) {
  const line = JSON.stringify(obj).replace(
    /[\u007f-\uffff]/g,
    (c) => "\\u" + c.charCodeAt(0).toString(16).padStart(4, "0"),
  );
  fs.writeSync(1, line + "\n");
}

function fail(lines) {
  for (const line of lines) fs.writeSync(2, `mcp_client: ${line}\n`);
  process.exit(2);
}

// "Type: message" lines for an error, its causes and (AggregateError) its parts.
function describe(e, depth = 0) {
  if (depth > 8) return [];
  if (!(e instanceof Error)) return [`${typeof e === "object" ? JSON.stringify(e) : String(e)}`];
  const type = e.constructor?.name && e.constructor.name !== "Error" ? e.constructor.name : e.name;
  const code = e.code !== undefined && !String(e.message).includes(String(e.code)) ? ` (${e.code})` : "";
  const message = String(e.message).replace(/\s*\n\s*/g, " "); // one line each (ZodError: JSON)
  const lines = [`${depth ? "caused by: " : ""}${type}: ${message}${code}`];
  if (Array.isArray(e.errors)) for (const sub of e.errors) lines.push(...describe(sub, depth + 1));
  if (e.cause !== undefined) lines.push(...describe(e.cause, depth + 1));
  return lines;
}

// A local failure (no answer, transport error, ...): exit 2.
class ClientFailure extends Error {}
class ClientTimeout extends Error {}

// ---------------------------------------------------------------- SDK
const PKG = "@modelcontextprotocol/sdk";
const candidates = opts.modules
  ? [opts.modules]
  : [
      process.env.GUARD_TEST_PEERS && path.join(process.env.GUARD_TEST_PEERS, "node/node_modules"),
      "/opt/guard-test-peers/node/node_modules",
      path.join(os.homedir(), ".cache/guard/test-peers/node/node_modules"),
    ].filter(Boolean);
const found = candidates.find((d) => fs.existsSync(path.join(d, PKG, "package.json")));
if (!found) usage(`no ${PKG} in ${candidates.join(", ")}: run \`cargo xtask setup\``);
const modules = fs.realpathSync(found);
const load = (rel) => import(pathToFileURL(path.join(modules, PKG, "dist/esm", rel)).href);
const { Client } = await load("client/index.js");
const { StreamableHTTPClientTransport } = await load("client/streamableHttp.js");
const { SSEClientTransport } = await load("client/sse.js");
const { StdioClientTransport, getDefaultEnvironment } = await load("client/stdio.js");
const { McpError } = await load("types.js");
const SDK_VERSION = JSON.parse(fs.readFileSync(path.join(modules, PKG, "package.json"), "utf8")).version;

// ---------------------------------------------------------------- run
const timeoutMs = opts.timeout * 1000;
const steps = Math.max(1, opts.steps.length);
// The whole run is bounded: a proxy that swallows a request must not hang a test.
setTimeout(
  () =>
    fail([
      "timed out (whole run)",
      `ClientTimeout: no end after ${opts.timeout * (steps + 2)} s`,
      ...sdkErrorLines(),
    ]),
  timeoutMs * (steps + 2),
);

let url;
let transport;
const requestInit = Object.keys(opts.headers).length ? { headers: opts.headers } : undefined;
if (opts.url === "stdio") {
  // A stdio server (the SDK's StdioClientTransport): its stderr is ours; the SDK passes only a
  // few variables (HOME, PATH, ...) unless told more.
  if (!Array.isArray(opts.stdioCommand) || !opts.stdioCommand.length) usage("stdio needs --stdio-command");
  const [command, ...args] = opts.stdioCommand;
  transport = new StdioClientTransport({
    command,
    args,
    env: { ...getDefaultEnvironment(), ...opts.stdioEnv },
    stderr: "inherit",
  });
} else {
  try {
    url = new URL(opts.url);
  } catch (e) {
    usage(`bad URL ${opts.url}: ${e.message}`);
  }
  transport =
    opts.transport === "sse"
      ? new SSEClientTransport(url, { requestInit })
      : new StreamableHTTPClientTransport(url, { requestInit });
}

// Tell the peer's JSON-RPC error responses (data) from the SDK's own McpErrors (time-out, "Connection
// closed", output validation: failures): remember the id of the last request sent and every error
// response received, by id.
let lastRequestId;
const peerErrors = new Map();
const send = transport.send.bind(transport);
transport.send = (message, options) => {
  if (message && typeof message === "object" && "method" in message && "id" in message) {
    lastRequestId = message.id;
  }
  return send(message, options);
};
// Protocol.connect() keeps an onmessage set before it and calls it first with every message.
transport.onmessage = (message) => {
  if (message && typeof message === "object" && "error" in message && "id" in message) {
    peerErrors.set(message.id, message.error ?? {});
  }
};
let negotiated;
// (Only HTTP transports carry the version; stdio has no setProtocolVersion.)
const setProtocolVersion = transport.setProtocolVersion?.bind(transport) ?? (() => {});
transport.setProtocolVersion = (v) => {
  negotiated = v;
  setProtocolVersion(v);
};

// The SDK's asynchronous errors (transport.onerror, e.g. the GET stream failing): kept and printed
// on stderr at the end as `mcp_client: sdk: ...` lines, for diagnosis only (a failing request ends
// with its own error; the same error object is not printed twice).
let closing = false;
const sdkErrors = [];
const client = new Client({ name: "guard-mcp-client-mjs", version: SDK_VERSION }, { capabilities: {} });
client.onerror = (e) => {
  if (!closing && !sdkErrors.includes(e)) sdkErrors.push(e);
};
function sdkErrorLines(except) {
  return sdkErrors.filter((e) => e !== except).flatMap((e) => describe(e).map((l) => `sdk: ${l}`));
}
if (opts.skipOutputValidation) {
  // The TS SDK never sends a tools/list of its own, but after --list it validates structuredContent
  // against the listed output schemas; this turns that off (as in mcp_client.py).
  client.getToolOutputValidator = () => undefined;
}

// The SDK's own time-out (McpError -32001 "Request timed out", not an error response from the
// peer): no answer, so a failure (exit 2), not data.
function asTimeout(e, what) {
  const sdkTimeout = e instanceof McpError && e.code === -32001 && e.data?.timeout !== undefined;
  if (sdkTimeout && !peerErrors.has(lastRequestId)) {
    return new ClientTimeout(
      `Timed out while waiting for response to ${what} (request ${lastRequestId}, ${opts.timeout} s)`,
    );
  }
  return e;
}

// {"code", "message", "data"} of the JSON-RPC error response that failed the last request; any
// other error (no answer, HTTP status, transport, validation) is re-thrown: a failure.
function errorDict(e, what) {
  const id = lastRequestId;
  const wire = peerErrors.get(id);
  if (!(e instanceof McpError) || wire === undefined) throw asTimeout(e, what);
  peerErrors.delete(id);
  return { code: wire.code, message: wire.message, data: wire.data === undefined ? null : wire.data };
}

// CallToolResult, as mcp_client.py prints it (model_dump(by_alias=True, exclude_none=True)): fields
// in the model's order, isError defaulting to false, top-level nulls dropped.
function resultDict(r) {
  const out = {};
  if (r._meta != null) out._meta = r._meta;
  out.content = r.content ?? [];
  if (r.structuredContent != null) out.structuredContent = r.structuredContent;
  out.isError = r.isError ?? false;
  for (const [k, v] of Object.entries(r)) if (!(k in out) && v != null) out[k] = v;
  return out;
}

async function listAll() {
  const names = [];
  const descriptions = {};
  const seen = new Set();
  let cursor;
  let pages = 0;
  for (;;) {
    let page;
    try {
      page = await client.listTools(cursor === undefined ? undefined : { cursor }, { timeout: timeoutMs });
    } catch (e) {
      emit({ tools: null, error: errorDict(e, "tools/list") });
      return;
    }
    pages += 1;
    for (const t of page.tools) {
      names.push(t.name);
      descriptions[t.name] = t.description ?? null;
    }
    cursor = page.nextCursor;
    if (!cursor) break;
    if (seen.has(cursor) || pages >= 1000) {
      throw new ClientFailure(`tools/list pagination does not end (cursor ${JSON.stringify(cursor)})`);
    }
    seen.add(cursor);
  }
  emit({ tools: names, pages, descriptions });
}

async function run() {
  try {
    await client.connect(transport, { timeout: timeoutMs });
  } catch (e) {
    throw asTimeout(e, "initialize");
  }
  if (opts.printInit) {
    emit({
      initialize: {
        protocolVersion: negotiated ?? null,
        serverInfo: client.getServerVersion() ?? null,
        sessionId: transport.sessionId ?? null,
      },
    });
  }
  for (const step of opts.steps) {
    if (step.kind === "list") {
      await listAll();
      continue;
    }
    let result;
    try {
      result = await client.callTool({ name: step.tool, arguments: step.args }, undefined, {
        timeout: timeoutMs,
      });
    } catch (e) {
      emit({ call: step.tool, error: errorDict(e, `tools/call ${step.tool}`) });
      continue;
    }
    emit({ call: step.tool, result: resultDict(result) });
  }
}

try {
  await run();
} catch (e) {
  fail([...describe(e), ...sdkErrorLines(e)]);
}
closing = true;
// Like the Python SDK: end the session with DELETE (Streamable HTTP with a session id only). The TS
// SDK's close() alone would not; a failing DELETE is only logged.
if (transport instanceof StreamableHTTPClientTransport && transport.sessionId) {
  try {
    await Promise.race([
      transport.terminateSession(),
      new Promise((_, reject) =>
        setTimeout(() => reject(new ClientTimeout(`DELETE: no answer in ${opts.timeout} s`)), timeoutMs),
      ),
    ]);
  } catch (e) {
    for (const line of describe(e)) fs.writeSync(2, `mcp_client: warning: session not terminated: ${line}\n`);
  }
}
await client.close().catch(() => {});
for (const line of sdkErrorLines()) fs.writeSync(2, `mcp_client: ${line}\n`);
process.exit(0);
