//! Binary diffs in three streams, as bsdiff makes them: controls, the bytes added to the old
//! file's, and new bytes. Apart, each stream compresses well with the same stream of other
//! files (the added bytes are mostly zeros where a rebuilt program moved its addresses), so a
//! bundle keeps them in three regions of a part.
//!
//! A control is three LEB128 numbers: how many bytes to add (old + diff, byte by byte, from the
//! old file's position), how many new bytes to copy, and how far to move in the old file
//! afterwards (zigzag-signed).

use std::io::{self, Write};

use anyhow::{Result, bail, ensure};

/// One file's diff against its basis.
#[derive(Debug, Default, Clone, PartialEq)]
pub(super) struct Diff {
    pub controls: Vec<u8>,
    pub diff: Vec<u8>,
    pub extra: Vec<u8>,
}

impl Diff {
    /// bsdiff's diff from `old` to `new`, its streams apart.
    pub(super) fn make(old: &[u8], new: &[u8]) -> io::Result<Self> {
        let mut raw = Vec::new();
        bsdiff::diff(old, new, &mut raw)?;
        let mut out = Self::default();
        let mut at = 0;
        // bsdiff's own layout: 24 bytes of control (three sign-magnitude i64), then the added
        // bytes, then the new ones.
        let word = |at: usize| -> io::Result<i64> {
            let bytes: [u8; 8] = raw
                .get(at..at + 8)
                .and_then(|b| b.try_into().ok())
                .ok_or(io::ErrorKind::UnexpectedEof)?;
            let y = i64::from_le_bytes(bytes);
            Ok(if y >= 0 { y } else { -(y & i64::MAX) })
        };
        while at < raw.len() {
            let (add, copy, seek) = (word(at)?, word(at + 8)?, word(at + 16)?);
            let (add, copy) = (add as usize, copy as usize);
            at += 24;
            let bytes = |from: usize, len: usize| {
                raw.get(from..from + len)
                    .ok_or(io::Error::from(io::ErrorKind::UnexpectedEof))
            };
            out.diff.extend_from_slice(bytes(at, add)?);
            out.extra.extend_from_slice(bytes(at + add, copy)?);
            at += add + copy;
            put(&mut out.controls, add as u64);
            put(&mut out.controls, copy as u64);
            put(&mut out.controls, ((seek << 1) ^ (seek >> 63)) as u64);
        }
        Ok(out)
    }
}

