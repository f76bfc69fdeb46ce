#!/usr/bin/env python3
"""A real MCP server on the Python SDK **2.x** (`MCPServer`), over stdio, for guard's tests.

    python mcp2_server.py [--log CALLS.jsonl] [--verbose]

Self-contained: needs only a venv built from requirements-mcp2.txt beside this file (mcp 2.3.0,
Python >= 3.10; Debian 12's python3 3.11 is fine). Speaks MCP on stdin/stdout (newline-delimited
JSON-RPC, one message per line); nothing else is ever written to stdout: logs go to stderr (and
while it serves, the SDK points fd 1 at stderr and fd 0 at /dev/null, so even a stray print
cannot corrupt the wire).

Both protocol eras are served on one connection, as the SDK's `MCPServer.run("stdio")` does
(`serve_dual_era_loop`): the client's *first request* decides, once.
- `initialize` first: the 2025 handshake era (it answers protocolVersion 2025-11-25, or the
  client's own if it is one of 2024-11-05 / 2025-03-26 / 2025-06-18 / 2025-11-25).
- a request whose `params._meta` carries `io.modelcontextprotocol/protocolVersion` first (the SDK
  2.x client opens with `server/discover`): the 2026-07-28 era, no handshake, every request
  carries its own envelope; a later `initialize` gets -32022.

Tools, in this order (as in mcp_server.py): `echo(text: str) -> text`,
`add(a: int, b: int) -> a+b`, `delete_file(path: str) -> "deleted <path>"` (deletes nothing;
annotated `destructiveHint`), `slow(seconds: float) -> "done"`. Results are as `MCPServer` makes
them: `content: [{"type":"text","text":"5"}]`, `structuredContent: {"result": 5}`,
`isError: false`; bad arguments or an unknown tool give `isError: true` results, not JSON-RPC
errors.

Hidden tool `rpc_error` (not listed), as in mcp_server.py: arguments
`{"code": int, "message": str, "data": any}` make the server answer that tools/call with a
JSON-RPC **error** with those fields.

--log FILE appends `{"tool": NAME, "arguments": {...}}` per tools/call **received**: written by
a middleware, before the tool runs (also for unknown tools and `rpc_error`), the file opened with
O_APPEND for every line, so several servers may share one log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import threading
from collections.abc import Mapping
from importlib.metadata import version as package_version
from typing import Any

from mcp.server import MCPServer
from mcp.shared.exceptions import MCPError
from mcp_types import ToolAnnotations


class CallLog:
    """Appends one JSON line per tools/call received: {"tool": ..., "arguments": ...}."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.lock = threading.Lock()

    def write(self, tool: Any, arguments: Any) -> None:
        if not self.path:
            return
        line = json.dumps({"tool": tool, "arguments": arguments}, separators=(",", ":")) + "\n"
        with self.lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)


def build(args: argparse.Namespace) -> MCPServer:
    mcp = MCPServer(
        name="guard-test-server",
        version=package_version("mcp"),  # serverInfo.version: the SDK's, e.g. "2.3.0"
        instructions="Test server for guard's integration tests.",
        log_level="DEBUG" if args.verbose else "WARNING",
    )
    log = CallLog(args.log)

    # The SDK's middleware chain sees every inbound request first (both eras), with the raw
    # method and params: log tools/call here, before lookup, argument validation and the tool.
    async def log_calls(ctx: Any, call_next: Any) -> Any:
        if ctx.method == "tools/call":
            params = ctx.params if isinstance(ctx.params, Mapping) else {}
            name, arguments = params.get("name"), params.get("arguments")
            log.write(name, arguments)
            if name == "rpc_error":
                # The hidden tool: a JSON-RPC error response (a tool's own exceptions would
                # become isError results).
                a = arguments if isinstance(arguments, Mapping) else {}
                raise MCPError(
                    code=int(a.get("code", -32000)),
                    message=str(a.get("message", "rpc_error")),
                    data=a.get("data"),
                )
        return await call_next(ctx)

    mcp.middleware.append(log_calls)

    @mcp.tool(description="Echo the given text back unchanged.")
    def echo(text: str) -> str:
        return text

    @mcp.tool(description="Add two integers.")
    def add(a: int, b: int) -> int:
        return a + b

    @mcp.tool(
        description="Delete a file (pretends to: nothing is deleted).",
        annotations=ToolAnnotations(destructive_hint=True, read_only_hint=False),
    )
    def delete_file(path: str) -> str:
        return f"deleted {path}"

    @mcp.tool(description="Sleep for the given number of seconds, then answer 'done'.")
    async def slow(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "done"

    return mcp


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--log", help="append one JSON line per tools/call received to this file")
    p.add_argument("--verbose", action="store_true", help="SDK debug logs (stderr)")
    args = p.parse_args()
    # Configure logging before MCPServer does (its own basicConfig is then a no-op): stderr only.
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="mcp2_server: %(levelname)s %(name)s: %(message)s",
    )
    try:
        build(args).run("stdio")  # anyio.run(run_stdio_async): returns when stdin reaches EOF
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
