//! Parsing a config file into a JSON value plus the location of every key and value in the text.
//!
//! Each format's own parser does the parsing (jsonc-parser, toml, saphyr); this module only walks
//! their syntax trees, so that later problems can point at the exact key or value.

use std::{collections::HashMap, ops::Range};

use serde_json::{Map, Number, Value};

/// Where a key and its value sit in the source text (byte ranges).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Spans {
    /// The key, for object members.
    pub key: Option<Range<usize>>,
    pub value: Range<usize>,
}

/// A parsed file: its value and, for every JSON pointer in it, where that part was written.
#[derive(Debug, Clone, Default)]
pub(crate) struct Parsed {
    pub value: Value,
    pub spans: HashMap<String, Spans>,
}

impl Parsed {
    /// The spans of `pointer` or, when the pointer is not in the file, of its nearest ancestor that
    /// is.
    pub(crate) fn locate(&self, pointer: &str) -> Option<&Spans> {
        let mut pointer = pointer;
        loop {
            if let Some(spans) = self.spans.get(pointer) {
                return Some(spans);
            }
            let cut = pointer.rfind('/')?;
            pointer = &pointer[..cut];
        }
    }
}

/// A syntax error: message and byte range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SyntaxError {
    pub message: String,
    pub span: Range<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    Json,
    Yaml,
    Toml,
}

impl Format {
    /// The format for a file name, by extension.
    pub(crate) fn from_path(path: &std::path::Path) -> Option<Format> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "json" | "jsonc" => Some(Format::Json),
            "yaml" | "yml" => Some(Format::Yaml),
            "toml" => Some(Format::Toml),
            _ => None,
        }
    }

    pub(crate) fn parse(self, text: &str) -> Result<Parsed, SyntaxError> {
        let mut parsed = Parsed::default();
        parsed.value = match self {
            Format::Json => json::parse(text, &mut parsed.spans)?,
            Format::Yaml => yaml::parse(text, &mut parsed.spans)?,
            Format::Toml => toml::parse(text, &mut parsed.spans)?,
        };
        Ok(parsed)
    }
}

