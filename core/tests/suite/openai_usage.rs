//! The response usage scanner (`openai_usage::UsageScanner`): by example, and against an oracle
//! that reads documents as `asgi.py`'s `_parse_usage` and `_choice_chars` do, on bodies and on
//! streams cut into any chunks.

use proptest::prelude::*;
use sluicegate_core::openai_usage::{ReportedUsage, ResponseUsage, UsageScanner};

use crate::json_doc::{Doc, doc};

fn read(stream: bool, chunks: &[&[u8]]) -> ResponseUsage {
    let mut scanner = UsageScanner::new(stream);
    for chunk in chunks {
        scanner.feed(chunk);
    }
    scanner.finish()
}

fn usage(prompt: Option<u64>, cached: u64, completion: u64) -> Option<ReportedUsage> {
    Some(ReportedUsage { prompt_tokens: prompt, cached_tokens: cached, completion_tokens: completion })
}

#[test]
fn a_chat_completion_body_gives_its_usage_and_text() {
    let body = br#"{"id": "x", "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!",
        "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]}}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17,
                  "prompt_tokens_details": {"cached_tokens": 8}}}"#;
    let r = read(false, &[body]);
    assert_eq!(r.usage, usage(Some(12), 8, 5));
    assert_eq!((r.generated_chars, r.objects, r.malformed_usage), (6 + 7, 1, false));
    // A completions body's text; its delta would be a stream's.
    let r = read(false, &[br#"{"choices": [{"text": "abc", "delta": {"content": "zz"}}]}"#]);
    assert_eq!((r.usage, r.generated_chars), (None, 3));
}

#[test]
fn a_stream_is_charged_as_its_events_complete_and_settled_by_its_last_usage() {
    let stream: &[u8] = b": keep-alive\n\nevent: x\ndata: {\"choices\": [{\"delta\": {\"role\": \"assistant\", \"content\": \"\"}}], \"usage\": null}\n\n\
data:{\"choices\": [{\"delta\": {\"content\": \"Hi th\"}}]}\r\n\r\n\
   data:   {\"choices\": [{\"delta\": {\"reasoning_content\": \"ok\", \"refusal\": null, \"content\": [\"ab\", {\"text\": \"cd\"}, 5]}}]}  \n\n\
data: {\"choices\": [], \"usage\": {\"prompt_tokens\": 3, \"completion_tokens\": 9}}\n\n\
data: [DONE]\n\n";
    let whole = read(true, &[stream]);
    assert_eq!(whole.usage, usage(Some(3), 0, 9));
    assert_eq!((whole.generated_chars, whole.objects, whole.malformed_usage), (5 + 2 + 4, 4, false));
    // Byte by byte, every event is still read; chars count once an event's line has ended.
    let mut scanner = UsageScanner::new(true);
    let mut seen = Vec::new();
    for b in stream {
        scanner.feed(std::slice::from_ref(b));
        seen.push(scanner.generated_chars());
    }
    assert_eq!(scanner.usage(), whole.usage, "known before finish");
    assert_eq!(scanner.finish(), whole);
    let second_event_ends = stream.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    assert_eq!(seen[second_event_ends], 0, "not at its \\r");
    assert_eq!(seen[second_event_ends + 1], 5, "but at its \\n");
}

#[test]
fn an_unterminated_last_line_counts_at_finish() {
    let r = read(true, &[b"data: {\"usage\": {\"completion_tokens\": 4}}"]);
    assert_eq!(r.usage, usage(None, 0, 4));
}

#[test]
fn unusable_usage_is_flagged_and_never_replaces_a_good_one() {
    for bad in [
        r#""usage": 5"#,
        r#""usage": {"prompt_tokens": 3}"#,
        r#""usage": {"completion_tokens": null}"#,
        r#""usage": {"completion_tokens": -1}"#,
        r#""usage": {"completion_tokens": 4294967297}"#,
        r#""usage": {"completion_tokens": 2.0}"#,
        r#""usage": {"completion_tokens": true}"#,
        r#""usage": {"completion_tokens": 1, "prompt_tokens": "3"}"#,
        r#""usage": {"completion_tokens": 1, "prompt_tokens_details": []}"#,
        r#""usage": {"completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": {}}}"#,
    ] {
        let stream = format!("data: {{\"usage\": {{\"completion_tokens\": 7}}}}\ndata: {{{bad}}}\n");
        let r = read(true, &[stream.as_bytes()]);
        assert_eq!((r.usage, r.malformed_usage), (usage(None, 0, 7), true), "{bad}");
    }
    // Nulls are absent: the prompt unknown, nothing cached.
    let r = read(
        false,
        &[br#"{"usage": {"completion_tokens": 0, "prompt_tokens": null, "prompt_tokens_details": null}}"#],
    );
    assert_eq!((r.usage, r.malformed_usage), (usage(None, 0, 0), false));
    let r = read(false, &[br#"{"usage": {"completion_tokens": 4294967296, "prompt_tokens_details": {"cached_tokens": null}}}"#]);
    assert_eq!(r.usage, usage(None, 0, 1 << 32));
}

#[test]
fn the_last_of_duplicate_keys_wins() {
    let body =
        br#"{"usage": {"completion_tokens": 1}, "usage": {"completion_tokens": 2, "completion_tokens": 3,
        "prompt_tokens_details": {"cached_tokens": 4}, "prompt_tokens_details": {"x": 1}},
        "choices": [{"message": {"content": "aaaa", "content": "b"}, "text": "cc", "text": 7}]}"#;
    let r = read(false, &[body]);
    assert_eq!((r.usage, r.generated_chars), (usage(None, 0, 3), 1));
    // A later usage is read on its own: nothing of an earlier one carries over.
    let body = br#"{"usage": {"completion_tokens": 1, "prompt_tokens": 5, "prompt_tokens_details": {"cached_tokens": 4}},
        "usage": {"completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 3}, "prompt_tokens_details": {}}}"#;
    assert_eq!(read(false, &[body]).usage, usage(None, 0, 2));
    // A later null usage leaves none in that object.
    let r = read(false, &[br#"{"usage": {"completion_tokens": 1}, "usage": null}"#]);
    assert_eq!((r.usage, r.malformed_usage), (None, false));
}

#[test]
fn what_is_not_a_json_object_reports_nothing() {
    for body in [&b""[..], b"[1]", b"\"x\"", b"{\"usage\": {\"completion_tokens\": 1}", b"{} x", b"<html>"] {
        let r = read(false, &[body]);
        assert_eq!(r, ResponseUsage::default(), "{}", String::from_utf8_lossy(body));
    }
    let stream = b"data: {\"usage\": \ndata: [1]\ndata: nope\ndata:\nid: 5\ndata {\"usage\": {\"completion_tokens\": 1}}\n";
    assert_eq!(read(true, &[stream]), ResponseUsage::default());
}

#[test]
fn a_long_stream_takes_constant_memory() {
    let event = b"data: {\"choices\": [{\"delta\": {\"content\": \"0123456789\"}}]}\n\n";
    let mut scanner = UsageScanner::new(true);
    for _ in 0..10_000 {
        scanner.feed(event);
    }
    scanner.feed(b"data: {\"usage\": {\"prompt_tokens\": 1, \"completion_tokens\": 25000}}\n\n");
    let r = scanner.finish();
    assert_eq!((r.generated_chars, r.objects), (100_000, 10_001));
    assert!(size_of::<UsageScanner>() < 8 << 10, "{} bytes", size_of::<UsageScanner>());
}

fn text_len(d: Option<&Doc>) -> u64 {
    match d {
        Some(Doc::String(s)) => s.chars().count() as u64,
        Some(Doc::Array(items)) => items
            .iter()
            .map(|i| match i {
                Doc::String(s) => s.chars().count() as u64,
                Doc::Object(_) => match i.get("text") {
                    Some(Doc::String(s)) => s.chars().count() as u64,
                    _ => 0,
                },
                _ => 0,
            })
            .sum(),
        _ => 0,
    }
}

/// `asgi.py`'s `_choice_chars`.
fn choice_chars(choice: &Doc, key: &str) -> u64 {
    let Doc::Object(_) = choice else { return 0 };
    let mut total = text_len(choice.get("text"));
    if let Some(part @ Doc::Object(_)) = choice.get(key) {
        for field in ["content", "reasoning_content", "reasoning", "refusal"] {
            total += text_len(part.get(field));
        }
        if let Some(Doc::Array(calls)) = part.get("tool_calls") {
            for call in calls {
                if let Some(function @ Doc::Object(_)) = call.get("function") {
                    total += text_len(function.get("arguments"));
                }
            }
        }
    }
    total
}

/// `asgi.py`'s `_parse_usage`: `Err` for its `_MALFORMED`.
fn parse_usage(value: Option<&Doc>) -> Result<Option<ReportedUsage>, ()> {
    let count = |d: Option<&Doc>| match d {
        Some(Doc::Int(v)) if (0..=1i64 << 32).contains(v) => Ok(*v as u64),
        _ => Err(()),
    };
    match value {
        None | Some(Doc::Null) => return Ok(None),
        Some(Doc::Object(_)) => {}
        Some(_) => return Err(()),
    }
    let value = value.unwrap();
    let completion = count(value.get("completion_tokens"))?;
    let cached = match value.get("prompt_tokens_details") {
        None | Some(Doc::Null) => 0,
        Some(details @ Doc::Object(_)) => match details.get("cached_tokens") {
            None | Some(Doc::Null) => 0,
            c => count(c)?,
        },
        Some(_) => return Err(()),
    };
    let prompt = match value.get("prompt_tokens") {
        None | Some(Doc::Null) => None,
        p => Some(count(p)?),
    };
    Ok(usage(prompt, cached, completion))
}

/// What `asgi.py` reads from the response objects `docs` (a body's one, or a stream's events).
fn oracle(docs: &[&Doc], key: &str) -> ResponseUsage {
    let mut r = ResponseUsage::default();
    for doc in docs {
        let Doc::Object(_) = doc else { continue };
        r.objects += 1;
        match parse_usage(doc.get("usage")) {
            Ok(Some(u)) => r.usage = Some(u),
            Ok(None) => {}
            Err(()) => r.malformed_usage = true,
        }
        if let Some(Doc::Array(choices)) = doc.get("choices") {
            r.generated_chars += choices.iter().map(|c| choice_chars(c, key)).sum::<u64>();
        }
    }
    r
}

const KEYS: [&str; 17] = [
    "choices",
    "usage",
    "text",
    "delta",
    "message",
    "content",
    "reasoning_content",
    "refusal",
    "tool_calls",
    "function",
    "arguments",
    "prompt_tokens",
    "completion_tokens",
    "prompt_tokens_details",
    "cached_tokens",
    "role",
    "x",
];

/// A stream line: an event's data, or something else a stream may hold.
fn line() -> impl Strategy<Value = (Option<Doc>, String)> {
    prop_oneof![
        8 => (doc(&KEYS), prop::sample::select(vec!["data: ", "data:", "  data:  ", "\tdata:"]), prop::sample::select(vec!["", "\r", " \r", "  "])).prop_map(|(d, prefix, suffix)| {
            let mut line = prefix.to_string();
            let mut data = String::new();
            d.write(&mut data, false);
            // An event is one line: the writer's newlines are whitespace between items.
            line.push_str(&data.replace('\n', " "));
            line.push_str(suffix);
            (Some(d), line)
        }),
        1 => prop::sample::select(vec![
            "data: [DONE]", ": ping", "event: message", "", "id: 7", "retry: 10", "data:", "data: {", "dat: {}", "Data: {}",
            // Lines that are no event, whatever they hold after their start.
            ": data: {\"usage\": {\"completion_tokens\": 99}}", "id: data: {\"choices\": [{\"delta\": {\"content\": \"zz\"}}]}",
        ])
            .prop_map(|l| (None, l.to_string())),
    ]
}

fn pairs(fields: Vec<BoxedStrategy<(String, Doc)>>) -> BoxedStrategy<Doc> {
    prop::collection::vec(prop::strategy::Union::new(fields), 0..5).prop_map(Doc::Object).boxed()
}

fn field(key: &'static str, value: BoxedStrategy<Doc>) -> BoxedStrategy<(String, Doc)> {
    value.prop_map(move |v| (key.to_string(), v)).boxed()
}

/// Responses shaped as OpenAI's, every level with wrong types and stray keys: the deep paths
/// (a tool call's arguments, a text part's text) that random documents seldom reach.
fn response() -> BoxedStrategy<Doc> {
    let string =
        prop::sample::select(vec!["", "ab", "é😀", "{\"a\": 1}"]).prop_map(|s| Doc::String(s.to_string()));
    let stray =
        prop_oneof![string.clone(), Just(Doc::Null), Just(Doc::Int(7)), Just(Doc::Bool(true))].boxed();
    let part_text = pairs(vec![
        field("text", string.clone().boxed()),
        field("type", string.clone().boxed()),
        field("x", stray.clone()),
    ]);
    let text = prop_oneof![
        3 => string.clone(),
        2 => prop::collection::vec(prop_oneof![string.clone(), part_text.clone(), Just(Doc::Int(3)), Just(Doc::Array(vec![Doc::String("no".into())]))], 0..4).prop_map(Doc::Array),
        1 => part_text,
        1 => stray.clone(),
    ]
    .boxed();
    let function = pairs(vec![
        field("arguments", text.clone()),
        field("name", string.clone().boxed()),
        field("x", stray.clone()),
    ]);
    let call = pairs(vec![
        field("function", prop_oneof![3 => function.clone(), 1 => stray.clone()].boxed()),
        field("id", stray.clone()),
        field("arguments", text.clone()),
        field("x", function.clone()),
    ]);
    let calls =
        prop_oneof![3 => prop::collection::vec(call, 0..3).prop_map(Doc::Array), 1 => function.clone()]
            .boxed();
    let mut part_fields: Vec<_> = ["content", "reasoning_content", "reasoning", "refusal", "text"]
        .iter()
        .map(|k| field(k, text.clone()))
        .collect();
    part_fields.push(field("tool_calls", calls));
    part_fields.push(field("function", function));
    part_fields.push(field("role", string.clone().boxed()));
    let part = pairs(part_fields);
    let choice = pairs(vec![
        field("text", text.clone()),
        field("delta", prop_oneof![3 => part.clone(), 1 => stray.clone()].boxed()),
        field("message", prop_oneof![3 => part.clone(), 1 => stray.clone()].boxed()),
        field("content", text),
        field("index", stray.clone()),
    ]);
    let count = prop::sample::select(vec![
        Doc::Int(0),
        Doc::Int(5),
        Doc::Int(1 << 32),
        Doc::Int((1 << 32) + 1),
        Doc::Int(-1),
        Doc::Float(1.0),
        Doc::Null,
        Doc::String("3".into()),
    ])
    .boxed();
    let details = prop_oneof![3 => pairs(vec![field("cached_tokens", count.clone()), field("x", stray.clone())]), 1 => stray.clone()].boxed();
    let usage = prop_oneof![
        4 => pairs(vec![
            field("prompt_tokens", count.clone()),
            field("completion_tokens", count.clone()),
            field("completion_tokens", count.clone()),
            field("prompt_tokens_details", details),
            field("total_tokens", count),
        ]),
        1 => stray.clone(),
    ]
    .boxed();
    pairs(vec![
        field(
            "choices",
            prop_oneof![4 => prop::collection::vec(choice.clone(), 0..3).prop_map(Doc::Array), 1 => choice]
                .boxed(),
        ),
        field("usage", usage),
        field("id", stray),
    ])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Responses shaped as OpenAI's, as bodies and as streams, read as `asgi.py` reads them.
    #[test]
    fn shaped_responses_read_as_the_middleware_reads_them(docs in prop::collection::vec(response(), 1..4), cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6)) {
        let mut body = String::new();
        docs[0].write(&mut body, false);
        prop_assert_eq!(read(false, &pieces(body.as_bytes(), &cuts)), oracle(&[&docs[0]], "message"), "{}", body);
        let stream: String = docs
            .iter()
            .map(|d| {
                let mut data = String::new();
                d.write(&mut data, false);
                format!("data: {}\n\n", data.replace('\n', " "))
            })
            .collect();
        let all: Vec<&Doc> = docs.iter().collect();
        prop_assert_eq!(read(true, &pieces(stream.as_bytes(), &cuts)), oracle(&all, "delta"), "{}", stream);
    }

    /// A body, in any chunks, reads as `asgi.py` reads it.
    #[test]
    fn a_body_reads_as_the_middleware_reads_it(doc in doc(&KEYS), escape in any::<bool>(), cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6)) {
        let mut body = String::new();
        doc.write(&mut body, escape);
        let got = read(false, &pieces(body.as_bytes(), &cuts));
        prop_assert_eq!(got, oracle(&[&doc], "message"), "{}", body);
    }

    /// A stream, in any chunks, reads as `asgi.py` reads it.
    #[test]
    fn a_stream_reads_as_the_middleware_reads_it(lines in prop::collection::vec(line(), 0..8), cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..10), blank in any::<bool>()) {
        let stream: String = lines.iter().map(|(_, l)| format!("{l}\n{}", if blank { "\n" } else { "" })).collect();
        let docs: Vec<&Doc> = lines.iter().filter_map(|(d, _)| d.as_ref()).collect();
        let got = read(true, &pieces(stream.as_bytes(), &cuts));
        prop_assert_eq!(got, oracle(&docs, "delta"), "{:?}", stream);
    }
}

fn pieces<'a>(bytes: &'a [u8], cuts: &[prop::sample::Index]) -> Vec<&'a [u8]> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
    at.sort();
    at.push(bytes.len());
    let mut from = 0;
    at.into_iter()
        .map(|to| {
            let piece = &bytes[from..to];
            from = to;
            piece
        })
        .collect()
}

