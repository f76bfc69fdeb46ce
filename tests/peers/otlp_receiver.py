#!/usr/bin/env python3
"""An OTLP receiver for guard's integration tests, built on the official `opentelemetry-proto`
package: the collector's TraceService and LogsService over gRPC (grpcio), and OTLP/HTTP
(protobuf bodies on POST /v1/traces and /v1/logs).

    python otlp_receiver.py OUT.jsonl

Listens on 127.0.0.1 (ports chosen by the kernel), prints `READY <grpc port> <http port>`, then
appends one JSON line per span or log record received to OUT.jsonl:

    {"signal": "span", "via": "grpc"|"http", "name", "kind", "trace_id", "span_id",
     "parent_span_id", "status": {"code", "message"}, "start", "end" (ns),
     "attributes": {...}, "resource": {...}, "scope": NAME}
    {"signal": "log", "via", "body", "event_name", "severity", "trace_id", "span_id",
     "attributes": {...}, "resource": {...}, "scope": NAME}

Runs until killed.
"""

from __future__ import annotations

import json
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

LOCK = threading.Lock()
OUT: Any = None


def value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind)


def attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: value(kv.value) for kv in kvs}


def write(lines: list[dict[str, Any]]) -> None:
    with LOCK:
        for line in lines:
            OUT.write(json.dumps(line, separators=(",", ":")) + "\n")
        OUT.flush()


def spans(req: Any, via: str) -> None:
    out = []
    for rs in req.resource_spans:
        resource = attrs(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(
                    {
                        "signal": "span",
                        "via": via,
                        "name": s.name,
                        "kind": s.kind,
                        "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(),
                        "parent_span_id": s.parent_span_id.hex(),
                        "status": {"code": s.status.code, "message": s.status.message},
                        "start": s.start_time_unix_nano,
                        "end": s.end_time_unix_nano,
                        "attributes": attrs(s.attributes),
                        "resource": resource,
                        "scope": ss.scope.name,
                    }
                )
    write(out)


def logs(req: Any, via: str) -> None:
    out = []
    for rl in req.resource_logs:
        resource = attrs(rl.resource.attributes)
        for sl in rl.scope_logs:
            for r in sl.log_records:
                out.append(
                    {
                        "signal": "log",
                        "via": via,
                        "body": value(r.body),
                        "event_name": r.event_name,
                        "severity": r.severity_text,
                        "trace_id": r.trace_id.hex(),
                        "span_id": r.span_id.hex(),
                        "attributes": attrs(r.attributes),
                        "resource": resource,
                        "scope": sl.scope.name,
                    }
                )
    write(out)


class Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 - the proto's name
        spans(request, "grpc")
        return trace_service_pb2.ExportTraceServiceResponse()


class Logs(logs_service_pb2_grpc.LogsServiceServicer):
    def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 - the proto's name
        logs(request, "grpc")
        return logs_service_pb2.ExportLogsServiceResponse()


class Http(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.headers.get("Content-Type") != "application/x-protobuf":
            self.send_error(415, "application/x-protobuf only")
            return
        if self.path == "/v1/traces":
            req = trace_service_pb2.ExportTraceServiceRequest()
            req.ParseFromString(body)
            spans(req, "http")
            answer = trace_service_pb2.ExportTraceServiceResponse()
        elif self.path == "/v1/logs":
            req = logs_service_pb2.ExportLogsServiceRequest()
            req.ParseFromString(body)
            logs(req, "http")
            answer = logs_service_pb2.ExportLogsServiceResponse()
        else:
            self.send_error(404)
            return
        data = answer.SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


def main() -> int:
    global OUT
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 64
    OUT = open(sys.argv[1], "a", encoding="utf-8")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), server)
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(), server)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    http = ThreadingHTTPServer(("127.0.0.1", 0), Http)
    print(f"READY {grpc_port} {http.server_address[1]}", flush=True)
    http.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
