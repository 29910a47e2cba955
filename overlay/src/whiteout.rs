//! The two encodings of deletions: the OCI layer's and overlayfs' own.
//!
//! OCI image spec, *layer.md*, "Whiteouts": "A whiteout file is an empty file with a special
//! filename that signifies a path should be deleted. A whiteout filename consists of the prefix
//! `.wh.` plus the basename of the path to be deleted." and "An opaque whiteout entry is a file
//! with the name `.wh..wh..opq` indicating that all siblings are hidden in the lower layer."
//!
//! Linux `Documentation/filesystems/overlayfs.rst`, "whiteouts and opaque directories": "A
//! whiteout is created as a character device with 0/0 device number" and "A directory is made
//! opaque by setting the xattr `trusted.overlay.opaque` to `y`." With the `userxattr` mount
//! option the `user.overlay.` namespace is used instead of `trusted.overlay.`.

use std::fmt;
use std::str::FromStr;

/// Prefix of an OCI whiteout file name.
pub const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// Name of the OCI opaque-directory marker.
pub const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// Value of the opaque xattr that marks a directory opaque.
pub const OPAQUE_VALUE: &[u8] = b"y";

/// Which xattr namespace overlayfs reads its metadata from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum XattrNs {
    /// `trusted.overlay.*`: the kernel default, needs CAP_SYS_ADMIN.
    #[default]
    Trusted,
    /// `user.overlay.*`: with the `userxattr` mount option, for user namespaces.
    User,
}

impl XattrNs {
    /// The namespace prefix including the trailing dot, e.g. `trusted.overlay.`.
    pub fn prefix(self) -> &'static [u8] {
        match self {
            XattrNs::Trusted => b"trusted.overlay.",
            XattrNs::User => b"user.overlay.",
        }
    }

    /// The full opaque xattr name.
    pub fn opaque(self) -> &'static std::ffi::CStr {
        match self {
            XattrNs::Trusted => c"trusted.overlay.opaque",
            XattrNs::User => c"user.overlay.opaque",
        }
    }

    /// The full redirect xattr name.
    pub fn redirect(self) -> &'static std::ffi::CStr {
        match self {
            XattrNs::Trusted => c"trusted.overlay.redirect",
            XattrNs::User => c"user.overlay.redirect",
        }
    }

    /// The full metacopy xattr name.
    pub fn metacopy(self) -> &'static std::ffi::CStr {
        match self {
            XattrNs::Trusted => c"trusted.overlay.metacopy",
            XattrNs::User => c"user.overlay.metacopy",
        }
    }

    /// Both namespaces.
    pub const ALL: [XattrNs; 2] = [XattrNs::Trusted, XattrNs::User];
}

impl fmt::Display for XattrNs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            XattrNs::Trusted => "trusted",
            XattrNs::User => "user",
        })
    }
}

impl FromStr for XattrNs {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "trusted" => Ok(XattrNs::Trusted),
            "user" => Ok(XattrNs::User),
            other => Err(crate::Error::Invalid(format!(
                "unknown xattr namespace {other:?}: expected trusted or user"
            ))),
        }
    }
}

/// True when `name` is an overlayfs metadata xattr in either namespace. Such xattrs are never
/// taken from, or written into, a layer tar: a crafted `redirect` or `metacopy` would let an image
/// read files of other layers.
pub fn is_overlay_xattr(name: &[u8]) -> bool {
    XattrNs::ALL.iter().any(|ns| name.starts_with(ns.prefix()))
}

/// What a tar entry's base name means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker<'a> {
    /// An ordinary name.
    Plain,
    /// `.wh..wh..opq`: the parent directory is opaque.
    Opaque,
    /// `.wh.NAME`: NAME is deleted.
    Whiteout(&'a [u8]),
}

/// `.wh.NAME`: the OCI whiteout of `name`.
pub fn wh_name(name: &[u8]) -> Vec<u8> {
    [WHITEOUT_PREFIX, name].concat()
}

/// Classifies a tar entry's (or a `.wh.`-form layer's) base name as the OCI layer spec does.
pub fn classify(base: &[u8]) -> Marker<'_> {
    if base == OPAQUE_MARKER {
        Marker::Opaque
    } else if let Some(rest) = base.strip_prefix(WHITEOUT_PREFIX) {
        Marker::Whiteout(rest)
    } else {
        Marker::Plain
    }
}

/// True for a character device with device number 0:0, overlayfs' whiteout.
pub fn is_whiteout_stat(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_names() {
        assert_eq!(classify(b"foo"), Marker::Plain);
        assert_eq!(classify(b".wh.foo"), Marker::Whiteout(b"foo"));
        assert_eq!(classify(b".wh..wh..opq"), Marker::Opaque);
        assert_eq!(classify(b".whx"), Marker::Plain);
    }

    #[test]
    fn overlay_xattrs() {
        assert!(is_overlay_xattr(b"trusted.overlay.redirect"));
        assert!(is_overlay_xattr(b"user.overlay.metacopy"));
        assert!(!is_overlay_xattr(b"user.overlayx"));
        assert!(!is_overlay_xattr(b"security.capability"));
        assert_eq!("user".parse::<XattrNs>().unwrap(), XattrNs::User);
        assert!("bogus".parse::<XattrNs>().is_err());
    }
}
