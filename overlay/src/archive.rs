//! A strict, streaming tar reader and a deterministic tar writer.
//!
//! The reader understands ustar, GNU (long names `L`/`K`, old sparse `S`) and PAX (`x`/`g`
//! records, `SCHILY.xattr.*`, GNU sparse formats 0.0, 0.1 and 1.0). PAX records are split by
//! their length prefix, never at newlines, so binary xattr values such as `security.capability`
//! survive. Everything is bounded: header extensions are capped in size, numbers are checked,
//! and every error carries the byte offset in the uncompressed stream.
//!
//! The writer emits ustar headers with PAX extension records only where a value does not fit,
//! with no user or group names and no access or change times, so the same tree always gives the
//! same bytes.

use std::io::{self, Read, Write};

use crate::{Error, Result};

const BLOCK: usize = 512;
/// Largest PAX or GNU long-name extension accepted.
const MAX_EXTENSION: u64 = 1 << 20;
/// Largest number of sparse segments accepted for one file.
const MAX_SPARSE_SEGMENTS: usize = 1 << 16;

/// The type of a tar entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file (possibly sparse).
    File,
    /// A hard link to an earlier entry.
    HardLink,
    /// A symbolic link.
    Symlink,
    /// A character device.
    Char,
    /// A block device.
    Block,
    /// A directory.
    Dir,
    /// A named pipe.
    Fifo,
}

/// One entry's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The path as stored (raw bytes, not normalised).
    pub path: Vec<u8>,
    /// The entry type.
    pub kind: Kind,
    /// Permission bits including setuid, setgid and sticky (`0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Nanoseconds of the modification time.
    pub mtime_nsec: u32,
    /// Logical size of the file's content (the real size for sparse files).
    pub size: u64,
    /// Link target for symlinks and hard links.
    pub link: Vec<u8>,
    /// Device major number.
    pub dev_major: u32,
    /// Device minor number.
    pub dev_minor: u32,
    /// Extended attributes, in archive order.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// For sparse files: the data segments `(offset, length)`; holes lie between them.
    pub sparse: Option<Vec<(u64, u64)>>,
}

impl Entry {
    /// A new entry with everything zero.
    pub fn new(path: impl Into<Vec<u8>>, kind: Kind) -> Self {
        Entry {
            path: path.into(),
            kind,
            mode: 0,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            size: 0,
            link: Vec::new(),
            dev_major: 0,
            dev_minor: 0,
            xattrs: Vec::new(),
            sparse: None,
        }
    }
}

/// Extension values gathered from `x`, `g`, `L` and `K` entries for the next entry.
#[derive(Default, Clone)]
struct Ext {
    path: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
    size: Option<u64>,
    uid: Option<u32>,
    gid: Option<u32>,
    mtime: Option<(i64, u32)>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    sparse_name: Option<Vec<u8>>,
    sparse_realsize: Option<u64>,
    sparse_major: Option<u64>,
    sparse_map: Vec<u64>,
    sparse_pending_offset: Option<u64>,
}

/// A streaming tar reader.
pub struct Reader<R> {
    inner: R,
    offset: u64,
    data_left: u64,
    pad_left: u64,
    global: Ext,
    done: bool,
}

impl<R: Read> Reader<R> {
    /// A reader over an uncompressed tar stream.
    pub fn new(inner: R) -> Self {
        Reader {
            inner,
            offset: 0,
            data_left: 0,
            pad_left: 0,
            global: Ext::default(),
            done: false,
        }
    }

    /// Bytes of the tar stream consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Returns the inner reader (positioned after the end-of-archive marker once `next_entry`
    /// returned `None`).
    pub fn into_inner(self) -> R {
        self.inner
    }

    fn corrupt(&self, reason: impl Into<String>) -> Error {
        Error::Corrupt {
            offset: self.offset,
            reason: reason.into(),
        }
    }

