//! Registries: `pull`, `push` and `login` over the OCI distribution API.
//!
//! - `client`: one repository on one registry; the ping, Basic and Bearer-token auth, and the
//!   registry's error bodies turned into errors that say what happened.
//! - `auth`: the credentials file (Docker's `config.json` format, mode 0600) and challenges.
//! - `pull`: manifest or index (platform selection), config, then layers streamed several at
//!   once straight into their snapshots, verified on the way.
//! - `push`: only the blobs the registry lacks (cross-repository mounts when it offers them),
//!   monolithic or chunked uploads, then the manifest.
//!
//! HTTPS by default; registries marked insecure (`--insecure`, `STRATA_INSECURE_REGISTRIES`,
//! `insecure-registries` in `$XDG_CONFIG_HOME/strata/config.json`, and loopback addresses, as
//! Docker does) are tried over HTTPS without certificate checks, then plain HTTP.

mod auth;
mod client;
mod pull;
mod push;

pub use auth::{
    Challenge, Credentials, config_dir, default_auth_file, parse_challenge, token_from,
};
pub use client::{Client, Options, api_host};
pub use pull::{Platform, Pulled, choose_platform, classify_manifest, pull};
pub use push::{CHUNK, Pushed, push};

use crate::{Error, Result};

/// One progress bar per blob on stderr (`show`: a terminal), labelled with the digest's first
/// 12 hex digits; `None`s otherwise.
pub(crate) fn blob_bars(
    show: bool,
    blobs: impl Iterator<Item = (strata_overlay::Digest, u64)>,
) -> Vec<Option<indicatif::ProgressBar>> {
    let multi = show.then(|| {
        indicatif::MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::stderr())
    });
    let style = indicatif::ProgressStyle::with_template(
        "{prefix:.bold} {msg:12} [{bar:30}] {bytes}/{total_bytes}",
    )
    .expect("valid template")
    .progress_chars("=> ");
    blobs
        .map(|(d, size)| {
            let b = multi
                .as_ref()?
                .add(indicatif::ProgressBar::new(size).with_style(style.clone()));
            b.set_prefix(d.hex()[..12].to_string());
            b.set_message("waiting");
            Some(b)
        })
        .collect()
}

/// Checks `creds` against `domain` (a ping with them, and a token when the registry wants one),
/// then stores them in `opts.auth_file`.
pub fn login(domain: &str, creds: &Credentials, opts: &Options) -> Result<()> {
    // Authenticate against a file holding only the new credentials, so a wrong password is
    // found before anything is written.
    let t = std::env::temp_dir().join(format!("strata-login-{}", std::process::id()));
    let _ = std::fs::remove_file(&t);
    auth::store(&t, domain, creds)?;
    let probe = Options {
        auth_file: t.clone(),
        ..opts.clone()
    };
    let r = Client::connect(domain, "strata/login", "pull", &probe).and_then(|c| {
        // A registry with Basic auth answers the ping itself; make sure it accepted us.
        let r = c.send("GET", "/v2/", &[], client::Body::Empty)?;
        match r.status().as_u16() {
            200..=299 => Ok(()),
            401 | 403 => Err(Error::Unauthorized(format!(
                "{}: login refused: wrong user name or password",
                c.host()
            ))),
            _ => Err(c.failure("GET", "/v2/", r)),
        }
    });
    let _ = std::fs::remove_file(&t);
    r?;
    auth::store(&opts.auth_file, domain, creds)
}

/// Removes the stored credentials of `domain`; false when there were none.
pub fn logout(domain: &str, opts: &Options) -> Result<bool> {
    auth::remove(&opts.auth_file, domain)
}

/// The insecure registries configured: `STRATA_INSECURE_REGISTRIES` (comma separated) and the
/// `insecure-registries` list of `$XDG_CONFIG_HOME/strata/config.json`.
pub fn configured_insecure() -> Result<Vec<String>> {
    let mut out: Vec<String> = std::env::var("STRATA_INSECURE_REGISTRIES")
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let Some((file, v)) = user_config()? else {
        return Ok(out);
    };
    match &v["insecure-registries"] {
        serde_json::Value::Null => {}
        serde_json::Value::Array(list) => {
            for i in list {
                out.push(
                    i.as_str()
                        .ok_or_else(|| {
                            Error::Invalid(format!(
                                "{}: insecure-registries holds a non-string",
                                file.display()
                            ))
                        })?
                        .to_string(),
                );
            }
        }
        _ => {
            return Err(Error::Invalid(format!(
                "{}: insecure-registries must be a list",
                file.display()
            )));
        }
    }
    Ok(out)
}

/// `$XDG_CONFIG_HOME/strata/config.json`, parsed, with its path: `None` when there is none, or
/// when it cannot be read (another user's HOME: not this user's settings, warned about).
pub fn user_config() -> Result<Option<(std::path::PathBuf, serde_json::Value)>> {
    let file = config_dir().join("config.json");
    match std::fs::read(&file) {
        Ok(data) => {
            let v = serde_json::from_slice(&data)
                .map_err(|e| Error::Invalid(format!("{}: not JSON: {e}", file.display())))?;
            Ok(Some((file, v)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            tracing::warn!(file = %file.display(), "cannot read the config file: using the defaults");
            Ok(None)
        }
        Err(e) => Err(Error::io("read", &file, e)),
    }
}
