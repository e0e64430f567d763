//! The PII detectors against a corpus (no NATS, no models): every positive is found as exactly
//! its value and type, no trap is touched. Prints the counts (`cargo test --test pii_corpus --
//! --nocapture`).
use std::collections::BTreeMap;

use millrace_preprocess::normalize::normalize;
use millrace_preprocess::pii::{Detectors, PiiKind, Redactor};

use PiiKind::*;

/// (kind, sentence, the exact PII inside it).
const POSITIVES: &[(PiiKind, &str, &str)] = &[
    // e-mail
    (Email, "Write to ann@example.com please.", "ann@example.com"),
    (Email, "Contact: John.Doe+tag@mail.example.co.uk.", "John.Doe+tag@mail.example.co.uk"),
    (Email, "<first_last-99@sub.domain.io>", "first_last-99@sub.domain.io"),
    (Email, "mail ME@EXAMPLE.ORG now", "ME@EXAMPLE.ORG"),
    (Email, "a link https://shop.example/?to=ann.b@example.net&x=1", "ann.b@example.net"),
    (Email, "(bob@example.travel)", "bob@example.travel"),
    // phone: international
    (Phone, "Call +44 20 7946 0958 today", "+44 20 7946 0958"),
    (Phone, "US office +1 (555) 123-4567.", "+1 (555) 123-4567"),
    (Phone, "mobile: +447700900123", "+447700900123"),
    (Phone, "Berlin +49 30 1234567, ask for Max", "+49 30 1234567"),
    (Phone, "Paris +33 1 23 45 67 89", "+33 1 23 45 67 89"),
    (Phone, "India +91-98765-43210", "+91-98765-43210"),
    (Phone, "UK with trunk +44 (0)20 7946 0958", "+44 (0)20 7946 0958"),
    // phone: national
    (Phone, "Call (555) 123-4567 after 5.", "(555) 123-4567"),
    (Phone, "my number is 555-123-4567", "555-123-4567"),
    (Phone, "dots 555.123.4567 work too", "555.123.4567"),
    (Phone, "toll free 1-800-555-0199", "1-800-555-0199"),
    (Phone, "spaces 212 555 0147 too", "212 555 0147"),
    (Phone, "London 020 7946 0958", "020 7946 0958"),
    (Phone, "mobile 07700 900123", "07700 900123"),
    (Phone, "Paris 01 23 45 67 89", "01 23 45 67 89"),
    (Phone, "UK (020) 7946 0958", "(020) 7946 0958"),
    (Phone, "Tel:0800-123-4567", "0800-123-4567"),
    // cards (Luhn-valid test numbers)
    (Card, "card 4111 1111 1111 1111 exp 12/29", "4111 1111 1111 1111"),
    (Card, "pay with 4111-1111-1111-1111.", "4111-1111-1111-1111"),
    (Card, "mc 5555555555554444", "5555555555554444"),
    (Card, "amex 3782 822463 10005", "3782 822463 10005"),
    (Card, "amex 378282246310005 ok", "378282246310005"),
    (Card, "discover 6011 1111 1111 1117", "6011 1111 1111 1117"),
    (Card, "visa13 4222222222222", "4222222222222"),
    (Card, "mc2 2223 0031 2200 3222", "2223 0031 2200 3222"),
    (Card, "diners 3056 930902 5904", "3056 930902 5904"),
    (Card, "jcb 3530111333300000, thanks", "3530111333300000"),
    // IPv4
    (Ipv4, "server at 192.168.1.10 is down", "192.168.1.10"),
    (Ipv4, "ssh root@10.0.0.1", "10.0.0.1"),
    (Ipv4, "listen 127.0.0.1:8080", "127.0.0.1"),
    (Ipv4, "block 203.0.113.0/24 now", "203.0.113.0"),
    (Ipv4, "(8.8.8.8)", "8.8.8.8"),
    (Ipv4, "max 255.255.255.255.", "255.255.255.255"),
    // IPv6
    (Ipv6, "host 2001:0db8:85a3:0000:0000:8a2e:0370:7334 up", "2001:0db8:85a3:0000:0000:8a2e:0370:7334"),
    (Ipv6, "short 2001:db8::8a2e:370:7334.", "2001:db8::8a2e:370:7334"),
    (Ipv6, "link-local fe80::1ff:fe23:4567:890a%eth0", "fe80::1ff:fe23:4567:890a"),
    (Ipv6, "mapped ::ffff:192.0.2.128 here", "::ffff:192.0.2.128"),
    (Ipv6, "at 2001:db8::1: timeout", "2001:db8::1"),
    (Ipv6, "upper 2001:DB8:0:0:8:800:200C:417A", "2001:DB8:0:0:8:800:200C:417A"),
    // IBAN
    (Iban, "IBAN DE89 3704 0044 0532 0130 00 thanks", "DE89 3704 0044 0532 0130 00"),
    (Iban, "pay GB82WEST12345698765432 today", "GB82WEST12345698765432"),
    (Iban, "FR14 2004 1010 0505 0001 3M02 606", "FR14 2004 1010 0505 0001 3M02 606"),
    (Iban, "NL91ABNA0417164300.", "NL91ABNA0417164300"),
    (Iban, "Belgian BE68 5390 0754 7034", "BE68 5390 0754 7034"),
    (Iban, "Swiss CH93 0076 2011 6238 5295 7 OK", "CH93 0076 2011 6238 5295 7"),
    // SSN
    (Ssn, "SSN 123-45-6789 on file", "123-45-6789"),
    (Ssn, "ssn:078-05-1120", "078-05-1120"),
    (Ssn, "(234-56-7890)", "234-56-7890"),
    (Ssn, "her number 665-12-3456.", "665-12-3456"),
];

