//! The request decoder on arbitrary input: the first byte picks the kind and the content type,
//! the rest is the body. Any answer but an object or a 4xx Status is a bug (and so is a panic).
#![no_main]

use berth_apiserver::decode::{FieldValidation, decode_object};
use libfuzzer_sys::fuzz_target;

const CONTENT_TYPES: [Option<&str>; 4] = [
    None,
    Some("application/json"),
    Some("application/yaml"),
    Some("text/plain"),
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let resources = berth_api::resources::RESOURCES;
    let res = &resources[usize::from(selector) % resources.len()];
    let ct = CONTENT_TYPES[usize::from(selector >> 4) % CONTENT_TYPES.len()];
    let validation = if selector & 0x80 != 0 {
        FieldValidation::Strict
    } else {
        FieldValidation::Warn
    };
    if let Err(e) = decode_object(res, ct, body, validation) {
        let code = e.code_reason().0;
        assert!((400..500).contains(&code), "{code}: {e}");
    }
});