#[test]
fn finishing_again_reports_the_same_and_later_bytes_count_for_nothing() {
    for stream in [false, true] {
        let mut scanner = UsageScanner::new(stream);
        let body: &[u8] = if stream {
            b"data: {\"choices\": [{\"delta\": {\"content\": \"abc\"}}]}\n"
        } else {
            b"{\"choices\": [{\"message\": {\"content\": \"abc\"}}]}"
        };
        scanner.feed(body);
        let first = scanner.finish();
        assert_eq!((first.generated_chars, first.objects), (3, 1));
        scanner.feed(body);
        assert_eq!(scanner.finish(), first, "stream {stream}");
    }
}

#[test]
fn a_line_that_is_no_event_stays_skipped_across_chunks() {
    let r = read(
        true,
        &[
            b": x",
            b"x data: {\"usage\": {\"completion_tokens\": 99}}\n",
            b"data: {\"usage\": {\"completion_tokens\": 1}}\n",
        ],
    );
    assert_eq!((r.usage, r.objects), (usage(None, 0, 1), 1));
}

#[test]
fn only_a_tool_calls_function_holds_its_arguments() {
    let body = br#"{"choices": [{"message": {"tool_calls": [{"x": {"arguments": "ab"}, "function": {"arguments": "cde"}}, {"id": {"arguments": "zz"}}]}}]}"#;
    assert_eq!(read(false, &[body]).generated_chars, 3);
}

#[test]
fn python_blanks_around_a_data_line_are_stripped_as_asgi_py_strips_them() {
    // Vertical tab and form feed are not JSON whitespace, but bytes.strip() takes them.
    let stream = b"\x0b\x0c data:\x0b\x0c {\"usage\": {\"completion_tokens\": 2}}\n";
    let r = read(true, &[stream]);
    assert_eq!((r.usage, r.objects), (usage(None, 0, 2), 1));
}
