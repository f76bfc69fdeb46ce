//! `[otel]`: OTLP export (gRPC or HTTP) of what guard decides. Every audit record becomes one
//! log record (the audit line itself as the body, its fields as attributes, `prev` included, so
//! the chain can be checked from the SIEM too) and every decided MCP request one span, named
//! and attributed per the OpenTelemetry MCP semantic conventions, joined to the client's trace
//! when it sent a `traceparent`.
//!
//! The decision path only queues: the audit observer hands the record to a bounded channel
//! (`try_send`: a full queue drops, and counts, the record). One task batches the queue into
//! the exporters; an export that fails counts its records as dropped too. The JSONL audit
//! stays the record of truth.

use std::{
    borrow::Cow,
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result};
use opentelemetry::{
    logs::{AnyValue, LogRecord as _, Logger as _, LoggerProvider as _, Severity},
    trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState},
    InstrumentationScope, KeyValue,
};
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _, WithTonicConfig as _};
use opentelemetry_sdk::{
    logs::{LogBatch, LogExporter as _, SdkLogRecord, SdkLogger, SdkLoggerProvider},
    trace::{
        IdGenerator as _, RandomIdGenerator, SpanData, SpanEvents, SpanExporter as _, SpanLinks,
    },
    Resource,
};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::{
    audit::{Decision, Event, Record},
    config::{OtelProtocol, OtelSection},
};

/// Records exported per request at most.
const MAX_BATCH: usize = 512;
/// Audit-line bytes per batch at most: a request stays well under a collector's 4 MiB message
/// limit (a record is sent about twice: its line as the body, its fields as attributes).
const MAX_BATCH_BYTES: usize = 1 << 20;
/// How long the first record of a batch waits for others (the collector sees a decision
/// within about this, plus the export).
const LINGER: Duration = Duration::from_millis(200);

/// What the decision path queues: the line written (the record is read back from it by the
/// export task, off the decision path) and when.
struct Queued {
    line: Vec<u8>,
    at: SystemTime,
}

/// One audit record to export.
struct Item {
    record: Record,
    line: Vec<u8>,
    at: SystemTime,
}

/// The export's counters, for the metrics and `guard status`.
#[derive(Default)]
pub struct Stats {
    pub logs_exported: AtomicU64,
    pub spans_exported: AtomicU64,
    pub logs_dropped: AtomicU64,
    pub spans_dropped: AtomicU64,
    /// Records queued and not yet exported or dropped.
    pending: AtomicU64,
    /// The last failed export of each signal (cleared by the next that succeeds).
    pub last_error: Mutex<[Option<String>; 2]>,
}

const LOGS: usize = 0;
const SPANS: usize = 1;

impl Stats {
    fn failed(&self, signal: usize, e: impl std::fmt::Display) {
        let what = ["log records", "spans"][signal];
        let msg = format!("exporting {what}: {e}");
        let mut last = self.last_error.lock().unwrap();
        if last[signal].as_deref() != Some(msg.as_str()) {
            tracing::warn!("otel: {msg} (the audit log has these records; counted in guard_otel_dropped_total)");
        }
        last[signal] = Some(msg);
    }

    fn succeeded(&self, signal: usize) {
        self.last_error.lock().unwrap()[signal] = None;
    }

    /// The newest error of either signal.
    fn last_error(&self) -> Option<String> {
        let last = self.last_error.lock().unwrap();
        last[SPANS].clone().or_else(|| last[LOGS].clone())
    }
}

/// The running export: its endpoint and counters.
pub struct Otel {
    pub endpoint: String,
    pub protocol: OtelProtocol,
    pub stats: Arc<Stats>,
    tx: mpsc::Sender<Queued>,
}

