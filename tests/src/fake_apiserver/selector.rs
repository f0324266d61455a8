//! Label and field selectors, parsed and matched the way kube-apiserver does
//! (`k8s.io/apimachinery/pkg/labels` and `pkg/fields`).

use std::collections::BTreeSet;

use serde_json::Value;

use super::objects::ResourceKind;

/// A parsed `labelSelector`: every requirement must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct LabelSelector {
    requirements: Vec<LabelRequirement>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelRequirement {
    Exists(String),
    DoesNotExist(String),
    Equals(String, String),
    NotEquals(String, String),
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    GreaterThan(String, i64),
    LessThan(String, i64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Word(String),
    Not,
    Equals,
    DoubleEquals,
    NotEquals,
    Greater,
    Less,
    Open,
    Close,
    Comma,
}

fn tokenize(input: &str) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    let mut chars = input.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            ' ' | '\t' => {
                chars.next();
            }
            '!' => {
                chars.next();
                if chars.peek() == Some(&'=') {
                    chars.next();
                    tokens.push(Token::NotEquals);
                } else {
                    tokens.push(Token::Not);
                }
            }
            '=' => {
                chars.next();
                if chars.peek() == Some(&'=') {
                    chars.next();
                    tokens.push(Token::DoubleEquals);
                } else {
                    tokens.push(Token::Equals);
                }
            }
            '>' => {
                chars.next();
                tokens.push(Token::Greater);
            }
            '<' => {
                chars.next();
                tokens.push(Token::Less);
            }
            '(' => {
                chars.next();
                tokens.push(Token::Open);
            }
            ')' => {
                chars.next();
                tokens.push(Token::Close);
            }
            ',' => {
                chars.next();
                tokens.push(Token::Comma);
            }
            _ => {
                let mut word = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/') {
                        word.push(c);
                        chars.next();
                    } else {
                        break;
                    }
                }
                if word.is_empty() {
                    return Err(format!("unexpected character {c:?}"));
                }
                tokens.push(Token::Word(word));
            }
        }
    }
    Ok(tokens)
}

struct Parser {
    tokens: Vec<Token>,
    position: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.position)
    }

    fn next(&mut self) -> Option<Token> {
        let token = self.tokens.get(self.position).cloned();
        self.position += 1;
        token
    }

    /// A value after `=`, `==` or `!=`: may be empty (`a=` selects an empty value).
    fn value(&mut self) -> Result<String, String> {
        match self.peek() {
            None | Some(Token::Comma) => Ok(String::new()),
            Some(Token::Word(_)) => match self.next() {
                Some(Token::Word(word)) => Ok(word),
                _ => unreachable!("peeked a word"),
            },
            Some(other) => Err(format!("found {other:?}, expected a value")),
        }
    }

    fn set(&mut self) -> Result<BTreeSet<String>, String> {
        if self.next() != Some(Token::Open) {
            return Err("found no '(' after a set operator".into());
        }
        let mut values = BTreeSet::new();
        loop {
            match self.next() {
                Some(Token::Word(word)) => {
                    values.insert(word);
                }
                // `in (a,)` and `in ()` hold an empty value, as upstream parses them.
                Some(Token::Comma) => {
                    values.insert(String::new());
                    continue;
                }
                Some(Token::Close) => {
                    values.insert(String::new());
                    return Ok(values);
                }
                other => return Err(format!("found {other:?}, expected a value in a set")),
            }
            match self.next() {
                Some(Token::Comma) => {}
                Some(Token::Close) => return Ok(values),
                other => return Err(format!("found {other:?}, expected ',' or ')'")),
            }
        }
    }

    fn integer(&mut self) -> Result<i64, String> {
        match self.next() {
            Some(Token::Word(word)) => word.parse().map_err(|_| {
                format!("for 'Gt', 'Lt' operators, the value must be an integer: {word}")
            }),
            other => Err(format!("found {other:?}, expected an integer")),
        }
    }

    fn requirement(&mut self) -> Result<LabelRequirement, String> {
        if self.peek() == Some(&Token::Not) {
            self.next();
            return match self.next() {
                Some(Token::Word(key)) => Ok(LabelRequirement::DoesNotExist(key)),
                other => Err(format!("found {other:?}, expected a key after '!'")),
            };
        }
        let key = match self.next() {
            Some(Token::Word(key)) => key,
            other => return Err(format!("found {other:?}, expected a key")),
        };
        match self.peek() {
            None | Some(Token::Comma) => Ok(LabelRequirement::Exists(key)),
            Some(Token::Equals | Token::DoubleEquals) => {
                self.next();
                Ok(LabelRequirement::Equals(key, self.value()?))
            }
            Some(Token::NotEquals) => {
                self.next();
                Ok(LabelRequirement::NotEquals(key, self.value()?))
            }
            Some(Token::Greater) => {
                self.next();
                Ok(LabelRequirement::GreaterThan(key, self.integer()?))
            }
            Some(Token::Less) => {
                self.next();
                Ok(LabelRequirement::LessThan(key, self.integer()?))
            }
            Some(Token::Word(word)) if word == "in" => {
                self.next();
                Ok(LabelRequirement::In(key, self.set()?))
            }
            Some(Token::Word(word)) if word == "notin" => {
                self.next();
                Ok(LabelRequirement::NotIn(key, self.set()?))
            }
            Some(other) => Err(format!(
                "found {other:?}, expected an operator after key {key:?}"
            )),
        }
    }
}

