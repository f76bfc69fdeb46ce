#!/usr/bin/env python3
"""A real MCP client on the Python SDK **2.x** (`mcp.Client`), over stdio, for guard's tests.

    python mcp2_client.py [--list] [--call TOOL JSON_ARGS]... [--print-init] [--timeout SECONDS]
                          [--env K=V]... [--mode auto|legacy|2026-07-28] [--skip-output-validation]
                          -- CMD [ARGS...]

Self-contained: needs only a venv built from requirements-mcp2.txt beside this file (mcp 2.3.0,
Python >= 3.10; Debian 12's python3 3.11 is fine). Starts CMD ARGS... as the server (the SDK's
`stdio_client`: its own process group, newline-delimited JSON-RPC on its stdin/stdout; its stderr
is this client's stderr), then runs the steps in the order given on the command line, printing
one JSON line to stdout per step, the same lines as mcp_client.py:

    --list             {"tools": [names, over every page], "pages": N, "descriptions": {name: text}}
                       or, on a JSON-RPC error: {"tools": null, "error": {"code", "message", "data"}}
    --call TOOL ARGS   {"call": TOOL, "result": <CallToolResult, model_dump(by_alias, exclude_none)>}
                       or, on a JSON-RPC error: {"call": TOOL, "error": {"code", "message", "data"}}
    --print-init       (first) {"initialize": {"protocolVersion", "serverInfo"}}

--mode (the SDK's `Client(mode=...)`):
    auto        (default, the SDK's default) send `server/discover` (2026-07-28 envelope, fixed
                10 s time-out); on a DiscoverResult naming 2026-07-28 use that era (no
                `initialize` at all), on any JSON-RPC error (or that time-out) fall back to the
                `initialize` handshake (offers 2025-11-25).
    legacy      `initialize` + `notifications/initialized` only, as SDK 1.x does.
    2026-07-28  adopt 2026-07-28 at once: no discover, no initialize (serverInfo is then null).
So --print-init's protocolVersion says which era was negotiated: "2026-07-28" or a 2025 one.

Unlike mcp_client.py's, a `result` always has `"resultType": "complete"` (the 2.x model's default,
dumped even when the wire had none), and in the 2026-07-28 era also the server's
`"_meta": {"io.modelcontextprotocol/serverInfo": {...}}` stamp. As in SDK 1.x, a call to a tool
whose output schema the client has not seen makes the SDK send its own (first-page) tools/list
after the call; --skip-output-validation turns that off.

--env K=V adds K to the server's environment; the SDK always passes HOME, LOGNAME, PATH, SHELL,
TERM, USER (and nothing else) from this process's.

Exit status: 0 when every step ran (JSON-RPC errors are data), 2 on a connection or protocol
failure or time-out (the reason on stderr as `mcp_client: <Type>: <message>` lines; lines already
printed stay printed), 64 on bad usage. An error is data only when it is the peer's own error
response that came on the wire: the SDK's own synthesized errors (its time-out -32001
"Request 'tools/call' timed out", "Connection closed" -32000 when the server goes away) are
failures, even though they use the same codes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from mcp import Client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.shared.exceptions import MCPError
from mcp.shared.message import SessionMessage
from mcp_types import CONNECTION_CLOSED, REQUEST_TIMEOUT, ErrorData, JSONRPCError

# Client(mode="auto") waits this long for the server/discover answer before falling back to
# initialize (mcp.client.session.DISCOVER_TIMEOUT_SECONDS): the whole-run bound allows for it.
DISCOVER_TIMEOUT = 10.0


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


class ClientTimeout(Exception):
    pass


class ConnectionClosed(Exception):
    pass


class UsageError(Exception):
    pass


class RecordingReadStream:
    """The transport's read stream, passed through unchanged; notes every JSON-RPC error response
    (`JSONRPCError` message) the server sent, so a step can tell a peer's error from one the SDK
    made up."""

    def __init__(self, inner: Any, errors: list[ErrorData]) -> None:
        self.inner = inner
        self.errors = errors

    def _note(self, item: Any) -> Any:
        if isinstance(item, SessionMessage) and isinstance(item.message, JSONRPCError):
            self.errors.append(item.message.error)
        return item

    async def receive(self) -> Any:
        return self._note(await self.inner.receive())

    def __aiter__(self) -> RecordingReadStream:
        return self

    async def __anext__(self) -> Any:
        return self._note(await self.inner.__anext__())

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def __aenter__(self) -> RecordingReadStream:
        await self.inner.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        return await self.inner.__aexit__(*exc)


class RecordingStdio:
    """A `Transport` for `Client`: the SDK's own `stdio_client`, with a RecordingReadStream."""

    def __init__(self, params: StdioServerParameters) -> None:
        self.params = params
        self.errors: list[ErrorData] = []
        self._cm: Any = None

    async def __aenter__(self) -> tuple[Any, Any]:
        # errlog: the server's stderr goes to ours (the SDK's default, said explicitly).
        self._cm = stdio_client(self.params, errlog=sys.stderr)
        read, write = await self._cm.__aenter__()
        return RecordingReadStream(read, self.errors), write

    async def __aexit__(self, *exc: Any) -> bool | None:
        return await self._cm.__aexit__(*exc)


