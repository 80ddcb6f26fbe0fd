//! The hook's log: each line to the kernel log (when open) and the console, and kept for the
//! record and the tests.

use std::fs;
use std::io::Write;

/// Where log lines go: the kernel log (when open) and the console, with a `strata:` prefix.
#[derive(Debug, Default)]
pub struct Log {
    pub kmsg: Option<fs::File>,
    pub debug: bool,
    /// Every line, for the record and for tests.
    pub lines: Vec<String>,
}

impl Log {
    pub fn say(&mut self, line: impl AsRef<str>) {
        let line = line.as_ref();
        eprintln!("strata: {line}");
        if let Some(kmsg) = &mut self.kmsg {
            to_kmsg(kmsg, line);
        }
        self.lines.push(line.to_owned());
    }

    pub fn debug(&mut self, line: impl AsRef<str>) {
        if self.debug {
            self.say(line);
        }
    }
}

/// The kernel log, when it can be opened.
pub fn open_kmsg() -> Option<fs::File> {
    fs::OpenOptions::new().write(true).open("/dev/kmsg").ok()
}

/// Writes `line` to the kernel log as one record: each write to /dev/kmsg is a record of its
/// own, so the line goes in one write. <5> is KERN_NOTICE: shown by default, not an alarm.
pub fn to_kmsg(kmsg: &mut fs::File, line: &str) {
    let _ = kmsg.write_all(format!("<5>strata: {line}\n").as_bytes());
}
