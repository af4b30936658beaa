//! pgoutput_decode: arbitrary bytes as the payload of one XLogData, decoded
//! every way walnats can (stateless inside and outside a stream block, and
//! by the stateful `Decoder` with and without `streaming = parallel`).
//!
//! Checks: nothing panics; an error names a field at an offset inside the
//! message; whatever is accepted encodes back to exactly the input bytes
//! (so decoding those bytes again gives the same message); the stateful
//! decoder accepts nothing the stateless one reads differently, and its
//! stream state moves only on an accepted Stream Start or Stream Stop.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use walnats::pgoutput::{DecodeError, Decoder, Message, decode_message, to_bytes};

fuzz_target!(|data: &[u8]| {
    let data = Bytes::copy_from_slice(data);
    for in_stream in [false, true] {
        let stateless = decode_message(data.clone(), in_stream);
        check(&data, &stateless);
        for parallel in [false, true] {
            let mut d = Decoder::new().parallel_streaming(parallel);
            if in_stream {
                // Stream Start, xid 7, first segment.
                let start = Bytes::from_static(b"S\0\0\0\x07\x01");
                assert!(d.decode(start).is_ok() && d.in_stream());
            }
            let got = d.decode(data.clone());
            check(&data, &got);
            match &got {
                Ok(m) => {
                    assert_eq!(stateless.as_ref(), Ok(m), "stateful and stateless differ");
                    let want = match m {
                        Message::StreamStart(_) => true,
                        Message::StreamStop => false,
                        _ => in_stream,
                    };
                    assert_eq!(d.in_stream(), want, "stream state after {m:?}");
                }
                Err(_) => assert_eq!(d.in_stream(), in_stream, "a failed decode moved the state"),
            }
        }
    }
});

fn check(data: &Bytes, result: &Result<Message, DecodeError>) {
    match result {
        Ok(m) => {
            let again = to_bytes(m).unwrap_or_else(|e| panic!("{e}: {m:?}"));
            assert_eq!(&again, data, "re-encoding {m:?} gives other bytes");
        }
        Err(e) => {
            assert!(e.offset() <= data.len(), "{e}: offset past the end");
            assert!(!e.field().is_empty() && !e.to_string().is_empty());
        }
    }
}
