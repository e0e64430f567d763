//! PII redaction into typed placeholders.
//!
//! Each detector finds candidates with a regular expression, then *validates* them (checksums,
//! ranges, shapes, what stands next to them), because a redactor that eats order numbers,
//! dates and version strings is as useless as one that misses e-mail addresses. Placeholders
//! are numbered per type in order of first appearance and are consistent within a request:
//! the same value twice is the same placeholder (`[EMAIL_1]` … `[EMAIL_1]`), a second distinct
//! value the next number (`[EMAIL_2]`). Values compare after light canonicalization (e-mail
//! lower-cased, phone / card / SSN digits only, IBAN without spaces, IP addresses parsed).
//!
//! | kind | placeholder | what counts |
//! |---|---|---|
//! | `email` | `[EMAIL_n]` | `local@domain.tld`, ASCII, TLD of letters |
//! | `phone` | `[PHONE_n]` | international `+CC …` (8–16 digits, single separators ` .-`, parentheses); North American `(555) 123-4567`, `555-123-4567`, `555.123.4567`, `1-800-555-0199`; national numbers with a trunk `0` like `020 7946 0958`, `07700 900123`, `01 23 45 67 89` (9–12 digits, one kind of separator). Bare digit strings and 7-digit local numbers are *not* phones. |
//! | `card` | `[CARD_n]` | 13–19 digits, unseparated or grouped as cards print them (4-4-4-4, 4-4-4-4-3, 4-4-4-1..3, 4-6-5, 4-6-4) with spaces or dashes, first digit 2–6 (the major networks), Luhn check passes |
//! | `ipv4` | `[IPV4_n]` | dotted quad with octets 0–255, no leading zeros; not after `v`/`version`/`build`/`release` |
//! | `ipv6` | `[IPV6_n]` | anything `std::net::Ipv6Addr` parses (compressed `::`, embedded IPv4), with at least 4 hex digits |
//! | `iban` | `[IBAN_n]` | country code + 2 check digits + BBAN, plain or in groups, the country's length where known (15–34 otherwise), mod-97 == 1 |
//! | `ssn` | `[SSN_n]` | US `123-45-6789`, area not 000 / 666 / 900–999, group not 00, serial not 0000 |
//!
//! **URLs.** An address inside a URL (`http://10.0.0.1/path`, `https://[2001:db8::1]:8443/`)
//! is the address of a service, not a person's: a URL (`scheme://…` or `www.…` up to the next
//! whitespace) is left whole by the weak, shape-only detectors — IPv4, IPv6 and phone. The
//! validated detectors (e-mail, card with Luhn, IBAN with mod-97, SSN) still apply inside URLs,
//! so `https://shop.example/?mail=ann@example.com` loses the e-mail address but keeps its host.
//!
//! **Neighbours.** A number glued to letters, `#`, `_`, or continued by `-digit`, `.digit`,
//! `/digit` is part of something else (an order number, a date, a version, a path) and is not
//! redacted: `#12345678`, `ORD-2024-000123`, `v1.2.3.4`, `10.0.19045`, `01/05/2024`.
//!
//! When findings overlap, the stronger detector wins: e-mail, IBAN, card, SSN, IPv6, IPv4,
//! phone.
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::sync::LazyLock;

use regex::Regex;

/// The kinds of PII this service redacts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PiiKind {
    Email,
    Phone,
    Card,
    Ipv4,
    Ipv6,
    Iban,
    Ssn,
}

impl PiiKind {
    pub const ALL: [PiiKind; 7] =
        [PiiKind::Email, PiiKind::Phone, PiiKind::Card, PiiKind::Ipv4, PiiKind::Ipv6, PiiKind::Iban, PiiKind::Ssn];

    /// Which detector runs first: the stronger (validated) ones before the shape-only ones.
    const PRIORITY: [PiiKind; 7] =
        [PiiKind::Email, PiiKind::Iban, PiiKind::Card, PiiKind::Ssn, PiiKind::Ipv6, PiiKind::Ipv4, PiiKind::Phone];