impl LabelSelector {
    /// Parses a `labelSelector` query value; the error is the message the
    /// server puts in its `400 BadRequest`.
    pub(super) fn parse(input: &str) -> Result<Self, String> {
        let mut parser = Parser {
            tokens: tokenize(input)
                .map_err(|error| format!("unable to parse requirement: {error}"))?,
            position: 0,
        };
        let mut requirements = Vec::new();
        while parser.peek().is_some() {
            requirements.push(
                parser
                    .requirement()
                    .map_err(|error| format!("unable to parse requirement: {error}"))?,
            );
            match parser.next() {
                None => break,
                Some(Token::Comma) => {}
                Some(other) => {
                    return Err(format!(
                        "unable to parse requirement: found {other:?}, expected ','"
                    ));
                }
            }
        }
        Ok(Self { requirements })
    }

    pub(super) fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Whether an object's `metadata.labels` satisfy every requirement.
    pub(super) fn matches(&self, object: &Value) -> bool {
        let labels = object
            .pointer("/metadata/labels")
            .and_then(Value::as_object);
        let label = |key: &str| {
            labels
                .and_then(|labels| labels.get(key))
                .and_then(Value::as_str)
        };
        self.requirements
            .iter()
            .all(|requirement| match requirement {
                LabelRequirement::Exists(key) => label(key).is_some(),
                LabelRequirement::DoesNotExist(key) => label(key).is_none(),
                LabelRequirement::Equals(key, value) => label(key) == Some(value.as_str()),
                LabelRequirement::NotEquals(key, value) => label(key) != Some(value.as_str()),
                LabelRequirement::In(key, values) => label(key).is_some_and(|v| values.contains(v)),
                LabelRequirement::NotIn(key, values) => {
                    !label(key).is_some_and(|v| values.contains(v))
                }
                LabelRequirement::GreaterThan(key, bound) => label(key)
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|v| v > *bound),
                LabelRequirement::LessThan(key, bound) => label(key)
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|v| v < *bound),
            })
    }
}

/// A parsed `fieldSelector`: `field=value`, `field==value`, `field!=value`,
/// comma-separated, with `\` escaping `,`, `=`, `!` and `\` in values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct FieldSelector {
    terms: Vec<FieldTerm>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct FieldTerm {
    field: String,
    value: String,
    negated: bool,
}

/// Splits on unescaped `separator`, keeping escapes for the next stage.
fn split_unescaped(input: &str, separator: char) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut escaped = false;
    for c in input.chars() {
        if escaped {
            parts.last_mut().expect("never empty").push(c);
            escaped = false;
        } else if c == '\\' {
            parts.last_mut().expect("never empty").push(c);
            escaped = true;
        } else if c == separator {
            parts.push(String::new());
        } else {
            parts.last_mut().expect("never empty").push(c);
        }
    }
    parts
}

