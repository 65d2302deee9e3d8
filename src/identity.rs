//! Agent identifier normalization.
//!
//! Every spelling of one agent must map to one cache entry, and that canonical form is also what
//! the gateway sends upstream. The functions here are pure: they take the already percent-decoded
//! path segment and return the canonical identification or a [`IdentityError`] that says what was
//! wrong and what is accepted.

use std::fmt;

/// Longest identification accepted, in bytes, for every type. An email address is capped at 254
/// bytes by RFC 5321; the same bound keeps SIP URIs and garbage input small.
pub const MAX_IDENTIFICATION_BYTES: usize = 254;

/// The `{identificationType}` segment of the route, in the API's spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IdType {
    SipUri,
    Id,
    Email,
    SyncId,
}

impl IdType {
    /// Every type, in the order the error messages list them.
    pub const ALL: [IdType; 4] = [IdType::SipUri, IdType::Id, IdType::Email, IdType::SyncId];

    /// Match the route segment case-insensitively (`EMAIL`, `sipuri`, ... are accepted).
    pub fn parse(segment: &str) -> Result<Self, IdentityError> {
        Self::ALL
            .into_iter()
            .find(|t| t.as_str().eq_ignore_ascii_case(segment))
            .ok_or_else(|| IdentityError::UnknownType(truncate_for_message(segment)))
    }

    /// The spelling the Miralix API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            IdType::SipUri => "sipUri",
            IdType::Id => "id",
            IdType::Email => "email",
            IdType::SyncId => "syncId",
        }
    }

    /// Turn a decoded, untrimmed identification into its canonical form for this type.
    pub fn normalize(self, raw: &str) -> Result<String, IdentityError> {
        // Forbidden characters are refused even where trimming would drop them: a CR or LF
        // around an identification is an injection attempt, not a typo.
        if raw.chars().any(forbidden) {
            return Err(IdentityError::ForbiddenCharacter(self));
        }
        let value = raw.trim();
        check_common(self, value)?;
        let canonical = match self {
            IdType::Email => normalize_email(value),
            IdType::SipUri => normalize_sip_uri(value),
            IdType::Id => normalize_id(value),
            IdType::SyncId => normalize_sync_id(value),
        }?;
        // The canonical form may be longer than the input (a `sip:` prefix added, letters
        // whose lowercase takes more bytes): the cap applies to what is stored and sent.
        if canonical.len() > MAX_IDENTIFICATION_BYTES {
            return Err(IdentityError::TooLong(self));
        }
        Ok(canonical)
    }
}

impl fmt::Display for IdType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an identification (or its type) was refused. The `Display` text is sent to the client,
/// so it names what was wrong and what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("unknown identification type \"{0}\": accepted types are sipUri, id, email and syncId")]
    UnknownType(String),
    #[error("the {0} identification is empty")]
    Empty(IdType),
    #[error("the {0} identification is longer than {MAX_IDENTIFICATION_BYTES} bytes")]
    TooLong(IdType),
    #[error(
        "the {0} identification contains a forbidden character ('/', '\\', a control character such as NUL, CR or LF, or an invisible formatting character such as U+200B or U+202E)"
    )]
    ForbiddenCharacter(IdType),
    #[error(
        "invalid email identification: {0}; expected local@domain with exactly one '@', no whitespace and none of \"(),:;<>[]"
    )]
    Email(&'static str),
    #[error(
        "invalid sipUri identification: {0}; expected sip:user@host, sips:user@host, user@host or <sip:user@host>"
    )]
    SipUri(&'static str),
    #[error("invalid id identification: expected decimal digits only (0 to 18446744073709551615)")]
    Id,
    #[error(
        "invalid syncId identification: expected a GUID such as f4fd9e5f-017d-4350-adf8-8dd811bc1a2e (braces and hyphens optional)"
    )]
    SyncId,
}