    /// The name in configuration and in `CleanedQuery.redactions`.
    pub fn name(self) -> &'static str {
        match self {
            PiiKind::Email => "email",
            PiiKind::Phone => "phone",
            PiiKind::Card => "card",
            PiiKind::Ipv4 => "ipv4",
            PiiKind::Ipv6 => "ipv6",
            PiiKind::Iban => "iban",
            PiiKind::Ssn => "ssn",
        }
    }

    /// The placeholder's label: `[EMAIL_1]`.
    pub fn label(self) -> &'static str {
        match self {
            PiiKind::Email => "EMAIL",
            PiiKind::Phone => "PHONE",
            PiiKind::Card => "CARD",
            PiiKind::Ipv4 => "IPV4",
            PiiKind::Ipv6 => "IPV6",
            PiiKind::Iban => "IBAN",
            PiiKind::Ssn => "SSN",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name().eq_ignore_ascii_case(name.trim()))
    }

    /// Shape-only detectors, which leave URLs alone.
    fn is_weak(self) -> bool {
        matches!(self, PiiKind::Ipv4 | PiiKind::Ipv6 | PiiKind::Phone)
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// Which detectors are on: `all`, `none` (or empty), or a comma-separated list of kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Detectors(u8);

impl Detectors {
    pub const ALL: Detectors = Detectors(0b111_1111);
    pub const NONE: Detectors = Detectors(0);

    pub fn of(kinds: &[PiiKind]) -> Self {
        Detectors(kinds.iter().fold(0, |bits, k| bits | k.bit()))
    }

    pub fn contains(self, kind: PiiKind) -> bool {
        self.0 & kind.bit() != 0
    }

    pub fn kinds(self) -> impl Iterator<Item = PiiKind> {
        PiiKind::ALL.into_iter().filter(move |k| self.contains(*k))
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown PII kind {0:?} (expected all, none, or a list of email, phone, card, ipv4, ipv6, iban, ssn)")]
pub struct UnknownKind(String);

impl FromStr for Detectors {
    type Err = UnknownKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut kinds = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.to_ascii_lowercase().as_str() {
                "all" => return Ok(Detectors::ALL),
                "none" => {}
                _ => kinds.push(PiiKind::parse(part).ok_or_else(|| UnknownKind(part.to_owned()))?),
            }
        }
        Ok(Detectors::of(&kinds))
    }
}

impl fmt::Display for Detectors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = self.kinds().map(PiiKind::name).collect();
        if names.is_empty() { f.write_str("none") } else { f.write_str(&names.join(",")) }
    }
}

/// One piece of PII found in a text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub kind: PiiKind,
    /// Byte range in the text.
    pub start: usize,
    pub end: usize,
    /// The canonical value: equal keys get the same placeholder.
    pub key: String,
}

/// A redacted text and how many values of each kind were replaced (occurrences, not distinct
/// values: the same address twice counts 2).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Redaction {
    pub text: String,
    pub counts: BTreeMap<&'static str, u32>,
}

struct Patterns {
    url: Regex,
    email: Regex,
    iban: Regex,
    digit_run: Regex,
    ssn: Regex,
    ipv6: Regex,
    ipv4: Regex,
    phone_international: Regex,
    phone_nanp: Regex,
    phone_trunk: Regex,
}