fn unescape(value: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(escaped @ ('\\' | ',' | '=' | '!')) => out.push(escaped),
                Some(other) => return Err(format!("invalid escape sequence \\{other}")),
                None => return Err("unterminated escape sequence".into()),
            }
        } else if matches!(c, ',' | '=') {
            return Err(format!(
                "invalid field selector value: unescaped {c:?} in {value:?}"
            ));
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

impl FieldSelector {
    /// Parses a `fieldSelector` and checks every field is one the server
    /// indexes for `kind` (it answers `400` "field label not supported"
    /// otherwise).
    pub(super) fn parse(input: &str, kind: ResourceKind) -> Result<Self, String> {
        let mut terms = Vec::new();
        for part in split_unescaped(input, ',') {
            if part.is_empty() {
                continue;
            }
            let (field, value, negated) = if let Some((field, value)) = part.split_once("!=") {
                (field, value, true)
            } else if let Some((field, value)) = part.split_once("==") {
                (field, value, false)
            } else if let Some((field, value)) = part.split_once('=') {
                (field, value, false)
            } else {
                return Err(format!(
                    "invalid selector: '{input}'; can't understand '{part}'"
                ));
            };
            let field = field.trim().to_owned();
            if !kind.selectable_fields().contains(&field.as_str()) {
                return Err(format!("field label not supported: {field}"));
            }
            terms.push(FieldTerm {
                field,
                value: unescape(value)?,
                negated,
            });
        }
        Ok(Self { terms })
    }

    pub(super) fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    pub(super) fn matches(&self, object: &Value) -> bool {
        self.terms.iter().all(|term| {
            let actual = field_value(object, &term.field);
            (actual == term.value) != term.negated
        })
    }
}

/// The string value of a selectable field, as the server's field-set
/// functions (`ServiceSelectableFields`, `NodeToSelectableFields`, ...)
/// render it.
fn field_value(object: &Value, field: &str) -> String {
    let text = |pointer: &str| {
        object
            .pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    match field {
        "metadata.name" => text("/metadata/name"),
        "metadata.namespace" => text("/metadata/namespace"),
        "spec.clusterIP" => text("/spec/clusterIP"),
        "spec.type" => text("/spec/type"),
        "spec.unschedulable" => object
            .pointer("/spec/unschedulable")
            .and_then(Value::as_bool)
            .unwrap_or(false)
            .to_string(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn labelled(labels: Value) -> Value {
        json!({"metadata": {"name": "web", "namespace": "default", "labels": labels}})
    }

    #[test]
    fn label_selector_grammar() {
        let object = labelled(json!({"app": "web", "tier": "3", "empty": ""}));
        let cases = [
            ("", true),
            ("app", true),
            ("!app", false),
            ("!service.kubernetes.io/headless", true),
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("missing!=x", true),
            ("app in (web, api)", true),
            ("app notin (web)", false),
            ("missing notin (web)", true),
            ("app in (api)", false),
            ("tier>2", true),
            ("tier<3", false),
            ("empty=", true),
            ("app=web,!service.kubernetes.io/service-proxy-name", true),
            ("app=web,tier=4", false),
        ];
        for (selector, expected) in cases {
            let parsed = LabelSelector::parse(selector).expect(selector);
            assert_eq!(parsed.matches(&object), expected, "{selector}");
        }
        assert!(LabelSelector::parse("app in web").is_err());
        assert!(LabelSelector::parse("app=web=x").is_err());
        assert!(LabelSelector::parse("tier>x").is_err());
    }

    #[test]
    fn field_selector_grammar_and_supported_fields() {
        let node = json!({"metadata": {"name": "node-a"}, "spec": {}});
        let selector = FieldSelector::parse("metadata.name=node-a", ResourceKind::Node).unwrap();
        assert!(selector.matches(&node));
        let selector = FieldSelector::parse(
            "metadata.name!=node-a,spec.unschedulable=false",
            ResourceKind::Node,
        )
        .unwrap();
        assert!(!selector.matches(&node));
        let error = FieldSelector::parse("spec.podCIDR=x", ResourceKind::Node).unwrap_err();
        assert_eq!(error, "field label not supported: spec.podCIDR");
        let service =
            json!({"metadata": {"name": "a", "namespace": "n"}, "spec": {"clusterIP": "None"}});
        let selector = FieldSelector::parse("spec.clusterIP!=None", ResourceKind::Service).unwrap();
        assert!(!selector.matches(&service));
        let escaped = FieldSelector::parse(r"metadata.name=a\,b", ResourceKind::Service).unwrap();
        assert!(escaped.matches(&json!({"metadata": {"name": "a,b"}})));
    }
}