impl Otel {
    /// Builds the exporters and starts the export task (on the current runtime); None when
    /// `[otel]` names no endpoint.
    pub fn start(
        cfg: &OtelSection,
        extra_roots: &[std::path::PathBuf],
    ) -> Result<Option<Arc<Otel>>> {
        if cfg.endpoint.is_empty() {
            return Ok(None);
        }
        let tls = Arc::new(crate::proxy::tls::upstream_config(extra_roots)?);
        let timeout = Duration::from_secs(cfg.timeout_s);
        let (spans, logs) = match cfg.protocol {
            OtelProtocol::Grpc => grpc_exporters(cfg, timeout, extra_roots)?,
            OtelProtocol::Http => http_exporters(cfg, timeout, tls)?,
        };
        let resource = resource(cfg);
        let stats = Arc::new(Stats::default());
        let (tx, rx) = mpsc::channel(cfg.queue.max(1));
        tokio::spawn(run(rx, spans, logs, resource, stats.clone(), timeout));
        tracing::info!(
            "otel: exporting decisions to {} over {}",
            cfg.endpoint,
            cfg.protocol.as_str()
        );
        Ok(Some(Arc::new(Otel {
            endpoint: cfg.endpoint.clone(),
            protocol: cfg.protocol,
            stats,
            tx,
        })))
    }