    /// Reads exactly `buf.len()` bytes; `Ok(false)` on a clean end of stream before any byte.
    fn fill(&mut self, buf: &mut [u8], what: &str) -> Result<bool> {
        let mut got = 0;
        while got < buf.len() {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => {
                    return Err(self.corrupt(format!("stream truncated inside {what}")));
                }
                Ok(n) => {
                    got += n;
                    self.offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::Stream(e)),
            }
        }
        Ok(true)
    }

    fn skip(&mut self, mut n: u64, what: &str) -> Result<()> {
        let mut buf = [0u8; 8192];
        while n > 0 {
            let k = n.min(buf.len() as u64) as usize;
            if !self.fill(&mut buf[..k], what)? {
                return Err(self.corrupt(format!("stream truncated inside {what}")));
            }
            n -= k as u64;
        }
        Ok(())
    }

    fn read_extension(&mut self, size: u64, what: &str) -> Result<Vec<u8>> {
        if size > MAX_EXTENSION {
            return Err(self.corrupt(format!("{what} of {size} bytes exceeds {MAX_EXTENSION}")));
        }
        let mut data = vec![0u8; size as usize];
        if !self.fill(&mut data, what)? && size > 0 {
            return Err(self.corrupt(format!("stream truncated inside {what}")));
        }
        self.skip(pad(size), what)?;
        Ok(data)
    }

    /// The next entry, or `None` at the end of the archive. Unread data of the previous entry
    /// is skipped.
    pub fn next_entry(&mut self) -> Result<Option<Entry>> {
        if self.done {
            return Ok(None);
        }
        let (left, padding) = (self.data_left, self.pad_left);
        self.skip(left + padding, "entry data")?;
        self.data_left = 0;
        self.pad_left = 0;
        let mut ext = self.global.clone();
        let mut have_ext = false;
        loop {
            let mut hdr = [0u8; BLOCK];
            if !self.fill(&mut hdr, "header")? {
                // A stream that ends on a block boundary without the two zero blocks: accepted,
                // as Go's archive/tar (and so Docker and containerd) do, unless an extension
                // header promised an entry.
                if have_ext {
                    return Err(self.corrupt("stream ends after an extension header"));
                }
                self.done = true;
                return Ok(None);
            }
            if hdr.iter().all(|&b| b == 0) {
                if have_ext {
                    return Err(self.corrupt("end-of-archive marker after an extension header"));
                }
                let mut second = [0u8; BLOCK];
                let _ = self.fill(&mut second, "end-of-archive marker")?;
                self.done = true;
                return Ok(None);
            }
            self.check_sum(&hdr)?;
            let size = self.num(&hdr[124..136], "size")?;
            let typeflag = hdr[156];
            match typeflag {
                b'x' | b'g' => {
                    let data = self.read_extension(size, "PAX header")?;
                    let target = if typeflag == b'g' {
                        &mut self.global
                    } else {
                        &mut ext
                    };
                    let offset = self.offset;
                    parse_pax(&data, target).map_err(|reason| Error::Corrupt { offset, reason })?;
                    if typeflag == b'g' {
                        // A global header applies to this and all following entries.
                        let g = self.global.clone();
                        ext = merge(g, ext);
                    } else {
                        have_ext = true;
                    }
                    continue;
                }
                b'L' | b'K' => {
                    let mut data = self.read_extension(size, "GNU long name")?;
                    while data.last() == Some(&0) {
                        data.pop();
                    }
                    if typeflag == b'L' {
                        ext.path = Some(data)
                    } else {
                        ext.link = Some(data)
                    }
                    have_ext = true;
                    continue;
                }
                _ => {}
            }
            return self.finish_entry(&hdr, typeflag, size, ext).map(Some);
        }
    }

    fn finish_entry(
        &mut self,
        hdr: &[u8; BLOCK],
        typeflag: u8,
        size: u64,
        ext: Ext,
    ) -> Result<Entry> {
        let kind = match typeflag {
            b'0' | 0 | b'7' | b'S' => Kind::File,
            b'1' => Kind::HardLink,
            b'2' => Kind::Symlink,
            b'3' => Kind::Char,
            b'4' => Kind::Block,
            b'5' => Kind::Dir,
            b'6' => Kind::Fifo,
            other => {
                return Err(self.corrupt(format!(
                    "unsupported entry type {:?} for {:?}",
                    char::from(other),
                    String::from_utf8_lossy(cstr_field(&hdr[0..100]))
                )));
            }
        };
        let is_ustar = &hdr[257..263] == b"ustar\0";
        let is_gnu = &hdr[257..265] == b"ustar  \0";
        let mut path = match ext.path {
            Some(p) => p,
            None => {
                let name = cstr_field(&hdr[0..100]);
                let prefix = if is_ustar {
                    cstr_field(&hdr[345..500])
                } else {
                    &[]
                };
                if prefix.is_empty() {
                    name.to_vec()
                } else {
                    [prefix, b"/", name].concat()
                }
            }
        };
        let link = ext
            .link
            .unwrap_or_else(|| cstr_field(&hdr[157..257]).to_vec());
        let mode = self.num(&hdr[100..108], "mode")? as u32 & 0o7777;
        let uid = match ext.uid {
            Some(u) => u,
            None => self.id(&hdr[108..116], "uid")?,
        };
        let gid = match ext.gid {
            Some(g) => g,
            None => self.id(&hdr[116..124], "gid")?,
        };
        let (mtime, mtime_nsec) = match ext.mtime {
            Some(t) => t,
            None => (self.signed(&hdr[136..148], "mtime")?, 0),
        };
        let mut stored = ext.size.unwrap_or(size);
        let (dev_major, dev_minor) = if matches!(kind, Kind::Char | Kind::Block) {
            (
                self.id(&hdr[329..337], "devmajor")?,
                self.id(&hdr[337..345], "devminor")?,
            )
        } else {
            (0, 0)
        };
        let mut logical = stored;
        let mut sparse = None;
        if typeflag == b'S' {
            if !is_gnu {
                return Err(self.corrupt("GNU sparse entry without GNU magic"));
            }
            let mut segs = Vec::new();
            self.gnu_sparse_entries(&hdr[386..482], &mut segs)?;
            let mut extended = hdr[482] != 0;
            while extended {
                let mut blk = [0u8; BLOCK];
                if !self.fill(&mut blk, "GNU sparse header")? {
                    return Err(self.corrupt("stream truncated inside GNU sparse header"));
                }
                self.gnu_sparse_entries(&blk[..504], &mut segs)?;
                extended = blk[504] != 0;
            }
            logical = self.num(&hdr[483..495], "sparse real size")?;
            sparse = Some(segs);
        } else if let Some(major) = ext.sparse_major.or(if ext.sparse_map.is_empty() {
            None
        } else {
            Some(0)
        }) {
            if let Some(name) = ext.sparse_name.clone() {
                path = name;
            }
            logical = ext
                .sparse_realsize
                .ok_or_else(|| self.corrupt("PAX sparse file without real size"))?;
            if major == 1 {
                let (segs, used) = self.sparse_v1_map(stored)?;
                stored -= used;
                sparse = Some(segs);
            } else {
                if ext.sparse_map.len() % 2 != 0 {
                    return Err(self.corrupt("PAX sparse map has an odd number of values"));
                }
                sparse = Some(ext.sparse_map.chunks(2).map(|c| (c[0], c[1])).collect());
            }
            if kind != Kind::File {
                return Err(self.corrupt("sparse map on an entry that is not a regular file"));
            }
        }
        if let Some(segs) = &sparse {
            let mut end = 0u64;
            let mut total = 0u64;
            for &(off, len) in segs {
                let seg_end = off
                    .checked_add(len)
                    .ok_or_else(|| self.corrupt("sparse segment overflows"))?;
                if off < end || seg_end > logical {
                    return Err(self.corrupt("sparse segments overlap or exceed the real size"));
                }
                end = seg_end;
                total += len;
            }
            if total != stored {
                return Err(self.corrupt(format!(
                    "sparse segments hold {total} bytes but the entry stores {stored}"
                )));
            }
        }
        // Only regular files carry data; other types' sizes are skipped, as tar does for hard
        // links with content.
        self.data_left = stored;
        // A 1.0 sparse map is consumed in whole blocks, so padding follows the remaining data.
        self.pad_left = pad(stored);
        let size = if kind == Kind::File { logical } else { 0 };
        Ok(Entry {
            path,
            kind,
            mode,
            uid,
            gid,
            mtime,
            mtime_nsec,
            size,
            link,
            dev_major,
            dev_minor,
            xattrs: ext.xattrs,
            sparse,
        })
    }

    fn gnu_sparse_entries(&self, area: &[u8], segs: &mut Vec<(u64, u64)>) -> Result<()> {
        for chunk in area.chunks_exact(24) {
            if chunk[0] == 0 {
                break;
            }
            let off = self.num(&chunk[0..12], "sparse offset")?;
            let len = self.num(&chunk[12..24], "sparse length")?;
            segs.push((off, len));
            if segs.len() > MAX_SPARSE_SEGMENTS {
                return Err(self.corrupt("too many sparse segments"));
            }
        }
        Ok(())
    }

    /// Reads the map at the start of a PAX 1.0 sparse file's data; returns it and the bytes used.
    fn sparse_v1_map(&mut self, stored: u64) -> Result<(Vec<(u64, u64)>, u64)> {
        let mut buf = Vec::new();
        let mut values = Vec::new();
        let mut count: Option<u64> = None;
        let mut used = 0u64;
        let mut line = Vec::new();
        loop {
            if used + BLOCK as u64 > stored {
                return Err(self.corrupt("PAX 1.0 sparse map runs past the entry"));
            }
            let mut blk = [0u8; BLOCK];
            if !self.fill(&mut blk, "sparse map")? {
                return Err(self.corrupt("stream truncated inside sparse map"));
            }
            used += BLOCK as u64;
            buf.extend_from_slice(&blk);
            for &b in &blk {
                if b == b'\n' {
                    let s = std::str::from_utf8(&line)
                        .ok()
                        .and_then(|s| s.parse::<u64>().ok());
                    let v = s.ok_or_else(|| self.corrupt("bad number in sparse map"))?;
                    line.clear();
                    match count {
                        None => {
                            if v as usize > MAX_SPARSE_SEGMENTS {
                                return Err(self.corrupt("too many sparse segments"));
                            }
                            count = Some(v);
                        }
                        Some(_) => values.push(v),
                    }
                    if count.is_some_and(|c| values.len() as u64 == c * 2) {
                        let segs = values.chunks(2).map(|c| (c[0], c[1])).collect();
                        return Ok((segs, used));
                    }
                } else if line.len() > 20 {
                    return Err(self.corrupt("bad number in sparse map"));
                } else {
                    line.push(b);
                }
            }
        }
    }

    fn check_sum(&self, hdr: &[u8; BLOCK]) -> Result<()> {
        let stored = self.num(&hdr[148..156], "checksum")?;
        let mut unsigned: u64 = 0;
        let mut signed: i64 = 0;
        for (i, &b) in hdr.iter().enumerate() {
            let b = if (148..156).contains(&i) { b' ' } else { b };
            unsigned += b as u64;
            signed += b as i8 as i64;
        }
        if stored != unsigned && stored as i64 != signed {
            return Err(self.corrupt(format!(
                "header checksum mismatch (stored {stored:o}, computed {unsigned:o}): not a tar stream or corrupt"
            )));
        }
        Ok(())
    }

    fn num(&self, field: &[u8], what: &str) -> Result<u64> {
        parse_number(field).ok_or_else(|| self.corrupt(format!("invalid {what} field")))
    }

    fn id(&self, field: &[u8], what: &str) -> Result<u32> {
        let v = self.num(field, what)?;
        u32::try_from(v).map_err(|_| self.corrupt(format!("{what} {v} out of range")))
    }

    fn signed(&self, field: &[u8], what: &str) -> Result<i64> {
        if field[0] == 0xff {
            // base-256, negative: two's complement over the field.
            let mut v: i64 = -1;
            for &b in &field[1..] {
                v = (v << 8) | b as i64;
            }
            return Ok(v);
        }
        let v = self.num(field, what)?;
        i64::try_from(v).map_err(|_| self.corrupt(format!("{what} out of range")))
    }

    /// A reader of the current entry's data (the stored bytes; for sparse files, the segments
    /// back to back).
    pub fn data(&mut self) -> Data<'_, R> {
        Data { reader: self }
    }
}

