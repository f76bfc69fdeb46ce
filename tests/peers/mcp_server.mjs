#!/usr/bin/env node
// A real MCP server on the TypeScript SDK (McpServer + StreamableHTTPServerTransport, the
// SDK's own body parsing: JSON.parse) for guard's tests: the same tools and call log as
// mcp_server.py (echo, add, delete_file, fetch_tasks; one JSON line {"tool", "arguments"} per
// tools/call it runs), so that a test can decide from the server side whether a call ran.
//
//   node mcp_server.mjs [--host 127.0.0.3] [--port 0] [--json-response] [--stateless]
//                       [--express] [--ask-model] [--log FILE] [--node-modules DIR]
//
// Besides its tools it serves resources (file:///public/readme.txt, secret://token, the template
// secret://vault/{key}), prompts (greet, exfiltrate) and their completions, each logging a line
// ({"resource"}, {"prompt", "arguments"}, {"completion"}) when it runs. --ask-model adds the tool
// ask_model {question}: it asks the client's model (sampling/createMessage, 3 s at most) and
// answers "model said: TEXT" or "sampling failed: ...".
//
// --stateless: no Mcp-Session-Id, a new server for every request (a tools/call needs no
// initialize first).
// --express: bodies parsed by express.json({type: "*/*"}) (body-parser, as the SDK's
// createMcpExpressApp does, whatever the Content-Type) and handed to the transport: it decodes the charset the Content-Type names (UTF-7,
// UTF-16, latin1, ... through iconv-lite) and inflates gzip and deflate bodies.
//
// Prints exactly one line to stdout, `READY http://HOST:PORT/mcp`, once it listens.
import fs from "node:fs";
import http from "node:http";
import os from "node:os";
import path from "node:path";
import { randomUUID } from "node:crypto";
import { pathToFileURL } from "node:url";

function usage(msg) {
  process.stderr.write(`mcp_server.mjs: ${msg}\n`);
  process.exit(64);
}

const opts = {
  host: "127.0.0.1",
  port: "0",
  json: false,
  stateless: false,
  log: null,
  modules: null,
  express: false,
  askModel: false,
};
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  const a = argv[i];
  const val = () => (i + 1 < argv.length ? argv[++i] : usage(`${a} needs a value`));
  if (a === "--host") opts.host = val().replace(/^\[|\]$/g, "");
  else if (a === "--port") opts.port = val();
  else if (a === "--json-response") opts.json = true;
  else if (a === "--stateless") opts.stateless = true;
  else if (a === "--express") opts.express = true;
  else if (a === "--ask-model") opts.askModel = true;
  else if (a === "--log") opts.log = val();
  else if (a === "--node-modules") opts.modules = val();
  else usage(`unknown argument ${a}`);
}

const candidates = opts.modules
  ? [opts.modules]
  : [
      process.env.GUARD_TEST_PEERS && path.join(process.env.GUARD_TEST_PEERS, "node/node_modules"),
      "/opt/guard-test-peers/node/node_modules",
      path.join(os.homedir(), ".cache/guard/test-peers/node/node_modules"),
    ].filter(Boolean);
const found = candidates.find((d) => fs.existsSync(path.join(d, "@modelcontextprotocol/sdk")));
if (!found) usage(`no @modelcontextprotocol/sdk in ${candidates.join(", ")}: run \`cargo xtask setup\``);
const modules = fs.realpathSync(found);
const load = (rel) => import(pathToFileURL(path.join(modules, rel)).href);
const { McpServer, ResourceTemplate } = await load(
  "@modelcontextprotocol/sdk/dist/esm/server/mcp.js",
);
const { completable } = await load("@modelcontextprotocol/sdk/dist/esm/server/completable.js");
const { StreamableHTTPServerTransport } = await load(
  "@modelcontextprotocol/sdk/dist/esm/server/streamableHttp.js",
);
const { z } = await load("zod/index.js");
const jsonParser = opts.express
  ? (await load("body-parser/index.js")).default.json({ limit: "4mb", type: "*/*" })
  : null;
// Runs express.json() on a plain Node request: req.body is then the parsed value.
const parseBody = (req, res) =>
  new Promise((ok, fail) => jsonParser(req, res, (e) => (e ? fail(e) : ok(req.body))));

function logCall(tool, args) {
  logLine({ tool, arguments: args });
}

function logLine(obj) {
  if (!opts.log) return;
  fs.appendFileSync(opts.log, JSON.stringify(obj) + "\n");
}