    /// Waits (at most `limit`) until what is queued has been exported or dropped.
    pub async fn flush(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.stats.pending.load(Ordering::Relaxed) > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What `guard status` shows.
    pub fn status(&self) -> serde_json::Value {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let s = &self.stats;
        serde_json::json!({
            "endpoint": self.endpoint,
            "protocol": self.protocol.as_str(),
            "exported": { "logs": n(&s.logs_exported), "spans": n(&s.spans_exported) },
            "dropped": { "logs": n(&s.logs_dropped), "spans": n(&s.spans_dropped) },
            "last_error": s.last_error(),
        })
    }

    /// Queues `record` (called by the audit log with every record written): never waits; a
    /// full queue drops it, counted.
    pub fn queue(&self, record: &Record, line: &[u8]) {
        let item = Queued {
            line: line.to_vec(),
            at: SystemTime::now(),
        };
        let span = is_span(record.event);
        self.stats.pending.fetch_add(1, Ordering::Relaxed);
        if self.tx.try_send(item).is_err() {
            self.stats.pending.fetch_sub(1, Ordering::Relaxed);
            self.stats.logs_dropped.fetch_add(1, Ordering::Relaxed);
            if span {
                self.stats.spans_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn grpc_exporters(
    cfg: &OtelSection,
    timeout: Duration,
    extra_roots: &[std::path::PathBuf],
) -> Result<(
    opentelemetry_otlp::SpanExporter,
    opentelemetry_otlp::LogExporter,
)> {
    use opentelemetry_otlp::tonic_types::{
        metadata::MetadataMap,
        transport::{Certificate, ClientTlsConfig},
    };
    let metadata = MetadataMap::from_headers(header_map(cfg)?);
    let tls = if cfg.endpoint.starts_with("https://") {
        let mut t = ClientTlsConfig::new().with_native_roots();
        for p in extra_roots {
            let pem = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            t = t.ca_certificate(Certificate::from_pem(pem));
        }
        Some(t)
    } else {
        None
    };
    let spans = {
        let mut b = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(cfg.endpoint.clone())
            .with_timeout(timeout)
            .with_metadata(metadata.clone());
        if let Some(t) = tls.clone() {
            b = b.with_tls_config(t);
        }
        b.build().context("otel: the span exporter")?
    };
    let logs = {
        let mut b = opentelemetry_otlp::LogExporter::builder()
            .with_tonic()
            .with_endpoint(cfg.endpoint.clone())
            .with_timeout(timeout)
            .with_metadata(metadata);
        if let Some(t) = tls {
            b = b.with_tls_config(t);
        }
        b.build().context("otel: the log exporter")?
    };
    Ok((spans, logs))
}

/// `otel.headers` (e.g. the collector's authorization) as HTTP headers / gRPC metadata.
fn header_map(cfg: &OtelSection) -> Result<http::HeaderMap> {
    let mut h = http::HeaderMap::new();
    for (k, v) in &cfg.headers {
        let name = http::HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes())
            .map_err(|_| anyhow::anyhow!("otel.headers: {k:?} is not a header name"))?;
        let value = http::HeaderValue::from_str(v)
            .map_err(|_| anyhow::anyhow!("otel.headers.{k}: not a valid header value"))?;
        h.insert(name, value);
    }
    Ok(h)
}

fn http_exporters(
    cfg: &OtelSection,
    timeout: Duration,
    tls: Arc<rustls::ClientConfig>,
) -> Result<(
    opentelemetry_otlp::SpanExporter,
    opentelemetry_otlp::LogExporter,
)> {
    // As OTEL_EXPORTER_OTLP_ENDPOINT: the base URL, each signal under its own path.
    let base = cfg.endpoint.trim_end_matches('/');
    header_map(cfg)?;
    let headers: HashMap<String, String> = cfg.headers.clone().into_iter().collect();
    let client = Arc::new(Client { tls, timeout });
    let spans = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(format!("{base}/v1/traces"))
        .with_timeout(timeout)
        .with_headers(headers.clone())
        .with_shared_http_client(client.clone())
        .build()
        .context("otel: the span exporter")?;
    let logs = opentelemetry_otlp::LogExporter::builder()
        .with_http()
        .with_endpoint(format!("{base}/v1/logs"))
        .with_timeout(timeout)
        .with_headers(headers)
        .with_shared_http_client(client)
        .build()
        .context("otel: the log exporter")?;
    Ok((spans, logs))
}

/// OTLP/HTTP through the daemon's own client (HTTPS verified against the upstream roots and
/// `tls.extra_roots`, as the policy source and webhooks are).
#[derive(Debug)]
struct Client {
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for Client {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let (parts, body) = request.into_parts();
        let headers: Vec<(http::HeaderName, String)> = parts
            .headers
            .iter()
            .filter(|(k, _)| *k != http::header::HOST && *k != http::header::CONTENT_LENGTH)
            .filter_map(|(k, v)| Some((k.clone(), v.to_str().ok()?.to_string())))
            .collect();
        let a = super::outbound::request(
            parts.method,
            &parts.uri.to_string(),
            &headers,
            body,
            self.tls.clone(),
            self.timeout,
            64 * 1024,
        )
        .await?;
        let mut resp = http::Response::new(a.body);
        *resp.status_mut() = a.status;
        *resp.headers_mut() = a.headers;
        Ok(resp)
    }
}

/// guard on this host: the resource every span and log record is of (agents are attributes:
/// one guard serves many).
fn resource(cfg: &OtelSection) -> Resource {
    let host = nix::sys::utsname::uname()
        .ok()
        .and_then(|u| u.nodename().to_str().map(str::to_string))
        .unwrap_or_default();
    let mut attrs = vec![
        KeyValue::new("service.name", "guard"),
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        KeyValue::new("host.name", host),
    ];
    for (k, v) in &cfg.resource {
        attrs.push(KeyValue::new(k.clone(), v.clone()));
    }
    Resource::builder_empty().with_attributes(attrs).build()
}

/// `f` within `limit` (the exporters keep their own limit; this one holds whatever they do).
async fn bounded(
    limit: Duration,
    f: impl std::future::Future<Output = opentelemetry_sdk::error::OTelSdkResult>,
) -> opentelemetry_sdk::error::OTelSdkResult {
    tokio::time::timeout(limit, f).await.unwrap_or_else(|_| {
        Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(
            "no answer within otel.timeout_s".into(),
        ))
    })
}

/// The records that are decided MCP requests (one span each).
fn is_span(e: Event) -> bool {
    matches!(e, Event::ToolCall | Event::ToolsList | Event::McpRequest)
}

async fn run(
    mut rx: mpsc::Receiver<Queued>,
    mut spans: opentelemetry_otlp::SpanExporter,
    mut logs: opentelemetry_otlp::LogExporter,
    resource: Resource,
    stats: Arc<Stats>,
    timeout: Duration,
) {
    // The exporters keep their own time limit; this one holds whatever they do.
    let limit = timeout + Duration::from_secs(1);
    spans.set_resource(&resource);
    logs.set_resource(&resource);
    // Only to make log records (SdkLogRecord has no public constructor): no processor.
    let provider = SdkLoggerProvider::builder().build();
    let scope = InstrumentationScope::builder("guard")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build();
    let logger = provider.logger_with_scope(scope.clone());
    let ids = RandomIdGenerator::default();
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        match rx.recv().await {
            Some(i) => batch.push(i),
            None => return,
        }
        tokio::time::sleep(LINGER).await;
        let mut bytes = batch[0].line.len();
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(i) => {
                    bytes += i.line.len();
                    batch.push(i);
                }
                Err(_) => break,
            }
        }
        let mut span_data = Vec::new();
        let mut records = Vec::with_capacity(batch.len());
        for q in batch.drain(..) {
            // The line is guard's own serialization of a Record (plus `prev`): it reads back.
            let Ok(record) = serde_json::from_slice::<Record>(&q.line) else {
                stats.logs_dropped.fetch_add(1, Ordering::Relaxed);
                stats.pending.fetch_sub(1, Ordering::Relaxed);
                continue;
            };
            let item = Item {
                record,
                line: q.line,
                at: q.at,
            };
            let span = is_span(item.record.event).then(|| span_of(&item, &ids, &scope));
            records.push(log_of(
                &logger,
                &item,
                span.as_ref().map(|s| &s.span_context),
            ));
            span_data.extend(span);
        }
        let n_spans = span_data.len() as u64;
        let refs: Vec<(&SdkLogRecord, &InstrumentationScope)> =
            records.iter().map(|r| (r, &scope)).collect();
        let n_logs = refs.len() as u64;
        // Both at once: a stalled collector costs one time limit per batch, not two.
        let (sent_spans, sent_logs) = tokio::join!(
            async {
                if n_spans == 0 {
                    return Ok(());
                }
                bounded(limit, spans.export(span_data)).await
            },
            bounded(limit, logs.export(LogBatch::new(&refs)))
        );
        for (signal, sent, n, exported, dropped) in [
            (
                SPANS,
                sent_spans,
                n_spans,
                &stats.spans_exported,
                &stats.spans_dropped,
            ),
            (
                LOGS,
                sent_logs,
                n_logs,
                &stats.logs_exported,
                &stats.logs_dropped,
            ),
        ] {
            match sent {
                Ok(()) if n > 0 => {
                    exported.fetch_add(n, Ordering::Relaxed);
                    stats.succeeded(signal);
                }
                Ok(()) => {}
                Err(e) => {
                    stats.failed(signal, e);
                    dropped.fetch_add(n, Ordering::Relaxed);
                }
            }
        }
        stats.pending.fetch_sub(n_logs, Ordering::Relaxed);
    }
}

