//! `initramfs-hook`: parse the command line, run it, report errors with their whole chain.

use clap::Parser;

fn main() {
    let cli = initramfs_hook::Cli::parse();
    match initramfs_hook::run(&cli) {
        Ok(report) => print!("{report}"),
        Err(err) => {
            eprintln!("strata: error: {err:#}");
            std::process::exit(1);
        }
    }
}
