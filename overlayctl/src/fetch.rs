//! Downloading a bundle over HTTP(S) into the store, resuming a download an earlier run left
//! unfinished when the server takes range requests, with a progress bar on a terminal.

use std::fs::{self, OpenOptions};
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};

/// Where downloads wait, in the store (not in staging/, which every change clears).
pub const DOWNLOADS: &str = layers_store::layout::Folder::Downloads.name();

/// Whether a bundle argument is a URL rather than a file.
pub fn is_url(text: &str) -> bool {
    text.starts_with("http://") || text.starts_with("https://")
}

/// The file a URL downloads to in a store: named by the URL's hash, so the next run finds it.
pub fn download_path(store: &Path, url: &str) -> PathBuf {
    let hash = blake3::hash(url.as_bytes()).to_hex();
    store
        .join(DOWNLOADS)
        .join(format!("{}.bundle.part", &hash[..16]))
}

/// Downloads `url` to `part`, continuing from what `part` already holds when the server
/// answers a range request with 206, starting over when it answers 200. Fails when the
/// connection ends before the length the server announced; what arrived is kept for the next
/// run.
pub fn fetch(url: &str, part: &Path) -> Result<()> {
    fetch_with(&ureq::agent(), url, &[], part)
}

/// [`fetch`] through `agent`, with more request headers (a registry's authorization).
pub fn fetch_with(
    agent: &ureq::Agent,
    url: &str,
    headers: &[(&str, String)],
    part: &Path,
) -> Result<()> {
    if let Some(dir) = part.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let have = fs::metadata(part).map_or(0, |m| m.len());
    let mut request = agent.get(url);
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    if have > 0 {
        request = request.header("Range", format!("bytes={have}-"));
    }
    let response = match request.call() {
        Ok(response) if response.status().as_u16() == 416 && have > 0 => return Ok(()),
        Ok(response) => response,
        Err(ureq::Error::StatusCode(416)) if have > 0 => return Ok(()),
        Err(e) => bail!("downloading {url}: {e}"),
    };
    let status = response.status().as_u16();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (start, total) = match status {
        206 => {
            // "bytes START-END/TOTAL"
            let range = header("content-range").unwrap_or_default();
            let parsed = range
                .strip_prefix("bytes ")
                .and_then(|r| r.split_once('-'))
                .and_then(|(start, rest)| {
                    let total = rest.split_once('/')?.1;
                    Some((start.parse::<u64>().ok()?, total.parse::<u64>().ok()))
                });
            let Some((start, total)) = parsed else {
                bail!(
                    "downloading {url}: the server sent a partial answer without a usable Content-Range ({range:?})"
                );
            };
            ensure!(
                start == have,
                "downloading {url}: asked to resume at byte {have}, the server sent from {start}"
            );
            (start, total)
        }
        200 => (
            0,
            header("content-length").and_then(|l| l.parse::<u64>().ok()),
        ),
        other => bail!("downloading {url}: the server answered {other}"),
    };
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .append(start > 0)
        .truncate(start == 0)
        .open(part)
        .with_context(|| format!("writing {}", part.display()))?;
    let bar = if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(total.unwrap_or(0));
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{bytes}/{total_bytes} {wide_bar} {bytes_per_sec} {eta}",
        ) {
            bar.set_style(style);
        }
        bar.set_position(start);
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut body = response.into_body().into_reader();
    let mut buf = vec![0u8; 1 << 16];
    let mut got = start;
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                bar.abandon();
                file.flush().ok();
                bail!(
                    "downloading {url}: the connection broke after {got} bytes ({e}); run the command again to resume"
                );
            }
        };
        file.write_all(&buf[..n])
            .with_context(|| format!("writing {}", part.display()))?;
        got += n as u64;
        bar.set_position(got);
    }
    bar.finish_and_clear();
    file.sync_all()
        .with_context(|| format!("writing {}", part.display()))?;
    if let Some(total) = total {
        ensure!(
            got == total,
            "downloading {url}: the connection ended after {got} of {total} bytes; run the command again to resume"
        );
    }
    Ok(())
}