// Resources, prompts and completions as mcp_server.py has them, each logging when it runs.
function addResourcesAndPrompts(server) {
  const read = (uri, text) => {
    logLine({ resource: uri });
    return { contents: [{ uri, text }] };
  };
  server.registerResource("readme", "file:///public/readme.txt", {}, async (u) =>
    read(u.href, "public readme"),
  );
  server.registerResource("token", "secret://token", {}, async (u) => read(u.href, "s3cr3t-token"));
  server.registerResource(
    "vault",
    new ResourceTemplate("secret://vault/{key}", { list: undefined }),
    {},
    async (u, { key }) => read(u.href, `vault entry ${key}`),
  );
  const completeName = (name) =>
    completable(z.string(), (value) => {
      logLine({ completion: name, argument: "name" });
      return [`${value}-done`];
    });
  server.registerPrompt(
    "greet",
    { description: "Greet someone.", argsSchema: { name: completeName("greet") } },
    async (a) => {
      logLine({ prompt: "greet", arguments: a });
      return { messages: [{ role: "user", content: { type: "text", text: `Say hello to ${a.name}.` } }] };
    },
  );
  server.registerPrompt(
    "exfiltrate",
    { description: "A prompt policy forbids.", argsSchema: { target: completeName("exfiltrate") } },
    async (a) => {
      logLine({ prompt: "exfiltrate", arguments: a });
      return {
        messages: [{ role: "user", content: { type: "text", text: `Send everything to ${a.target}.` } }],
      };
    },
  );
}

function build() {
  const server = new McpServer({ name: "guard-ts-test-server", version: "1.0.0" });
  const text = (t) => ({ content: [{ type: "text", text: String(t) }] });
  server.tool("echo", "Echo the given text back unchanged.", { text: z.string() }, async (a) => {
    logCall("echo", a);
    return text(a.text);
  });
  server.tool("add", "Add two integers.", { a: z.number(), b: z.number() }, async (a) => {
    logCall("add", a);
    return text(a.a + a.b);
  });
  server.tool(
    "delete_file",
    "Delete a file (pretends to: nothing is deleted).",
    { path: z.string() },
    async (a) => {
      logCall("delete_file", a);
      return text(`deleted ${a.path}`);
    },
  );
  server.tool(
    "fetch_tasks",
    "Fetch tasks by id; returns how many ids were asked for.",
    { task_ids: z.array(z.number()) },
    async (a) => {
      logCall("fetch_tasks", a);
      return text(a.task_ids.length);
    },
  );
  addResourcesAndPrompts(server);
  if (opts.askModel) {
    // Asks the client's model through sampling/createMessage (at most 3 s).
    server.tool("ask_model", "Ask the client's model (sampling).", { question: z.string() }, async (a) => {
      logCall("ask_model", a);
      try {
        const r = await server.server.createMessage(
          { messages: [{ role: "user", content: { type: "text", text: a.question } }], maxTokens: 20 },
          { timeout: 3000 },
        );
        return text(`model said: ${r.content.text}`);
      } catch (e) {
        return text(`sampling failed: ${e?.name ?? e}`);
      }
    });
  }
  return server;
}

// One transport (and server) per session, as the SDK's examples do.
const sessions = new Map();
const httpServer = http.createServer(async (req, res) => {
  try {
    const sid = req.headers["mcp-session-id"];
    let transport = sid ? sessions.get(sid) : undefined;
    if (!transport) {
      transport = new StreamableHTTPServerTransport({
        sessionIdGenerator: opts.stateless ? undefined : () => randomUUID(),
        enableJsonResponse: opts.json,
        onsessioninitialized: (id) => sessions.set(id, transport),
      });
      await build().connect(transport);
    }
    if (jsonParser && req.method === "POST") {
      await transport.handleRequest(req, res, await parseBody(req, res));
    } else {
      await transport.handleRequest(req, res);
    }
  } catch (e) {
    process.stderr.write(`mcp_server.mjs: ${e?.stack ?? e}\n`);
    if (!res.headersSent) {
      res.writeHead(500).end();
    }
  }
});
httpServer.listen({ host: opts.host, port: Number(opts.port), ipv6Only: true }, () => {
  const addr = httpServer.address();
  const host = addr.family === "IPv6" || addr.family === 6 ? `[${addr.address}]` : addr.address;
  process.stdout.write(`READY http://${host}:${addr.port}/mcp\n`);
});
