//! Kubernetes label selectors (`labelSelector=`), parsed and matched. Pure.
//!
//! The grammar is the API server's: comma-separated requirements, each `key=value`,
//! `key==value`, `key!=value`, `key`, `!key`, `key in (a,b)` or `key notin (a,b)`.
//! An empty selector matches everything.

use std::collections::BTreeMap;

/// Every requirement must hold for a selector to match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

/// One comma-separated term of a selector.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    /// `key=value`, `key==value`, or `key in (..)`: the label is one of these values.
    In(String, Vec<String>),
    /// `key!=value` or `key notin (..)`: the label is absent or none of these values.
    NotIn(String, Vec<String>),
    /// `key`: the label is present.
    Exists(String),
    /// `!key`: the label is absent.
    Absent(String),
}

/// Why a `labelSelector` was refused (answered with 400 Bad Request).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid label selector {selector:?}: {reason}")]
pub struct SelectorError {
    selector: String,
    reason: &'static str,
}

impl Selector {
    /// Parses a `labelSelector` query value.
    pub fn parse(s: &str) -> Result<Selector, SelectorError> {
        let fail = |reason| SelectorError { selector: s.to_owned(), reason };
        let mut requirements = Vec::new();
        for term in split_terms(s).ok_or_else(|| fail("unbalanced parentheses"))? {
            let term = term.trim();
            if term.is_empty() {
                if s.trim().is_empty() {
                    continue;
                }
                return Err(fail("empty requirement"));
            }
            requirements.push(parse_term(term).map_err(fail)?);
        }
        Ok(Selector { requirements })
    }

    /// Whether an object with these labels is selected.
    pub fn matches(&self, labels: Option<&BTreeMap<String, String>>) -> bool {
        let get = |key: &str| labels.and_then(|l| l.get(key));
        self.requirements.iter().all(|r| match r {
            Requirement::In(key, values) => get(key).is_some_and(|v| values.contains(v)),
            Requirement::NotIn(key, values) => get(key).is_none_or(|v| !values.contains(v)),
            Requirement::Exists(key) => get(key).is_some(),
            Requirement::Absent(key) => get(key).is_none(),
        })
    }
}

/// Splits at the commas outside parentheses; `None` when they do not balance.
fn split_terms(s: &str) -> Option<Vec<&str>> {
    let (mut terms, mut depth, mut start) = (Vec::new(), 0u32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.checked_sub(1)?,
            ',' if depth == 0 => {
                terms.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    (depth == 0).then(|| {
        terms.push(&s[start..]);
        terms
    })
}

fn parse_term(term: &str) -> Result<Requirement, &'static str> {
    if let Some(key) = term.strip_prefix('!') {
        return Ok(Requirement::Absent(label_key(key.trim())?));
    }
    if let Some((key, value)) = term.split_once("!=") {
        return Ok(Requirement::NotIn(label_key(key.trim())?, vec![label_value(value.trim())?]));
    }
    if let Some((key, value)) = term.split_once('=') {
        let value = value.strip_prefix('=').unwrap_or(value);
        return Ok(Requirement::In(label_key(key.trim())?, vec![label_value(value.trim())?]));
    }
    if let Some((key, rest)) = term.split_once(char::is_whitespace) {
        let key = label_key(key)?;
        let rest = rest.trim_start();
        let (negate, set) = if let Some(set) = rest.strip_prefix("notin") {
            (true, set)
        } else if let Some(set) = rest.strip_prefix("in") {
            (false, set)
        } else {
            return Err("expected =, ==, !=, in or notin after the key");
        };
        let values = set_values(set.trim())?;
        return Ok(if negate { Requirement::NotIn(key, values) } else { Requirement::In(key, values) });
    }
    Ok(Requirement::Exists(label_key(term)?))
}

/// `(a, b)` -> `[a, b]`.
fn set_values(set: &str) -> Result<Vec<String>, &'static str> {
    let inner = set.strip_prefix('(').and_then(|s| s.strip_suffix(')')).ok_or("expected a (value, ...) set")?;
    inner.split(',').map(|v| label_value(v.trim())).collect()
}

/// A label key: an optional DNS-subdomain prefix and `/`, then a name.
fn label_key(key: &str) -> Result<String, &'static str> {
    let name = key.rsplit_once('/').map_or(key, |(_, name)| name);
    if name.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c)) {
        return Err("a label key is a name with an optional prefix/ (letters, digits, '-', '_', '.')");
    }
    Ok(key.to_owned())
}

fn label_value(value: &str) -> Result<String, &'static str> {
    if !value.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        return Err("a label value has only letters, digits, '-', '_' and '.'");
    }
    Ok(value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn equality_matches_the_service_name_label() {
        let sel = Selector::parse("kubernetes.io/service-name=server").unwrap();
        assert!(sel.matches(Some(&labels(&[("kubernetes.io/service-name", "server")]))));
        assert!(!sel.matches(Some(&labels(&[("kubernetes.io/service-name", "other")]))));
        assert!(!sel.matches(None));
        assert_eq!(Selector::parse("kubernetes.io/service-name==server").unwrap(), sel);
    }

    #[test]
    fn empty_selector_matches_everything() {
        let sel = Selector::parse("").unwrap();
        assert!(sel.matches(None));
        assert!(sel.matches(Some(&labels(&[("a", "b")]))));
    }

    #[test]
    fn every_requirement_must_hold() {
        let sel = Selector::parse("app=greeter, tier!=db,zone,!canary").unwrap();
        assert!(sel.matches(Some(&labels(&[("app", "greeter"), ("zone", "z1")]))));
        assert!(sel.matches(Some(&labels(&[("app", "greeter"), ("zone", "z1"), ("tier", "web")]))));
        assert!(!sel.matches(Some(&labels(&[("app", "greeter"), ("zone", "z1"), ("tier", "db")]))));
        assert!(!sel.matches(Some(&labels(&[("app", "greeter")]))));
        assert!(!sel.matches(Some(&labels(&[("app", "greeter"), ("zone", "z1"), ("canary", "")]))));
    }

    #[test]
    fn set_based_requirements() {
        let sel = Selector::parse("svc in (server, other),env notin (test)").unwrap();
        assert!(sel.matches(Some(&labels(&[("svc", "other")]))));
        assert!(sel.matches(Some(&labels(&[("svc", "server"), ("env", "prod")]))));
        assert!(!sel.matches(Some(&labels(&[("svc", "server"), ("env", "test")]))));
        assert!(!sel.matches(Some(&labels(&[("svc", "third")]))));
    }

    #[test]
    fn refuses_malformed_selectors() {
        for bad in ["a=b,", ",a", "a in (b", "a in b", "a ~ b", "a=b c", "=b", "a/=b", "a in (b))"] {
            assert!(Selector::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
