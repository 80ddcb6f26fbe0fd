//! The hook's log: each line to the kernel log (when open) and the console, and kept for the
//! record and the tests.

use std::fs;
use std::io::Write;

/// Where log lines go: the kernel log (when open) and the console, with a `strata:` prefix.
#[derive(Debug, Default)]
pub struct Log {
    /// Whether lines go to the kernel log too.
    pub kmsg: bool,
    pub debug: bool,
    /// Every line, for the record and for tests.
    pub lines: Vec<String>,
}

impl Log {
    pub fn say(&mut self, line: impl AsRef<str>) {
        let line = line.as_ref();
        eprintln!("strata: {line}");
        if self.kmsg {
            to_kmsg(line);
        }
        self.lines.push(line.to_owned());
    }

    pub fn debug(&mut self, line: impl AsRef<str>) {
        if self.debug {
            self.say(line);
        }
    }
}

/// The longest line the kernel log takes in one write (it refuses longer ones), less room for
/// the prefix.
const KMSG_LINE_MAX: usize = 900;

/// Writes `line` to the kernel log as one record (each write to /dev/kmsg is a record of its
/// own), cut to what one record holds. /dev/kmsg is opened for each line: the kernel limits
/// each open file to ten lines in five seconds, and a boot says more. <5> is KERN_NOTICE: shown
/// by default, not an alarm.
pub fn to_kmsg(line: &str) {
    let mut end = line.len().min(KMSG_LINE_MAX);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    if let Ok(mut kmsg) = fs::OpenOptions::new().write(true).open("/dev/kmsg") {
        let _ = kmsg.write_all(format!("<5>strata: {}\n", &line[..end]).as_bytes());
    }
}
