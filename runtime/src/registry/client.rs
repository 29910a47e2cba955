//! A client of one repository on one registry: the distribution API's requests, with Docker's
//! auth flow. The first request is the ping `GET /v2/`; a 401 names the scheme: Basic (the
//! stored credentials on every request) or Bearer (a token for `repository:NAME:ACTIONS` from
//! the realm it names, asked for with the credentials when there are some). A later 401, as
//! when a cross-repository mount needs pull access to the other repository, fetches a token
//! for the scope that challenge names and retries once.

use std::io::Read;
use std::sync::RwLock;
use std::time::Duration;

use base64::Engine;
use ureq::http::{self, Response};

use super::auth::{self, Challenge, Credentials};
use crate::{Error, Result};

/// How to reach registries.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Registries (`host[:port]`) to reach over plain HTTP or HTTPS without certificate checks,
    /// as Docker's `insecure-registries`. `*` marks every registry insecure (`--insecure`).
    pub insecure: Vec<String>,
    /// The credentials file (Docker's `config.json` format).
    pub auth_file: std::path::PathBuf,
    /// Layers transferred at once (Docker's `max-concurrent-downloads` is 3).
    pub parallel: usize,
}

impl Options {
    fn is_insecure(&self, host: &str) -> bool {
        let bare = host.rsplit_once(':').map_or(host, |(h, _)| h);
        self.insecure.iter().any(|i| i == "*" || i == host)
            // Docker treats loopback registries as insecure without being told.
            || bare == "localhost"
            || bare.starts_with("127.")
            || bare == "[::1]"
    }
}

/// The host a registry name is served at (`docker.io` is `registry-1.docker.io`).
pub fn api_host(domain: &str) -> &str {
    if domain == "docker.io" {
        "registry-1.docker.io"
    } else {
        domain
    }
}

/// A request body.
pub enum Body<'a> {
    /// No body.
    Empty,
    /// Bytes in memory (retried after a new token).
    Bytes(&'a [u8]),
    /// A file, sent with its length (not retried).
    File(&'a std::fs::File),
}

/// A client for `repo` on one registry.
pub struct Client {
    agent: ureq::Agent,
    base: String,
    host: String,
    repo: String,
    actions: &'static str,
    creds: Option<Credentials>,
    auth: RwLock<Option<String>>,
}

fn agent(insecure: bool) -> ureq::Agent {
    let mut tls = ureq::tls::TlsConfig::builder();
    if insecure {
        tls = tls.disable_verification(true);
    }
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(30)))
        // A stalled transfer fails instead of hanging the pull.
        .timeout_recv_response(Some(Duration::from_secs(120)))
        .max_idle_connections_per_host(8)
        .user_agent(concat!("strata/", env!("CARGO_PKG_VERSION")))
        .tls_config(tls.build())
        .build()
        .into()
}

/// What an HTTP failure means to the user.
pub fn transport(host: &str, e: ureq::Error) -> Error {
    Error::Registry(format!("{host}: {e}"))
}

impl Client {
    /// Connects to `domain` for `repo` with `actions` (`pull` or `pull,push`): pings the
    /// registry and authenticates as it asks.
    pub fn connect(
        domain: &str,
        repo: &str,
        actions: &'static str,
        opts: &Options,
    ) -> Result<Client> {
        let host = api_host(domain).to_string();
        let insecure = opts.is_insecure(domain);
        let creds = auth::lookup(&opts.auth_file, domain)?;
        let agent = agent(insecure);
        let mut client = Client {
            agent,
            base: format!("https://{host}"),
            host,
            repo: repo.to_string(),
            actions,
            creds,
            auth: RwLock::new(None),
        };
        let ping = match client.raw("GET", "/v2/", &[], Body::Empty) {
            Ok(r) => r,
            // An insecure registry may speak plain HTTP only.
            Err(_) if insecure => {
                client.base = format!("http://{}", client.host);
                client.raw("GET", "/v2/", &[], Body::Empty)?
            }
            Err(e) => return Err(e),
        };
        match ping.status().as_u16() {
            200..=299 => {}
            401 => {
                let scope = format!("repository:{}:{}", client.repo, client.actions);
                client.authenticate(&ping, &scope)?;
            }
            s => {
                return Err(Error::Registry(format!(
                    "{}: GET /v2/ answered {s}: not a registry (distribution API v2)?",
                    client.host
                )));
            }
        }
        Ok(client)
    }

    /// The registry's host.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The repository.
    pub fn repo(&self) -> &str {
        &self.repo
    }