/// Reads the data of the current entry.
pub struct Data<'a, R> {
    reader: &'a mut Reader<R>,
}

impl<R: Read> Read for Data<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let r = &mut *self.reader;
        if r.data_left == 0 {
            return Ok(0);
        }
        let k = buf.len().min(r.data_left as usize);
        let n = r.inner.read(&mut buf[..k])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("stream truncated inside entry data at byte {}", r.offset),
            ));
        }
        r.offset += n as u64;
        r.data_left -= n as u64;
        Ok(n)
    }
}

fn merge(global: Ext, local: Ext) -> Ext {
    Ext {
        path: local.path.or(global.path),
        link: local.link.or(global.link),
        size: local.size.or(global.size),
        uid: local.uid.or(global.uid),
        gid: local.gid.or(global.gid),
        mtime: local.mtime.or(global.mtime),
        xattrs: if local.xattrs.is_empty() {
            global.xattrs
        } else {
            local.xattrs
        },
        ..local
    }
}

fn pad(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

fn cstr_field(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end]
}

/// Parses an octal (NUL/space padded) or base-256 numeric field.
fn parse_number(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|&b| b & 0x80 != 0) {
        if field[0] == 0xff {
            return None; // negative
        }
        let mut v: u64 = (field[0] & 0x7f) as u64;
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(b as u64)?;
        }
        return Some(v);
    }
    let s: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|&b| b == b' ' || b == 0)
        .take_while(|&b| b != 0 && b != b' ')
        .collect();
    if s.is_empty() {
        return Some(0);
    }
    let mut v: u64 = 0;
    for b in s {
        if !(b'0'..=b'7').contains(&b) {
            return None;
        }
        v = v.checked_mul(8)?.checked_add((b - b'0') as u64)?;
    }
    Some(v)
}