/// Escapes one JSON-pointer segment.
pub(crate) fn escape_segment(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

fn child(pointer: &str, segment: &str) -> String {
    format!("{pointer}/{}", escape_segment(segment))
}

fn duplicate(key: &str, span: Range<usize>) -> SyntaxError {
    SyntaxError {
        message: format!("the key `{key}` appears twice in the same table"),
        span,
    }
}

mod json {
    use jsonc_parser::{CollectOptions, ParseOptions, ast};

    use super::*;

    pub(super) fn parse(
        text: &str,
        spans: &mut HashMap<String, Spans>,
    ) -> Result<Value, SyntaxError> {
        let options = ParseOptions {
            allow_comments: true,
            allow_trailing_commas: true,
            allow_loose_object_property_names: false,
            allow_missing_commas: false,
            allow_single_quoted_strings: false,
            allow_hexadecimal_numbers: false,
            allow_unary_plus_numbers: false,
            allow_bare_decimal_point_numbers: false,
            allow_non_finite_numbers: false,
            allow_extended_string_escapes: false,
        };
        let result = jsonc_parser::parse_to_ast(text, &CollectOptions::default(), &options)
            .map_err(|e| SyntaxError {
                message: e.kind().to_string(),
                span: e.range().start..e.range().end,
            })?;
        let Some(root) = result.value else {
            return Ok(Value::Object(Map::new()));
        };
        spans.insert(
            String::new(),
            Spans {
                key: None,
                value: range(&root),
            },
        );
        convert(&root, "", spans)
    }

    fn range(value: &ast::Value<'_>) -> Range<usize> {
        let r = match value {
            ast::Value::StringLit(v) => v.range,
            ast::Value::NumberLit(v) => v.range,
            ast::Value::BooleanLit(v) => v.range,
            ast::Value::Object(v) => v.range,
            ast::Value::Array(v) => v.range,
            ast::Value::NullKeyword(v) => v.range,
        };
        r.start..r.end
    }

    fn convert(
        value: &ast::Value<'_>,
        pointer: &str,
        spans: &mut HashMap<String, Spans>,
    ) -> Result<Value, SyntaxError> {
        Ok(match value {
            ast::Value::StringLit(s) => Value::String(s.value.to_string()),
            ast::Value::NumberLit(n) => {
                let number: Number = serde_json::from_str(n.value).map_err(|_| SyntaxError {
                    message: format!("`{}` is not a number JSON can hold", n.value),
                    span: n.range.start..n.range.end,
                })?;
                Value::Number(number)
            }
            ast::Value::BooleanLit(b) => Value::Bool(b.value),
            ast::Value::NullKeyword(_) => Value::Null,
            ast::Value::Array(array) => {
                let mut items = Vec::with_capacity(array.elements.len());
                for (i, element) in array.elements.iter().enumerate() {
                    let path = child(pointer, &i.to_string());
                    spans.insert(
                        path.clone(),
                        Spans {
                            key: None,
                            value: range(element),
                        },
                    );
                    items.push(convert(element, &path, spans)?);
                }
                Value::Array(items)
            }
            ast::Value::Object(object) => {
                let mut map = Map::new();
                for prop in &object.properties {
                    let (name, key_range) = match &prop.name {
                        ast::ObjectPropName::String(s) => (s.value.to_string(), s.range),
                        ast::ObjectPropName::Word(w) => (w.value.to_owned(), w.range),
                    };
                    let key_span = key_range.start..key_range.end;
                    if map.contains_key(&name) {
                        return Err(duplicate(&name, key_span));
                    }
                    let path = child(pointer, &name);
                    spans.insert(
                        path.clone(),
                        Spans {
                            key: Some(key_span),
                            value: range(&prop.value),
                        },
                    );
                    let converted = convert(&prop.value, &path, spans)?;
                    map.insert(name, converted);
                }
                Value::Object(map)
            }
        })
    }
}

mod toml {
    use ::toml::{
        Spanned,
        de::{DeTable, DeValue},
    };

    use super::*;

    pub(super) fn parse(
        text: &str,
        spans: &mut HashMap<String, Spans>,
    ) -> Result<Value, SyntaxError> {
        let root = DeTable::parse(text).map_err(|e| SyntaxError {
            message: e.message().to_owned(),
            span: e.span().unwrap_or(0..0),
        })?;
        spans.insert(
            String::new(),
            Spans {
                key: None,
                value: root.span(),
            },
        );
        table(root.get_ref(), "", spans)
    }

    fn table(
        table: &DeTable<'_>,
        pointer: &str,
        spans: &mut HashMap<String, Spans>,
    ) -> Result<Value, SyntaxError> {
        let mut map = Map::new();
        for (key, value) in table {
            let path = child(pointer, key.get_ref());
            spans.insert(
                path.clone(),
                Spans {
                    key: Some(key.span()),
                    value: value.span(),
                },
            );
            map.insert(key.get_ref().to_string(), convert(value, &path, spans)?);
        }
        Ok(Value::Object(map))
    }

    fn convert(
        value: &Spanned<DeValue<'_>>,
        pointer: &str,
        spans: &mut HashMap<String, Spans>,
    ) -> Result<Value, SyntaxError> {
        let bad = |what: &str| SyntaxError {
            message: what.to_owned(),
            span: value.span(),
        };
        Ok(match value.get_ref() {
            DeValue::String(s) => Value::String(s.to_string()),
            DeValue::Integer(i) => {
                let n = i64::from_str_radix(&i.as_str().replace('_', ""), i.radix())
                    .map_err(|_| bad("this integer is out of range"))?;
                Value::from(n)
            }
            DeValue::Float(f) => {
                let n: f64 = f
                    .as_str()
                    .replace('_', "")
                    .parse()
                    .map_err(|_| bad("this float is not supported"))?;
                Number::from_f64(n)
                    .map(Value::Number)
                    .ok_or_else(|| bad("infinite and NaN floats are not supported"))?
            }
            DeValue::Boolean(b) => Value::Bool(*b),
            DeValue::Datetime(d) => Value::String(d.to_string()),
            DeValue::Array(array) => {
                let mut items = Vec::with_capacity(array.len());
                for (i, element) in array.iter().enumerate() {
                    let path = child(pointer, &i.to_string());
                    spans.insert(
                        path.clone(),
                        Spans {
                            key: None,
                            value: element.span(),
                        },
                    );
                    items.push(convert(element, &path, spans)?);
                }
                Value::Array(items)
            }
            DeValue::Table(t) => table(t, pointer, spans)?,
        })
    }
}

mod yaml {
    use saphyr::{LoadableYamlNode, MarkedYaml, Scalar, YamlData};

    use super::*;

    pub(super) fn parse(
        text: &str,
        spans: &mut HashMap<String, Spans>,
    ) -> Result<Value, SyntaxError> {
        // saphyr's markers count characters; spans here are byte offsets.
        let offsets: Vec<usize> = text
            .char_indices()
            .map(|(i, _)| i)
            .chain([text.len()])
            .collect();
        let byte = |chars: usize| offsets.get(chars).copied().unwrap_or(text.len());
        let docs = MarkedYaml::load_from_str(text).map_err(|e| {
            let at = byte(e.marker().index());
            SyntaxError {
                message: e.info().to_owned(),
                span: at..at,
            }
        })?;
        let Some(root) = docs.first() else {
            return Ok(Value::Object(Map::new()));
        };
        if let Some(second) = docs.get(1) {
            let at = byte(second.span.start.index());
            return Err(SyntaxError {
                message: "a config file holds one YAML document".into(),
                span: at..at,
            });
        }
        let walker = Walker { byte: &byte };
        spans.insert(
            String::new(),
            Spans {
                key: None,
                value: walker.span(root),
            },
        );
        walker.convert(root, "", spans)
    }

    struct Walker<'a> {
        byte: &'a dyn Fn(usize) -> usize,
    }

    impl Walker<'_> {
        fn span(&self, node: &MarkedYaml<'_>) -> Range<usize> {
            let start = (self.byte)(node.span.start.index());
            let end = (self.byte)(node.span.end.index()).max(start);
            start..end
        }

        fn convert(
            &self,
            node: &MarkedYaml<'_>,
            pointer: &str,
            spans: &mut HashMap<String, Spans>,
        ) -> Result<Value, SyntaxError> {
            let unsupported = |what: &str| SyntaxError {
                message: format!("{what} are not supported in tether config files"),
                span: self.span(node),
            };
            Ok(match &node.data {
                YamlData::Value(Scalar::Null) => Value::Null,
                YamlData::Value(Scalar::Boolean(b)) => Value::Bool(*b),
                YamlData::Value(Scalar::Integer(i)) => Value::from(*i),
                YamlData::Value(Scalar::FloatingPoint(f)) => Number::from_f64(f.into_inner())
                    .map(Value::Number)
                    .ok_or_else(|| unsupported("infinite and NaN floats"))?,
                YamlData::Value(Scalar::String(s)) => Value::String(s.to_string()),
                YamlData::Sequence(items) => {
                    let mut out = Vec::with_capacity(items.len());
                    for (i, item) in items.iter().enumerate() {
                        let path = child(pointer, &i.to_string());
                        spans.insert(
                            path.clone(),
                            Spans {
                                key: None,
                                value: self.span(item),
                            },
                        );
                        out.push(self.convert(item, &path, spans)?);
                    }
                    Value::Array(out)
                }
                YamlData::Mapping(mapping) => {
                    let mut map = Map::new();
                    for (key, value) in mapping {
                        let name = match &key.data {
                            YamlData::Value(Scalar::String(s)) => s.to_string(),
                            YamlData::Value(Scalar::Integer(i)) => i.to_string(),
                            YamlData::Value(Scalar::Boolean(b)) => b.to_string(),
                            _ => {
                                return Err(SyntaxError {
                                    message: "keys must be plain strings".into(),
                                    span: self.span(key),
                                });
                            }
                        };
                        let path = child(pointer, &name);
                        spans.insert(
                            path.clone(),
                            Spans {
                                key: Some(self.span(key)),
                                value: self.span(value),
                            },
                        );
                        let converted = self.convert(value, &path, spans)?;
                        map.insert(name, converted);
                    }
                    Value::Object(map)
                }
                YamlData::Tagged(..) => return Err(unsupported("YAML tags")),
                YamlData::Alias(_) => return Err(unsupported("YAML aliases")),
                _ => return Err(unsupported("this kind of YAML value")),
            })
        }
    }
}
