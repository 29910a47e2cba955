//! Which backend a store's layers mount with, as Podman's `storage.conf` says which driver to
//! use: `--storage-mode` (global), else `STRATA_STORAGE_MODE`, else `storage-mode` in
//! `$XDG_CONFIG_HOME/strata/config.json`, else `auto`.
//!
//! - `overlay`: kernel overlayfs, or a clear error where it cannot mount on the store's root;
//! - `fuse`: Strata's FUSE union for every container;
//! - `auto`: kernel overlay where a trial mount on the store's root works (as root, or in a
//!   user namespace with `userxattr`), FUSE where it does not (a root on overlayfs, NFS or
//!   another filesystem kernel overlay refuses as an upper), with the reason logged and shown
//!   by `strata info`.
//!
//! The on-disk format is the same either way, so a store can move between modes.

use std::sync::OnceLock;

use strata_snapshotter::Mode;

use crate::{Error, Result};

/// The mode chosen on the command line, which wins over the environment and the config.
static CHOSEN: OnceLock<(Mode, &'static str)> = OnceLock::new();

/// The `--storage-mode` given on the command line (`None`: not given). A value that does not
/// parse is an error naming the accepted ones.
pub fn choose(flag: Option<&str>) -> Result<()> {
    if let Some(v) = flag {
        let _ = CHOSEN.set((parse(v, "--storage-mode")?, "--storage-mode"));
    }
    Ok(())
}

fn parse(v: &str, from: &str) -> Result<Mode> {
    v.parse()
        .map_err(|e: strata_snapshotter::Error| Error::Invalid(format!("{from}: {e}")))
}

/// The storage mode and where it comes from (`--storage-mode`, `STRATA_STORAGE_MODE`, the
/// config file's path, or `default`).
pub fn mode() -> Result<(Mode, String)> {
    if let Some((m, from)) = CHOSEN.get() {
        return Ok((*m, from.to_string()));
    }
    if let Some(v) = std::env::var("STRATA_STORAGE_MODE")
        .ok()
        .filter(|v| !v.is_empty())
    {
        return Ok((
            parse(&v, "STRATA_STORAGE_MODE")?,
            "STRATA_STORAGE_MODE".into(),
        ));
    }
    if let Some((file, v)) = crate::registry::user_config()? {
        match &v["storage-mode"] {
            serde_json::Value::Null => {}
            serde_json::Value::String(s) => {
                let from = format!("{} (storage-mode)", file.display());
                return Ok((parse(s, &from)?, from));
            }
            _ => {
                return Err(Error::Invalid(format!(
                    "{}: storage-mode must be a string (overlay, fuse or auto)",
                    file.display()
                )));
            }
        }
    }
    Ok((Mode::Auto, "default".into()))
}