/// Characters no identification may contain: path separators, controls (a tab is whitespace,
/// trimmed at the ends and refused inside by each type's rules), and the invisible
/// formatting characters (zero-width, bidirectional overrides, soft hyphen, BOM) that make one
/// spelling look like another.
pub fn forbidden(c: char) -> bool {
    matches!(
        c,
        '/' | '\\'
            | '\u{00AD}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{2069}'
            | '\u{FEFF}'
    ) || (c.is_control() && c != '\t')
}

/// Rules every type shares, checked on the trimmed value before the type's own rules.
fn check_common(id_type: IdType, value: &str) -> Result<(), IdentityError> {
    if value.is_empty() {
        return Err(IdentityError::Empty(id_type));
    }
    if value.len() > MAX_IDENTIFICATION_BYTES {
        return Err(IdentityError::TooLong(id_type));
    }
    Ok(())
}

/// Characters that never appear unquoted in an address; quoted local parts are not supported.
const EMAIL_SPECIALS: &[char] = &['"', '(', ')', ',', ':', ';', '<', '>', '[', ']'];

fn normalize_email(value: &str) -> Result<String, IdentityError> {
    if value.chars().any(char::is_whitespace) {
        return Err(IdentityError::Email("it contains whitespace"));
    }
    if value.contains(EMAIL_SPECIALS) {
        return Err(IdentityError::Email(
            "it contains a character not allowed in an address",
        ));
    }
    let (local, domain) = split_once_at(value).map_err(IdentityError::Email)?;
    if local.is_empty() {
        return Err(IdentityError::Email("the part before '@' is empty"));
    }
    if domain.is_empty() {
        return Err(IdentityError::Email("the domain after '@' is empty"));
    }
    // Dot-atoms (RFC 5322): dots only between characters.
    let dotted = |part: &str| part.starts_with('.') || part.ends_with('.') || part.contains("..");
    if dotted(local) {
        return Err(IdentityError::Email(
            "the part before '@' starts or ends with '.' or has \"..\"",
        ));
    }
    if dotted(domain) {
        return Err(IdentityError::Email(
            "the domain starts or ends with '.' or has \"..\"",
        ));
    }
    Ok(value.to_lowercase())
}

fn normalize_sip_uri(value: &str) -> Result<String, IdentityError> {
    // A name-addr (`"Derek" <sip:derek@x>`) carries the URI between angle brackets.
    let uri = match (value.find('<'), value.rfind('>')) {
        (Some(open), Some(close)) if open < close && value[close + 1..].trim().is_empty() => {
            &value[open + 1..close]
        }
        (None, None) => value,
        _ => return Err(IdentityError::SipUri("unbalanced '<' or '>'")),
    };
    let uri = uri.trim();
    let rest = strip_prefix_ignore_case(uri, "sips:")
        .or_else(|| strip_prefix_ignore_case(uri, "sip:"))
        .unwrap_or(uri);
    let (user, host) = split_once_at(rest).map_err(IdentityError::SipUri)?;
    // URI parameters (`;transport=tls`) and headers (`?subject=x`) follow the host part.
    let host = host.split([';', '?']).next().unwrap_or_default();
    if user.is_empty() {
        return Err(IdentityError::SipUri("the user part before '@' is empty"));
    }
    if host.is_empty() {
        return Err(IdentityError::SipUri("the host after '@' is empty"));
    }
    let canonical = format!("sip:{user}@{host}").to_lowercase();
    if canonical
        .chars()
        .any(|c| c.is_whitespace() || "<>\"".contains(c))
    {
        return Err(IdentityError::SipUri(
            "it contains whitespace, '<', '>' or '\"'",
        ));
    }
    Ok(canonical)
}

fn normalize_id(value: &str) -> Result<String, IdentityError> {
    if !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(IdentityError::Id);
    }
    // Parsing drops leading zeros and rejects values beyond u64 in one step. Written back
    // with itoa rather than `to_string`'s formatting machinery: this runs for every request.
    value
        .parse::<u64>()
        .map(|n| itoa::Buffer::new().format(n).to_owned())
        .map_err(|_| IdentityError::Id)
}