fn parse_decimal(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 20 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

fn parse_time(v: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(v).ok()?;
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    if secs.is_empty()
        || !secs.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let secs: i64 = secs.parse().ok()?;
    let mut nanos: u32 = 0;
    for (i, d) in frac.bytes().take(9).enumerate() {
        nanos += (d - b'0') as u32 * 10u32.pow(8 - i as u32);
    }
    if neg {
        if nanos == 0 {
            Some((-secs, 0))
        } else {
            Some((-secs - 1, 1_000_000_000 - nanos))
        }
    } else {
        Some((secs, nanos))
    }
}

/// Parses PAX records (`"%d %s=%s\n"`, the length counting the whole record) into `ext`.
fn parse_pax(mut data: &[u8], ext: &mut Ext) -> std::result::Result<(), String> {
    while !data.is_empty() {
        if data.iter().all(|&b| b == 0) {
            break; // trailing NUL padding some writers leave
        }
        let sp = data
            .iter()
            .position(|&b| b == b' ')
            .ok_or("PAX record without length")?;
        let len = parse_decimal(&data[..sp]).ok_or("PAX record with a bad length")? as usize;
        if len <= sp + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err("PAX record length does not match its content".into());
        }
        let rec = &data[sp + 1..len - 1];
        let eq = rec
            .iter()
            .position(|&b| b == b'=')
            .ok_or("PAX record without '='")?;
        let (key, value) = (&rec[..eq], &rec[eq + 1..]);
        apply_pax(key, value, ext)?;
        data = &data[len..];
    }
    Ok(())
}

