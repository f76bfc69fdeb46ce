//! The ClientHello reader: never panics; a hello read from a prefix is the hello of the whole.
#![no_main]
use guard::proxy::tls::hello::parse_client_hello;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = parse_client_hello(data);
    if let Ok(Some(h)) = &whole {
        assert!(h.sni.as_deref().is_none_or(|s| !s.is_empty()));
    }
    for i in (0..data.len()).step_by(7) {
        if let Ok(Some(h)) = parse_client_hello(&data[..i]) {
            assert_eq!(whole, Ok(Some(h)), "prefix of {i} bytes");
        }
    }
});
