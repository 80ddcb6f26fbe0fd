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
            // <5> is KERN_NOTICE: shown by default, not an alarm.
            let _ = writeln!(kmsg, "<5>strata: {line}");
        }
        self.lines.push(line.to_owned());
    }

    pub fn debug(&mut self, line: impl AsRef<str>) {
        if self.debug {
            self.say(line);
        }
    }
}
