//! Credentials and auth challenges.
//!
//! Credentials live in Docker's `config.json` format (`{"auths": {"HOST": {"auth":
//! base64("user:password")}}}`), so a file written by `docker login` or `podman login` works
//! too. Strata writes it atomically with mode 0600 (a temporary file in the same directory,
//! then rename); a file other users can read is refused.

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;

use crate::{Error, Result};

/// A user name and password (or identity token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub user: String,
    /// The password.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <password>)", self.user)
    }
}

impl Credentials {
    /// The value of a Basic `Authorization` header.
    pub fn basic(&self) -> String {
        super::client::basic(&self.user, &self.password)
    }
}

/// The default credentials file: `$STRATA_AUTH_FILE`, else `$XDG_CONFIG_HOME/strata/auth.json`
/// (`~/.config/strata/auth.json`).
pub fn default_auth_file() -> PathBuf {
    if let Some(p) = std::env::var_os("STRATA_AUTH_FILE").filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    config_dir().join("auth.json")
}

/// `$XDG_CONFIG_HOME/strata` (`~/.config/strata`).
pub fn config_dir() -> PathBuf {
    std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/".into())).join(".config")
        })
        .join("strata")
}

/// The keys a registry may be stored under (Docker stores Docker Hub under its v1 URL).
fn keys(domain: &str) -> Vec<String> {
    let mut k = vec![
        domain.to_string(),
        format!("https://{domain}"),
        format!("http://{domain}"),
    ];
    if domain == "docker.io" {
        k.push("https://index.docker.io/v1/".into());
        k.push("index.docker.io".into());
    }
    k
}

fn read(file: &Path) -> Result<serde_json::Value> {
    match std::fs::read(file) {
        Ok(data) => {
            let mode = std::fs::metadata(file)
                .map_err(|e| Error::io("stat", file, e))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(Error::Invalid(format!(
                    "{}: credentials readable by other users (mode {:o}): chmod 600 it",
                    file.display(),
                    mode & 0o7777
                )));
            }
            serde_json::from_slice(&data)
                .map_err(|e| Error::Invalid(format!("{}: not JSON: {e}", file.display())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(serde_json::json!({})),
        Err(e) => Err(Error::io("read", file, e)),
    }
}

/// The stored credentials for `domain`, if any.
pub fn lookup(file: &Path, domain: &str) -> Result<Option<Credentials>> {
    let v = read(file)?;
    for k in keys(domain) {
        let Some(entry) = v["auths"].get(&k) else {
            continue;
        };
        if let Some(a) = entry["auth"].as_str() {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(a.trim())
                .map_err(|e| Error::Invalid(format!("{}: auth of {k}: {e}", file.display())))?;
            let s = String::from_utf8(raw).map_err(|_| {
                Error::Invalid(format!("{}: auth of {k} is not UTF-8", file.display()))
            })?;
            let (user, password) = s.split_once(':').ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: auth of {k} is not user:password",
                    file.display()
                ))
            })?;
            return Ok(Some(Credentials {
                user: user.into(),
                password: password.into(),
            }));
        }
    }
    Ok(None)
}

