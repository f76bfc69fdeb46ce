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
    // Two Content-Type headers: clients join them or take either one.
    if headers.get_all(header::CONTENT_TYPE).iter().count() > 1 {
        return AnswerType::Ambiguous;
    }
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

/// Why a request body might not read to a server as the bytes guard parsed: a `charset` other
/// than UTF-8 (body-parser and the TypeScript SDK's legacy SSE transport decode UTF-7, UTF-16,
/// latin1, ... through iconv-lite; `+AHQ-ools/call` is `tools/call` in UTF-7), a
/// `Content-Encoding` (express.json() inflates gzip and deflate), a `Transfer-Encoding` other
/// than chunked, or two `Content-Type` or `Content-Encoding` headers (servers take either).
pub(super) fn request_encoding(headers: &HeaderMap, body: &[u8]) -> Result<(), String> {
    for name in [header::CONTENT_TYPE, header::CONTENT_ENCODING] {
        if headers.get_all(&name).iter().count() > 1 {
            return Err(format!("more than one {name} header"));
        }
    }
    let lossy = |v: &http::HeaderValue| String::from_utf8_lossy(v.as_bytes()).to_ascii_lowercase();
    // ASCII bytes read the same in every charset that extends ASCII.
    if body.is_ascii() {
        charset(headers, ascii_superset)?;
    } else {
        charset(headers, |_| false)?;
    }
    if let Some(ce) = headers.get(header::CONTENT_ENCODING).map(lossy) {
        if ce.split(',').any(|c| !matches!(c.trim(), "identity" | "")) {
            return Err(format!(
                "the body is encoded (Content-Encoding: {})",
                ce.escape_debug()
            ));
        }
    }
    for te in headers.get_all(header::TRANSFER_ENCODING).iter().map(lossy) {
        if te.split(',').any(|c| c.trim() != "chunked") {
            return Err(format!("Transfer-Encoding `{}`", te.escape_debug()));
        }
    }
    Ok(())
}

/// Refuses a `charset` other than UTF-8 (or one `also_ok` takes) in the `Content-Type`: the
/// bytes guard reads would be other text to whoever decodes them by it (httpx decodes an event
/// stream by it, too).
pub(super) fn charset(headers: &HeaderMap, also_ok: fn(&str) -> bool) -> Result<(), String> {
    let Some(ct) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let ct = String::from_utf8_lossy(ct.as_bytes()).to_ascii_lowercase();
    for param in ct.split(';').skip(1) {
        let (k, v) = param.split_once('=').unwrap_or((param, ""));
        if k.trim() != "charset" {
            continue;
        }
        let v = v.trim().trim_matches('"');
        if v != "utf-8" && v != "utf8" && !also_ok(v) {
            return Err(format!(
                "the body is in charset `{}`, not UTF-8",
                v.escape_debug()
            ));
        }
    }
    Ok(())
}

/// Charsets in which ASCII bytes mean ASCII (UTF-7, UTF-16, EBCDIC and the Asian multi-byte
/// ones are not among them).
pub(super) fn ascii_superset(charset: &str) -> bool {
    matches!(
        charset,
        "us-ascii" | "ascii" | "latin1" | "iso8859-1" | "cp1252"
    ) || charset
        .strip_prefix("iso-8859-")
        .is_some_and(|n| n.parse::<u8>().is_ok())
        || charset
            .strip_prefix("windows-125")
            .is_some_and(|n| n.len() == 1 && n.as_bytes()[0].is_ascii_digit())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn only_plain_utf8_bodies_are_read_as_sent() {
        for ok in [
            &[][..],
            &[("content-type", "application/json")],
            &[("content-type", "application/json; charset=utf-8")],
            &[("content-type", "application/json;Charset=\"UTF-8\"")],
            &[("content-type", "application/json; charset=utf8")],
            &[("content-encoding", "identity")],
            &[("transfer-encoding", "chunked")],
        ] {
            assert_eq!(request_encoding(&headers(ok), b"{}"), Ok(()), "{ok:?}");
        }
        for bad in [
            &[("content-type", "application/json; charset=utf-7")][..],
            &[("content-type", "application/json; charset=\"utf-16le\"")],
            &[("content-type", "text/plain; charset=shift_jis")],
            &[(
                "content-type",
                "application/json; charset=utf-8; charset=utf-7",
            )],
            &[
                ("content-type", "application/json"),
                ("content-type", "application/json; charset=utf-7"),
            ],
            &[("content-encoding", "gzip")],
            &[("content-encoding", "identity, deflate")],
            &[("content-encoding", "identity"), ("content-encoding", "br")],
            &[("transfer-encoding", "gzip, chunked")],
        ] {
            assert!(request_encoding(&headers(bad), b"{}").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ascii_in_a_charset_that_extends_ascii_is_read_as_sent() {
        let latin1 = headers(&[("content-type", "application/json; charset=ISO-8859-1")]);
        assert_eq!(request_encoding(&latin1, br#"{"user":"x"}"#), Ok(()));
        assert!(request_encoding(&latin1, "{\"user\":\"\u{e9}\"}".as_bytes()).is_err());
        let utf7 = headers(&[("content-type", "text/plain; charset=utf-7")]);
        assert!(request_encoding(&utf7, b"+AHsAIg-jsonrpc").is_err());
        assert!(!ascii_superset("utf-7") && !ascii_superset("shift_jis"));
        assert!(ascii_superset("windows-1252") && ascii_superset("iso-8859-15"));
    }

    #[test]
    fn two_content_types_on_an_answer_are_ambiguous() {
        let h = headers(&[
            ("content-type", "application/json"),
            ("content-type", "text/event-stream"),
        ]);
        assert_eq!(answer_type(&h), AnswerType::Ambiguous);
        let h = headers(&[("content-type", "application/json")]);
        assert_eq!(answer_type(&h), AnswerType::Json);
    }
}
