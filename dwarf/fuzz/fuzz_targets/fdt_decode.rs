//! The FDT decoder must return `Ok` or `Err` on any bytes, never panic, and a
//! table it accepts must survive a re-encode/decode round trip unchanged.
//! Run: `cd dwarf/fuzz && cargo +nightly fuzz run fdt_decode`
#![no_main]

use libfuzzer_sys::fuzz_target;
use upstare_dwarf::fdt;

fuzz_target!(|data: &[u8]| {
    // A whole section almost never passes the checksum: half the inputs go
    // to the payload decoder behind it.
    if data.first().is_some_and(|b| b & 1 == 1) {
        if let Ok(tables) = fdt::decode_payload(&data[1..]) {
            let again = fdt::encode(&tables, &[0; 32]).expect("a decoded table re-encodes");
            assert_eq!(fdt::decode(&again).expect("re-decodes").tables, tables);
        }
    } else if let Ok(section) = fdt::decode(data) {
        let again = fdt::encode(&section.tables, &section.code_digest).expect("re-encodes");
        assert_eq!(fdt::decode(&again).expect("re-decodes"), section);
    }
});