static PATTERNS: LazyLock<Patterns> = LazyLock::new(|| {
    let re = |p: &str| Regex::new(p).expect("PII pattern compiles");
    Patterns {
        url: re(r#"(?i)\b(?:[a-z][a-z0-9+.\-]{0,15}://|www\.)[^\s<>"'`]+"#),
        email: re(r"(?i)\b[a-z0-9][a-z0-9._%+\-]{0,63}@(?:[a-z0-9](?:[a-z0-9\-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}\b"),
        iban: re(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,32}"),
        digit_run: re(r"\d+(?:[ \-]\d+)*"),
        ssn: re(r"\b\d{3}-\d{2}-\d{4}\b"),
        ipv6: re(r"(?i)(?:[0-9a-f]{0,4}:){2,7}(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9a-f]{1,4})?"),
        ipv4: re(r"\b\d{1,3}(?:\.\d{1,3}){3}\b"),
        phone_international: re(r"\+\d{1,3}(?:[ .\-]?(?:\(\d{1,4}\)|\d{1,5})){1,7}"),
        phone_nanp: re(r"(?:\b1[ .\-]?)?(?:\([2-9]\d{2}\)[ .\-]?|\b[2-9]\d{2}[ .\-])\d{3}[ .\-]\d{4}\b"),
        phone_trunk: re(r"(?:\(0[1-9]\d{0,3}\)[ .\-]?|\b0[1-9]\d{0,3}[ .\-])\d{2,6}(?:[ .\-]\d{2,6}){0,3}\b"),
    }
});

/// Finds and replaces PII; cheap to clone, shareable between workers.
#[derive(Debug, Clone, Copy)]
pub struct Redactor {
    detectors: Detectors,
}

impl Redactor {
    pub fn new(detectors: Detectors) -> Self {
        LazyLock::force(&PATTERNS);
        Self { detectors }
    }

    pub fn detectors(&self) -> Detectors {
        self.detectors
    }

    /// Every piece of PII in `text` that the enabled detectors find, non-overlapping, in order.
    pub fn find(&self, text: &str) -> Vec<Finding> {
        let mut accepted: Vec<Finding> = Vec::new();
        if self.detectors == Detectors::NONE {
            return accepted;
        }
        let p = &*PATTERNS;
        let shields: Vec<(usize, usize)> = if PiiKind::ALL.iter().any(|k| k.is_weak() && self.detectors.contains(*k)) {
            p.url.find_iter(text).map(|m| (m.start(), m.end())).collect()
        } else {
            Vec::new()
        };
        for kind in PiiKind::PRIORITY.into_iter().filter(|k| self.detectors.contains(*k)) {
            for finding in detect(kind, text) {
                let clashes = |a: usize, b: usize| finding.start < b && a < finding.end;
                if accepted.iter().any(|f| clashes(f.start, f.end)) {
                    continue;
                }
                if kind.is_weak() && shields.iter().any(|&(a, b)| clashes(a, b)) {
                    continue;
                }
                accepted.push(finding);
            }
        }
        accepted.sort_by_key(|f| f.start);
        accepted
    }

    /// `text` with every finding replaced by its placeholder.
    pub fn redact(&self, text: &str) -> Redaction {
        let findings = self.find(text);
        if findings.is_empty() {
            return Redaction { text: text.to_owned(), counts: BTreeMap::new() };
        }
        let mut out = String::with_capacity(text.len());
        let mut numbers: HashMap<(PiiKind, &str), u32> = HashMap::new();
        let mut distinct: HashMap<PiiKind, u32> = HashMap::new();
        let mut counts = BTreeMap::new();
        let mut at = 0;
        for f in &findings {
            out.push_str(&text[at..f.start]);
            let n = *numbers.entry((f.kind, f.key.as_str())).or_insert_with(|| {
                let next = distinct.entry(f.kind).or_default();
                *next += 1;
                *next
            });
            out.push('[');
            out.push_str(f.kind.label());
            out.push('_');
            out.push_str(&n.to_string());
            out.push(']');
            *counts.entry(f.kind.name()).or_default() += 1;
            at = f.end;
        }
        out.push_str(&text[at..]);
        Redaction { text: out, counts }
    }
}

fn detect(kind: PiiKind, text: &str) -> Vec<Finding> {
    match kind {
        PiiKind::Email => detect_email(text),
        PiiKind::Phone => detect_phone(text),
        PiiKind::Card => detect_card(text),
        PiiKind::Ipv4 => detect_ipv4(text),
        PiiKind::Ipv6 => detect_ipv6(text),
        PiiKind::Iban => detect_iban(text),
        PiiKind::Ssn => detect_ssn(text),
    }
}

fn finding(kind: PiiKind, start: usize, end: usize, key: String) -> Finding {
    Finding { kind, start, end, key }
}

fn char_before(text: &str, at: usize) -> Option<char> {
    text[..at].chars().next_back()
}

/// Whether a number at `start..end` stands alone: not glued to letters or to the punctuation of
/// order numbers, versions, dates and paths (see the module docs).
fn stands_alone(text: &str, start: usize, end: usize, bad_before: &str) -> bool {
    if char_before(text, start).is_some_and(|c| c.is_alphanumeric() || c == '_' || bad_before.contains(c)) {
        return false;
    }
    let mut after = text[end..].chars();
    match (after.next(), after.next()) {
        (Some(c), _) if c.is_alphanumeric() || c == '_' => false,
        (Some('-' | '.' | '/'), Some(d)) if d.is_ascii_digit() => false,
        _ => true,
    }
}

/// Characters that, right before a number, make it part of something else.
const NUMBER_GLUE: &str = "#-./@$€£¥+";

fn detect_email(text: &str) -> Vec<Finding> {
    PATTERNS
        .email
        .find_iter(text)
        .filter(|m| char_before(text, m.start()).is_none_or(|c| !matches!(c, '.' | '-' | '+' | '%')))
        .map(|m| finding(PiiKind::Email, m.start(), m.end(), m.as_str().to_ascii_lowercase()))
        .collect()
}

// ---- cards -------------------------------------------------------------------------------

/// The Luhn (mod 10) check over a string of ASCII digits.
pub fn luhn_valid(digits: &str) -> bool {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    let sum: u32 = digits
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            if i % 2 == 1 {
                let doubled = d * 2;
                if doubled > 9 { doubled - 9 } else { doubled }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// Whether digit groups look like a printed card number.
/// Unseparated, or 4-4-4-4 (16), 4-4-4-4-3 (19), 4-4-4-1..3 (13–15), 4-6-5 (Amex), 4-6-4 (Diners).
fn card_grouping(groups: &[usize]) -> bool {
    match groups {
        [n] => (13..=19).contains(n),
        [4, 4, 4, 4] | [4, 4, 4, 4, 3] | [4, 6, 5] | [4, 6, 4] => true,
        [4, 4, 4, last] => (1..=3).contains(last),
        _ => false,
    }
}

fn detect_card(text: &str) -> Vec<Finding> {
    let mut found = Vec::new();
    for run in PATTERNS.digit_run.find_iter(text) {
        // The run's digit groups as byte ranges in `text`.
        let groups: Vec<(usize, usize)> =
            PATTERNS_DIGITS.find_iter(run.as_str()).map(|g| (run.start() + g.start(), run.start() + g.end())).collect();
        let mut i = 0;
        'starts: while i < groups.len() {
            for j in (i..groups.len()).rev() {
                let (start, end) = (groups[i].0, groups[j].1);
                let lengths: Vec<usize> = groups[i..=j].iter().map(|(a, b)| b - a).collect();
                let total: usize = lengths.iter().sum();
                if !(13..=19).contains(&total) || !card_grouping(&lengths) {
                    continue;
                }
                let span = &text[start..end];
                if j > i && !(span.contains(' ') ^ span.contains('-')) {
                    continue; // one kind of separator
                }
                let digits: String = span.chars().filter(char::is_ascii_digit).collect();
                if matches!(digits.as_bytes()[0], b'2'..=b'6')
                    && stands_alone(text, start, end, NUMBER_GLUE)
                    && luhn_valid(&digits)
                {
                    found.push(finding(PiiKind::Card, start, end, digits));
                    i = j + 1;
                    continue 'starts;
                }
            }
            i += 1;
        }
    }
    found
}

static PATTERNS_DIGITS: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\d+").expect("digits pattern"));

// ---- IBAN ----------------------------------------------------------------------------------

/// IBAN lengths by country (ISO 13616 registry); other country codes may be 15–34 long.
fn iban_length(country: &str) -> Option<usize> {
    Some(match country {
        "NO" => 15,
        "BE" => 16,
        "DK" | "FI" | "FO" | "GL" | "NL" => 18,
        "MK" | "SI" => 19,
        "AT" | "BA" | "EE" | "KZ" | "LT" | "LU" | "XK" => 20,
        "CH" | "CR" | "HR" | "LI" | "LV" => 21,
        "BG" | "BH" | "DE" | "GB" | "GE" | "IE" | "ME" | "RS" | "VA" => 22,
        "AE" | "IL" | "TL" => 23,
        "AD" | "CZ" | "ES" | "MD" | "PK" | "RO" | "SA" | "SE" | "SK" | "TN" | "VG" => 24,
        "PT" | "ST" => 25,
        "IS" | "TR" => 26,
        "FR" | "GR" | "IT" | "MC" | "MR" | "SM" => 27,
        "AL" | "AZ" | "BY" | "CY" | "DO" | "GT" | "HU" | "LB" | "PL" | "SV" => 28,
        "BR" | "EG" | "PS" | "QA" | "UA" => 29,
        "JO" | "KW" | "MU" => 30,
        "MT" | "SC" => 31,
        "LC" => 32,
        _ => return None,
    })
}

/// The IBAN check: the first four characters moved to the end, letters as 10–35, mod 97 == 1.
/// Takes the IBAN without spaces.
pub fn iban_valid(iban: &str) -> bool {
    let b = iban.as_bytes();
    if !(15..=34).contains(&b.len())
        || !b[..2].iter().all(u8::is_ascii_uppercase)
        || !b[2..4].iter().all(u8::is_ascii_digit)
        || !b[4..].iter().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
    {
        return false;
    }
    if iban_length(&iban[..2]).is_some_and(|len| len != b.len()) {
        return false;
    }
    let mut remainder = 0u32;
    for &c in b[4..].iter().chain(&b[..4]) {
        remainder = if c.is_ascii_digit() {
            (remainder * 10 + u32::from(c - b'0')) % 97
        } else {
            (remainder * 100 + u32::from(c - b'A' + 10)) % 97
        };
    }
    remainder == 1
}

fn detect_iban(text: &str) -> Vec<Finding> {
    let mut found = Vec::new();
    for m in PATTERNS.iban.find_iter(text) {
        // Candidate ends: after the last character of a group (before a space or the end),
        // longest first — the pattern may have run on into the next word.
        let span = m.as_str();
        let ends = span
            .char_indices()
            .filter(|&(i, _)| i + 1 == span.len() || span[i + 1..].starts_with(' '))
            .map(|(i, _)| i + 1)
            .collect::<Vec<_>>();
        for &end in ends.iter().rev() {
            let compact: String = span[..end].chars().filter(|c| *c != ' ').collect();
            if iban_valid(&compact) && stands_alone(text, m.start(), m.start() + end, "#-./@") {
                found.push(finding(PiiKind::Iban, m.start(), m.start() + end, compact));
                break;
            }
        }
    }
    found
}

// ---- SSN -----------------------------------------------------------------------------------

/// US SSN rules: area not 000, 666 or 900–999; group not 00; serial not 0000.
pub fn ssn_valid(area: u16, group: u8, serial: u16) -> bool {
    area != 0 && area != 666 && area < 900 && group != 0 && serial != 0
}

fn detect_ssn(text: &str) -> Vec<Finding> {
    PATTERNS
        .ssn
        .find_iter(text)
        .filter(|m| stands_alone(text, m.start(), m.end(), NUMBER_GLUE))
        .filter_map(|m| {
            let s = m.as_str();
            let (area, group, serial) = (s[0..3].parse().ok()?, s[4..6].parse().ok()?, s[7..11].parse().ok()?);
            ssn_valid(area, group, serial).then(|| finding(PiiKind::Ssn, m.start(), m.end(), s.replace('-', "")))
        })
        .collect()
}

// ---- IP addresses ----------------------------------------------------------------------------

/// Words after which a dotted quad is a version number, not an address.
fn after_version_word(text: &str, start: usize) -> bool {
    let before = text[..start].trim_end().to_ascii_lowercase();
    ["version", "ver", "ver.", "v", "v.", "build", "release", "firmware"].iter().any(|w| {
        before.ends_with(w) && before[..before.len() - w.len()].chars().next_back().is_none_or(|c| !c.is_alphanumeric())
    })
}

/// Like [`stands_alone`], but `10.0.0.1-10.0.0.9` (a range), `10.0.0.1:80` and `10.0.0.0/8`
/// are addresses.
fn ipv4_stands_alone(text: &str, start: usize, end: usize) -> bool {
    let before_ok = char_before(text, start).is_none_or(|c| !(c.is_alphanumeric() || "_.#$€£¥+".contains(c)));
    let mut after = text[end..].chars();
    let after_ok = match (after.next(), after.next()) {
        (Some(c), _) if c.is_alphanumeric() || c == '_' => false,
        (Some('.'), Some(d)) if d.is_ascii_digit() => false,
        _ => true,
    };
    before_ok && after_ok
}

fn detect_ipv4(text: &str) -> Vec<Finding> {
    PATTERNS
        .ipv4
        .find_iter(text)
        .filter(|m| ipv4_stands_alone(text, m.start(), m.end()) && !after_version_word(text, m.start()))
        .filter_map(|m| {
            let addr: Ipv4Addr = m.as_str().parse().ok()?;
            Some(finding(PiiKind::Ipv4, m.start(), m.end(), addr.to_string()))
        })
        .collect()
}

fn detect_ipv6(text: &str) -> Vec<Finding> {
    let mut found = Vec::new();
    for m in PATTERNS.ipv6.find_iter(text) {
        let mut candidate = m.as_str();
        // "… at fe80::1: down": a trailing colon is punctuation.
        if candidate.ends_with(':') && !candidate.ends_with("::") {
            candidate = &candidate[..candidate.len() - 1];
        }
        let (start, end) = (m.start(), m.start() + candidate.len());
        let Ok(addr) = candidate.parse::<Ipv6Addr>() else {
            continue;
        };
        let hex_digits = candidate.chars().filter(char::is_ascii_hexdigit).count();
        let before_ok = char_before(text, start).is_none_or(|c| !(c.is_alphanumeric() || matches!(c, '_' | ':' | '.')));
        // After the whole match: a colon trimmed above was followed by a non-address character.
        let after_ok = text[m.end()..].chars().next().is_none_or(|c| !(c.is_alphanumeric() || matches!(c, '_' | ':')));
        if hex_digits >= 4 && before_ok && after_ok {
            found.push(finding(PiiKind::Ipv6, start, end, addr.to_string()));
        }
    }
    found
}

// ---- phones ----------------------------------------------------------------------------------

fn digits_of(s: &str) -> String {
    s.chars().filter(char::is_ascii_digit).collect()
}

/// Whether every separator between digit groups (ignoring parentheses) is the same character.
fn one_kind_of_separator(s: &str) -> bool {
    let mut seps = s.chars().filter(|c| matches!(c, ' ' | '.' | '-'));
    match seps.next() {
        Some(first) => seps.all(|c| c == first),
        None => true,
    }
}

/// `dd?-dd?-yyyy…`: a date (and maybe a time) rather than a phone number.
fn looks_like_date(s: &str) -> bool {
    let groups: Vec<&str> = s.split([' ', '.', '-']).collect();
    groups.len() >= 3
        && groups[0].len() <= 2
        && groups[1].len() <= 2
        && groups[2].len() == 4
        && (groups[2].starts_with("19") || groups[2].starts_with("20"))
}

/// `ddd-dd-dddd` is the shape of an SSN, whether or not its detector is on.
fn is_ssn_shaped(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 11 && b[3] == b'-' && b[6] == b'-' && s.bytes().filter(u8::is_ascii_digit).count() == 9
}

/// Whether a national number starting at `start` is the tail of a longer digit sequence
/// (`… 0044 0532 0130 01`, an account number), not a phone number of its own.
fn continues_a_number(text: &str, start: usize) -> bool {
    let mut before = text[..start].chars().rev();
    matches!((before.next(), before.next()), (Some(' ' | '.' | '-'), Some(d)) if d.is_ascii_digit())
}

fn detect_phone(text: &str) -> Vec<Finding> {
    let p = &*PATTERNS;
    let mut found: Vec<Finding> = Vec::new();
    let mut push = |f: Finding| {
        if !found.iter().any(|g| f.start < g.end && g.start < f.end) {
            found.push(f);
        }
    };
    for m in p.phone_international.find_iter(text) {
        let digits = digits_of(m.as_str());
        let balanced = m.as_str().matches('(').count() == m.as_str().matches(')').count();
        if (8..=16).contains(&digits.len()) && balanced && stands_alone(text, m.start(), m.end(), "#-./@$€£¥+") {
            push(finding(PiiKind::Phone, m.start(), m.end(), format!("+{digits}")));
        }
    }
    for m in p.phone_nanp.find_iter(text) {
        if stands_alone(text, m.start(), m.end(), NUMBER_GLUE) && !continues_a_number(text, m.start()) {
            let mut digits = digits_of(m.as_str());
            if digits.len() == 11 {
                digits.remove(0); // the country code 1
            }
            push(finding(PiiKind::Phone, m.start(), m.end(), digits));
        }
    }
    for m in p.phone_trunk.find_iter(text) {
        let s = m.as_str();
        let digits = digits_of(s);
        let unparenthesized = s.rsplit(')').next().unwrap_or(s).trim_start();
        if (9..=12).contains(&digits.len())
            && one_kind_of_separator(unparenthesized)
            && !looks_like_date(s)
            && !is_ssn_shaped(s)
            && stands_alone(text, m.start(), m.end(), NUMBER_GLUE)
            && !continues_a_number(text, m.start())
        {
            push(finding(PiiKind::Phone, m.start(), m.end(), digits));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Redactor {
        Redactor::new(Detectors::ALL)
    }

    #[test]
    fn luhn() {
        for valid in ["4111111111111111", "5555555555554444", "378282246310005", "6011111111111117", "79927398713", "0"]
        {
            assert!(luhn_valid(valid), "{valid}");
        }
        for invalid in ["4111111111111112", "1234567812345678", "79927398710", "", "4111-1111"] {
            assert!(!luhn_valid(invalid), "{invalid}");
        }
    }

    #[test]
    fn iban_mod_97() {
        for valid in [
            "DE89370400440532013000",
            "GB82WEST12345698765432",
            "FR1420041010050500013M02606",
            "NL91ABNA0417164300",
            "BE68539007547034",
            "CH9300762011623852957",
        ] {
            assert!(iban_valid(valid), "{valid}");
        }
        for invalid in [
            "DE89370400440532013001",      // wrong check
            "GB82WEST1234569876543",       // one short for GB
            "DE8937040044053201300",       // one short for DE
            "de89370400440532013000",      // lower case
            "DE89 3704 0044 0532 0130 00", // spaces are stripped by the caller
            "XX00",
        ] {
            assert!(!iban_valid(invalid), "{invalid}");
        }
    }

    #[test]
    fn ssn_rules() {
        assert!(ssn_valid(123, 45, 6789));
        assert!(!ssn_valid(0, 45, 6789));
        assert!(!ssn_valid(666, 45, 6789));
        assert!(!ssn_valid(900, 45, 6789));
        assert!(!ssn_valid(123, 0, 6789));
        assert!(!ssn_valid(123, 45, 0));
    }

    #[test]
    fn placeholders_are_consistent_within_a_text() {
        let r = all().redact("Mail ann@example.com, then ANN@Example.com, then bob@example.org.");
        assert_eq!(r.text, "Mail [EMAIL_1], then [EMAIL_1], then [EMAIL_2].");
        assert_eq!(r.counts, BTreeMap::from([("email", 3)]));
        let r = all().redact("Call +44 20 7946 0958 or 555-123-4567; again +44 20 7946 0958 from 10.0.0.1");
        assert_eq!(r.text, "Call [PHONE_1] or [PHONE_2]; again [PHONE_1] from [IPV4_1]");
        assert_eq!(r.counts, BTreeMap::from([("ipv4", 1), ("phone", 3)]));
    }

    #[test]
    fn detectors_can_be_switched_off() {
        let text = "ann@example.com 10.0.0.1 4111 1111 1111 1111";
        let only_ip = Redactor::new("ipv4".parse().unwrap()).redact(text);
        assert_eq!(only_ip.text, "ann@example.com [IPV4_1] 4111 1111 1111 1111");
        assert_eq!(Redactor::new(Detectors::NONE).redact(text).text, text);
        assert_eq!("email, Card".parse::<Detectors>().unwrap(), Detectors::of(&[PiiKind::Email, PiiKind::Card]));
        assert_eq!("".parse::<Detectors>().unwrap(), Detectors::NONE);
        assert_eq!("none".parse::<Detectors>().unwrap().to_string(), "none");
        assert_eq!("all".parse::<Detectors>().unwrap().to_string(), "email,phone,card,ipv4,ipv6,iban,ssn");
        assert!("email,passport".parse::<Detectors>().is_err());
    }

    #[test]
    fn url_hosts_stay_but_validated_pii_inside_urls_goes() {
        let r =
            all().redact("See http://10.0.0.1/path and https://[2001:db8::1]:8443/x?to=ann@example.com then 10.0.0.2");
        assert_eq!(r.text, "See http://10.0.0.1/path and https://[2001:db8::1]:8443/x?to=[EMAIL_1] then [IPV4_1]");
    }

    #[test]
    fn a_card_followed_by_another_number_is_still_found() {
        let r = all().redact("card 4111 1111 1111 1111 2 times");
        assert_eq!(r.text, "card [CARD_1] 2 times");
    }
}
