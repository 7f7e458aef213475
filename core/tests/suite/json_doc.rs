//! A JSON document tree that, unlike serde_json's, keeps duplicate keys (Python's `json` keeps
//! the last), written plainly or with every character escaped, and random ones for proptests.

use proptest::prelude::*;

/// A document tree that, unlike serde_json's, keeps duplicate keys.
#[derive(Clone, Debug)]
pub enum Doc {
    Object(Vec<(String, Doc)>),
    Array(Vec<Doc>),
    String(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Null,
}

impl Doc {
    pub fn get(&self, key: &str) -> Option<&Doc> {
        match self {
            Doc::Object(pairs) => pairs.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn write(&self, out: &mut String, escape: bool) {
        match self {
            Doc::Object(pairs) => {
                out.push('{');
                for (i, (k, v)) in pairs.iter().enumerate() {
                    out.push_str(if i > 0 { ", " } else { "" });
                    write_string(k, out, escape);
                    out.push_str(": ");
                    v.write(out, escape);
                }
                out.push('}');
            }
            Doc::Array(items) => {
                out.push('[');
                for (i, v) in items.iter().enumerate() {
                    out.push_str(if i > 0 { ",\n" } else { "" });
                    v.write(out, escape);
                }
                out.push(']');
            }
            Doc::String(s) => write_string(s, out, escape),
            Doc::Int(i) => out.push_str(&i.to_string()),
            Doc::Float(f) => out.push_str(&format!("{f:?}")),
            Doc::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Doc::Null => out.push_str("null"),
        }
    }
}

fn write_string(s: &str, out: &mut String, escape: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || escape && !c.is_ascii_alphanumeric() => {
                let mut units = [0u16; 2];
                for &mut u in c.encode_utf16(&mut units) {
                    // Both cases of hex digit, by the unit's parity.
                    out.push_str(&if u % 2 == 0 { format!("\\u{u:04x}") } else { format!("\\u{u:04X}") });
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

pub fn doc(keys: &'static [&'static str]) -> impl Strategy<Value = Doc> {
    let text = prop::collection::vec(
        prop::sample::select(vec![
            'a',
            'Z',
            '7',
            ' ',
            'é',
            '\u{7ff}',
            '\u{800}',
            '€',
            '\u{fffd}',
            '😀',
            '\u{10ffff}',
            '"',
            '\\',
            '\n',
            '\u{1}',
            '/',
            '\u{7f}',
        ]),
        0..6,
    )
    .prop_map(|cs| cs.into_iter().collect::<String>());
    let leaf = prop_oneof![
        text.clone().prop_map(Doc::String),
        prop::sample::select(vec!["flex", "default", "priority", "auto", "priorityx", "Flex"])
            .prop_map(|name| Doc::String(name.into())),
        prop::sample::select(vec![0i64, 1, 2, 7, -1, -300, 4_294_967_296, 4_294_967_297, i64::MAX])
            .prop_map(Doc::Int),
        prop::sample::select(vec![0.5f64, 1.0, -2.25, 1e21]).prop_map(Doc::Float),
        any::<bool>().prop_map(Doc::Bool),
        Just(Doc::Null),
    ];
    let tree = leaf.prop_recursive(5, 48, 5, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Doc::Array),
            prop::collection::vec((prop::sample::select(keys.to_vec()).prop_map(String::from), inner), 0..5)
                .prop_map(Doc::Object),
        ]
    });
    let top = prop::collection::vec(
        (prop::sample::select(keys.to_vec()).prop_map(String::from), tree.clone()),
        0..8,
    );
    let model = prop::option::of(prop_oneof![text.prop_map(Doc::String), Just(Doc::String("m".repeat(129)))]);
    prop_oneof![
        9 => (top, model).prop_map(|(mut pairs, model)| {
            if let Some(m) = model {
                pairs.push(("model".into(), m));
            }
            Doc::Object(pairs)
        }),
        1 => tree,
    ]
}
