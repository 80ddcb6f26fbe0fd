//! `initramfs-hook`: `/init` of a minimal initramfs when run as process 1, else a command line
//! (resolve, boot, mkinitramfs) whose errors are printed with their whole chain.

use clap::Parser;

fn main() {
    if std::process::id() == 1 {
        initramfs_hook::standalone::main();
    }
    let cli = initramfs_hook::Cli::parse();
    match initramfs_hook::run(&cli) {
        Ok(report) => print!("{report}"),
        Err(err) => {
            eprintln!("strata: error: {err:#}");
            std::process::exit(1);
        }
    }
}