    /// Sets the Authorization to use after a 401 `challenge` for `scope`.
    fn authenticate(&self, resp: &Response<ureq::Body>, scope: &str) -> Result<()> {
        let header = resp
            .headers()
            .get(http::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let value = match auth::parse_challenge(header) {
            Some(Challenge::Basic) => {
                let c = self.creds.as_ref().ok_or_else(|| {
                    Error::Unauthorized(format!(
                        "{}: authentication required: run `strata login {}`",
                        self.host, self.host
                    ))
                })?;
                format!("Basic {}", c.basic())
            }
            Some(Challenge::Bearer { realm, service, .. }) => {
                format!("Bearer {}", self.token(&realm, service.as_deref(), scope)?)
            }
            None => {
                return Err(Error::Unauthorized(format!(
                    "{}: 401 with an authentication challenge Strata does not know: {header:?}",
                    self.host
                )));
            }
        };
        *self.auth.write().expect("auth lock") = Some(value);
        Ok(())
    }

    /// A bearer token from `realm` (the token server) for `scope`.
    fn token(&self, realm: &str, service: Option<&str>, scope: &str) -> Result<String> {
        let mut url = format!("{realm}?scope={}", auth::query_escape(scope));
        if let Some(s) = service {
            url.push_str(&format!("&service={}", auth::query_escape(s)));
        }
        let mut req = self.agent.get(&url);
        if let Some(c) = &self.creds {
            req = req.header("Authorization", format!("Basic {}", c.basic()));
        }
        let resp = req.call().map_err(|e| transport(realm, e))?;
        match resp.status().as_u16() {
            200 => {}
            401 | 403 => {
                return Err(Error::Unauthorized(format!(
                    "{}: the token server {realm} refused {}: {}",
                    self.host,
                    if self.creds.is_some() {
                        "the credentials"
                    } else {
                        "anonymous access (run `strata login`)"
                    },
                    resp.status()
                )));
            }
            s => {
                return Err(Error::Registry(format!(
                    "{}: token server {realm} answered {s}",
                    self.host
                )));
            }
        }
        let body = self.read_small(resp, 1 << 20)?;
        auth::token_from(&body).ok_or_else(|| {
            Error::Registry(format!("{}: token server {realm} sent no token", self.host))
        })
    }

    fn url(&self, path: &str) -> String {
        if path.starts_with("http://") || path.starts_with("https://") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        }
    }

    fn raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Body<'_>,
    ) -> Result<Response<ureq::Body>> {
        let mut b = http::Request::builder().method(method).uri(self.url(path));
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        if let Some(a) = self.auth.read().expect("auth lock").as_deref() {
            b = b.header("Authorization", a);
        }
        let bad = |e: http::Error| Error::Registry(format!("{}: bad request: {e}", self.host));
        let r = match body {
            Body::Empty => self.agent.run(b.body(()).map_err(bad)?),
            Body::Bytes(bytes) => self.agent.run(b.body(bytes).map_err(bad)?),
            Body::File(f) => self.agent.run(b.body(f).map_err(bad)?),
        };
        r.map_err(|e| transport(&self.host, e))
    }

    /// Sends a request to `path` (below the registry, e.g. `/v2/NAME/blobs/DIGEST`, or an
    /// absolute upload URL), re-authenticating once on a 401 when the body can be sent again.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Body<'_>,
    ) -> Result<Response<ureq::Body>> {
        let again = match &body {
            Body::Empty => Some(Body::Empty),
            Body::Bytes(b) => Some(Body::Bytes(b)),
            Body::File(_) => None,
        };
        let r = self.raw(method, path, headers, body)?;
        if r.status() != 401 {
            return Ok(r);
        }
        let Some(again) = again else {
            return Ok(r);
        };
        let scope = auth::challenge_scope(&r)
            .unwrap_or_else(|| format!("repository:{}:{}", self.repo, self.actions));
        self.authenticate(&r, &scope)?;
        self.raw(method, path, headers, again)
    }

    /// `send`, then fails with the registry's own error message unless the status is `want`.
    pub fn expect(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Body<'_>,
        want: &[u16],
    ) -> Result<Response<ureq::Body>> {
        let r = self.send(method, path, headers, body)?;
        if want.contains(&r.status().as_u16()) {
            return Ok(r);
        }
        Err(self.failure(method, path, r))
    }

    /// The error for an unexpected response: the status and the registry's error codes.
    pub fn failure(&self, method: &str, path: &str, r: Response<ureq::Body>) -> Error {
        let status = r.status();
        let body = self.read_small(r, 64 << 10).unwrap_or_default();
        let detail = registry_errors(&body);
        let what = format!("{}: {method} {path}: {status}{detail}", self.host);
        match status.as_u16() {
            401 | 403 => Error::Unauthorized(format!(
                "{what}{}",
                if self.creds.is_none() {
                    " (not logged in: run `strata login`)"
                } else {
                    ""
                }
            )),
            404 => Error::NotFound(what),
            _ => Error::Registry(what),
        }
    }

    /// Reads a small JSON document (manifest, config) of at most `limit` bytes.
    pub fn read_small(&self, mut r: Response<ureq::Body>, limit: u64) -> Result<Vec<u8>> {
        r.body_mut()
            .with_config()
            .limit(limit)
            .read_to_vec()
            .map_err(|e| transport(&self.host, e))
    }

    /// The body of `r` as a reader.
    pub fn reader(r: Response<ureq::Body>) -> impl Read + Send + 'static {
        r.into_body().into_reader()
    }
}

/// `: CODE message; ...` from a distribution error body (`{"errors":[{"code","message"}]}`).
fn registry_errors(body: &[u8]) -> String {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return String::new();
    };
    let list: Vec<String> = v["errors"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            format!(
                "{} {}",
                e["code"].as_str().unwrap_or("?"),
                e["message"].as_str().unwrap_or("")
            )
        })
        .collect();
    if list.is_empty() {
        String::new()
    } else {
        format!(": {}", list.join("; "))
    }
}

/// Basic credentials as the `Authorization` header carries them.
pub(super) fn basic(user: &str, password: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries_are_insecure_by_default() {
        let o = Options::default();
        assert!(o.is_insecure("127.0.0.1:5000"));
        assert!(o.is_insecure("localhost:5000"));
        assert!(!o.is_insecure("registry.example.com"));
        let o = Options {
            insecure: vec!["registry.example.com".into()],
            ..Default::default()
        };
        assert!(o.is_insecure("registry.example.com"));
        assert!(!o.is_insecure("registry.example.com:444"));
    }

    #[test]
    fn registry_errors_are_quoted() {
        let body = br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#;
        assert_eq!(registry_errors(body), ": MANIFEST_UNKNOWN manifest unknown");
        assert_eq!(registry_errors(b"<html>"), "");
    }
}