/// Nothing in these is PII.
const TRAPS: &[&str] = &[
    // order and reference numbers
    "Order #12345678 shipped",
    "order number 12345678 shipped",
    "ORD-2024-000123 is ready",
    "ticket INC0012345678 closed",
    "invoice 2024/000123",
    // dates and times
    "Due 2024-05-01.",
    "Due 01/05/2024 or 5/1/24",
    "on 01.05.2024 at 10:30",
    "timestamp 2024-05-01T10:00:00Z",
    "at 12:30:45 sharp",
    "epoch 1714557600 seconds, 1714557600000 ms",
    "dated 05-01-2024 10:30",
    // versions
    "upgrade to v1.2.3.4 now",
    "Windows 10.0.19045 build",
    "version 1.2.3.4 is out",
    "release 2.0.0.1",
    "python 3.11.4",
    // card-like numbers failing Luhn (or no network prefix)
    "card 4111 1111 1111 1112",
    "number 1234567812345678",
    "account 5555 5555 5555 5555",
    "ref 9783161484100",
    // IPs inside URLs
    "see http://10.0.0.1/path for details",
    "https://192.168.0.1:8443/admin",
    "http://[2001:db8::1]:8080/",
    "ftp://172.16.0.5/pub/file.txt",
    // invalid IPs
    "not an ip 256.1.1.1 or 1.2.3",
    "zeros 01.02.03.04",
    // ISBNs
    "ISBN 978-3-16-148410-0",
    "ISBN-10 0-306-40615-2",
    // prices and amounts
    "costs $1,299.99 or €4.111,00",
    "total 1 234 567,89 EUR",
    "USD 12345.67",
    // things with colons that are not IPv6
    "use std::collections::HashMap",
    "MAC 00:1A:2B:3C:4D:5E",
    "ratio 16:9 and 4:3",
    // invalid SSNs
    "SSN 000-12-3456",
    "SSN 666-12-3456",
    "SSN 912-34-5678",
    "SSN 123-00-4567",
    "SSN 123-45-0000",
    // invalid IBANs
    "IBAN DE89 3704 0044 0532 0130 01",
    "GB00WEST12345698765432",
    // plain prose with numbers
    "I have 3 cats and 12 dogs, 2024 was a good year.",
    "Call me maybe, room 101, floor 7.",
    "phone extension 4567",
    "score 555-1234 points",
    "the range 10-20 and 1999-2001",
    "coordinates 48.8566, 2.3522",
    "patch 2024.05.01.1",
];

fn covers(redactor: &Redactor, text: &str) -> Vec<(PiiKind, String)> {
    redactor.find(text).into_iter().map(|f| (f.kind, text[f.start..f.end].to_owned())).collect()
}

