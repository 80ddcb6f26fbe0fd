//! gzip files sent as their content. A Debian system holds thousands of `gzip -9n` files
//! (changelogs, manuals): an upgrade changes a few lines of one, but its compressed bytes from
//! there on, so neither a diff nor compression finds much in common with the old file. Most are
//! exactly what zlib's deflate at level 9 makes of their content; a bundle sends those as their
//! content (diffed against the old file's content), and the device compresses it again.
//! `bundle create` only does so when compressing again gives back every byte, and the device
//! checks the result against the file's hash like any other.

use std::io::{self, Read, Write};

use flate2::Compression;
use flate2::write::DeflateEncoder;

/// gzip's header as `gzip -9n` writes it: deflate, no name, no time, the best compression, Unix.
const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 2, 3];

/// The content of `file` when compressing it again gives `file` back exactly (and it is at
/// most `limit` bytes).
pub(super) fn content_if_remade(file: &[u8], limit: u64) -> Option<Vec<u8>> {
    if !file.starts_with(&HEADER) {
        return None;
    }
    let mut content = Vec::new();
    flate2::read::GzDecoder::new(file)
        .take(limit + 1)
        .read_to_end(&mut content)
        .ok()?;
    if content.len() as u64 > limit {
        return None;
    }
    let mut again = Remade::new(Vec::with_capacity(file.len()));
    again.write_all(&content).ok()?;
    (again.finish().ok()? == file).then_some(content)
}

/// The content of the gzip file `file`, at most `limit` bytes.
pub(super) fn content(file: impl Read, limit: u64) -> io::Result<Vec<u8>> {
    let mut content = Vec::new();
    flate2::read::GzDecoder::new(file)
        .take(limit + 1)
        .read_to_end(&mut content)?;
    if content.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("its content is larger than {limit} bytes"),
        ));
    }
    Ok(content)
}

/// A writer that gzips what it is given as `gzip -9n` would, into `out`.
pub(super) struct Remade<W: Write> {
    deflate: DeflateEncoder<W>,
    crc: flate2::Crc,
    started: bool,
}

impl<W: Write> Remade<W> {
    pub(super) fn new(out: W) -> Self {
        Self {
            deflate: DeflateEncoder::new(out, Compression::new(9)),
            crc: flate2::Crc::new(),
            started: false,
        }
    }

    fn start(&mut self) -> io::Result<()> {
        if !self.started {
            self.deflate.get_mut().write_all(&HEADER)?;
            self.started = true;
        }
        Ok(())
    }

    /// Ends the stream (its checksum and length) and gives `out` back.
    pub(super) fn finish(mut self) -> io::Result<W> {
        self.start()?;
        let mut out = self.deflate.finish()?;
        out.write_all(&self.crc.sum().to_le_bytes())?;
        out.write_all(&self.crc.amount().to_le_bytes())?;
        Ok(out)
    }
}

impl<W: Write> Write for Remade<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.start()?;
        let n = self.deflate.write(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A changelog as Debian ships it, made by `gzip -9n` (the host's gzip).
    fn gzip_9n(content: &[u8]) -> Option<Vec<u8>> {
        let mut child = std::process::Command::new("gzip")
            .arg("-9n")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .ok()?;
        child.stdin.take()?.write_all(content).ok()?;
        Some(child.wait_with_output().ok()?.stdout)
    }

    #[test]
    fn gzip_9n_files_are_remade_exactly_and_others_are_not() {
        let content: Vec<u8> = (0..300)
            .flat_map(|i| format!("  * Fix bug #{i} in the parser ({}).\n", i * 37).into_bytes())
            .collect();
        let file = gzip_9n(&content).expect("gzip is on every Debian");
        assert_eq!(content_if_remade(&file, 1 << 20), Some(content.clone()));
        let mut remade = Remade::new(Vec::new());
        remade.write_all(&content).unwrap();
        assert_eq!(remade.finish().unwrap(), file);
        // Too large for the limit, another level, a name in the header, bytes after the end.
        assert_eq!(content_if_remade(&file, 100), None);
        let mut fast = flate2::write::GzEncoder::new(Vec::new(), Compression::new(1));
        fast.write_all(&content).unwrap();
        assert_eq!(content_if_remade(&fast.finish().unwrap(), 1 << 20), None);
        let mut named = file.clone();
        named[3] = 8;
        assert_eq!(content_if_remade(&named, 1 << 20), None);
        let mut longer = file.clone();
        longer.push(0);
        assert_eq!(content_if_remade(&longer, 1 << 20), None);
        assert_eq!(super::content(file.as_slice(), 1 << 20).unwrap(), content);
        assert!(super::content(file.as_slice(), 100).is_err());
    }
}