fn normalize_sync_id(value: &str) -> Result<String, IdentityError> {
    let inner = match (value.strip_prefix('{'), value.strip_suffix('}')) {
        (Some(_), Some(_)) => &value[1..value.len() - 1],
        (None, None) => value,
        _ => return Err(IdentityError::SyncId),
    };
    // Only the plain 32-digit and the 8-4-4-4-12 forms: `Uuid::try_parse` also takes URNs.
    if !(inner.len() == 32 || inner.len() == 36) {
        return Err(IdentityError::SyncId);
    }
    uuid::Uuid::try_parse(inner)
        .map(|id| id.hyphenated().to_string())
        .map_err(|_| IdentityError::SyncId)
}

/// Split at the single `@`; more or fewer than one is an error.
fn split_once_at(value: &str) -> Result<(&str, &str), &'static str> {
    match value.split_once('@') {
        Some((left, right)) if !right.contains('@') => Ok((left, right)),
        Some(_) => Err("it contains more than one '@'"),
        None => Err("it has no '@'"),
    }
}

fn strip_prefix_ignore_case<'a>(value: &'a str, prefix: &str) -> Option<&'a str> {
    let head = value.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &value[prefix.len()..])
}

/// Echo at most a short, printable prefix of client input in error messages.
pub(crate) fn truncate_for_message(value: &str) -> String {
    value
        .chars()
        .take(40)
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(t: IdType, raw: &str) -> String {
        t.normalize(raw)
            .unwrap_or_else(|e| panic!("{t} {raw:?} refused: {e}"))
    }

    #[test]
    fn type_is_matched_case_insensitively_and_spelled_as_the_api() {
        for (input, expected) in [
            ("sipUri", IdType::SipUri),
            ("SIPURI", IdType::SipUri),
            ("sipuri", IdType::SipUri),
            ("id", IdType::Id),
            ("ID", IdType::Id),
            ("Email", IdType::Email),
            ("syncid", IdType::SyncId),
            ("SyncId", IdType::SyncId),
        ] {
            assert_eq!(IdType::parse(input), Ok(expected), "{input}");
        }
        assert_eq!(IdType::SipUri.as_str(), "sipUri");
        assert_eq!(IdType::SyncId.as_str(), "syncId");
    }

    #[test]
    fn unknown_type_names_the_accepted_ones() {
        for bad in ["", "phone", "sip", "e-mail", "ids", "emai1"] {
            let err = IdType::parse(bad).unwrap_err().to_string();
            assert!(err.contains("sipUri, id, email and syncId"), "{err}");
        }
    }

    #[test]
    fn email_is_trimmed_and_lowercased() {
        for raw in [
            "derek.a@company.local",
            "Derek.A@Company.Local",
            "  DEREK.A@COMPANY.LOCAL\t",
        ] {
            assert_eq!(ok(IdType::Email, raw), "derek.a@company.local");
        }
        assert_eq!(ok(IdType::Email, "a+tag@x.y"), "a+tag@x.y");
        assert_eq!(ok(IdType::Email, "ÅSE@Firma.DK"), "åse@firma.dk");
    }

    #[test]
    fn malformed_emails_are_refused() {
        for bad in [
            "no-at-sign",
            "@company.local",
            "derek@",
            "a@b@c",
            ".derek@company.local",
            "derek.@company.local",
            "de..rek@company.local",
            "derek@.company.local",
            "derek@company.local.",
            "derek@company..local",
            "de rek@company.local",
            "derek@company local",
            "<derek@company.local>",
            "derek@company.local;x",
            "\"derek\"@company.local",
            "derek@[10.0.0.1]",
        ] {
            assert!(
                matches!(IdType::Email.normalize(bad), Err(IdentityError::Email(_))),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn sip_uri_variants_share_one_canonical_form() {
        for raw in [
            "sip:lp1@company.local",
            "SIP:LP1@Company.Local",
            "sips:lp1@company.local",
            "SiPs:lp1@company.local",
            "lp1@company.local",
            "<sip:lp1@company.local>",
            "\"Line Phone\" <sip:lp1@company.local>",
            "sip:lp1@company.local;transport=tls",
            "sip:lp1@company.local?subject=call",
            "<sip:lp1@company.local;transport=tcp>",
            "  sip:lp1@company.local  ",
        ] {
            assert_eq!(ok(IdType::SipUri, raw), "sip:lp1@company.local", "{raw}");
        }
        assert_eq!(
            ok(IdType::SipUri, "sip:lp1@10.0.0.5:5061"),
            "sip:lp1@10.0.0.5:5061"
        );
    }

    #[test]
    fn malformed_sip_uris_are_refused() {
        for bad in [
            "sip:",
            "sip:lp1",
            "sip:@company.local",
            "sip:lp1@",
            "sip:lp1@;transport=tls",
            "sip:a@b@c",
            "<sip:lp1@company.local",
            "sip:lp1@company.local>",
            "<sip:lp1@company.local> trailing",
            "sip:l p1@company.local",
        ] {
            assert!(
                matches!(IdType::SipUri.normalize(bad), Err(IdentityError::SipUri(_))),
                "{bad:?} was accepted: {:?}",
                IdType::SipUri.normalize(bad)
            );
        }
    }

    #[test]
    fn ids_are_canonical_decimal() {
        assert_eq!(ok(IdType::Id, "103"), "103");
        assert_eq!(ok(IdType::Id, "000103"), "103");
        assert_eq!(ok(IdType::Id, "0"), "0");
        assert_eq!(ok(IdType::Id, "000"), "0");
        assert_eq!(ok(IdType::Id, " 7 "), "7");
        assert_eq!(
            ok(IdType::Id, "18446744073709551615"),
            "18446744073709551615"
        );
        for bad in [
            "-1",
            "+1",
            "1.0",
            "1e3",
            "0x10",
            "12a",
            "18446744073709551616",
            "١٢",
        ] {
            assert_eq!(IdType::Id.normalize(bad), Err(IdentityError::Id), "{bad}");
        }
    }

    #[test]
    fn sync_ids_are_lowercase_hyphenated() {
        let canonical = "f4fd9e5f-017d-4350-adf8-8dd811bc1a2e";
        for raw in [
            canonical,
            "F4FD9E5F-017D-4350-ADF8-8DD811BC1A2E",
            "{f4fd9e5f-017d-4350-adf8-8dd811bc1a2e}",
            "{F4FD9E5F017D4350ADF88DD811BC1A2E}",
            "f4fd9e5f017d4350adf88dd811bc1a2e",
        ] {
            assert_eq!(ok(IdType::SyncId, raw), canonical, "{raw}");
        }
        for bad in [
            "f4fd9e5f-017d-4350-adf8",
            "{f4fd9e5f-017d-4350-adf8-8dd811bc1a2e",
            "f4fd9e5f-017d-4350-adf8-8dd811bc1a2e}",
            "g4fd9e5f-017d-4350-adf8-8dd811bc1a2e",
            "urn:uuid:f4fd9e5f-017d-4350-adf8-8dd811bc1a2e",
            "f4fd9e5f-017d4350-adf8-8dd811bc1a2e0",
        ] {
            assert_eq!(
                IdType::SyncId.normalize(bad),
                Err(IdentityError::SyncId),
                "{bad}"
            );
        }
    }

    #[test]
    fn shared_rules_apply_to_every_type() {
        for t in IdType::ALL {
            assert_eq!(t.normalize("   "), Err(IdentityError::Empty(t)));
            assert_eq!(t.normalize(""), Err(IdentityError::Empty(t)));
            for bad in [
                "a/b@c",
                "a\\b@c",
                "a\0b@c",
                "a\r\nb@c",
                "a\u{7f}@c",
                "a\u{85}@c",
                "a\u{200B}@c",
                "a\u{202E}@c",
                "\u{FEFF}a@c",
                "\r\n103",
                "103\n",
            ] {
                assert_eq!(
                    t.normalize(bad),
                    Err(IdentityError::ForbiddenCharacter(t)),
                    "{t} {bad:?}"
                );
            }
            let long = format!("{}@x.y", "a".repeat(MAX_IDENTIFICATION_BYTES));
            assert_eq!(t.normalize(&long), Err(IdentityError::TooLong(t)));
        }
        // Found by the fuzz target: within the cap as given, beyond it once canonical.
        let user = "a".repeat(MAX_IDENTIFICATION_BYTES - 4);
        assert_eq!(
            IdType::SipUri.normalize(&format!("{user}@b")),
            Err(IdentityError::TooLong(IdType::SipUri))
        );
        // 'Ⱥ' is two bytes, its lowercase 'ⱥ' three.
        let grows = format!("{}@x.y", "\u{23A}".repeat(120));
        assert!(grows.len() <= MAX_IDENTIFICATION_BYTES);
        assert_eq!(
            IdType::Email.normalize(&grows),
            Err(IdentityError::TooLong(IdType::Email))
        );
    }

    #[test]
    fn normalizing_twice_changes_nothing() {
        for (t, raw) in [
            (IdType::Email, "X@Y.Z"),
            (IdType::SipUri, "<SIPS:A@B;x=y>"),
            (IdType::Id, "0042"),
            (IdType::SyncId, "{F4FD9E5F017D4350ADF88DD811BC1A2E}"),
        ] {
            let once = ok(t, raw);
            assert_eq!(ok(t, &once), once);
        }
    }
}

/// Property tests: normalization never panics, is idempotent, and only ever yields characters
/// the canonical forms allow, whatever the input.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    /// Strings biased towards what breaks parsers: separators, escapes, controls, look-alikes.
    fn hostile() -> impl Strategy<Value = String> {
        let pieces = prop::sample::select(vec![
            "@",
            ":",
            "sip:",
            "SIPS:",
            "<",
            ">",
            ";",
            "?",
            "/",
            "\\",
            "%",
            "%2F",
            " ",
            "\t",
            "\0",
            "\r\n",
            "{",
            "}",
            "-",
            ".",
            "..",
            "0",
            "9",
            "a",
            "Z",
            "\u{0430}",
            "\u{FF20}",
            "\u{200B}",
            "ß",
            "İ",
            "\u{1F600}",
            "\"",
            ",",
        ]);
        prop_oneof![
            any::<String>(),
            prop::collection::vec(pieces, 0..24).prop_map(|p| p.concat()),
            "[0-9a-fA-F{}-]{0,40}",
            "[a-zA-Z0-9._%+-]{0,20}@[a-zA-Z0-9.-]{0,20}",
            // Near the length cap, with letters whose lowercase is longer.
            "[a-zA-Z\u{23A}]{120,253}@[a-z]{1,2}",
        ]
    }

    fn allowed(id_type: IdType, out: &str) -> bool {
        out.len() <= MAX_IDENTIFICATION_BYTES
            && !out.is_empty()
            && !out.chars().any(|c| forbidden(c) || c.is_whitespace())
            && match id_type {
                IdType::Id => out.bytes().all(|b| b.is_ascii_digit()),
                IdType::SyncId => {
                    out.len() == 36 && out.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
                }
                IdType::Email => out.matches('@').count() == 1 && out == out.to_lowercase(),
                IdType::SipUri => out.starts_with("sip:") && out == out.to_lowercase(),
            }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn normalization_is_total_idempotent_and_clean(raw in hostile()) {
            for id_type in IdType::ALL {
                if let Ok(out) = id_type.normalize(&raw) {
                    prop_assert!(allowed(id_type, &out), "{id_type:?} {raw:?} -> {out:?}");
                    prop_assert_eq!(id_type.normalize(&out), Ok(out.clone()));
                }
            }
        }
    }
}
