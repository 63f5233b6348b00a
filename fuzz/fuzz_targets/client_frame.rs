#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| muxgate_fuzz::client_frame(data));