fn put(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push(n as u8 | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn take(from: &mut &[u8]) -> Result<u64> {
    let mut n = 0u64;
    for shift in (0..64).step_by(7) {
        let Some((&byte, rest)) = from.split_first() else {
            bail!("a control ends early");
        };
        *from = rest;
        n |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(n);
        }
    }
    bail!("a control number is too long")
}

/// Writes the file `controls` make from `old`, `diff` and `extra` to `out`, at most `limit`
/// bytes; returns how many it wrote. Every count is checked against the streams and the old
/// file: a damaged diff is an error, never a read outside them.
pub(super) fn apply(
    old: &[u8],
    mut controls: &[u8],
    diff: &[u8],
    extra: &[u8],
    limit: u64,
    out: &mut dyn Write,
) -> Result<u64> {
    let (mut diff, mut extra) = (diff, extra);
    let mut pos = 0u64;
    let mut written = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    while !controls.is_empty() {
        let add = take(&mut controls)?;
        let copy = take(&mut controls)?;
        let seek = take(&mut controls)?;
        let seek = (seek >> 1) as i64 ^ -((seek & 1) as i64);
        ensure!(
            written.saturating_add(add).saturating_add(copy) <= limit,
            "the diff makes more than the {limit} bytes expected"
        );
        ensure!(
            add <= diff.len() as u64 && copy <= extra.len() as u64,
            "the diff needs more bytes than its part holds"
        );
        ensure!(
            pos.checked_add(add)
                .is_some_and(|end| end <= old.len() as u64),
            "the diff reads past the end of the file it applies to"
        );
        let (at, n) = (pos as usize, add as usize);
        for (o, d) in old[at..at + n]
            .chunks(buf.len())
            .zip(diff[..n].chunks(buf.len()))
        {
            for ((b, o), d) in buf.iter_mut().zip(o).zip(d) {
                *b = o.wrapping_add(*d);
            }
            out.write_all(&buf[..o.len()])?;
        }
        diff = &diff[n..];
        pos += add;
        out.write_all(&extra[..copy as usize])?;
        extra = &extra[copy as usize..];
        written += add + copy;
        pos = pos
            .checked_add_signed(seek)
            .filter(|p| *p <= old.len() as u64)
            .ok_or_else(|| anyhow::anyhow!("the diff moves outside the file it applies to"))?;
    }
    Ok(written)
}

/// How many diff and new bytes `controls` use: where the next file's start.
pub(super) fn lengths(mut controls: &[u8]) -> Result<(u64, u64)> {
    let (mut diff, mut extra) = (0u64, 0u64);
    while !controls.is_empty() {
        diff = diff.saturating_add(take(&mut controls)?);
        extra = extra.saturating_add(take(&mut controls)?);
        take(&mut controls)?;
    }
    Ok((diff, extra))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(old: &[u8], new: &[u8]) -> Diff {
        let made = Diff::make(old, new).unwrap();
        let mut out = Vec::new();
        let n = apply(
            old,
            &made.controls,
            &made.diff,
            &made.extra,
            new.len() as u64,
            &mut out,
        )
        .unwrap();
        assert_eq!(out, new);
        assert_eq!(n, new.len() as u64);
        assert_eq!(
            lengths(&made.controls).unwrap(),
            (made.diff.len() as u64, made.extra.len() as u64)
        );
        made
    }

    #[test]
    fn diffs_rebuild_the_new_file() {
        // A program whose addresses moved: every 4-byte word a little larger.
        let old: Vec<u8> = (0..20_000u32).flat_map(|i| (i * 7).to_le_bytes()).collect();
        let new: Vec<u8> = (0..20_000u32)
            .flat_map(|i| (i * 7 + 16).to_le_bytes())
            .collect();
        let made = round_trip(&old, &new);
        let zeros = made.diff.iter().filter(|b| **b == 0).count();
        assert!(zeros > made.diff.len() / 2, "mostly zeros to add");
        round_trip(b"", b"all new");
        round_trip(b"all gone", b"");
        round_trip(b"same", b"same");
    }

    #[test]
    fn damaged_diffs_are_errors_not_reads_outside() {
        let old = b"0123456789".repeat(100);
        let mut new = old.clone();
        new[500] = b'x';
        new.extend(b"tail");
        let made = Diff::make(&old, &new).unwrap();
        let run = |controls: &[u8], diff: &[u8], extra: &[u8], limit: u64| {
            apply(&old, controls, diff, extra, limit, &mut Vec::new())
        };
        let e = run(&made.controls, &made.diff, &made.extra, 10).unwrap_err();
        assert!(e.to_string().contains("more than the 10 bytes"), "{e}");
        let e = run(&made.controls, &made.diff[..3], &made.extra, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("more bytes than its part"), "{e}");
        // An add past the old file's end, a seek before its start, a control cut short.
        let mut far = Vec::new();
        put(&mut far, 2000);
        put(&mut far, 0);
        put(&mut far, 0);
        let e = run(&far, &[0; 2000], b"", 1 << 20).unwrap_err();
        assert!(e.to_string().contains("past the end"), "{e}");
        let mut back = Vec::new();
        put(&mut back, 0);
        put(&mut back, 0);
        put(&mut back, 3); // -2
        let e = run(&back, b"", b"", 1 << 20).unwrap_err();
        assert!(e.to_string().contains("moves outside"), "{e}");
        let e = run(&[0x80], b"", b"", 1 << 20).unwrap_err();
        assert!(e.to_string().contains("ends early"), "{e}");
        let e = run(&[0xff; 11], b"", b"", 1 << 20).unwrap_err();
        assert!(e.to_string().contains("too long"), "{e}");
    }
}