fn apply_pax(key: &[u8], value: &[u8], ext: &mut Ext) -> std::result::Result<(), String> {
    let bad = |what: &str| format!("PAX {what} {:?} is invalid", String::from_utf8_lossy(value));
    match key {
        b"path" => ext.path = Some(value.to_vec()),
        b"linkpath" => ext.link = Some(value.to_vec()),
        b"size" => ext.size = Some(parse_decimal(value).ok_or_else(|| bad("size"))?),
        b"uid" => {
            ext.uid = Some(
                parse_decimal(value)
                    .and_then(|v| u32::try_from(v).ok())
                    .ok_or_else(|| bad("uid"))?,
            )
        }
        b"gid" => {
            ext.gid = Some(
                parse_decimal(value)
                    .and_then(|v| u32::try_from(v).ok())
                    .ok_or_else(|| bad("gid"))?,
            )
        }
        b"mtime" => ext.mtime = Some(parse_time(value).ok_or_else(|| bad("mtime"))?),
        b"GNU.sparse.name" => ext.sparse_name = Some(value.to_vec()),
        b"GNU.sparse.realsize" | b"GNU.sparse.size" => {
            ext.sparse_realsize = Some(parse_decimal(value).ok_or_else(|| bad("sparse size"))?)
        }
        b"GNU.sparse.major" => {
            ext.sparse_major = Some(parse_decimal(value).ok_or_else(|| bad("sparse major"))?)
        }
        b"GNU.sparse.minor" => {}
        b"GNU.sparse.map" => {
            for v in value.split(|&b| b == b',') {
                ext.sparse_map
                    .push(parse_decimal(v).ok_or_else(|| bad("sparse map"))?);
                if ext.sparse_map.len() > 2 * MAX_SPARSE_SEGMENTS {
                    return Err("too many sparse segments".into());
                }
            }
        }
        b"GNU.sparse.offset" => {
            ext.sparse_pending_offset =
                Some(parse_decimal(value).ok_or_else(|| bad("sparse offset"))?)
        }
        b"GNU.sparse.numbytes" => {
            let off = ext
                .sparse_pending_offset
                .take()
                .ok_or("GNU.sparse.numbytes without offset")?;
            ext.sparse_map.push(off);
            ext.sparse_map
                .push(parse_decimal(value).ok_or_else(|| bad("sparse numbytes"))?);
            if ext.sparse_map.len() > 2 * MAX_SPARSE_SEGMENTS {
                return Err("too many sparse segments".into());
            }
        }
        _ => {
            if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                if name.is_empty() {
                    return Err("PAX xattr with an empty name".into());
                }
                ext.xattrs.retain(|(n, _)| n != name);
                ext.xattrs.push((name.to_vec(), value.to_vec()));
            }
            // Other keys (atime, ctime, uname, gname, comment, charset, vendor keys) carry
            // nothing a layer needs.
        }
    }
    Ok(())
}

