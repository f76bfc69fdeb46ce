//! Bodies and the answers guard writes itself: reading a body up to a limit, streaming the rest,
//! JSON / text / SSE responses, and the header and content-type checks the adapter needs.

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::Value;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

pub(super) enum Read {
    Whole(Bytes),
    /// More than the limit: what was read, and the rest of the body still unread.
    Over {
        prefix: Bytes,
        rest: Body,
    },
    Failed(String),
}

/// Reads a body up to `max` bytes, keeping the rest unread when it is longer. Hand-rolled rather
/// than `Limited`: its boxed-error bound defeats the Send check of the spawned task.
pub(super) async fn read_up_to(mut body: Body, max: usize) -> Read {
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => return Read::Failed(e.to_string()),
        };
        if let Ok(data) = frame.into_data() {
            buf.extend_from_slice(&data);
            if buf.len() > max {
                return Read::Over {
                    prefix: buf.freeze(),
                    rest: body,
                };
            }
        }
    }
    Read::Whole(buf.freeze())
}

/// `prefix` followed by the rest of `body`, streamed.
pub(super) fn chain(prefix: Bytes, body: Body) -> Body {
    use futures_util::StreamExt as _;
    let head = futures_util::stream::once(async move { Ok::<_, BoxError>(Frame::data(prefix)) });
    let tail =
        futures_util::stream::unfold(body, |mut b| async move { b.frame().await.map(|f| (f, b)) });
    BodyExt::boxed(StreamBody::new(head.chain(tail)))
}

pub(super) fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

pub(super) fn boxed(b: Incoming) -> Body {
    b.map_err(|e| Box::new(e) as BoxError).boxed()
}

pub(super) fn text_response(status: StatusCode, text: String) -> Response<Body> {
    let mut r = Response::new(full(text));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

pub(super) fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    let mut r = Response::new(full(serde_json::to_vec(v).unwrap_or_default()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// One answer event on a stream (for clients that only accept `text/event-stream`).
pub(super) fn sse_response(messages: &[Value]) -> Response<Body> {
    let mut out = String::new();
    for m in messages {
        out.push_str("event: message\ndata: ");
        out.push_str(&m.to_string());
        out.push_str("\n\n");
    }
    let mut r = Response::new(full(out));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    r
}

/// What an answer's `Content-Type` makes of it, read the way MCP clients read it: the
/// TypeScript SDK takes any value that contains `application/json` (or `text/event-stream`),
/// the Python SDK any that starts with it, lower-cased.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AnswerType {
    Json,
    Sse,
    /// Both: clients disagree on which it is.
    Ambiguous,
    /// Neither (or none): no MCP client reads it as an answer.
    Other,
}

pub(super) fn answer_type(headers: &HeaderMap) -> AnswerType {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).to_ascii_lowercase())
    else {
        return AnswerType::Other;
    };
    let essence = ct.split(';').next().unwrap_or("").trim();
    let json = ct.contains("application/json") || essence.ends_with("+json");
    let sse = ct.contains("text/event-stream");
    match (json, sse) {
        (true, true) => AnswerType::Ambiguous,
        (true, false) => AnswerType::Json,
        (false, true) => AnswerType::Sse,
        (false, false) => AnswerType::Other,
    }
}

/// Whether a response says it has no body (`Content-Length: 0`, or an ended stream).
pub(super) fn is_empty_body(resp: &Response<Body>) -> bool {
    use hyper::body::Body as _;
    resp.body().is_end_stream() || resp.body().size_hint().exact() == Some(0)
}

pub(super) fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// `session_id` (legacy HTTP+SSE) from a request path's query.
pub(super) fn query_session(uri: &http::Uri) -> Option<String> {
    uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == "session_id" || k == "sessionId").then(|| v.to_string())
    })
}
