//! The SSE parser: however a stream is cut into chunks, the same events come out, and together
//! with what is left at the end they are the stream byte for byte.
#![no_main]
use guard::mcp::sse::SseParser;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let cut = usize::from(cut).max(1);
    let run = |step: usize| {
        let mut p = SseParser::new(1 << 16);
        let mut events = Vec::new();
        for chunk in stream.chunks(step) {
            match p.push(chunk) {
                Ok(evs) => events.extend(evs),
                Err(_) => return None,
            }
        }
        let mut bytes: Vec<u8> = events.iter().flat_map(|e| e.raw.to_vec()).collect();
        bytes.extend_from_slice(&p.rest());
        Some((events, bytes))
    };
    let (Some((a, bytes)), Some((b, _))) = (run(cut), run(stream.len().max(1))) else {
        return;
    };
    assert_eq!(bytes, stream, "lossless");
    assert_eq!(a, b, "the same events whatever the chunks");
});
