#!/usr/bin/env python3
"""A real MCP client (Python SDK's ClientSession) for guard's integration tests.

    python mcp_client.py URL [--transport streamable-http|sse] [--list] [--call TOOL JSON_ARGS]...
                         (URL `stdio`: [--stdio-command JSON_ARRAY | --stdio-config FILE
                          --stdio-server NAME] [--stdio-env K=V]...)
                         [--ca FILE] [--timeout SECONDS] [--header 'Name: value']... [--print-init]
                         [--sampling TEXT] [--meta JSON_OBJECT]
                         [--skip-output-validation]

Self-contained: needs only the venv that `cargo xtask setup` builds (see README.md beside this
file). Initializes, then runs the steps in the order given on the command line, printing one JSON
line to stdout per step:

    --list             {"tools": [names, over every page], "pages": N, "descriptions": {name: text}}
                       or, on a JSON-RPC error: {"tools": null, "error": {"code", "message", "data"}}
    --call TOOL ARGS   {"call": TOOL, "result": <CallToolResult, model_dump(by_alias, exclude_none)>}
                       or, on a JSON-RPC error: {"call": TOOL, "error": {"code", "message", "data"}}
    --print-init       (first) {"initialize": {"protocolVersion", "serverInfo", "sessionId"}}
    --meta OBJECT      sent as `params._meta` of every tools/call (e.g. a `traceparent`)
    --sampling TEXT    offers sampling; each sampling/createMessage the server sends prints
                       {"sampling": <its first message's text>} and is answered with TEXT

Exit status: 0 when every step ran (JSON-RPC errors are data), 2 on a connection or protocol
failure or time-out (the reason on stderr; lines already printed stay printed), 64 on bad usage.
TLS: --ca FILE trusts that CA (PEM); otherwise httpx's defaults, which honour SSL_CERT_FILE.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
from datetime import timedelta
from typing import Any

import httpx
from mcp import ClientSession
from mcp.client.sse import sse_client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import McpError


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


class ClientTimeout(Exception):
    pass


def error_dict(e: McpError) -> dict[str, Any]:
    # The SDK reports its own read time-out as McpError(408, "Timed out while waiting ..."): that is
    # no answer from the peer, so it is a failure (exit 2), not data.
    if e.error.code == 408 and e.error.message.startswith("Timed out while waiting"):
        raise ClientTimeout(e.error.message) from None
    return {"code": e.error.code, "message": e.error.message, "data": e.error.data}


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


def verify_setting(ca: str | None) -> ssl.SSLContext | bool:
    if ca is None:
        return True  # httpx: certifi, or SSL_CERT_FILE / SSL_CERT_DIR when set
    return ssl.create_default_context(cafile=ca)


async def run(args: argparse.Namespace) -> None:
    verify = verify_setting(args.ca)
    headers = dict(args.headers)
    timeout = httpx.Timeout(args.timeout, read=args.timeout)

    def client_factory(
        headers: dict[str, str] | None = None,
        timeout: httpx.Timeout | None = None,
        auth: httpx.Auth | None = None,
    ) -> httpx.AsyncClient:
        return httpx.AsyncClient(headers=headers, timeout=timeout, auth=auth, verify=verify)

    if args.url == "stdio":
        # The server's command line: --stdio-command (a JSON array), or the entry
        # --stdio-server of an agent's MCP config file (--stdio-config).
        transport = stdio_client(stdio_params(args))
        http_client = None
    elif args.transport == "sse":
        transport = sse_client(
            args.url,
            headers=headers or None,
            timeout=args.timeout,
            sse_read_timeout=args.timeout,
            httpx_client_factory=client_factory,
        )
        http_client = None
    else:
        http_client = client_factory(headers=headers or None, timeout=timeout)
        transport = streamable_http_client(args.url, http_client=http_client)

    try:
        async with transport as streams:
            read, write = streams[0], streams[1]
            async with ClientSession(
                read,
                write,
                read_timeout_seconds=timedelta(seconds=args.timeout),
                sampling_callback=sampler(args.sampling) if args.sampling is not None else None,
            ) as session:
                if args.skip_output_validation:
                    # The SDK otherwise sends its own tools/list after calling a tool whose output
                    # schema it has not seen yet (see README.md).
                    async def no_validation(name: str, result: Any) -> None:
                        return None

                    session._validate_tool_result = no_validation  # type: ignore[method-assign]
                init = await session.initialize()
                if args.print_init:
                    emit(
                        {
                            "initialize": {
                                "protocolVersion": init.protocolVersion,
                                "serverInfo": init.serverInfo.model_dump(mode="json"),
                                "sessionId": streams[2]() if len(streams) > 2 else None,
                            }
                        }
                    )
                for kind, tool, arguments in args.steps or []:
                    if kind == "list":
                        await list_all(session)
                    else:
                        try:
                            result = await session.call_tool(tool, arguments, meta=args.meta)
                        except McpError as e:
                            emit({"call": tool, "error": error_dict(e)})
                        else:
                            emit(
                                {
                                    "call": tool,
                                    "result": result.model_dump(
                                        mode="json", by_alias=True, exclude_none=True
                                    ),
                                }
                            )
    finally:
        if http_client is not None:
            await http_client.aclose()


def stdio_params(args: argparse.Namespace) -> StdioServerParameters:
    if args.stdio_config:
        with open(args.stdio_config, encoding="utf-8") as f:
            config = json.load(f)
        # Claude Desktop / Claude Code / Cursor: mcpServers; VS Code: servers.
        servers = config.get("mcpServers") or config.get("servers") or {}
        entry = servers[args.stdio_server]
        command, argv, env = entry["command"], entry.get("args", []), entry.get("env")
    else:
        command, *argv = json.loads(args.stdio_command)
        env = None
    # The SDK passes only a few variables by default (HOME, PATH, ...): add what was asked.
    if args.stdio_env:
        from mcp.client.stdio import get_default_environment

        env = {**get_default_environment(), **(env or {}), **dict(args.stdio_env)}
    return StdioServerParameters(command=command, args=argv, env=env)


def sampler(text: str) -> Any:
    """A sampling callback: prints {"sampling": <the request's first text>} and answers `text`."""
    from mcp import types

    async def sample(context: Any, params: types.CreateMessageRequestParams) -> Any:
        first = params.messages[0].content if params.messages else None
        emit({"sampling": getattr(first, "text", None)})
        return types.CreateMessageResult(
            role="assistant", content=types.TextContent(type="text", text=text), model="guard-test"
        )

    return sample


async def list_all(session: ClientSession) -> None:
    names: list[str] = []
    descriptions: dict[str, str | None] = {}
    cursor: str | None = None
    pages = 0
    seen: set[str] = set()
    while True:
        try:
            page = await session.list_tools(cursor=cursor)
        except McpError as e:
            emit({"tools": None, "error": error_dict(e)})
            return
        pages += 1
        for t in page.tools:
            names.append(t.name)
            descriptions[t.name] = t.description
        cursor = page.nextCursor
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "url", help="MCP endpoint: .../mcp (streamable-http) or .../sse (sse), or stdio"
    )
    p.add_argument("--stdio-command", help="with URL stdio: the server's command, a JSON array")
    p.add_argument("--stdio-config", help="with URL stdio: an agent's MCP config file ...")
    p.add_argument("--stdio-server", help="... and the name of the server entry in it")
    p.add_argument(
        "--stdio-env",
        action="append",
        default=[],
        type=lambda s: tuple(s.split("=", 1)),
        help="with URL stdio: K=V for the server's environment",
    )
    p.add_argument("--transport", choices=["streamable-http", "sse"], default="streamable-http")
    p.add_argument("--list", nargs=0, action=Steps, help="list every tool (all pages)")
    p.add_argument(
        "--call", nargs=2, action=Steps, metavar=("TOOL", "JSON_ARGS"), help="call a tool"
    )
    p.add_argument("--ca", help="trust this CA certificate (PEM) for https")
    p.add_argument(
        "--timeout", type=float, default=30.0, help="seconds for each request and the whole run"
    )
    p.add_argument(
        "--header",
        dest="headers",
        action="append",
        default=[],
        type=lambda s: tuple(x.strip() for x in s.split(":", 1)),
        help="extra HTTP header 'Name: value' on every request",
    )
    p.add_argument(
        "--skip-output-validation",
        action="store_true",
        help="do not let the SDK send its own tools/list after a call to validate the output",
    )
    p.add_argument("--print-init", action="store_true", help="print the initialize result first")
    p.add_argument(
        "--meta", type=json.loads, help="a JSON object sent as params._meta of every tools/call"
    )
    p.add_argument(
        "--sampling",
        metavar="TEXT",
        help="offer sampling: print {\"sampling\": first text} per request, answer TEXT",
    )
    p.set_defaults(steps=[])
    try:
        args = p.parse_args()
    except SystemExit as e:
        return 64 if e.code else 0
    if any(len(h) != 2 for h in args.headers):
        print("mcp_client: --header wants 'Name: value'", file=sys.stderr)
        return 64

    async def bounded() -> None:
        # The whole run is bounded: a proxy that swallows a request must not hang a test.
        steps = max(1, len(args.steps))
        await asyncio.wait_for(run(args), timeout=args.timeout * (steps + 2))

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
