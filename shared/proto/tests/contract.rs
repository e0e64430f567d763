//! The wire contract every stage relies on: a message that belongs to one request carries the
//! request's `RequestContext` as field 1, named `ctx`, so the bus (through `Envelope`), the DLQ
//! and the sink can read the context of a payload without knowing its type. Read from the
//! descriptor set the build compiles from `proto/millrace/v1/*.proto`, not from the generated
//! Rust, so the test sees exactly what goes on the wire.
use std::collections::BTreeMap;

use millrace_proto::{FILE_DESCRIPTOR_SET, Message as _};
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FieldDescriptorProto, FileDescriptorSet};

const PACKAGE: &str = "millrace.v1";
const CONTEXT: &str = ".millrace.v1.RequestContext";

/// The messages of one request on the stage graph's per-request edges: ingest → QUERIES
/// (`Query`), preprocess → CLEAN (`CleanedQuery`), moderation(input) → ADMITTED
/// (`AdmittedQuery`), session → PROMPTS (`Prompt`), inference → COMPLETIONS (`Completion`),
/// any stage → RESULTS (`Result`); and `Envelope`, the common prefix the bus decodes any of
/// them as.
const PER_REQUEST: [&str; 7] = ["Query", "CleanedQuery", "AdmittedQuery", "Prompt", "Completion", "Result", "Envelope"];

/// Edge messages that are not one request's, and why.
const EXCEPTIONS: [(&str, &str); 2] = [
    // batcher → BATCHES: many requests at once, each prompt with its own context.
    ("Batch", "carries its requests' prompts, each with its own ctx"),
    // any stage → DLQ: a record about a dead message, which may be of no single request (a
    // batch, an undecodable payload); the context, when one was read, is kept beside it.
    ("DlqRecord", "a record about a dead message; the dead message's ctx, if any, is field 11"),
];

/// Every message of the package, nested ones by their dotted path (`Outer.Inner`).
fn messages() -> BTreeMap<String, DescriptorProto> {
    let set = FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).expect("FILE_DESCRIPTOR_SET decodes");
    let mut found = BTreeMap::new();
    for file in set.file.iter().filter(|f| f.package() == PACKAGE) {
        let mut pending: Vec<(String, DescriptorProto)> =
            file.message_type.iter().map(|m| (m.name().to_owned(), m.clone())).collect();
        while let Some((path, message)) = pending.pop() {
            pending.extend(message.nested_type.iter().map(|n| (format!("{path}.{}", n.name()), n.clone())));
            assert!(found.insert(path.clone(), message).is_none(), "{path} is defined twice");
        }
    }
    assert!(found.contains_key("RequestContext"), "no RequestContext in {PACKAGE}: {:?}", found.keys());
    found
}

fn is_context(field: &FieldDescriptorProto) -> bool {
    field.r#type() == Type::Message && field.type_name() == CONTEXT
}

fn describe(field: &FieldDescriptorProto) -> String {
    let kind = match field.type_name() {
        "" => format!("{:?}", field.r#type()),
        message => message.to_owned(),
    };
    format!("`{}` = {} ({:?} {kind})", field.name(), field.number(), field.label())
}

/// What is wrong with `message` as a per-request message, if anything.
fn per_request_violation(name: &str, message: &DescriptorProto) -> Option<String> {
    let Some(first) = message.field.iter().find(|f| f.number() == 1) else {
        return Some(format!("{name} has no field 1; it must be `RequestContext ctx = 1`"));
    };
    let ok = is_context(first) && first.name() == "ctx" && first.label() == Label::Optional;
    (!ok).then(|| format!("{name}: field 1 is {}; it must be `RequestContext ctx = 1`", describe(first)))
}

#[test]
fn a_request_context_is_always_field_1_named_ctx() {
    let messages = messages();
    let exceptions: BTreeMap<&str, &str> = EXCEPTIONS.into_iter().collect();
    let mut offenders = Vec::new();
    for (name, message) in &messages {
        let contexts: Vec<_> = message.field.iter().filter(|f| is_context(f)).collect();
        if contexts.is_empty() {
            continue;
        }
        if let Some(why) = exceptions.get(name.as_str()) {
            eprintln!("{name}: known exception ({why})");
            continue;
        }
        if let Some(violation) = per_request_violation(name, message) {
            offenders.push(violation);
        }
        if contexts.len() > 1 {
            let all: Vec<_> = contexts.iter().map(|f| describe(f)).collect();
            offenders.push(format!("{name} holds more than one RequestContext: {}", all.join(", ")));
        }
    }
    assert!(
        offenders.is_empty(),
        "messages that carry a RequestContext other than as `RequestContext ctx = 1` (fix the message, or \
         list it in EXCEPTIONS with the reason):\n  {}",
        offenders.join("\n  ")
    );
}

#[test]
fn every_per_request_edge_message_carries_its_context_first() {
    let messages = messages();
    let mut offenders = Vec::new();
    for name in PER_REQUEST {
        match messages.get(name) {
            None => offenders.push(format!("{name} is not a message of {PACKAGE} any more")),
            Some(message) => offenders.extend(per_request_violation(name, message)),
        }
    }
    assert!(
        offenders.is_empty(),
        "per-request edge messages without their context first:\n  {}",
        offenders.join("\n  ")
    );
}

#[test]
fn the_exceptions_are_still_what_they_are_listed_for() {
    let messages = messages();
    let batch = messages.get("Batch").expect("Batch is a message of millrace.v1");
    assert!(!batch.field.iter().any(is_context), "Batch now carries a RequestContext itself: {:?}", batch.field);
    let prompts = batch.field.iter().find(|f| f.name() == "prompts").expect("Batch.prompts");
    assert_eq!(
        (prompts.label(), prompts.type_name()),
        (Label::Repeated, ".millrace.v1.Prompt"),
        "Batch carries its requests as `repeated Prompt prompts`, each prompt with its own ctx"
    );
    assert!(per_request_violation("Prompt", &messages["Prompt"]).is_none());

    let dlq = messages.get("DlqRecord").expect("DlqRecord is a message of millrace.v1");
    let context: Vec<_> = dlq.field.iter().filter(|f| is_context(f)).map(|f| (f.name(), f.number())).collect();
    assert_eq!(context, [("ctx", 11)], "DlqRecord keeps the dead message's context as `ctx = 11`");
    for (name, _) in EXCEPTIONS {
        assert!(!PER_REQUEST.contains(&name), "{name} is listed both as per-request and as an exception");
    }
}
