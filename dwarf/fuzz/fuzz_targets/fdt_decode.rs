//! The FDT decoder must return `Ok` or `Err` on any bytes, never panic, and a
//! table it accepts must survive a re-encode/decode round trip unchanged.
//! Run: `cd dwarf/fuzz && cargo +nightly fuzz run fdt_decode`
#![no_main]

use libfuzzer_sys::fuzz_target;
use upstare_dwarf::fdt;

fuzz_target!(|data: &[u8]| {
    // Let the fuzzer reach the payload: prefix a valid header to half the inputs.
    let mut framed;
    let input = if data.first().is_some_and(|b| b & 1 == 1) {
        framed = Vec::with_capacity(data.len() + 16);
        framed.extend_from_slice(fdt::MAGIC);
        framed.extend_from_slice(&fdt::VERSION.to_le_bytes());
        framed.extend_from_slice(&[0, 0]);
        framed.extend_from_slice(&((data.len() - 1) as u32).to_le_bytes());
        framed.extend_from_slice(&data[1..]);
        &framed[..]
    } else {
        data
    };
    if let Ok(tables) = fdt::decode(input) {
        let again = fdt::encode(&tables).expect("a decoded table re-encodes");
        assert_eq!(fdt::decode(&again).expect("re-decodes"), tables);
    }
});