/// A deterministic tar writer.
pub struct Writer<W: Write> {
    out: W,
}

impl<W: Write> Writer<W> {
    /// A writer over `out`.
    pub fn new(out: W) -> Self {
        Writer { out }
    }

    /// Appends `entry`; for regular files, exactly `entry.size` bytes are copied from `data`.
    pub fn append(&mut self, entry: &Entry, data: &mut dyn Read) -> io::Result<()> {
        let mut pax: Vec<(&[u8], Vec<u8>)> = Vec::new();
        if entry.path.len() > 100 {
            pax.push((b"path", entry.path.clone()));
        }
        if entry.link.len() > 100 {
            pax.push((b"linkpath", entry.link.clone()));
        }
        let size = if entry.kind == Kind::File {
            entry.size
        } else {
            0
        };
        if size > 0o77777777777 {
            pax.push((b"size", size.to_string().into_bytes()));
        }
        if entry.uid > 0o7777777 {
            pax.push((b"uid", entry.uid.to_string().into_bytes()));
        }
        if entry.gid > 0o7777777 {
            pax.push((b"gid", entry.gid.to_string().into_bytes()));
        }
        if entry.mtime_nsec != 0 || entry.mtime < 0 || entry.mtime > 0o77777777777 {
            pax.push((
                b"mtime",
                format_time(entry.mtime, entry.mtime_nsec).into_bytes(),
            ));
        }
        let mut xattr_keys = Vec::new();
        for (name, _) in &entry.xattrs {
            xattr_keys.push([b"SCHILY.xattr.".as_slice(), name].concat());
        }
        for (key, (_, value)) in xattr_keys.iter().zip(&entry.xattrs) {
            pax.push((key.as_slice(), value.clone()));
        }
        if !pax.is_empty() {
            let mut records = Vec::new();
            for (key, value) in &pax {
                let body = key.len() + value.len() + 3;
                let mut len = body + body.to_string().len();
                if len.to_string().len() != body.to_string().len() {
                    len = body + len.to_string().len();
                }
                records.extend_from_slice(len.to_string().as_bytes());
                records.push(b' ');
                records.extend_from_slice(key);
                records.push(b'=');
                records.extend_from_slice(value);
                records.push(b'\n');
            }
            let base = entry
                .path
                .rsplit(|&b| b == b'/')
                .find(|s| !s.is_empty())
                .unwrap_or(b"");
            let mut name = b"PaxHeaders.0/".to_vec();
            name.extend_from_slice(&base[..base.len().min(80)]);
            let mut h = Entry::new(name, Kind::File);
            h.mode = 0o644;
            h.size = records.len() as u64;
            self.header(&h, b'x')?;
            self.out.write_all(&records)?;
            self.out
                .write_all(&[0u8; BLOCK][..pad(records.len() as u64) as usize])?;
        }
        let typeflag = match entry.kind {
            Kind::File => b'0',
            Kind::HardLink => b'1',
            Kind::Symlink => b'2',
            Kind::Char => b'3',
            Kind::Block => b'4',
            Kind::Dir => b'5',
            Kind::Fifo => b'6',
        };
        self.header(entry, typeflag)?;
        if size > 0 {
            let copied = io::copy(&mut data.take(size), &mut self.out)?;
            if copied != size {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "{}: file shrank while being read ({copied} of {size} bytes)",
                        String::from_utf8_lossy(&entry.path)
                    ),
                ));
            }
            self.out.write_all(&[0u8; BLOCK][..pad(size) as usize])?;
        }
        Ok(())
    }

    fn header(&mut self, e: &Entry, typeflag: u8) -> io::Result<()> {
        let mut h = [0u8; BLOCK];
        let trunc = |f: &mut [u8], v: &[u8]| {
            let n = v.len().min(f.len());
            f[..n].copy_from_slice(&v[..n]);
        };
        trunc(&mut h[0..100], &e.path);
        octal(&mut h[100..108], e.mode as u64);
        octal(&mut h[108..116], (e.uid as u64).min(0o7777777));
        octal(&mut h[116..124], (e.gid as u64).min(0o7777777));
        let size = if typeflag == b'0' || typeflag == b'x' {
            e.size
        } else {
            0
        };
        octal(&mut h[124..136], size.min(0o77777777777));
        octal(&mut h[136..148], e.mtime.clamp(0, 0o77777777777) as u64);
        h[156] = typeflag;
        trunc(&mut h[157..257], &e.link);
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        if matches!(e.kind, Kind::Char | Kind::Block) {
            octal(&mut h[329..337], e.dev_major as u64);
            octal(&mut h[337..345], e.dev_minor as u64);
        }
        h[148..156].fill(b' ');
        let sum: u64 = h.iter().map(|&b| b as u64).sum();
        octal(&mut h[148..155], sum);
        h[155] = b' ';
        self.out.write_all(&h)
    }

    /// Writes the end-of-archive marker and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.out.write_all(&[0u8; BLOCK * 2])?;
        Ok(self.out)
    }
}