/// The client's trace context, from a validated `traceparent`.
fn parent_of(tp: &str) -> Option<(TraceId, SpanId, TraceFlags)> {
    let (t, p, f) = crate::audit::parse_traceparent(tp)?;
    Some((TraceId::from(t), SpanId::from(p), TraceFlags::new(f)))
}

/// A refusal, for span status and log severity.
fn refused(d: Decision) -> bool {
    matches!(
        d,
        Decision::Deny
            | Decision::RateLimited
            | Decision::ToolChanged
            | Decision::ApprovalDenied
            | Decision::ApprovalTimeout
            | Decision::Block
            | Decision::Error
            | Decision::Denied
            | Decision::Timeout
            | Decision::Rejected
    )
}

/// The span of a decided request: `{mcp.method.name} {target}`, SERVER (guard answers the
/// agent), from when the request arrived to when its decision was written.
fn span_of(item: &Item, ids: &RandomIdGenerator, scope: &InstrumentationScope) -> SpanData {
    let r = &item.record;
    let method = r.method.clone().unwrap_or_default();
    let parent = r.traceparent.as_deref().and_then(parent_of);
    let (trace_id, parent_id, flags) = match parent {
        Some((t, p, f)) => (t, p, f),
        None => (ids.new_trace_id(), SpanId::INVALID, TraceFlags::SAMPLED),
    };
    // Every decision is exported (a security record, not a sample): sampled whatever the
    // client's flag said.
    let span_context = SpanContext::new(
        trace_id,
        ids.new_span_id(),
        flags.with_sampled(true),
        false,
        TraceState::default(),
    );
    let is_tool = method == "tools/call";
    // The tool or prompt named (not a resource URI: unbounded, the conventions leave it out),
    // clipped and of visible characters only: names chosen by an agent must not flood a
    // backend with span names.
    let target = r
        .tool
        .as_deref()
        .filter(|_| matches!(method.as_str(), "tools/call" | "prompts/get"))
        .filter(|t| t.len() <= 64 && t.chars().all(|c| c.is_ascii_graphic()));
    let name = match target {
        Some(t) => format!("{method} {t}"),
        None if method.is_empty() => r.event.as_str().to_string(),
        None => method.clone(),
    };
    let mut a = Vec::with_capacity(24);
    let mut s = |k: &'static str, v: Option<&str>| {
        if let Some(v) = v {
            a.push(KeyValue::new(k, v.to_string()));
        }
    };
    s("mcp.method.name", r.method.as_deref());
    s("mcp.session.id", r.session_id.as_deref());
    s("mcp.protocol.version", r.protocol_version.as_deref());
    s(
        "network.transport",
        r.transport.as_deref().map(|t| match t {
            "stdio" => "pipe",
            _ => "tcp",
        }),
    );
    if is_tool {
        s("gen_ai.tool.name", r.tool.as_deref());
        s("gen_ai.operation.name", Some("execute_tool"));
    } else if method == "prompts/get" {
        s("gen_ai.prompt.name", r.tool.as_deref());
    } else if method == "resources/read" {
        s("mcp.resource.uri", r.tool.as_deref());
    }
    s("guard.decision", Some(r.decision.as_str()));
    s("guard.rule", r.rule.as_deref());
    s("guard.reason", r.reason.as_deref());
    s("guard.audit.id", Some(&r.id));
    s("guard.policy.sha256", r.policy.as_deref());
    s("guard.event", Some(r.event.as_str()));
    s("guard.args.sha256", r.args_sha256.as_deref());
    if let Some(srv) = &r.server {
        s("guard.server", srv.name.as_deref());
        s("server.address", Some(&srv.host));
        s("guard.server.command", srv.command.as_deref());
    }
    if let Some(ag) = &r.agent {
        s("guard.agent.name", ag.name.as_deref());
        s("guard.agent.comm", Some(&ag.comm));
        s("guard.agent.exe", ag.exe.as_deref());
        s("guard.agent.cgroup", ag.cgroup.as_deref());
    }
    if refused(r.decision) {
        s("error.type", Some(r.decision.as_str()));
    }
    if let Some(id) = r.jsonrpc_id.as_ref().filter(|id| !id.is_null()) {
        let id = match id {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        a.push(KeyValue::new("jsonrpc.request.id", id));
    }
    if let Some(srv) = r.server.as_ref().filter(|s| s.port != 0) {
        a.push(KeyValue::new("server.port", i64::from(srv.port)));
    }
    if let Some(ag) = &r.agent {
        a.push(KeyValue::new("guard.agent.uid", i64::from(ag.uid)));
        a.push(KeyValue::new("guard.agent.pid", i64::from(ag.tgid)));
    }
    let latency = Duration::from_micros(r.latency_us.unwrap_or(0));
    let status = if refused(r.decision) {
        Status::error(
            r.reason
                .clone()
                .unwrap_or_else(|| r.decision.as_str().into()),
        )
    } else {
        Status::Unset
    };
    SpanData {
        span_context,
        parent_span_id: parent_id,
        parent_span_is_remote: parent.is_some(),
        span_kind: SpanKind::Server,
        name: Cow::Owned(name),
        start_time: item.at.checked_sub(latency).unwrap_or(item.at),
        end_time: item.at,
        attributes: a,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status,
        instrumentation_scope: scope.clone(),
    }
}

