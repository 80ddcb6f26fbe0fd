//! `overlayctl`: parse the command line, run it, report errors with their whole chain.

use clap::Parser;

/// Warnings always, progress notes with `--verbose`, on stderr with the program's name.
struct StderrLog {
    verbose: bool,
}

impl log::Log for StderrLog {
    fn enabled(&self, meta: &log::Metadata<'_>) -> bool {
        meta.level()
            <= if self.verbose {
                log::Level::Info
            } else {
                log::Level::Warn
            }
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            let level = record.level().as_str().to_lowercase();
            eprintln!("overlayctl: {level}: {}", record.args());
        }
    }

    fn flush(&self) {}
}

fn main() {
    let cli = overlayctl::Cli::parse();
    let logger = Box::leak(Box::new(StderrLog {
        verbose: cli.verbose,
    }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
    if let Err(err) = overlayctl::run(cli, &mut std::io::stdout().lock()) {
        eprintln!("overlayctl: error: {err:#}");
        std::process::exit(1);
    }
}
