//! The request-line classifier: never panics, and a verdict on a prefix is the verdict on the
//! whole (bytes arriving later never change what a connection was taken for).
#![no_main]
use guard::proxy::classify::classify;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = classify(data);
    for i in 0..data.len() {
        if let Some(k) = classify(&data[..i]) {
            assert_eq!(whole, Some(k), "prefix of {i} bytes");
        }
    }
});