/// The log record of an audit record: the line as written (so `prev` links it to the one
/// before), its fields as attributes (`agent.uid`, ...), tied to the request's span.
fn log_of(logger: &SdkLogger, item: &Item, span: Option<&SpanContext>) -> SdkLogRecord {
    let r = &item.record;
    let mut rec = logger.create_log_record();
    rec.set_event_name("guard.audit");
    rec.set_timestamp(item.at);
    rec.set_observed_timestamp(item.at);
    let (severity, text) = if refused(r.decision) {
        (Severity::Warn, "WARN")
    } else {
        (Severity::Info, "INFO")
    };
    rec.set_severity_number(severity);
    rec.set_severity_text(text);
    let line = String::from_utf8_lossy(&item.line).into_owned();
    if let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(&line) {
        // `arguments` (audit.log_arguments) stay in the body: unclipped, agent-shaped.
        for (k, v) in fields.into_iter().filter(|(k, _)| k != "arguments") {
            attributes(&mut rec, k, v);
        }
    }
    rec.set_body(AnyValue::String(line.into()));
    if let Some(sc) = span {
        rec.set_trace_context(sc.trace_id(), sc.span_id(), Some(sc.trace_flags()));
    }
    rec
}

/// `v` as attributes named `key` (objects one level down, `key.field`).
fn attributes(rec: &mut SdkLogRecord, key: String, v: Value) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                if let Some(v) = scalar(v) {
                    rec.add_attribute(format!("{key}.{k}"), v);
                }
            }
        }
        v => {
            if let Some(v) = scalar(v) {
                rec.add_attribute(key, v);
            }
        }
    }
}