fn octal(field: &mut [u8], v: u64) {
    let digits = field.len() - 1;
    let s = format!("{v:0digits$o}");
    field[..digits].copy_from_slice(&s.as_bytes()[s.len() - digits..]);
    field[digits] = 0;
}

fn format_time(sec: i64, nsec: u32) -> String {
    if nsec == 0 {
        return sec.to_string();
    }
    let (s, n) = if sec < 0 {
        (sec + 1, 1_000_000_000 - nsec)
    } else {
        (sec, nsec)
    };
    let frac = format!("{n:09}");
    let frac = frac.trim_end_matches('0');
    if sec < 0 && s == 0 {
        format!("-0.{frac}")
    } else {
        format!("{s}.{frac}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(entries: &[(Entry, Vec<u8>)]) -> Vec<(Entry, Vec<u8>)> {
        let mut w = Writer::new(Vec::new());
        for (e, d) in entries {
            w.append(e, &mut &d[..]).unwrap();
        }
        let bytes = w.finish().unwrap();
        let mut r = Reader::new(&bytes[..]);
        let mut out = Vec::new();
        while let Some(e) = r.next_entry().unwrap() {
            let mut d = Vec::new();
            r.data().read_to_end(&mut d).unwrap();
            out.push((e, d));
        }
        out
    }

    #[test]
    fn writer_reader_round_trip_with_binary_xattrs_and_long_names() {
        let mut f = Entry::new("a/".repeat(80) + "file", Kind::File);
        f.mode = 0o4755;
        f.uid = 70000;
        f.gid = 3_000_000;
        f.mtime = 1_700_000_000;
        f.mtime_nsec = 123_456_789;
        f.size = 3;
        f.xattrs.push((
            b"security.capability".to_vec(),
            b"\x01\x00\n\x00 = \n\x02".to_vec(),
        ));
        let mut l = Entry::new("link", Kind::Symlink);
        l.link = "t/".repeat(100).into_bytes();
        let mut d = Entry::new("dev", Kind::Char);
        d.dev_major = 1;
        d.dev_minor = 3;
        let got = roundtrip(&[
            (f.clone(), b"abc".to_vec()),
            (l.clone(), vec![]),
            (d.clone(), vec![]),
        ]);
        assert_eq!(got[0].0, f);
        assert_eq!(got[0].1, b"abc");
        assert_eq!(got[1].0, l);
        assert_eq!(got[2].0, d);
    }

    #[test]
    fn negative_and_fractional_times() {
        assert_eq!(parse_time(b"-1.5"), Some((-2, 500_000_000)));
        assert_eq!(parse_time(b"12.000000001"), Some((12, 1)));
        assert_eq!(parse_time(b"abc"), None);
        assert_eq!(format_time(-2, 500_000_000), "-1.5");
        let mut e = Entry::new("t", Kind::Dir);
        e.mtime = -2;
        e.mtime_nsec = 500_000_000;
        assert_eq!(roundtrip(&[(e.clone(), vec![])])[0].0, e);
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_number(b"0000644\0"), Some(0o644));
        assert_eq!(parse_number(b"  644 \0"), Some(0o644));
        assert_eq!(parse_number(&[0x80, 0, 0, 1, 0]), Some(256));
        assert_eq!(parse_number(b"0009"), None);
    }

    #[test]
    fn rejects_garbage_and_truncation() {
        let junk = vec![b'x'; 1024];
        let err = Reader::new(&junk[..]).next_entry().unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
        let mut w = Writer::new(Vec::new());
        let mut f = Entry::new("f", Kind::File);
        f.size = 1000;
        w.append(&f, &mut &vec![7u8; 1000][..]).unwrap();
        let bytes = w.finish().unwrap();
        let cut = &bytes[..700];
        let mut r = Reader::new(cut);
        r.next_entry().unwrap().unwrap();
        let mut sink = Vec::new();
        assert!(r.data().read_to_end(&mut sink).is_err());
    }

    #[test]
    fn pax_length_mismatch_is_corrupt() {
        let mut ext = Ext::default();
        assert!(parse_pax(b"30 path=x\n", &mut ext).is_err());
        assert!(parse_pax(b"11 path=x\n", &mut ext).is_err());
        parse_pax(b"10 path=x\n", &mut ext).unwrap();
        assert_eq!(ext.path.as_deref(), Some(&b"x"[..]));
    }
}