fn write(file: &Path, v: &serde_json::Value) -> Result<()> {
    let dir = file.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io("create", dir, e))?;
    let tmp = dir.join(format!(
        ".{}.{}",
        file.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let data = serde_json::to_vec_pretty(v).expect("JSON serializes");
    let r = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        std::io::Write::write_all(&mut f, &data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, file)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r.map_err(|e| Error::io("write", file, e))
}

/// Stores `creds` for `domain` in `file` (mode 0600), replacing what was there for it.
pub fn store(file: &Path, domain: &str, creds: &Credentials) -> Result<()> {
    let mut v = read(file)?;
    if !v["auths"].is_object() {
        v["auths"] = serde_json::json!({});
    }
    let auths = v["auths"].as_object_mut().expect("made an object");
    for k in keys(domain) {
        auths.remove(&k);
    }
    auths.insert(domain.into(), serde_json::json!({ "auth": creds.basic() }));
    write(file, &v)
}

/// Removes the credentials of `domain`; false when there were none.
pub fn remove(file: &Path, domain: &str) -> Result<bool> {
    let mut v = read(file)?;
    let Some(auths) = v["auths"].as_object_mut() else {
        return Ok(false);
    };
    let mut found = false;
    for k in keys(domain) {
        found |= auths.remove(&k).is_some();
    }
    if found {
        write(file, &v)?;
    }
    Ok(found)
}

/// A `WWW-Authenticate` challenge.
#[derive(Debug, PartialEq, Eq)]
pub enum Challenge {
    /// HTTP Basic.
    Basic,
    /// A token server.
    Bearer {
        /// The token server's URL.
        realm: String,
        /// The service to ask a token for.
        service: Option<String>,
        /// The scope the registry wants.
        scope: Option<String>,
    },
}

/// Parses `Basic realm="..."` or `Bearer realm="...",service="...",scope="..."`.
pub fn parse_challenge(h: &str) -> Option<Challenge> {
    let h = h.trim();
    let (scheme, rest) = h.split_once(' ').unwrap_or((h, ""));
    let params = parse_params(rest);
    let get = |k: &str| {
        params
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    if scheme.eq_ignore_ascii_case("basic") {
        Some(Challenge::Basic)
    } else if scheme.eq_ignore_ascii_case("bearer") {
        Some(Challenge::Bearer {
            realm: get("realm").filter(|r| r.starts_with("http"))?,
            service: get("service"),
            scope: get("scope"),
        })
    } else {
        None
    }
}

/// `k=v` and `k="v, with commas"` pairs, comma separated.
fn parse_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=')).collect();
        if key.is_empty() || chars.next().is_none() {
            break;
        }
        let mut val = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '"' => break,
                    '\\' => val.extend(chars.next()),
                    c => val.push(c),
                }
            }
        } else {
            val = std::iter::from_fn(|| chars.next_if(|c| *c != ',')).collect();
        }
        out.push((key.trim().to_string(), val.trim().to_string()));
    }
    out
}

/// The scope a 401's Bearer challenge names.
pub fn challenge_scope(r: &ureq::http::Response<ureq::Body>) -> Option<String> {
    let h = r.headers().get("www-authenticate")?.to_str().ok()?;
    match parse_challenge(h)? {
        Challenge::Bearer { scope, .. } => scope,
        Challenge::Basic => None,
    }
}

/// The token of a token server's answer (`token`, or OAuth2's `access_token`).
pub fn token_from(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v["token"]
        .as_str()
        .or_else(|| v["access_token"].as_str())
        .filter(|t| !t.is_empty())
        .map(String::from)
}

/// Percent-encodes a query value.
pub fn query_escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse_as_registries_send_them() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        // A scope with commas inside quotes stays one value.
        match parse_challenge(r#"bearer realm="http://t/x", scope="repository:a:pull,push""#) {
            Some(Challenge::Bearer { scope, .. }) => {
                assert_eq!(scope.as_deref(), Some("repository:a:pull,push"))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(parse_challenge(r#"Bearer service="x""#), None, "no realm");
        assert_eq!(parse_challenge(r#"Bearer realm="file:///etc""#), None);
    }

    #[test]
    fn tokens_come_from_either_field() {
        assert_eq!(token_from(br#"{"token":"abc"}"#).as_deref(), Some("abc"));
        assert_eq!(
            token_from(br#"{"access_token":"xyz"}"#).as_deref(),
            Some("xyz")
        );
        assert_eq!(token_from(br#"{"token":""}"#), None);
        assert_eq!(token_from(b"nope"), None);
        assert_eq!(
            query_escape("repository:a/b:pull,push"),
            "repository%3Aa%2Fb%3Apull%2Cpush"
        );
    }

    #[test]
    fn credentials_round_trip_owner_only() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("sub/auth.json");
        let c = Credentials {
            user: "u".into(),
            password: "p:w".into(),
        };
        assert_eq!(lookup(&f, "r:5000").unwrap(), None);
        store(&f, "r:5000", &c).unwrap();
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(lookup(&f, "r:5000").unwrap(), Some(c.clone()));
        // Docker's way of writing Docker Hub is understood.
        std::fs::write(
            &f,
            format!(
                r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{}"}}}}}}"#,
                c.basic()
            ),
        )
        .unwrap();
        assert_eq!(lookup(&f, "docker.io").unwrap(), Some(c));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = lookup(&f, "docker.io").unwrap_err().to_string();
        assert!(e.contains("readable by other users"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(remove(&f, "docker.io").unwrap());
        assert!(!remove(&f, "docker.io").unwrap());
    }
}
