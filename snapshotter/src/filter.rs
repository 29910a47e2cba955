//! containerd's filter syntax for `List` (Walk): `name==x`, `parent==x`, `kind==committed`,
//! `labels."containerd.io/gc.root"`, `labels.l!=v`, `labels.k~=regex`, selectors joined by `,`
//! (all must match); several filters are alternatives (any may match).
//!
//! Grammar (containerd `filters/parser.go`):
//! ```text
//! filter   := selector ("," selector)*
//! selector := fieldpath (op value)?        op := "==" | "!=" | "~="
//! fieldpath:= field ("." field)*           field := [A-Za-z_][A-Za-z0-9_]* | quoted
//! value    := quoted | [^,]+               quoted := "..." (with \ escapes) | /.../
//! ```
//! A selector without an operator tests that the field is present (and not empty).

use regex::Regex;

use crate::{Error, Result};

/// What a selector compares.
#[derive(Debug, Clone)]
enum Op {
    Present,
    Eq(String),
    Ne(String),
    Matches(Regex),
}

/// One `fieldpath op value` term.
#[derive(Debug, Clone)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

/// A parsed filter: selectors that must all match.
#[derive(Debug, Clone)]
pub struct Filter {
    selectors: Vec<Selector>,
}

/// Something filters can look at: a field path resolves to a value, or to nothing.
pub trait Fields {
    /// The value at `path`, if the field exists.
    fn field(&self, path: &[String]) -> Option<String>;
}

impl Filter {
    /// Parses one filter string.
    pub fn parse(input: &str) -> Result<Filter> {
        let mut p = Parser {
            s: input.as_bytes(),
            i: 0,
            input,
        };
        let mut selectors = vec![p.selector()?];
        p.ws();
        while p.eat(b',') {
            selectors.push(p.selector()?);
            p.ws();
        }
        if p.i != p.s.len() {
            return Err(p.err("unexpected input"));
        }
        Ok(Filter { selectors })
    }

    /// True when every selector matches.
    pub fn matches(&self, f: &dyn Fields) -> bool {
        self.selectors.iter().all(|s| {
            let v = f.field(&s.path);
            match &s.op {
                Op::Present => v.is_some_and(|v| !v.is_empty()),
                Op::Eq(want) => v.as_deref() == Some(want.as_str()),
                Op::Ne(want) => v.as_deref() != Some(want.as_str()),
                Op::Matches(re) => v.is_some_and(|v| re.is_match(&v)),
            }
        })
    }
}

/// True when `filters` is empty or any of them matches.
pub fn any_matches(filters: &[Filter], f: &dyn Fields) -> bool {
    filters.is_empty() || filters.iter().any(|flt| flt.matches(f))
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    input: &'a str,
}

impl Parser<'_> {
    fn err(&self, what: &str) -> Error {
        Error::InvalidArgument(format!(
            "filter {:?}: {what} at offset {}",
            self.input, self.i
        ))
    }

    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn eat(&mut self, b: u8) -> bool {
        if self.s.get(self.i) == Some(&b) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn selector(&mut self) -> Result<Selector> {
        self.ws();
        let mut path = vec![self.field()?];
        while self.eat(b'.') {
            path.push(self.field()?);
        }
        self.ws();
        let op = match (self.s.get(self.i), self.s.get(self.i + 1)) {
            (Some(b'='), Some(b'=')) => Some("=="),
            (Some(b'!'), Some(b'=')) => Some("!="),
            (Some(b'~'), Some(b'=')) => Some("~="),
            _ => None,
        };
        let Some(op) = op else {
            return Ok(Selector {
                path,
                op: Op::Present,
            });
        };
        self.i += 2;
        self.ws();
        let value = self.value()?;
        let op = match op {
            "==" => Op::Eq(value),
            "!=" => Op::Ne(value),
            _ => Op::Matches(
                Regex::new(&value)
                    .map_err(|e| self.err(&format!("bad regular expression: {e}")))?,
            ),
        };
        Ok(Selector { path, op })
    }

    fn field(&mut self) -> Result<String> {
        match self.s.get(self.i) {
            Some(b'"') => self.quoted(b'"'),
            Some(c) if c.is_ascii_alphabetic() || *c == b'_' => {
                let start = self.i;
                while self
                    .s
                    .get(self.i)
                    .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_')
                {
                    self.i += 1;
                }
                Ok(self.input[start..self.i].to_string())
            }
            _ => Err(self.err("expected a field name")),
        }
    }

    fn value(&mut self) -> Result<String> {
        match self.s.get(self.i) {
            Some(b'"') => self.quoted(b'"'),
            Some(b'/') => self.quoted(b'/'),
            Some(_) => {
                let start = self.i;
                while self.s.get(self.i).is_some_and(|&c| c != b',') {
                    self.i += 1;
                }
                let v = self.input[start..self.i].trim_end();
                if v.is_empty() {
                    return Err(self.err("expected a value"));
                }
                Ok(v.to_string())
            }
            None => Err(self.err("expected a value")),
        }
    }

    fn quoted(&mut self, q: u8) -> Result<String> {
        self.i += 1;
        let mut out = Vec::new();
        loop {
            match self.s.get(self.i) {
                None => return Err(self.err("unterminated quoted string")),
                Some(&c) if c == q => {
                    self.i += 1;
                    break;
                }
                Some(b'\\') => {
                    let c = *self
                        .s
                        .get(self.i + 1)
                        .ok_or_else(|| self.err("unterminated escape"))?;
                    out.push(match c {
                        b'n' => b'\n',
                        b't' => b'\t',
                        other => other,
                    });
                    self.i += 2;
                }
                Some(&c) => {
                    out.push(c);
                    self.i += 1;
                }
            }
        }
        String::from_utf8(out).map_err(|_| self.err("quoted string is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct M(HashMap<&'static str, &'static str>);
    impl Fields for M {
        fn field(&self, path: &[String]) -> Option<String> {
            self.0.get(path.join(".").as_str()).map(|s| s.to_string())
        }
    }

    #[test]
    fn parses_and_matches() {
        let m = M(HashMap::from([
            ("kind", "committed"),
            ("name", "a"),
            ("labels.containerd.io/gc.root", "x"),
            ("labels.l", "v"),
        ]));
        for (f, want) in [
            ("kind==committed", true),
            ("kind!=committed", false),
            ("kind==active", false),
            ("labels.\"containerd.io/gc.root\"", true),
            ("labels.missing", false),
            ("labels.l==v,kind==committed", true),
            ("labels.l==v,kind==view", false),
            ("name~=^a$", true),
            ("name~=/[b-z]/", false),
            ("labels.\"l\"==\"v\"", true),
            (" kind == committed ", true),
        ] {
            assert_eq!(Filter::parse(f).unwrap().matches(&m), want, "{f}");
        }
        for bad in [
            "",
            "==x",
            "kind==",
            "labels.\"open",
            "kind==x,",
            "name~=(",
            "9abc",
        ] {
            assert!(Filter::parse(bad).is_err(), "{bad:?} should not parse");
        }
        let any = [
            Filter::parse("kind==view").unwrap(),
            Filter::parse("name==a").unwrap(),
        ];
        assert!(any_matches(&any, &m));
        assert!(any_matches(&[], &m));
    }
}