fn scalar(v: Value) -> Option<AnyValue> {
    Some(match v {
        Value::Null => return None,
        Value::Bool(b) => AnyValue::Boolean(b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => AnyValue::Int(i),
            None => AnyValue::Double(n.as_f64().unwrap_or(0.0)),
        },
        Value::String(s) => AnyValue::String(s.into()),
        other => AnyValue::String(other.to_string().into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{AgentRef, ServerRef};
    use opentelemetry::Value as OtelValue;

    fn item(r: Record) -> Item {
        Item {
            line: serde_json::to_vec(&r).unwrap(),
            record: r,
            at: SystemTime::now(),
        }
    }

    fn attr<'a>(s: &'a SpanData, k: &str) -> Option<&'a OtelValue> {
        s.attributes
            .iter()
            .find(|kv| kv.key.as_str() == k)
            .map(|kv| &kv.value)
    }

    #[test]
    fn traceparents_are_read_strictly() {
        let (t, p, f) =
            parent_of("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(t, TraceId::from(0x4bf92f3577b34da6a3ce929d0e0e4736u128));
        assert_eq!(p, SpanId::from(0x00f067aa0ba902b7u64));
        assert!(f.is_sampled());
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(parent_of(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn a_tool_call_span_follows_the_mcp_conventions_and_joins_the_clients_trace() {
        let mut r = Record::new(Event::ToolCall, Decision::Deny);
        r.id = "rec-1".into();
        r.method = Some("tools/call".into());
        r.tool = Some("delete_file".into());
        r.session_id = Some("s-1".into());
        r.protocol_version = Some("2025-06-18".into());
        r.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00".into());
        r.rule = Some("tools.delete_file".into());
        r.reason = Some("no deleting".into());
        r.latency_us = Some(1500);
        r.transport = Some("streamable_http".into());
        r.jsonrpc_id = Some(serde_json::json!(7));
        r.agent = Some(AgentRef {
            name: Some("bot".into()),
            uid: 1000,
            tgid: 42,
            ..Default::default()
        });
        r.server = Some(ServerRef {
            name: Some("files".into()),
            host: "127.0.0.1".into(),
            port: 8080,
            command: None,
        });
        let it = item(r);
        let scope = InstrumentationScope::builder("guard").build();
        let s = span_of(&it, &RandomIdGenerator::default(), &scope);
        assert_eq!(s.name, "tools/call delete_file");
        assert_eq!(s.span_kind, SpanKind::Server);
        assert_eq!(
            s.span_context.trace_id(),
            TraceId::from(0x4bf92f3577b34da6a3ce929d0e0e4736u128)
        );
        assert_eq!(s.parent_span_id, SpanId::from(0x00f067aa0ba902b7u64));
        assert!(s.parent_span_is_remote);
        assert!(s.span_context.is_sampled());
        assert_eq!(
            s.end_time.duration_since(s.start_time).unwrap(),
            Duration::from_micros(1500)
        );
        for (k, v) in [
            ("mcp.method.name", "tools/call"),
            ("mcp.session.id", "s-1"),
            ("mcp.protocol.version", "2025-06-18"),
            ("gen_ai.tool.name", "delete_file"),
            ("gen_ai.operation.name", "execute_tool"),
            ("guard.decision", "deny"),
            ("guard.rule", "tools.delete_file"),
            ("guard.agent.name", "bot"),
            ("guard.server", "files"),
            ("jsonrpc.request.id", "7"),
            ("error.type", "deny"),
            ("network.transport", "tcp"),
        ] {
            assert_eq!(attr(&s, k), Some(&OtelValue::from(v.to_string())), "{k}");
        }
        assert_eq!(attr(&s, "guard.agent.uid"), Some(&OtelValue::I64(1000)));
        assert_eq!(attr(&s, "server.port"), Some(&OtelValue::I64(8080)));
        assert!(matches!(s.status, Status::Error { .. }));
    }

    #[test]
    fn without_a_traceparent_the_span_is_a_root() {
        let mut r = Record::new(Event::ToolCall, Decision::Allow);
        r.method = Some("tools/call".into());
        r.tool = Some("echo".into());
        r.traceparent = Some("garbage".into());
        let s = span_of(
            &item(r),
            &RandomIdGenerator::default(),
            &InstrumentationScope::builder("guard").build(),
        );
        assert_eq!(s.parent_span_id, SpanId::INVALID);
        assert!(!s.parent_span_is_remote);
        assert_ne!(s.span_context.trace_id(), TraceId::INVALID);
        assert_eq!(s.status, Status::Unset);
        assert!(attr(&s, "error.type").is_none());
    }

    #[test]
    fn a_written_line_reads_back_as_its_record() {
        let mut r = Record::new(Event::ToolCall, Decision::Deny);
        r.tool = Some("rm".into());
        r.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
        let line = crate::audit::chain::chained(&[3; 32], &serde_json::to_vec(&r).unwrap());
        assert_eq!(serde_json::from_slice::<Record>(&line).unwrap(), r);
    }

    #[test]
    fn a_log_record_is_the_audit_line_with_its_fields() {
        let mut r = Record::new(Event::ToolCall, Decision::Allow);
        r.tool = Some("echo".into());
        r.agent = Some(AgentRef {
            uid: 7,
            ..Default::default()
        });
        let body = serde_json::to_vec(&r).unwrap();
        let line = crate::audit::chain::chained(&[1; 32], &body);
        let it = Item {
            record: r,
            line: line.clone(),
            at: SystemTime::now(),
        };
        let provider = SdkLoggerProvider::builder().build();
        let logger = provider.logger("t");
        let rec = log_of(&logger, &it, None);
        assert_eq!(
            rec.body(),
            Some(&AnyValue::String(String::from_utf8(line).unwrap().into()))
        );
        let get = |k: &str| {
            rec.attributes_iter()
                .find(|(key, _)| key.as_str() == k)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(
            get("prev"),
            Some(AnyValue::String(crate::audit::chain::hex(&[1; 32]).into()))
        );
        assert_eq!(get("tool"), Some(AnyValue::String("echo".into())));
        assert_eq!(get("agent.uid"), Some(AnyValue::Int(7)));
        assert_eq!(get("decision"), Some(AnyValue::String("allow".into())));
        assert_eq!(rec.severity_number(), Some(Severity::Info));
    }
}