#[test]
fn every_positive_is_found_as_its_type_and_no_trap_is_touched() {
    let redactor = Redactor::new(Detectors::ALL);
    let mut failures = Vec::new();
    let mut per_kind: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for &(kind, text, value) in POSITIVES {
        let found = covers(&redactor, text);
        let ok = found == [(kind, value.to_owned())];
        let entry = per_kind.entry(kind.name()).or_default();
        entry.0 += 1;
        entry.1 += ok as usize;
        if !ok {
            failures.push(format!("positive {text:?}: want {kind:?} {value:?}, found {found:?}"));
        } else {
            let redacted = redactor.redact(text);
            let placeholder = format!("[{}_1]", kind.label());
            assert!(redacted.text.contains(&placeholder) && !redacted.text.contains(value), "{redacted:?}");
            assert_eq!(redacted.counts, BTreeMap::from([(kind.name(), 1)]));
        }
    }
    let mut traps_clean = 0;
    for &text in TRAPS {
        let found = covers(&redactor, text);
        if found.is_empty() {
            traps_clean += 1;
        } else {
            failures.push(format!("trap {text:?} redacted: {found:?}"));
        }
    }
    println!("PII corpus: {} positives, {} traps", POSITIVES.len(), TRAPS.len());
    for (kind, (total, ok)) in &per_kind {
        println!("  {kind:<6} {ok}/{total} found");
    }
    println!("  traps  {traps_clean}/{} untouched", TRAPS.len());
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    assert!(POSITIVES.len() >= 40);
}

#[test]
fn a_mixed_text_gets_consistent_numbered_placeholders() {
    let text = "Hi, I'm Ann (ann@example.com, +44 20 7946 0958). Card 4111 1111 1111 1111, \
                IBAN DE89 3704 0044 0532 0130 00, SSN 123-45-6789, from 192.168.1.10 and 2001:db8::1. \
                Bob is bob@example.org; again: ann@example.com. Order #12345678 of 2024-05-01, see \
                http://10.0.0.1/status.";
    let r = Redactor::new(Detectors::ALL).redact(text);
    assert_eq!(
        r.text,
        "Hi, I'm Ann ([EMAIL_1], [PHONE_1]). Card [CARD_1], IBAN [IBAN_1], SSN [SSN_1], from [IPV4_1] and \
         [IPV6_1]. Bob is [EMAIL_2]; again: [EMAIL_1]. Order #12345678 of 2024-05-01, see http://10.0.0.1/status."
    );
    let counts: Vec<_> = r.counts.into_iter().collect();
    assert_eq!(counts, [("card", 1), ("email", 3), ("iban", 1), ("ipv4", 1), ("ipv6", 1), ("phone", 1), ("ssn", 1)]);
}

#[test]
fn pii_hidden_behind_invisible_or_full_width_characters_is_found_after_normalization() {
    let redactor = Redactor::new(Detectors::ALL);
    let sneaky = "mail ann\u{200B}@exa\u{00AD}mple.com or ＋４４ ２０ ７９４６ ０９５８";
    let r = redactor.redact(&normalize(sneaky));
    assert_eq!(r.text, "mail [EMAIL_1] or [PHONE_1]");
}

#[test]
fn each_detector_can_be_disabled() {
    for kind in PiiKind::ALL {
        let others: Vec<PiiKind> = PiiKind::ALL.into_iter().filter(|k| *k != kind).collect();
        let redactor = Redactor::new(Detectors::of(&others));
        for &(k, text, value) in POSITIVES.iter().filter(|(k, ..)| *k == kind) {
            let found = covers(&redactor, text);
            assert!(!found.iter().any(|(fk, _)| *fk == k), "{kind:?} disabled yet found in {text:?}: {found:?}");
            // Nothing else takes its place.
            // (An IPv4-mapped IPv6 address still holds an IPv4 address.)
            let embedded_ipv4 = kind == Ipv6 && found.iter().all(|(k, _)| *k == Ipv4);
            assert!(found.is_empty() || embedded_ipv4, "{kind:?} disabled, {value:?} in {text:?} became {found:?}");
        }
    }
}