def error_dict(e: MCPError, transport: RecordingStdio, since: int) -> dict[str, Any]:
    """{"code", "message", "data"} of a peer's error response; raises for the SDK's own errors."""
    if any(err.code == e.code and err.message == e.message for err in transport.errors[since:]):
        return {"code": e.code, "message": e.message, "data": e.data}
    # Not on the wire: the SDK synthesized it (no answer in time, or the server went away).
    if e.code == REQUEST_TIMEOUT:
        raise ClientTimeout(e.message) from None
    if e.code == CONNECTION_CLOSED:
        raise ConnectionClosed(e.message) from None
    raise e


class Steps(argparse.Action):
    """Keeps --list and --call in command-line order."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
        steps = getattr(namespace, "steps", None) or []
        if option_string == "--list":
            steps.append(("list", None, None))
        else:
            tool, raw = values
            try:
                arguments = json.loads(raw)
            except json.JSONDecodeError as e:
                parser.error(f"--call {tool}: arguments are not JSON: {e}")
            if not isinstance(arguments, dict):
                parser.error(f"--call {tool}: arguments must be a JSON object")
            steps.append(("call", tool, arguments))
        namespace.steps = steps


async def run(args: argparse.Namespace) -> None:
    command, *argv = args.command
    params = StdioServerParameters(command=command, args=argv, env=dict(args.env) or None)
    transport = RecordingStdio(params)
    client = Client(
        transport,
        mode=args.mode,
        read_timeout_seconds=args.timeout,
        # No response cache (the SDK's default honours ttlMs hints): every --list goes on the wire.
        cache=None,
    )
    async with client:
        session = client.session
        if args.skip_output_validation:
            # The SDK otherwise sends its own tools/list after calling a tool whose output schema
            # it has not seen yet, to validate structuredContent (as SDK 1.x does).
            async def no_validation(name: str, result: Any) -> None:
                return None

            session.validate_tool_result = no_validation  # type: ignore[method-assign]
        if args.print_init:
            info = client.server_info
            emit(
                {
                    "initialize": {
                        "protocolVersion": client.protocol_version,
                        "serverInfo": info.model_dump(mode="json", by_alias=True) if info else None,
                    }
                }
            )
        for kind, tool, arguments in args.steps or []:
            since = len(transport.errors)
            if kind == "list":
                await list_all(client, transport, since)
                continue
            try:
                result = await client.call_tool(tool, arguments)
            except MCPError as e:
                emit({"call": tool, "error": error_dict(e, transport, since)})
            else:
                emit(
                    {
                        "call": tool,
                        "result": result.model_dump(mode="json", by_alias=True, exclude_none=True),
                    }
                )


async def list_all(client: Client, transport: RecordingStdio, since: int) -> None:
    names: list[str] = []
    descriptions: dict[str, str | None] = {}
    cursor: str | None = None
    pages = 0
    seen: set[str] = set()
    while True:
        try:
            page = await client.list_tools(cursor=cursor)
        except MCPError as e:
            emit({"tools": None, "error": error_dict(e, transport, since)})
            return
        pages += 1
        for t in page.tools:
            names.append(t.name)
            descriptions[t.name] = t.description
        cursor = page.next_cursor
        if not cursor:
            break
        if cursor in seen or pages >= 1000:
            raise RuntimeError(f"tools/list pagination does not end (cursor {cursor!r})")
        seen.add(cursor)
    emit({"tools": names, "pages": pages, "descriptions": descriptions})


def describe(e: BaseException) -> list[str]:
    if isinstance(e, BaseExceptionGroup):
        return [line for sub in e.exceptions for line in describe(sub)]
    return [f"{type(e).__name__}: {e}"]


def parse_env(s: str) -> tuple[str, str]:
    key, eq, value = s.partition("=")
    if not key or not eq:
        raise argparse.ArgumentTypeError(f"--env wants K=V, got {s!r}")
    return key, value


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="mcp2_client.py",
        usage="%(prog)s [--list] [--call TOOL JSON_ARGS]... [--print-init] [--timeout SECONDS]\n"
        "       [--env K=V]... [--mode auto|legacy|2026-07-28] [--skip-output-validation]\n"
        "       -- CMD [ARGS...]",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--list", nargs=0, action=Steps, help="list every tool (all pages)")
    p.add_argument(
        "--call", nargs=2, action=Steps, metavar=("TOOL", "JSON_ARGS"), help="call a tool"
    )
    p.add_argument(
        "--timeout", type=float, default=30.0, help="seconds for each request and the whole run"
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        type=parse_env,
        metavar="K=V",
        help="add K=V to the server's environment",
    )
    p.add_argument(
        "--mode",
        choices=["auto", "legacy", "2026-07-28"],
        default="auto",
        help="auto: server/discover, else initialize; legacy: initialize; 2026-07-28: neither",
    )
    p.add_argument(
        "--skip-output-validation",
        action="store_true",
        help="do not let the SDK send its own tools/list after a call to validate the output",
    )
    p.add_argument("--print-init", action="store_true", help="print the negotiated version first")
    p.set_defaults(steps=[])
    # Everything after the first `--` is the server's command line, untouched by argparse.
    cut = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:cut])  # (--help exits 0 here, bad options exit 2: see main)
    args.command = argv[cut + 1 :]
    if not args.command:
        p.print_usage(sys.stderr)
        raise UsageError("the server command goes after `--`: -- CMD [ARGS...]")
    return args


def main() -> int:
    try:
        args = parse_args(sys.argv[1:])
    except SystemExit as e:
        return 64 if e.code else 0
    except UsageError as e:
        print(f"mcp_client: {e}", file=sys.stderr)
        return 64

    async def bounded() -> None:
        # The whole run is bounded: a proxy that swallows a request must not hang a test.
        steps = max(1, len(args.steps))
        extra = DISCOVER_TIMEOUT if args.mode == "auto" else 0.0
        await asyncio.wait_for(run(args), timeout=args.timeout * (steps + 2) + extra)

    try:
        asyncio.run(bounded())
    except KeyboardInterrupt:
        return 130
    except BaseException as e:  # noqa: BLE001 - every failure is reported the same way
        if isinstance(e, (TimeoutError, asyncio.TimeoutError)):
            print("mcp_client: timed out (whole run)", file=sys.stderr)
        for line in describe(e):
            print(f"mcp_client: {line}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
