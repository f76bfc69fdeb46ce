//! An incremental Server-Sent Events parser: streams are inspected event by event as they pass,
//! never buffered whole.

use bytes::{Bytes, BytesMut};

/// One event of a `text/event-stream`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SseEvent {
    /// The event exactly as it arrived, blank-line terminator included.
    pub raw: Bytes,
    pub event: Option<String>,
    pub data: Option<String>,
    pub id: Option<String>,
}

impl SseEvent {
    /// Re-encodes the event with new `data`, keeping its `event` and `id` fields.
    pub fn with_data(&self, data: &str) -> Bytes {
        let mut out = String::new();
        if let Some(id) = &self.id {
            out.push_str(&format!("id: {id}\n"));
        }
        if let Some(e) = &self.event {
            out.push_str(&format!("event: {e}\n"));
        }
        for line in data.split('\n') {
            out.push_str(&format!("data: {line}\n"));
        }
        out.push('\n');
        Bytes::from(out)
    }
}

/// Splits a byte stream into SSE events as they complete (CRLF, LF or CR line ends).
#[derive(Default)]
pub struct SseParser {
    buf: BytesMut,
    max: usize,
}

impl SseParser {
    /// `max`: the largest event held while incomplete (beyond it the stream is refused).
    pub fn new(max: usize) -> Self {
        SseParser {
            buf: BytesMut::new(),
            max,
        }
    }

    /// Feeds bytes; returns the events completed by them. Err when an event outgrows `max`.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<SseEvent>, usize> {
        self.buf.extend_from_slice(chunk);
        let mut events = Vec::new();
        while let Some(end) = event_end(&self.buf) {
            let raw = self.buf.split_to(end).freeze();
            events.push(parse_event(raw));
        }
        if self.buf.len() > self.max {
            return Err(self.buf.len());
        }
        Ok(events)
    }

    /// Bytes of an incomplete event left at the end of the stream.
    pub fn rest(&mut self) -> Bytes {
        self.buf.split().freeze()
    }
}

/// Index just past the blank line that ends the first complete event.
fn event_end(b: &[u8]) -> Option<usize> {
    let mut i = 0;
    let mut line_start = true;
    while i < b.len() {
        match b[i] {
            b'\n' | b'\r' => {
                let len = if b[i] == b'\r' && b.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                if b[i] == b'\r' && i + 1 == b.len() {
                    // A CR at the very end may be the first half of CRLF: wait.
                    return None;
                }
                if line_start {
                    return Some(i + len);
                }
                line_start = true;
                i += len;
            }
            _ => {
                line_start = false;
                i += 1;
            }
        }
    }
    None
}

fn parse_event(raw: Bytes) -> SseEvent {
    let text = String::from_utf8_lossy(&raw).into_owned();
    let mut ev = SseEvent {
        raw,
        ..Default::default()
    };
    let mut data: Vec<&str> = Vec::new();
    for line in text.split(['\n', '\r']) {
        if line.is_empty() || line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "data" => data.push(value),
            "event" => ev.event = Some(value.to_string()),
            "id" => ev.id = Some(value.to_string()),
            _ => {}
        }
    }
    if !data.is_empty() {
        ev.data = Some(data.join("\n"));
    }
    ev
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_split_across_chunks_and_line_endings() {
        let mut p = SseParser::new(1 << 20);
        assert!(p.push(b"event: message\nda").unwrap().is_empty());
        let evs = p
            .push(b"ta: {\"a\":1}\n\nid: 5\r\ndata: x\r\ndata: y\r\n\r\n: comment\n\n")
            .unwrap();
        assert_eq!(evs.len(), 3);
        assert_eq!(evs[0].event.as_deref(), Some("message"));
        assert_eq!(evs[0].data.as_deref(), Some("{\"a\":1}"));
        assert_eq!(&evs[0].raw[..], b"event: message\ndata: {\"a\":1}\n\n");
        assert_eq!(evs[1].id.as_deref(), Some("5"));
        assert_eq!(evs[1].data.as_deref(), Some("x\ny"));
        assert_eq!(evs[2].data, None);
        // A CR at a chunk boundary is not taken for a blank line.
        let mut p = SseParser::new(1 << 20);
        assert!(p.push(b"data: z\r\n\r").unwrap().is_empty());
        assert_eq!(p.push(b"\n").unwrap().len(), 1);
        assert!(p.rest().is_empty());
    }

    #[test]
    fn sse_events_are_bounded() {
        let mut p = SseParser::new(8);
        assert!(p.push(b"data: 0123456789").is_err());
    }

    #[test]
    fn sse_reencoding_keeps_fields() {
        let ev = SseEvent {
            event: Some("message".into()),
            id: Some("9".into()),
            data: Some("old".into()),
            ..Default::default()
        };
        assert_eq!(
            &ev.with_data("{}")[..],
            b"id: 9\nevent: message\ndata: {}\n\n"
        );
    }
}
