//! `overlayctl`: parse the command line, run it, report errors with their whole chain.

use clap::Parser;

fn main() {
    let cli = overlayctl::Cli::parse();
    if let Err(err) = overlayctl::run(cli, &mut std::io::stdout().lock()) {
        eprintln!("overlayctl: error: {err:#}");
        std::process::exit(1);
    }
}
