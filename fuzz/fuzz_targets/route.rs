//! Request targets and identifications: parsing never panics, and what it accepts is canonical.
//!
//! Run for five minutes from the repository root:
//!
//! ```sh
//! mkdir -p fuzz/corpus/route
//! cargo +nightly fuzz run route fuzz/corpus/route fuzz/seeds/route -- -max_total_time=300
//! ```

#![no_main]

use libfuzzer_sys::fuzz_target;
use miralix_gateway::fuzzing::{
    self as route, IdType, MAX_IDENTIFICATION_BYTES, Route, Subject, forbidden,
};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (path, query) = match text.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (text, None),
    };
    // An agent's recordings request names its agent canonically: sent again, it names the
    // same one.
    if let Ok(Route::List(request)) = route::parse(path, query)
        && let Subject::Agent {
            id_type,
            identification,
        } = &request.query.subject
    {
        let again = format!(
            "/mot/{}/agents/{}/{}/recordings",
            utf8_percent_encode(&request.account, NON_ALPHANUMERIC),
            id_type.as_str(),
            utf8_percent_encode(identification, NON_ALPHANUMERIC),
        );
        // Encoding every byte may take the path over the cap a client's spelling fit in.
        if again.len() > route::MAX_PATH_BYTES {
            return;
        }
        match route::parse(&again, None) {
            Ok(Route::List(reparsed)) => {
                assert_eq!(reparsed.account, request.account);
                assert_eq!(reparsed.query.subject, request.query.subject);
            }
            other => panic!("{again} from {text:?} parsed as {other:?}"),
        }
    }
    let _ = route::parse_cache_target(path);
    // Every type: total, idempotent, and only allowed characters out.
    for id_type in IdType::ALL {
        if let Ok(out) = id_type.normalize(text) {
            assert!(
                !out.is_empty() && out.len() <= MAX_IDENTIFICATION_BYTES,
                "{out:?}"
            );
            assert!(
                !out.chars().any(|c| forbidden(c) || c.is_whitespace()),
                "{id_type} {text:?} -> {out:?}"
            );
            assert_eq!(
                id_type.normalize(&out),
                Ok(out.clone()),
                "{id_type} {text:?}"
            );
        }
    }
});
